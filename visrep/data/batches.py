"""Training batches of an in-memory dataset, addressed by global step.

Step s is batch i = s mod S of epoch e = s // S (S = N // batch_size steps per epoch; the last partial batch is
dropped). Epoch e's order is a permutation seeded by (seed, e), so any step can be fetched directly: a run that
restarts at step s from its checkpoint sees exactly the batches an uninterrupted run would. Under torchrun the
global batch is split into one contiguous slice per rank, so the ranks together see the same images as one
process does.

Example:
    >>> import torch
    >>> from visrep.data.sources import ImageDataset
    >>> ds = ImageDataset(torch.zeros(10, 3, 4, 4, dtype=torch.uint8), torch.arange(10), [str(i) for i in range(10)], "toy")
    >>> batches = EpochBatches(ds, batch_size=4, seed=0)
    >>> batches.steps_per_epoch, sorted(batches(0)["labels"].tolist() + batches(1)["labels"].tolist()) == sorted(
    ...     epoch_permutation(10, 0, 0)[:8].tolist())
    (2, True)
"""
from __future__ import annotations

import torch

from visrep.errors import ConfigError


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class EpochBatches:
    """`batches(step, device)` → {"images": uint8 [b, 3, H, W], "labels": [b], "targets": [b, T] or None}, with
    b = batch_size / world_size this rank's share."""

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ConfigError(f"train.batch_size {batch_size} must be divisible by the {world_size} processes")
        self.steps_per_epoch = len(dataset) // batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train.batch_size {batch_size} is larger than the {len(dataset)} training images")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.local = batch_size // world_size
        self.offset = rank * self.local
        self._epoch, self._perm = None, None

    def __call__(self, step: int, device: torch.device | str = "cpu") -> dict:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, epoch_permutation(len(self.dataset), self.seed, epoch)
        start = i * self.batch_size + self.offset
        idx = self._perm[start:start + self.local]
        ds = self.dataset
        return {"images": ds.images[idx].to(device, non_blocking=True),
                "labels": ds.labels[idx].to(device, non_blocking=True),
                "targets": ds.targets[idx].to(device, non_blocking=True) if ds.targets is not None else None}
