"""Batches of similar-length sequences, to waste little on padding.

After HuggingFace's distillation example (itself adapted from torchvision's
group_by_aspect_ratio). Works on top of any index sampler: RandomSampler on one process,
DistributedSampler under torchrun (each rank groups its own share).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler, Sampler

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


def epoch_batches(dataset, epoch: int, *, batch_size: int, seed: int, group_by_size: bool, max_len: int,
                  world_size: int = 1, rank: int = 0) -> list[list[int]]:
    """The item indices of each batch of `epoch` for this rank, in order; the same on every call.

    One process: a random order seeded by (seed, epoch). Under DDP (`world_size` > 1, the process
    group initialised) each rank takes its share (`DistributedSampler`), and every rank keeps as
    many batches as the rank with the fewest, so that all run the same number of steps.
    `group_by_size` batches items of similar lengths (bins of `create_lengths_groups` up to `max_len`).
    """
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                     drop_last=True)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed * 1000003 + epoch))
    if group_by_size:
        groups = create_lengths_groups(lengths=dataset.lengths, k=max_len)
        batch_sampler = GroupedBatchSampler(sampler=sampler, group_ids=groups, batch_size=batch_size)
    else:
        batch_sampler = BatchSampler(sampler, batch_size=batch_size, drop_last=False)
    batches = list(batch_sampler)
    if world_size > 1:
        n = torch.tensor([len(batches)])
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
        batches = batches[: int(n)]
    return batches
