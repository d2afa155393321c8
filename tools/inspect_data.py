"""Show the first training examples exactly as the trainer sees them, before a long run.

    python tools/inspect_data.py --dataset_path DATA --model_name_or_path MODEL [--block_size N] [--num_examples K]
        [--packing] [--packing_attention document] [--streaming [--text_key text]]

Each example is printed decoded (special tokens included, padding left out) with the
tokens that carry loss wrapped in [[ ]]; then the counts: examples, tokens, loss-bearing
tokens and the share of padding. DATA is anything --dataset_path takes (a file, a folder,
or the prefix of a Megatron indexed dataset); the tokenized cache is the trainer's.
With --packing (or --packing_attention document) a row holds several examples (documents),
each printed on its own after a `~~ next example` line: no token attends across one.
With --streaming (a datasets folder or .jsonl/.parquet/.txt files, as training reads them)
the first windows of the stream are shown, in stream order, and counted.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from owlore_ds.cli import run_main  # noqa: E402


def main(argv: Optional[list[str]] = None) -> None:
    import torch

    from owlore_ds.data import StreamingBatches, dataset_counts, load_training_data, render_example
    from owlore_ds.errors import UserInputError
    from owlore_ds.modeling import check_block_size, load_tokenizer, read_model_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_path", required=True)
    parser.add_argument("--model_name_or_path", required=True, help="model folder (its tokenizer and chat template)")
    parser.add_argument("--block_size", type=int, default=512, help="tokens per example, as given to training")
    parser.add_argument("--num_examples", type=int, default=3)
    parser.add_argument("--cache_dir", default="~/.cache/owlore_ds", help="tokenized-data cache, as given to training")
    parser.add_argument("--packing", action="store_true", help="SFT examples packed several to a row, as given to training")
    parser.add_argument("--packing_attention", default="causal", choices=("causal", "document"),
                        help="indexed data: causal or document, as given to training")
    parser.add_argument("--streaming", action="store_true", help="read the corpus as --streaming training does")
    parser.add_argument("--text_key", default="text", help="with --streaming: the text's column / key")
    args = parser.parse_args(argv)

    config = read_model_config(args.model_name_or_path)
    check_block_size(config, args.block_size, args.model_name_or_path)
    tokenizer = load_tokenizer(args.model_name_or_path)
    if args.streaming:
        if args.num_examples < 1:
            raise UserInputError(f"--num_examples must be at least 1 with --streaming, got {args.num_examples}")
        stream = StreamingBatches(args.dataset_path, args.text_key, tokenizer, args.block_size, config.vocab_size,
                                  args.num_examples, seed=0, shuffle=False, chunk_windows=args.num_examples,
                                  document_attention=args.packing_attention == "document")
        stream.start()
        stream.rows(0)
        data = stream.data  # the first step's windows: the stream's first --num_examples
    else:
        data = load_training_data(args.dataset_path, tokenizer, args.model_name_or_path, args.block_size,
                                  args.cache_dir, config.vocab_size, packing=args.packing,
                                  packing_attention=args.packing_attention)
    shown = min(args.num_examples, len(data))
    batch = data.batch(torch.arange(shown))
    for i in range(shown):
        mask = batch["attention_mask"][i]
        print(f"----- {'row' if 'position_ids' in batch else 'example'} {i} ({int(mask.sum())} tokens, "
              f"{data.target_count(torch.tensor([i]))} with loss, marked [[ ]])")
        starts = [0] if "position_ids" not in batch else (batch["position_ids"][i] == 0).nonzero().flatten().tolist()
        for lo, hi in zip(starts, starts[1:] + [len(mask)]):
            if not mask[lo]:
                break  # the padding at the row's end
            if lo:
                print("~~ next example (no attention across this line)")
            print(render_example(tokenizer, batch["input_ids"][i, lo:hi], batch["labels"][i, lo:hi], mask[lo:hi]))
    counts = dataset_counts(data, args.block_size)
    print(f"----- {counts['examples']} {'rows' if args.packing else 'examples'} of {args.block_size} tokens: "
          f"{counts['tokens']} tokens, "
          f"{counts['loss_tokens']} with loss, padding {100 * counts['padding_share']:.1f}% of the blocks")


if __name__ == "__main__":
    run_main(main)
