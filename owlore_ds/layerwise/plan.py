"""Which rank owns what: the items of a step and their owners, computed the same on every rank.

An *item* is the unit of gradient reduction, optimizer state and update:
- a tensor of an active decoder layer is one item, owned whole by one rank, so GaLore's
  SVD sees the full 2-D gradient;
- a tensor that is always trained (embeddings, final norm, lm_head) is cut into one flat
  chunk per rank, chunk r owned by rank r. The chunks are ZeRO-3's partitions
  (ceil(numel / N) elements each, DeepSpeed's `ds_tensor`), so under stage 3 an owner
  updates exactly the slice of the weights it already holds.

memory_model.py uses these functions, so the model and the trainer cannot disagree on
who holds what.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch


def full_shape(p: torch.Tensor) -> torch.Size:
    """The parameter's shape, also while ZeRO-3 keeps only a partition (`p.shape` is then (0,))."""
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def full_numel(p: torch.Tensor) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def chunk_bounds(numel: int, world: int) -> list[tuple[int, int]]:
    """[lo, hi) of chunk r for every rank r that gets elements: DeepSpeed ZeRO-3's partitioning."""
    size = math.ceil(numel / world)
    return [(r * size, min((r + 1) * size, numel)) for r in range(world) if r * size < numel]


def assign_owners(sizes: dict[str, int], world: int, existing: Optional[dict[str, int]] = None,
                  names: Optional[Iterable[str]] = None) -> dict[str, int]:
    """Greedy, largest first, to the least-loaded rank (ties by name, then by rank).

    `existing` owners keep their items and count as load; `names` (default: all of
    `sizes` not yet owned) are placed. Returns the new owners of `names` only.
    """
    existing = existing or {}
    load = [0] * world
    for name, owner in existing.items():
        load[owner] += sizes[name]
    todo = [n for n in (sizes if names is None else names) if n not in existing]
    placed = {}
    for name in sorted(todo, key=lambda n: (-sizes[n], n)):
        owner = min(range(world), key=lambda r: (load[r], r))
        placed[name] = owner
        load[owner] += sizes[name]
    return placed


@dataclass
class Item:
    key: str  # parameter name, plus "@lo" for a chunk of an always-trained tensor
    name: str
    param: torch.nn.Parameter
    lo: int
    hi: int
    owner: int
    low_rank: bool  # GaLore rule (whole 2-D layer matrices when GaLore is on)
    position: int = 0  # index of the tensor within its layer

    @property
    def numel(self) -> int:
        return self.hi - self.lo

    @property
    def whole(self) -> bool:
        return self.lo == 0 and self.hi == full_numel(self.param)

    @property
    def shape(self) -> torch.Size:
        return full_shape(self.param) if self.whole else torch.Size([self.numel])


def always_items(name: str, param: torch.nn.Parameter, world: int) -> list[Item]:
    return [Item(f"{name}@{lo}", name, param, lo, hi, r, False)
            for r, (lo, hi) in enumerate(chunk_bounds(full_numel(param), world))]
