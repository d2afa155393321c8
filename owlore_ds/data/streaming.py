"""--streaming: a corpus read, tokenized and cut into windows while training, never preprocessed.

The corpus is a Hugging Face `datasets` folder (Dataset.save_to_disk's output; its arrow
files are memory-mapped, so any document is reached without reading those before it) or
.jsonl/.parquet/.txt files as tools/preprocess_data.py reads them. Each document becomes its
tokens followed by EOS exactly as that tool writes them (tokenize.encode_documents), the
documents are concatenated in order and the stream is cut into windows of block_size tokens,
every token with loss, as PackedWindows cuts an indexed dataset: a streamed corpus trains on
the windows of its preprocessed form. With --packing_attention document the position ids
restart at every document that begins inside a window, as there.

Order: the windows are taken in chunks of `chunk_windows` consecutive windows of the stream;
with shuffling each chunk is permuted by a permutation seeded by (seed, chunk number), with
--no_shuffle not at all, and global batch s is the next B windows of that sequence (B the
global batch; a batch may span two chunks). At the stream's end the tail shorter than a
window is dropped and the next epoch starts again from the first document (chunk numbers go
on counting, so epochs are shuffled differently). Every rank reads and tokenizes the whole
stream and takes its own rows of each global batch (GlobalBatches.micro_rows): the order is
then a function of the data and the seed alone, so 1 rank and N ranks train on the same
batches; tokenizing costs far less than the training step it feeds.

Resume: the position at the start of the next step (the current chunk's number, epoch and
first stream position as (document, token offset), and how many of its windows are used) is
saved in the checkpoint's trainer state; a resumed run skips to that document without
tokenizing those before it, rebuilds that one chunk and goes on, on any number of ranks.

Memory: one chunk of windows (chunk_windows x block_size int64; twice that with document
attention) and one batch of documents, whatever the corpus size.
"""

from __future__ import annotations

import functools
import itertools
import logging
from typing import Any, Iterator, Optional

import numpy as np
import torch

from owlore_ds.data.records import DocumentSource
from owlore_ds.data.rows import restart_positions
from owlore_ds.data.tokenize import encode_documents
from owlore_ds.data.windows import _Windows
from owlore_ds.errors import UserInputError

log = logging.getLogger(__name__)

TOKENIZE_BATCH = 64  # documents tokenized together (the fast tokenizer's batch call)


class TokenReader:
    """The token stream from a position (document, offset) on: offset tokens into that document's
    tokens, which end in EOS. A document with no tokens adds nothing but still counts."""

    def __init__(self, source: DocumentSource, tokenizer, position: tuple[int, int] = (0, 0)):
        self.document, self.offset = position
        self._documents = self._tokenized(source.texts(self.document), tokenizer)
        self._ids: Optional[list[int]] = next(self._documents, None)  # document self.document; None: past the end

    @staticmethod
    def _tokenized(texts: Iterator[str], tokenizer) -> Iterator[list[int]]:
        while batch := list(itertools.islice(texts, TOKENIZE_BATCH)):
            yield from encode_documents(tokenizer, batch)

    @property
    def position(self) -> tuple[int, int]:
        return self.document, self.offset

    def read(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The next `count` tokens (fewer only at the stream's end), and where documents begin
        among them (True at a document's first token)."""
        out = np.empty(count, dtype=np.int64)
        begins = np.zeros(count, dtype=bool)
        filled = 0
        while filled < count and self._ids is not None:
            if self.offset >= len(self._ids):
                self.document, self.offset = self.document + 1, 0
                self._ids = next(self._documents, None)
                continue
            piece = self._ids[self.offset : self.offset + count - filled]
            out[filled : filled + len(piece)] = piece
            begins[filled] = self.offset == 0
            filled += len(piece)
            self.offset += len(piece)
        return out[:filled], begins[:filled]


class StepWindows(_Windows):
    """The TrainingData of --streaming: rows 0..B-1 are the windows of the current global batch
    (StreamingBatches.rows puts them here). Calibration (OWL ratios) draws from the first chunk's
    worth of the stream (chunk_windows x block_size tokens, or the whole stream if shorter)."""

    def __init__(self, source: DocumentSource, tokenizer, block_size: int, prefix_tokens: int,
                 document_attention: bool = False):
        self.block_size = block_size
        self.document_attention = document_attention
        self.current = torch.empty(0, block_size, dtype=torch.long)
        self.current_positions = torch.empty(0, block_size, dtype=torch.long)  # with document_attention
        self._source, self._tokenizer, self._prefix_tokens = source, tokenizer, prefix_tokens

    def __len__(self) -> int:
        return len(self.current)

    def window(self, row: int) -> torch.Tensor:
        return self.current[row]

    def window_positions(self, row: int) -> torch.Tensor:
        return self.current_positions[row]

    @functools.cached_property
    def _prefix(self) -> torch.Tensor:
        return torch.from_numpy(TokenReader(self._source, self._tokenizer).read(self._prefix_tokens)[0])

    def num_tokens(self) -> int:
        return len(self._prefix)

    def tokens(self, start: int, length: int) -> torch.Tensor:
        return self._prefix[start : start + length]


class StreamingBatches:
    """GlobalBatches' role for --streaming: the windows of each global batch, read from the stream
    in step order (see the module's docstring), and the position a checkpoint resumes from."""

    def __init__(self, path: str, text_key: str, tokenizer, block_size: int, vocab_size: int, global_batch: int,
                 seed: int, shuffle: bool, chunk_windows: int, document_attention: bool = False):
        if tokenizer.eos_token_id is None:
            raise UserInputError("--streaming: the model's tokenizer has no EOS token to end documents with")
        self.source = DocumentSource(path, text_key)
        self.tokenizer = tokenizer
        self.block_size, self.vocab_size, self.global_batch = block_size, vocab_size, global_batch
        self.seed, self.shuffle, self.chunk_windows = seed, shuffle, chunk_windows
        self.steps_per_epoch = None  # unknown until the stream has been read: --max_steps is required
        self.data = StepWindows(self.source, tokenizer, block_size, chunk_windows * block_size, document_attention)
        self.next_step = 0
        self._reader: Optional[TokenReader] = None
        self._epoch = self._chunk_number = self._used = 0
        self._chunk_start = (0, 0)
        self._ends_epoch = False
        self._chunk = torch.empty(0, block_size, dtype=torch.long)
        self._positions = torch.empty(0, block_size, dtype=torch.long)
        self._last_epoch = 0  # epoch of the last window handed out

    def start(self, state: Optional[dict[str, Any]] = None, step: int = 0) -> None:
        """Reads the first chunk, or with `state` (a checkpoint's `stream`) the chunk that step
        `step` starts in; bad input (a missing column, an empty corpus) fails here, before training."""
        if state is None:
            state = {"epoch": 0, "chunk": 0, "chunk_start": [0, 0], "used": 0}
        try:
            epoch, number, used = int(state["epoch"]), int(state["chunk"]), int(state["used"])
            document, offset = (int(v) for v in state["chunk_start"])
        except (KeyError, TypeError, ValueError):
            raise UserInputError(f"the checkpoint's stream position {state!r} is not readable") from None
        self._reader = TokenReader(self.source, self.tokenizer, (document, offset))
        self._load_chunk(epoch, number)
        if used > len(self._chunk):
            raise UserInputError(f"--dataset_path {self.source.path}: chunk {number} now has {len(self._chunk)} windows, "
                                 f"the checkpoint used {used} of it: the data changed since the checkpoint was written")
        self._used, self._last_epoch, self.next_step = used, epoch, step
        log.info("streaming %s (%s): windows of %d tokens, %s; from document %d token %d (epoch %d, chunk %d)",
                 self.source.path, self.source.kind(), self.block_size,
                 f"shuffled in chunks of {self.chunk_windows}" if self.shuffle else "in stream order",
                 document, offset, epoch, number)

    def _load_chunk(self, epoch: int, number: int) -> None:
        """Reads chunk `number` from the reader's position, in epoch `epoch`; at the stream's end
        it is shorter, and an empty one moves on to the next epoch."""
        size = self.chunk_windows * self.block_size
        while True:
            start = self._reader.position
            tokens, begins = self._reader.read(size)
            windows = len(tokens) // self.block_size
            if len(tokens) < size:
                log.info("end of the stream in epoch %d: %d token(s) short of a window dropped; epoch %d starts again "
                         "from the first document", epoch, len(tokens) - windows * self.block_size, epoch + 1)
            if windows:
                break
            if start == (0, 0):
                raise UserInputError(f"--dataset_path {self.source.path}: the stream holds {len(tokens)} tokens, fewer "
                                     f"than one window of {self.block_size}")
            epoch += 1
            self._reader = TokenReader(self.source, self.tokenizer)
        self._ends_epoch = len(tokens) < size  # the stream ended inside this chunk
        chunk = torch.from_numpy(tokens[: windows * self.block_size]).view(windows, self.block_size)
        positions = restart_positions(torch.from_numpy(begins[: windows * self.block_size]).view(
            windows, self.block_size)) if self.data.document_attention else None
        top = int(chunk.max())
        if top >= self.vocab_size:
            raise UserInputError(f"--dataset_path {self.source.path}: token id {top} in chunk {number} is outside the "
                                 f"model's vocabulary of {self.vocab_size}")
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + number)
            order = torch.randperm(windows, generator=generator)
            chunk, positions = chunk[order], None if positions is None else positions[order]
        self._positions = positions
        self._chunk, self._chunk_start, self._epoch, self._chunk_number, self._used = chunk, start, epoch, number, 0

    def _next_chunk(self) -> None:
        epoch = self._epoch
        if self._ends_epoch:
            epoch += 1
            self._reader = TokenReader(self.source, self.tokenizer)
        self._load_chunk(epoch, self._chunk_number + 1)

    def rows(self, step: int) -> torch.Tensor:
        """Puts the windows of global batch `step` in self.data (rows 0..B-1) and returns those rows.
        Steps come in order: the stream is read once."""
        if step != self.next_step:
            raise RuntimeError(f"streamed batches are read in order: step {step} asked for, step {self.next_step} is next")
        parts, positions, taken = [], [], 0
        while taken < self.global_batch:
            if self._used == len(self._chunk):
                self._next_chunk()
            take = min(self.global_batch - taken, len(self._chunk) - self._used)
            parts.append(self._chunk[self._used : self._used + take])
            if self._positions is not None:
                positions.append(self._positions[self._used : self._used + take])
            self._used += take
            taken += take
        self.data.current = torch.cat(parts)
        if positions:
            self.data.current_positions = torch.cat(positions)
        self._last_epoch = self._epoch
        self.next_step += 1
        return torch.arange(self.global_batch)

    def epoch_of(self, step: int) -> int:
        """The epoch of the last step handed out, whatever `step`: the trainer asks only about that
        one (GlobalBatches answers for any step; the stream's epochs are known only as read)."""
        return self._last_epoch

    def state(self) -> dict[str, Any]:
        """Where the next step starts: saved in the checkpoint, given to start() on resume."""
        return {"epoch": self._epoch, "chunk": self._chunk_number, "chunk_start": list(self._chunk_start),
                "used": self._used}

