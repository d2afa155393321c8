#!/usr/bin/env python
"""Train a small SentencePiece BPE tokenizer and save it as a Llama tokenizer.

    python tools/train_tokenizer.py --input data/pretrain/train.txt \
        --vocab_size 4096 --output runs/tokenizer

DIR ends up with ``tokenizer.model`` (the SentencePiece model) plus the
files ``save_pretrained`` writes, so both ``LlamaTokenizer.from_pretrained(DIR)``
and ``AutoTokenizer.from_pretrained(DIR, local_files_only=True)`` load it.
Special ids follow Llama: unk=0, bos=1, eos=2, plus pad=3 so batching needs
no added token.  The tokenizer carries a plain-text chat template (see
``CHAT_TEMPLATE``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import sentencepiece as spm

# Renders "<s>### User:\n...\n### Assistant:\n...</s>### User:\n...".  Each
# message only appends text, so a conversation's rendering is a string prefix
# of any longer conversation that starts with it; the generation prompt is
# exactly the header the next assistant message would start with.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '### System:\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '### User:\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '### Assistant:\\n' + message['content'] + eos_token }}"
    "{% else %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


def train_sentencepiece(inputs: list[Path], vocab_size: int, output: Path) -> Path:
    """Train a BPE SentencePiece model into ``output/tokenizer.model``."""
    output.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=",".join(str(p) for p in inputs),
        model_prefix=str(output / "tokenizer"),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,  # no <unk> ever: unseen characters become bytes
        character_coverage=1.0,
        split_digits=True,
        # Keep text byte-exact (verse indentation, double spaces) so decoding
        # gives back what went in.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        # Bounds the time on big inputs; the Shakespeare corpus is ~170k lines.
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        num_threads=2,
        minloglevel=2,
    )
    (output / "tokenizer.vocab").unlink(missing_ok=True)  # not read by anything
    return output / "tokenizer.model"


def save_hf_tokenizer(output: Path, model_max_length: int) -> None:
    """Wrap ``output/tokenizer.model`` as a LlamaTokenizer and save it next to it."""
    from transformers import LlamaTokenizer

    # add_bos_token must be explicit: the converted tokenizer otherwise adds none.
    tokenizer = LlamaTokenizer.from_pretrained(
        str(output),
        add_bos_token=True,
        add_eos_token=False,
        pad_token="<pad>",
        model_max_length=model_max_length,
    )
    if tokenizer.pad_token_id != PAD_ID or tokenizer.bos_token_id != BOS_ID:
        raise RuntimeError(
            f"unexpected special ids: pad={tokenizer.pad_token_id} bos={tokenizer.bos_token_id}"
        )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(output))


def check_round_trip(output: Path, sample: str) -> list[str]:
    """Reload the saved tokenizer the way the trainer will; return sample's pieces."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(output), local_files_only=True)
    ids = tokenizer(sample).input_ids
    if ids[0] != tokenizer.bos_token_id:
        raise RuntimeError("saved tokenizer does not add <s>")
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    if decoded != sample:
        raise RuntimeError(f"round trip changed {sample!r} into {decoded!r}")
    return tokenizer.convert_ids_to_tokens(ids)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a SentencePiece BPE Llama tokenizer.")
    parser.add_argument("--input", type=Path, nargs="+", required=True, help="plain-text file(s)")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--output", type=Path, required=True, help="folder to write")
    parser.add_argument("--model_max_length", type=int, default=2048)
    args = parser.parse_args(argv)

    for path in args.input:
        if not path.is_file():
            sys.exit(f"error: input file not found: {path}")
    # 256 byte pieces + 4 specials are always in the vocabulary.
    if args.vocab_size <= 260:
        sys.exit(f"error: --vocab_size must be above 260, got {args.vocab_size}")

    start = time.perf_counter()
    try:
        train_sentencepiece(args.input, args.vocab_size, args.output)
    except RuntimeError as err:  # e.g. "Vocabulary size is too high" for tiny inputs
        sys.exit(f"error: sentencepiece training on {', '.join(map(str, args.input))} failed: {err}")
    save_hf_tokenizer(args.output, args.model_max_length)

    # A line of running text (not a caps title) says more about the merges.
    sample = next(
        (
            line.strip()
            for line in args.input[0].read_text(encoding="utf-8").splitlines()
            if len(line.split()) >= 5 and not line.isupper()
        ),
        "To be, or not to be, that is the question.",
    )
    pieces = check_round_trip(args.output, sample)
    print(
        f"tokenizer with {args.vocab_size} pieces written to {args.output} "
        f"in {time.perf_counter() - start:.1f}s; {sample!r} -> {len(pieces)} tokens"
    )


if __name__ == "__main__":
    main()
