"""Indexed datasets cut into windows of block_size tokens, alone or blended by weight."""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import numpy as np
import torch

from owlore_ds.data.indexed import IndexedDataset, is_prefix, release_pages
from owlore_ds.data.rows import restart_positions
from owlore_ds.data.sample_index import SampleIndexCache
from owlore_ds.errors import UserInputError

log = logging.getLogger(__name__)


class _Windows:
    """Rows that are whole windows of token stream: no padding, every token with loss."""

    block_size: int
    document_attention: bool = False  # --packing_attention document: position_ids in every batch
    sample_index: Optional[SampleIndexCache] = None  # where GlobalBatches keeps its shuffles (load_training_data)

    def __len__(self) -> int:
        raise NotImplementedError

    def window(self, row: int) -> torch.Tensor:
        raise NotImplementedError

    def window_positions(self, row: int) -> torch.Tensor:
        raise NotImplementedError

    def batch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        ids = torch.stack([self.window(row) for row in rows.tolist()])
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        if self.document_attention:
            batch["position_ids"] = torch.stack([self.window_positions(row) for row in rows.tolist()])
        self.release()
        return batch

    def release(self) -> None:
        """Unmaps the pages of memory-mapped files read for the last batch (indexed.release_pages)."""

    def target_count(self, rows: torch.Tensor) -> int:
        return len(rows) * (self.block_size - 1)

    def token_count(self, rows: torch.Tensor) -> int:
        return len(rows) * self.block_size

    def num_tokens(self) -> int:
        return len(self) * self.block_size

    def tokens(self, start: int, length: int) -> torch.Tensor:
        first, last = start // self.block_size, (start + length - 1) // self.block_size
        ids = torch.cat([self.window(row) for row in range(first, last + 1)])
        offset = start - first * self.block_size
        return ids[offset : offset + length]


class PackedWindows(_Windows):
    """An indexed dataset's sequences concatenated in index order and cut into windows of
    `block_size` tokens (the tail shorter than a window is dropped); window i is row i.

    Tokens are used as stored (the EOS between documents is the one the preprocessing
    wrote). Rows are read from the memory map on demand, and a stream position is found
    by a binary search of the index's memory-mapped byte pointers, which Megatron's writer
    (and ours) lays out back to back: nothing the size of the corpus is held in memory, so
    the sample index needs no building or caching. An index whose sequences are not back
    to back gets its stream offsets computed once instead (8 bytes a sequence).

    With `document_attention` (--packing_attention document) a window's position ids
    start at 0 and restart at 0 at every document that begins inside it (a document is
    the run of sequences between two entries of the index's document indices), as
    Megatron's reset_position_ids does at EOD tokens; the model call then lets no token
    attend across those restarts. Labels stay every token: the last token of a document
    (its EOS) still predicts the first token of the next, as in Megatron.
    """

    def __init__(self, dataset: IndexedDataset, block_size: int, vocab_size: int, document_attention: bool = False):
        self.dataset = dataset
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.document_attention = document_attention
        self._itemsize = dataset.dtype.itemsize
        # Byte offset of each sequence in the concatenated stream: the pointers themselves
        # when the sequences are stored back to back.
        if _back_to_back(dataset):
            self._offsets = dataset.pointers
        else:
            log.info("%s: sequences not stored back to back; computing their stream offsets", dataset.prefix)
            self._offsets = np.concatenate([[0], np.cumsum(dataset.lengths[:-1], dtype=np.int64)]) * self._itemsize
        last = len(dataset) - 1
        self._num_tokens = self._begin(last) + int(dataset.lengths[last]) if len(dataset) else 0
        dataset.release()  # the check above read the whole index

    def release(self) -> None:
        self.dataset.release()

    def _begin(self, sequence: int | np.ndarray):
        """Stream position of the first token of `sequence` (or of each of an array of them)."""
        return self._offsets[sequence] // self._itemsize

    def _sequence_at(self, position: int) -> int:
        """The sequence that holds stream position `position` (empty ones are skipped)."""
        return int(np.searchsorted(self._offsets, position * self._itemsize, side="right")) - 1

    def __len__(self) -> int:
        return self._num_tokens // self.block_size

    def window(self, row: int) -> torch.Tensor:
        return self.tokens(row * self.block_size, self.block_size)

    def window_positions(self, row: int) -> torch.Tensor:
        """Position ids of window `row`: 0 at its first token and at each document start inside it."""
        start, size = row * self.block_size, self.block_size
        # Sequences first..last begin inside the window (after its first token).
        first = self._sequence_at(start) + 1
        last = self._sequence_at(start + size - 1)
        restarts = torch.zeros(size, dtype=torch.bool)
        restarts[0] = True
        if last >= first:
            sequences = np.arange(first, last + 1)
            documents = self.dataset.document_indices  # sorted sequence indices where documents begin
            found = np.searchsorted(documents, sequences)
            begins = sequences[(found < len(documents)) & (documents[np.minimum(found, len(documents) - 1)] == sequences)]
            restarts[torch.from_numpy(np.asarray(self._begin(begins), dtype=np.int64) - start)] = True
        return restart_positions(restarts)

    def tokens(self, start: int, length: int) -> torch.Tensor:
        out = np.empty(length, dtype=np.int64)
        filled = 0
        sequence = self._sequence_at(start)
        while filled < length:
            offset = start + filled - int(self._begin(sequence))
            piece = self.dataset.get(sequence, offset, min(length - filled, int(self.dataset.lengths[sequence]) - offset))
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
            sequence += 1
        if length and int(out.max()) >= self.vocab_size:
            raise UserInputError(f"--dataset_path {self.dataset.prefix}: token id {int(out.max())} near stream position "
                                 f"{start} is outside the model's vocabulary of {self.vocab_size}")
        return torch.from_numpy(out)


def _back_to_back(dataset: IndexedDataset, chunk: int = 1 << 20) -> bool:
    """Whether sequence i + 1 starts in P.bin where sequence i ends, for every i (read a
    chunk of the index at a time, so the check holds no corpus-sized array)."""
    pointers, lengths = dataset.pointers, dataset.lengths
    if len(pointers) == 0:
        return True
    if int(pointers[0]) != 0:
        return False
    for lo in range(0, len(pointers) - 1, chunk):
        hi = min(lo + chunk, len(pointers) - 1)
        if not np.array_equal(pointers[lo + 1 : hi + 1],
                              pointers[lo:hi] + lengths[lo:hi].astype(np.int64) * dataset.dtype.itemsize):
            return False
    return True


class BlendedWindows(_Windows):
    """Windows of several indexed datasets, interleaved in proportion to their weights.

    The blend holds floor(w_d * N) windows of dataset d, N the largest size at which no
    dataset repeats a window; its k-th pick is window floor(k * len_d / picks_d), spread
    over the whole of d rather than its start. Picks are placed at times (k + 0.5) / w_d
    and merged in time order (ties to the earlier dataset), so every stretch of the blend
    holds the datasets in their weights, as Megatron's BlendedDataset interleaves them.
    The order is a function of the data and weights alone; GlobalBatches shuffles it
    with the seed like any dataset. It is an int64 array [N, 2] of (dataset, window) per
    row, built once and kept beside the data (`sample_index`), or in memory without one.
    """

    def __init__(self, parts: list[PackedWindows], weights: list[float],
                 sample_index: Optional[SampleIndexCache] = None):
        self.parts = parts
        self.block_size = parts[0].block_size
        self.document_attention = parts[0].document_attention
        self.sample_index = sample_index
        shares = np.asarray(weights, dtype=np.float64) / sum(weights)
        build = functools.partial(_blend_order, [len(part) for part in parts], shares)
        if sample_index is None:
            self.picks = build()
        else:  # the order depends on the windows of each part and the weights, not on document attention
            self.picks = sample_index.array("blend", {"block_size": self.block_size, "shares": shares.tolist()}, build)

    def __len__(self) -> int:
        return len(self.picks)

    def release(self) -> None:
        release_pages(self.picks)
        for part in self.parts:
            part.release()

    def window(self, row: int) -> torch.Tensor:
        dataset, window = self.picks[row]
        return self.parts[dataset].window(int(window))

    def window_positions(self, row: int) -> torch.Tensor:
        dataset, window = self.picks[row]
        return self.parts[dataset].window_positions(int(window))


def _blend_order(sizes: list[int], shares: np.ndarray) -> np.ndarray:
    """BlendedWindows' rows as (dataset, window) pairs, for datasets of `sizes` windows."""
    size = min(n / share for n, share in zip(sizes, shares))
    picks = [int(share * size + 1e-9) for share in shares]
    times = np.concatenate([(np.arange(n) + 0.5) / share for n, share in zip(picks, shares)])
    order = np.argsort(times, kind="stable")
    which = np.concatenate([np.full(n, d, dtype=np.int64) for d, n in enumerate(picks)])[order]
    picked = np.concatenate([np.arange(n, dtype=np.int64) * length // max(n, 1)
                             for length, n in zip(sizes, picks)])[order]
    return np.stack([which, picked], axis=1)


def parse_mix(spec: str) -> list[tuple[str, float]]:
    """"P1:0.7,P2:0.3" -> [(P1, 0.7), (P2, 0.3)]; every P the prefix of an indexed dataset."""
    mix = []
    for entry in spec.split(","):
        prefix, _, weight = entry.strip().rpartition(":")
        try:
            value = float(weight)
        except ValueError:
            value = float("nan")
        if not prefix or not value > 0 or not np.isfinite(value):
            raise UserInputError(f"--data_mix {spec}: {entry.strip()!r} is not PREFIX:WEIGHT with a weight above 0")
        if not is_prefix(prefix):
            raise UserInputError(f"--data_mix {spec}: {prefix}.idx and {prefix}.bin do not both exist")
        mix.append((prefix, value))
    return mix


def is_mix(path: str) -> bool:
    """A --data_mix spec rather than one path: several entries, or one PREFIX:WEIGHT."""
    return not os.path.exists(path) and not is_prefix(path) and ":" in path
