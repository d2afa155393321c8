"""What the trainer asks of a dataset (TrainingData), and tokenized rows: dense tensors (TokenizedData,
built in memory by tokenize_records) or the compact, memory-mapped form of the cache (CompactRows)."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from owlore_ds.data.sample_index import SampleIndexCache

IGNORE_INDEX = -100


def restart_positions(restarts: torch.Tensor) -> torch.Tensor:
    """Position ids along the last dimension that count from 0 at its start and again at every
    True of `restarts` (an example's or document's first token)."""
    index = torch.arange(restarts.shape[-1]).expand_as(restarts)
    return index - torch.cummax(torch.where(restarts, index, 0), dim=-1).values


class TrainingData(Protocol):
    """What the trainer asks of a dataset: rows by index, never the whole dense tensors."""

    # Where GlobalBatches keeps its shuffles (indexed data: files beside it); None: in memory.
    sample_index: Optional[SampleIndexCache]

    def __len__(self) -> int: ...

    def batch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """int64 `input_ids`, `attention_mask` and `labels` of these rows, [len(rows), block_size] each;
        with packed examples or per-document attention also `position_ids`, which restart at 0
        where a new example or document begins (no token attends across that boundary)."""

    def target_count(self, rows: torch.Tensor) -> int:
        """Loss-bearing tokens of these rows, after the causal shift."""

    def token_count(self, rows: torch.Tensor) -> int:
        """Real (not padding) tokens of these rows."""

    def num_tokens(self) -> int:
        """Length of the token stream (padding removed) that calibration windows are cut from."""

    def tokens(self, start: int, length: int) -> torch.Tensor:
        """int64 tokens start..start+length of that stream."""


@dataclass
class TokenizedData:
    sample_index = None  # (not a field) small data: the shuffles are kept in memory
    input_ids: torch.Tensor  # [N, block_size] int64
    labels: torch.Tensor  # [N, block_size] int64, IGNORE_INDEX where no loss
    attention_mask: torch.Tensor  # [N, block_size] int64
    position_ids: Optional[torch.Tensor] = None  # [N, block_size] int64 when examples are packed

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = {"input_ids": self.input_ids[rows], "attention_mask": self.attention_mask[rows], "labels": self.labels[rows]}
        if self.position_ids is not None:
            batch["position_ids"] = self.position_ids[rows]
        return batch

    def target_count(self, rows: torch.Tensor) -> int:
        return int((self.labels[rows, 1:] != IGNORE_INDEX).sum())

    def token_count(self, rows: torch.Tensor) -> int:
        return int(self.attention_mask[rows].sum())

    @functools.cached_property
    def _stream(self) -> torch.Tensor:
        return self.input_ids[self.attention_mask.bool()]

    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def tokens(self, start: int, length: int) -> torch.Tensor:
        return self._stream[start : start + length]


class CompactRows:
    """Tokenized rows of the small formats in compact form, as the tokenized cache holds
    them (tokenize.write_compact) and every rank opens them memory-mapped: the real tokens
    of all rows back to back (`tokens`, the smallest dtype that holds the ids), a uint8
    `loss` flag per token (its label is set), `offsets` [N + 1] where each row's tokens
    begin, `targets` [N] each row's loss-bearing tokens after the causal shift, with packed
    rows `examples` [E + 1] where each example begins, and `labels` (int64, per token) only
    for pre-tokenized data whose labels are not the tokens themselves. Nothing is padded or
    widened until `batch`, which builds the int64 rows asked for, equal to the dense
    TokenizedData of the same examples (tests/test_data.py compares them).
    """

    sample_index = None  # the small formats keep their order in memory (batches.GlobalBatches)

    def __init__(self, arrays: dict[str, np.ndarray], block_size: int, pad_id: int):
        self.block_size = block_size
        self.pad_id = pad_id
        self._tokens, self._loss = arrays["tokens"], arrays["loss"]
        self._offsets, self._targets = arrays["offsets"], arrays["targets"]
        self._labels = arrays.get("labels")
        self._examples = arrays.get("examples")
        self.token_range: Optional[tuple[int, int]] = None  # lowest and highest id, from the cache's meta.json

    @classmethod
    def open(cls, folder: str) -> "CompactRows":
        """The cache folder's arrays, memory-mapped (read-only): no rank copies them."""
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as fh:
            meta = json.load(fh)
        arrays = {name: np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r") for name in meta["arrays"]}
        rows = cls(arrays, meta["block_size"], meta["pad_id"])
        rows.token_range = (meta["min_token"], meta["max_token"])
        return rows

    @property
    def packed(self) -> bool:
        return self._examples is not None

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def batch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = torch.as_tensor(rows).tolist()
        shape = (len(rows), self.block_size)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(shape, dtype=torch.long)
        positions = torch.zeros(shape, dtype=torch.long) if self.packed else None
        for i, row in enumerate(rows):
            lo, hi = int(self._offsets[row]), int(self._offsets[row + 1])
            ids = torch.from_numpy(self._tokens[lo:hi].astype(np.int64))
            targets = ids if self._labels is None else torch.from_numpy(np.array(self._labels[lo:hi]))
            input_ids[i, : hi - lo] = ids
            labels[i, : hi - lo] = torch.where(torch.from_numpy(self._loss[lo:hi].astype(bool)), targets, IGNORE_INDEX)
            mask[i, : hi - lo] = 1
            if positions is not None:
                positions[i] = self._positions(lo, hi)
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        if positions is not None:
            batch["position_ids"] = positions
        return batch

    def _positions(self, lo: int, hi: int) -> torch.Tensor:
        """Positions of the packed row of tokens lo..hi: from 0 in each example, and again in the
        padding after them (as pack_examples numbers them)."""
        first, last = np.searchsorted(self._examples, [lo, hi])
        restarts = torch.zeros(self.block_size, dtype=torch.bool)
        restarts[torch.from_numpy(self._examples[first:last] - lo)] = True
        if hi - lo < self.block_size:
            restarts[hi - lo] = True
        return restart_positions(restarts)

    def target_count(self, rows: torch.Tensor) -> int:
        return int(self._targets[torch.as_tensor(rows).numpy()].sum(dtype=np.int64))

    def token_count(self, rows: torch.Tensor) -> int:
        rows = torch.as_tensor(rows).numpy()
        return int((self._offsets[rows + 1] - self._offsets[rows]).sum())

    def num_tokens(self) -> int:
        return int(self._offsets[-1])

    def tokens(self, start: int, length: int) -> torch.Tensor:
        return torch.from_numpy(self._tokens[start : start + length].astype(np.int64))
