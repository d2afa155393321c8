"""Tokenize a corpus into Megatron-LM's indexed format (P.bin + P.idx), in parallel.

    python tools/preprocess_data.py --input CORPUS --tokenizer DIR --output_prefix P --workers N [--text_key text]

CORPUS is a .jsonl file (one document a line, its text under --text_key), a .parquet
file (a --text_key column), a .txt file (one document), or a folder of those (in sorted
order). Each document is tokenized without special tokens and ends in EOS, as Megatron's
preprocess_data.py --append-eod writes it; empty documents are skipped, as there. Tokens
are uint16 when the vocabulary has fewer than 65500 entries, else int32. Then train with
`--dataset_path P`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from typing import Iterator, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from owlore_ds.cli import run_main  # noqa: E402
from owlore_ds.data import data_files, iter_jsonl  # noqa: E402
from owlore_ds.errors import UserInputError  # noqa: E402
from owlore_ds.indexed import IndexedWriter, token_dtype  # noqa: E402

SUFFIXES = (".jsonl", ".parquet", ".txt")
BATCH = 256  # documents a worker tokenizes per task: large enough that the pool's overhead is small

_tokenizer = None
_dtype: Optional[type] = None


def input_files(path: str) -> list[str]:
    return data_files(path, "--input", SUFFIXES)


def documents(files: list[str], text_key: str) -> Iterator[str]:
    """Every document's text, streamed (a file is never read whole, except a .txt, which is one document)."""
    for path in files:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8", errors="replace") as fh:
                yield fh.read()
        elif path.endswith(".jsonl"):
            for lineno, row in iter_jsonl(path):
                if not isinstance(row.get(text_key), str):
                    raise UserInputError(f"{path}: line {lineno} has no string {text_key!r} (--text_key); "
                                         f"found {sorted(row)}")
                yield row[text_key]
        else:
            import pyarrow.parquet as pq

            table = pq.ParquetFile(path)
            if text_key not in table.schema_arrow.names:
                raise UserInputError(f"{path}: no column {text_key!r} (--text_key); found {table.schema_arrow.names}")
            for batch in table.iter_batches(columns=[text_key], batch_size=1024):
                yield from (text or "" for text in batch.column(0).to_pylist())


def _start_worker(tokenizer_dir: str) -> None:
    global _tokenizer, _dtype
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the pool is the parallelism
    from transformers import AutoTokenizer

    _tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    if _tokenizer.eos_token_id is None:
        raise UserInputError(f"--tokenizer {tokenizer_dir}: has no EOS token to end documents with")
    _dtype = token_dtype(len(_tokenizer))


def _encode(texts: list[str]) -> tuple[np.ndarray, list[int]]:
    """The documents' tokens back to back, and their lengths: one array to send back, not one per document."""
    encoded = [ids + [_tokenizer.eos_token_id] for ids in _tokenizer(texts, add_special_tokens=False)["input_ids"] if ids]
    flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=_dtype)
    return flat, [len(ids) for ids in encoded]


def _batches(texts: Iterator[str]) -> Iterator[list[str]]:
    while batch := list(itertools.islice(texts, BATCH)):
        yield batch


def preprocess(input_path: str, tokenizer_dir: str, output_prefix: str, workers: int, text_key: str = "text") -> tuple[int, int]:
    """Writes output_prefix.bin/.idx; returns (documents, tokens)."""
    from tqdm import tqdm

    files = input_files(input_path)
    _start_worker(tokenizer_dir)  # in this process too: the dtype, and tokenizing when workers == 1
    writer = IndexedWriter(output_prefix, _dtype)
    start = time.perf_counter()
    pool = None
    try:
        batches = _batches(documents(files, text_key))
        if workers > 1:
            import multiprocessing

            # fork: the workers inherit the imported transformers rather than spend seconds importing it.
            pool = multiprocessing.get_context("fork").Pool(workers, _start_worker, (tokenizer_dir,))
            # imap keeps the input order, so the index order is the corpus order whatever the worker count.
            encoded = pool.imap(_encode, batches)
        else:
            encoded = map(_encode, batches)
        with tqdm(unit="tok", unit_scale=True, desc="tokenize", dynamic_ncols=True) as progress:
            for tokens, lengths in encoded:
                writer.add_documents(tokens, lengths)
                progress.update(len(tokens))
                progress.set_postfix(docs=len(writer.lengths))
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
    seconds = time.perf_counter() - start
    print(f"wrote {output_prefix}.bin and {output_prefix}.idx: {len(writer.lengths)} documents, {writer.tokens} tokens "
          f"({np.dtype(_dtype).name}) in {seconds:.1f} s, {writer.tokens / max(seconds, 1e-9):,.0f} tokens/s")
    return len(writer.lengths), writer.tokens


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help=".jsonl, .parquet or .txt file, or a folder of them")
    parser.add_argument("--tokenizer", required=True, help="folder of a Hugging Face tokenizer (a model folder will do)")
    parser.add_argument("--output_prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    parser.add_argument("--text_key", default="text", help="the text's key in .jsonl rows / column in .parquet")
    args = parser.parse_args(argv)
    if args.workers < 1:
        raise UserInputError(f"--workers must be at least 1, got {args.workers}")
    if not os.path.isdir(args.tokenizer):
        raise UserInputError(f"--tokenizer {args.tokenizer}: no such folder")
    preprocess(args.input, args.tokenizer, args.output_prefix, args.workers, args.text_key)


if __name__ == "__main__":
    run_main(main)
