"""Tokenize a corpus into Megatron-LM's indexed format (P.bin + P.idx), in parallel.

    python tools/preprocess_data.py --input CORPUS --tokenizer DIR --output_prefix P --workers N [--text_key text]

CORPUS is a .jsonl file (one document a line, its text under --text_key), a .parquet
file (a --text_key column), a .txt file (one document), a folder of those (in sorted
order), or a Hugging Face datasets folder (Dataset.save_to_disk's output, its --text_key
column, read memory-mapped). Each document is tokenized without special tokens and ends in EOS, as Megatron's
preprocess_data.py --append-eod writes it; empty documents are skipped, as there. Tokens
are uint16 when the vocabulary has fewer than 65500 entries, else int32. Then train with
`--dataset_path P`.

Resumable: every --checkpoint_seconds what is written is made durable (P.bin.partial,
P.lengths.partial, P.progress.json); run the same command again after a kill or Ctrl-C
and it continues from there, provided the input files, tokenizer and --text_key are
unchanged (else it starts over).
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
from owlore_ds.data.records import DocumentSource  # noqa: E402
from owlore_ds.errors import UserInputError  # noqa: E402
from owlore_ds.data.indexed import IndexedWriter, token_dtype  # noqa: E402
from owlore_ds.data.tokenize import encode_documents  # noqa: E402

BATCH = 256  # documents a worker tokenizes per task: large enough that the pool's overhead is small

_tokenizer = None
_dtype: Optional[type] = None


def _start_worker(tokenizer_dir: str) -> None:
    global _tokenizer, _dtype
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the pool is the parallelism
    from transformers import AutoTokenizer

    _tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    if _tokenizer.eos_token_id is None:
        raise UserInputError(f"--tokenizer {tokenizer_dir}: has no EOS token to end documents with")
    _dtype = token_dtype(len(_tokenizer))


def _encode(texts: list[str]) -> tuple[np.ndarray, list[int], int]:
    """The documents' tokens back to back, their lengths (one array to send back, not one per
    document) and how many input documents they came from (empty ones are skipped)."""
    encoded = [ids for ids in encode_documents(_tokenizer, texts) if ids]
    flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=_dtype)
    return flat, [len(ids) for ids in encoded], len(texts)


def _identity(files: list[str], tokenizer_dir: str, text_key: str) -> dict:
    """What the output is made from, cheap to compute: a resumed run must agree on it."""
    def stamp(path: str) -> list:
        info = os.stat(path)
        return [os.path.abspath(path), info.st_size, info.st_mtime_ns]

    tokenizer = sorted(os.path.join(tokenizer_dir, name) for name in os.listdir(tokenizer_dir)
                       if name.startswith("tokenizer") or name.endswith(".model"))
    return {"inputs": [stamp(p) for p in files], "tokenizer": [stamp(p) for p in tokenizer], "text_key": text_key,
            "dtype": np.dtype(_dtype).name}


def _batches(texts: Iterator[str]) -> Iterator[list[str]]:
    while batch := list(itertools.islice(texts, BATCH)):
        yield batch


def preprocess(input_path: str, tokenizer_dir: str, output_prefix: str, workers: int, text_key: str = "text",
               checkpoint_seconds: float = 30.0) -> tuple[int, int]:
    """Writes output_prefix.bin/.idx, continuing an interrupted run of the same command;
    returns (documents, tokens)."""
    from tqdm import tqdm

    source = DocumentSource(input_path, text_key, "--input")
    _start_worker(tokenizer_dir)  # in this process too: the dtype, and tokenizing when workers == 1
    writer = IndexedWriter(output_prefix, _dtype, identity=_identity(source.files(), tokenizer_dir, text_key))
    read, resumed_tokens = writer.documents_read, writer.tokens
    if read:
        print(f"resuming {output_prefix}: {read} input documents already done "
              f"({len(writer.lengths)} written, {writer.tokens} tokens)", flush=True)
    start = last_checkpoint = time.perf_counter()
    pool = None
    try:
        batches = _batches(source.texts(read))
        if workers > 1:
            import multiprocessing

            # fork: the workers inherit the imported transformers rather than spend seconds importing it.
            pool = multiprocessing.get_context("fork").Pool(workers, _start_worker, (tokenizer_dir,))
            # imap keeps the input order, so the index order is the corpus order whatever the worker count.
            encoded = pool.imap(_encode, batches)
        else:
            encoded = map(_encode, batches)
        with tqdm(unit="tok", unit_scale=True, desc="tokenize", dynamic_ncols=True, initial=writer.tokens) as progress:
            for tokens, lengths, texts in encoded:
                writer.add_documents(tokens, lengths)
                read += texts
                progress.update(len(tokens))
                progress.set_postfix(docs=len(writer.lengths))
                if time.perf_counter() - last_checkpoint >= checkpoint_seconds:
                    writer.checkpoint(read)
                    last_checkpoint = time.perf_counter()
        writer.finish()
    except KeyboardInterrupt:
        writer.checkpoint(read)  # what is written is whole documents: keep it for the next run
        print(f"interrupted after {read} input documents; run the same command again to continue", file=sys.stderr)
        raise
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
    seconds = time.perf_counter() - start
    done = writer.tokens - resumed_tokens
    print(f"wrote {output_prefix}.bin and {output_prefix}.idx: {len(writer.lengths)} documents, {writer.tokens} tokens "
          f"({np.dtype(_dtype).name}) in {seconds:.1f} s, {done / max(seconds, 1e-9):,.0f} tokens/s")
    return len(writer.lengths), writer.tokens


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help=".jsonl, .parquet or .txt file, a folder of them, or a datasets folder (save_to_disk)")
    parser.add_argument("--tokenizer", required=True, help="folder of a Hugging Face tokenizer (a model folder will do)")
    parser.add_argument("--output_prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    parser.add_argument("--text_key", default="text", help="the text's key in .jsonl rows / column in .parquet")
    parser.add_argument("--checkpoint_seconds", type=float, default=30.0,
                        help="how often progress is made durable for a resumed run (0: after every batch)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        raise UserInputError(f"--workers must be at least 1, got {args.workers}")
    if args.checkpoint_seconds < 0:
        raise UserInputError(f"--checkpoint_seconds must be >= 0, got {args.checkpoint_seconds}")
    if not os.path.isdir(args.tokenizer):
        raise UserInputError(f"--tokenizer {args.tokenizer}: no such folder")
    preprocess(args.input, args.tokenizer, args.output_prefix, args.workers, args.text_key, args.checkpoint_seconds)


if __name__ == "__main__":
    run_main(main)
