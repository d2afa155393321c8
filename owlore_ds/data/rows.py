"""What the trainer asks of a dataset (TrainingData), and tokenized rows held as tensors."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Protocol

import torch

IGNORE_INDEX = -100


class TrainingData(Protocol):
    """What the trainer asks of a dataset: rows by index, never the whole dense tensors."""

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
