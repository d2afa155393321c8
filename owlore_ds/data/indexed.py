"""Megatron-LM's indexed dataset (`P.bin` + `P.idx`), read memory-mapped and written incrementally.

The layout is the one `megatron/core/datasets/indexed_dataset.py` documents and GPT-NeoX
shares, so a corpus preprocessed with those tools trains here without conversion:

    P.idx: b"MMIDIDX\\x00\\x00", version u64 (1), dtype code u8, sequence count u64 (S),
           document count u64 (D), int32 sequence lengths [S], int64 byte pointers into
           P.bin [S], int64 document indices [D] (0, then the end of each document in
           sequences), and in multimodal files int8 modes [S], which are ignored here.
    P.bin: the tokens of every sequence, in the dtype of the code.

All integers are little-endian. Nothing is copied into memory: the arrays are views of
memory maps, so a reader's resident memory does not grow with the corpus.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import tempfile
from array import array
from typing import BinaryIO, Callable, Iterable, Optional

import numpy as np

from owlore_ds.errors import UserInputError

HEADER = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
_PREAMBLE = struct.Struct("<9sQBQQ")  # header, version, dtype code, sequence count, document count


def token_dtype(vocab_size: int) -> type:
    """Megatron's choice: uint16 when every id fits with room to spare, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def write_atomic(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Writes `path` through `write` under a temporary name no other process (on any host sharing
    the folder) can have, then renames it: a reader sees the whole file or none."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as fh:
            write(fh)
        os.chmod(tmp, 0o644)  # mkstemp's 0o600 would keep the other users of shared data out
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def release_pages(*arrays: np.ndarray) -> None:
    """Unmaps the pages of these memory-mapped arrays' files that this process has read.

    A read page of a file mapping counts in the process's resident set until unmapped, so a
    run that reads windows all over a large corpus (and its index and sample order) would
    see its RSS grow with the corpus, though the pages belong to the kernel's page cache.
    MADV_DONTNEED on a read-only shared mapping only drops this process's mappings: the
    pages stay cached, and the next read maps them again."""
    for mapped in arrays:
        base = mapped
        while isinstance(base, np.ndarray):
            base = base.base
        if isinstance(base, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
            base.madvise(mmap.MADV_DONTNEED)


def is_prefix(path: str) -> bool:
    """True when `path` names an indexed dataset: `path.idx` and `path.bin` both exist."""
    return os.path.isfile(f"{path}.idx") and os.path.isfile(f"{path}.bin")


class IndexedDataset:
    """Memory-mapped reader of one `P.bin` + `P.idx` pair; sequence i is `self[i]`."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        idx_path = f"{prefix}.idx"
        size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as fh:
            raw = fh.read(_PREAMBLE.size)
        if len(raw) < _PREAMBLE.size or raw[:9] != HEADER:
            raise UserInputError(f"{idx_path}: not a Megatron indexed dataset (its header is not {HEADER!r})")
        _, version, code, sequences, documents = _PREAMBLE.unpack(raw)
        if version != VERSION:
            raise UserInputError(f"{idx_path}: index version {version}; only version {VERSION} is known")
        if code not in DTYPE_CODES or not np.issubdtype(DTYPE_CODES[code], np.integer):
            raise UserInputError(f"{idx_path}: dtype code {code} is not a token dtype")
        needed = _PREAMBLE.size + sequences * 12 + documents * 8
        if size < needed:
            raise UserInputError(f"{idx_path}: {size} bytes, fewer than the {needed} its counts need (a partial file?)")
        self.dtype = np.dtype(DTYPE_CODES[code])
        self._idx = np.memmap(idx_path, mode="r", dtype=np.uint8)
        offset = _PREAMBLE.size
        self.lengths = np.frombuffer(self._idx, dtype="<i4", count=sequences, offset=offset)
        offset += self.lengths.nbytes
        self.pointers = np.frombuffer(self._idx, dtype="<i8", count=sequences, offset=offset)
        offset += self.pointers.nbytes
        self.document_indices = np.frombuffer(self._idx, dtype="<i8", count=documents, offset=offset)
        bin_path = f"{prefix}.bin"
        bin_size = os.path.getsize(bin_path)
        end = int(self.pointers[-1]) + int(self.lengths[-1]) * self.dtype.itemsize if sequences else 0
        if bin_size < end:
            raise UserInputError(f"{bin_path}: {bin_size} bytes, but {idx_path} points up to byte {end} (a partial file?)")
        # An empty memmap is an error in numpy; an empty corpus is reported by the caller.
        self._bin = np.memmap(bin_path, mode="r", dtype=np.uint8) if bin_size else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.lengths)

    def release(self) -> None:
        """Unmaps what was read of P.idx and P.bin (release_pages)."""
        release_pages(self._idx, self._bin)

    @property
    def num_documents(self) -> int:
        return max(len(self.document_indices) - 1, 0)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, start: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens start..start+length of sequence i, as a view of the memory map."""
        count = int(self.lengths[i]) - start if length is None else length
        return np.frombuffer(self._bin, dtype=self.dtype.newbyteorder("<"), count=count,
                             offset=int(self.pointers[i]) + start * self.dtype.itemsize)


class IndexedWriter:
    """Writes `P.bin` + `P.idx` one document at a time (one sequence per document, as
    Megatron's preprocess_data.py writes it without --split-sentences).

    Both files are written under temporary names and renamed by `finish`, so a killed
    writer never leaves a pair that looks complete. With an `identity` (what the output is
    made from) the writer is resumable: `checkpoint` makes what was written so far durable
    (`P.bin.partial`, `P.lengths.partial`, `P.progress.json`), and a new writer with the
    same identity continues from the last checkpoint (`documents_read` says how many input
    documents that covers); a different identity starts over.
    """

    def __init__(self, prefix: str, dtype: type, identity: Optional[dict] = None):
        self.prefix = prefix
        self.dtype = np.dtype(dtype).newbyteorder("<")
        code = next((c for c, d in DTYPE_CODES.items() if np.dtype(d) == np.dtype(dtype)), None)
        if code is None:
            raise ValueError(f"no Megatron dtype code for {dtype}")
        self.code = code
        folder = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(folder, exist_ok=True)
        self.identity = identity
        self._tmp = ".partial" if identity is not None else f".{os.getpid()}.tmp"
        self._progress = f"{prefix}.progress.json"
        self._lengths = f"{prefix}.lengths.partial"
        self.lengths = array("i")  # 4 bytes a document, not a Python int each
        self.tokens = 0
        self.documents_read = 0
        progress = self._saved_progress()
        if progress is None:
            self._bin = open(f"{prefix}.bin{self._tmp}", "wb")
            return
        with open(self._lengths, "rb") as fh:
            self.lengths.frombytes(fh.read(4 * progress["documents_written"]))
        self.tokens, self.documents_read = progress["tokens"], progress["documents_read"]
        self._bin = open(f"{prefix}.bin{self._tmp}", "r+b")
        self._bin.truncate(self.tokens * self.dtype.itemsize)  # what came after the checkpoint
        self._bin.seek(0, os.SEEK_END)

    def _saved_progress(self) -> Optional[dict]:
        """The last checkpoint of a writer with this identity, if its files are all there."""
        if self.identity is None or not os.path.isfile(self._progress):
            return None
        try:
            with open(self._progress) as fh:
                progress = json.load(fh)
        except (OSError, ValueError):
            return None
        complete = (progress.get("identity") == self.identity and os.path.isfile(f"{self.prefix}.bin{self._tmp}")
                    and os.path.getsize(f"{self.prefix}.bin{self._tmp}") >= progress["tokens"] * self.dtype.itemsize
                    and os.path.isfile(self._lengths)
                    and os.path.getsize(self._lengths) >= 4 * progress["documents_written"])
        return progress if complete else None

    def checkpoint(self, documents_read: int) -> None:
        """Makes the documents written so far durable, as covering `documents_read` input documents."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        for path, data in ((self._lengths, self.lengths.tobytes()),
                           (self._progress, json.dumps({"identity": self.identity, "documents_read": documents_read,
                                                        "documents_written": len(self.lengths),
                                                        "tokens": self.tokens}).encode())):
            with open(f"{path}.tmp", "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(f"{path}.tmp", path)
        self.documents_read = documents_read

    def add_document(self, tokens: Iterable[int] | np.ndarray) -> None:
        array = np.asarray(tokens, dtype=self.dtype)
        self.add_documents(array, [len(array)])

    def add_documents(self, tokens: np.ndarray, lengths: Iterable[int]) -> None:
        """Several documents at once: their tokens back to back, and each one's length."""
        self._bin.write(np.asarray(tokens, dtype=self.dtype).tobytes())
        self.lengths.extend(int(n) for n in lengths)
        self.tokens += len(tokens)

    def abort(self) -> None:
        """Removes what a writer that will not finish has written."""
        self._bin.close()
        self._remove_partial_files()

    def _remove_partial_files(self) -> None:
        for path in (f"{self.prefix}.bin{self._tmp}", f"{self.prefix}.idx{self._tmp}", self._progress, self._lengths):
            if os.path.exists(path):
                os.remove(path)

    def finish(self) -> None:
        self._bin.close()
        lengths = np.asarray(self.lengths, dtype="<i4")
        pointers = np.zeros(len(lengths), dtype="<i8")
        if len(lengths):
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        documents = np.arange(len(lengths) + 1, dtype="<i8")  # one sequence per document
        with open(f"{self.prefix}.idx{self._tmp}", "wb") as fh:
            fh.write(_PREAMBLE.pack(HEADER, VERSION, self.code, len(lengths), len(documents)))
            fh.write(lengths.tobytes())
            fh.write(pointers.tobytes())
            fh.write(documents.tobytes())
        os.replace(f"{self.prefix}.bin{self._tmp}", f"{self.prefix}.bin")
        os.replace(f"{self.prefix}.idx{self._tmp}", f"{self.prefix}.idx")
        self._remove_partial_files()
