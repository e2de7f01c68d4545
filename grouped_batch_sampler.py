"""Batches of similar-length sequences, to waste little on padding.

After HuggingFace's distillation example (itself adapted from torchvision's
group_by_aspect_ratio). Works on top of any index sampler: RandomSampler on one process,
DistributedSampler under torchrun (each rank groups its own share).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import BatchSampler, Sampler

from utils import logger


def create_lengths_groups(lengths: Sequence[int], k: int = 0) -> np.ndarray:
    """Group id of each length: bins every 4 tokens from 3 up to `k` (or one cut at 10 when k <= 0).

    Group g holds the lengths in [bins[g-1], bins[g]) with bins[-1] = 0 and bins[len] = inf.
    """
    bins = np.arange(start=3, stop=k, step=4) if k > 0 else np.array([10])
    groups = np.searchsorted(bins, np.asarray(lengths), side="right")
    counts = np.bincount(groups, minlength=len(bins) + 1)
    logger.info("length groups with bins %s: %s sequences per group", [0, *bins.tolist(), "inf"], counts.tolist())
    return groups


class GroupedBatchSampler(BatchSampler):
    """Yield batches of `batch_size` indices of `sampler` that share a group id.

    Indices are taken in the sampler's order; a batch is emitted as soon as one group has
    `batch_size` members. The leftovers (fewer than `batch_size` per group) come last, sorted by
    group and cut into batches, so every index appears exactly once and `len(self)` is
    ceil(len(sampler) / batch_size).
    """

    def __init__(self, sampler: Sampler, group_ids: Sequence[int], batch_size: int):
        if not isinstance(sampler, Sampler):
            raise ValueError(f"sampler should be a torch.utils.data.Sampler, got {sampler!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        self.sampler = sampler
        self.group_ids = np.asarray(group_ids)
        self.batch_size = batch_size
        self.drop_last = False

    def __iter__(self) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = defaultdict(list)
        for idx in self.sampler:
            group = int(self.group_ids[idx])
            buffers[group].append(int(idx))
            if len(buffers[group]) == self.batch_size:
                yield buffers.pop(group)
        leftovers = [idx for group in sorted(buffers) for idx in buffers[group]]
        for start in range(0, len(leftovers), self.batch_size):
            yield leftovers[start : start + self.batch_size]

    def __len__(self) -> int:
        return (len(self.sampler) + self.batch_size - 1) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Forward to the wrapped sampler (DistributedSampler reshuffles per epoch)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
