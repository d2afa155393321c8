"""Which rows each optimizer step trains on, and the calibration windows of OWL."""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch

from owlore_ds.data.indexed import release_pages
from owlore_ds.data.rows import TrainingData
from owlore_ds.data.sample_index import SampleIndexCache
from owlore_ds.errors import UserInputError


class GlobalBatches:
    """Which rows every optimizer step trains on, and how they split over ranks and micro-batches.

    Step s of epoch e = s // steps_per_epoch trains on rows perm_e[j*B:(j+1)*B] with
    j = s % steps_per_epoch, where perm_e is a seeded permutation (identity with
    --no_shuffle) and B the global batch. The last partial batch of an epoch is dropped.

    With a `sample_index` (indexed data, whose windows can be billions) each epoch's
    permutation is built once, kept as a file beside the data and memory-mapped, so no
    rank holds it; without one (the small formats) it is built in memory, the same order.
    """

    def __init__(self, num_examples: int, global_batch: int, seed: int, shuffle: bool,
                 sample_index: Optional[SampleIndexCache] = None):
        if num_examples < global_batch:
            raise UserInputError(
                f"the dataset has {num_examples} examples, fewer than one global batch of {global_batch} "
                "(per_device_train_batch_size x gradient_accumulation_steps x ranks)"
            )
        self.num_examples = num_examples
        self.global_batch = global_batch
        self.seed = seed
        self.shuffle = shuffle
        self.steps_per_epoch = num_examples // global_batch
        self.sample_index = sample_index
        self._epoch, self._order = -1, None

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        # int32 when it fits: the same permutation as int64's, at half the builder's memory.
        dtype = torch.int32 if self.num_examples < 2**31 else torch.int64
        return torch.randperm(self.num_examples, generator=generator, dtype=dtype).numpy()

    def rows(self, step: int) -> torch.Tensor:
        start = (step % self.steps_per_epoch) * self.global_batch
        if not self.shuffle:
            return torch.arange(start, start + self.global_batch)
        epoch = self.epoch_of(step)
        if epoch != self._epoch:
            build = functools.partial(self._permutation, epoch)
            # The permutation is torch's: a new torch may draw another, so its version is in the key.
            key = {"examples": self.num_examples, "seed": self.seed, "epoch": epoch, "torch": torch.__version__}
            self._order = build() if self.sample_index is None else self.sample_index.array("order", key, build)
            self._epoch = epoch
        rows = torch.from_numpy(self._order[start : start + self.global_batch].astype(np.int64))
        release_pages(self._order)
        return rows

    @staticmethod
    def micro_rows(rows: torch.Tensor, micro_step: int, rank: int, world: int, micro_batch: int) -> torch.Tensor:
        start = (micro_step * world + rank) * micro_batch
        return rows[start : start + micro_batch]


def calibration_windows(data: TrainingData, nsamples: int, seqlen: int, seed: int, sequential: bool) -> torch.Tensor:
    """[nsamples, seqlen] token windows from the dataset's real tokens (padding removed).

    Random windows (seeded) as OWL draws them from C4, or with `sequential` the first
    `nsamples` consecutive windows in file order.
    """
    total = data.num_tokens()
    if total < seqlen:
        raise UserInputError(f"the calibration data has {total} tokens, fewer than one window of {seqlen}")
    if sequential:
        count = min(nsamples, total // seqlen)
        return data.tokens(0, count * seqlen).view(count, seqlen)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen + 1, (nsamples,), generator=generator)
    return torch.stack([data.tokens(s, seqlen) for s in starts.tolist()])
