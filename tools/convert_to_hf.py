"""Turn a training checkpoint (any ZeRO stage, any world size) into a Hugging Face model folder.

    python tools/convert_to_hf.py OUT/checkpoint-N DEST [--dtype bf16|fp32] [--overwrite] [--max_shard_size 5GB]

DEST then loads with AutoModelForCausalLM.from_pretrained(DEST, local_files_only=True)
and serves lm-eval-harness, vLLM or transformers. The default dtype is the run's.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from owlore_ds.cli import run_main  # noqa: E402


def main() -> None:
    from owlore_ds.distributed import select_accelerator

    select_accelerator()
    from owlore_ds.export import export_checkpoint, parse_size

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="an OUT/checkpoint-N folder")
    parser.add_argument("destination", help="the Hugging Face folder to write")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: the run's precision")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty DEST")
    parser.add_argument("--max_shard_size", default="5GB",
                        help="largest safetensors file, as save_pretrained (default 5GB); larger models get "
                             "model-0000k-of-0000n.safetensors and an index")
    args = parser.parse_args()
    path = export_checkpoint(args.checkpoint, args.destination, args.dtype, args.overwrite,
                             max_shard_bytes=parse_size(args.max_shard_size))
    print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
