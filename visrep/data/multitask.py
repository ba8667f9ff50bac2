"""Multi-dataset training batches: every step holds a fixed number of samples from EVERY task's dataset.

Faceptor (Qin et al. 2024) trains one model on many face datasets at once: each step draws a fixed-size batch
from each dataset, and each dataset has its own sampler that starts a new pass when it runs out, independently
of the others (a small dataset is seen many times while a large one is seen once).

Here each task's sampler is addressed by the global step, like `EpochBatches`: task t with N_t images and b_t
samples per step has S_t = N_t // b_t steps per pass; step s reads batch i = s mod S_t of pass e = s // S_t, in
an order that is a permutation seeded by (seed, the task's name, e). So no sampler holds state: a run resumed at
step s from its checkpoint draws exactly the samples an uninterrupted run would, for every task (bit-exact resume
of every sampler's position), and under torchrun each rank takes its contiguous slice of every task's batch.

Example:
    >>> import torch
    >>> from visrep.data.sources import ImageDataset
    >>> big = ImageDataset(torch.zeros(12, 3, 4, 4, dtype=torch.uint8), torch.arange(12), [str(i) for i in range(12)], "big")
    >>> small = ImageDataset(torch.zeros(4, 3, 4, 4, dtype=torch.uint8), torch.arange(4) % 2, ["a", "b"], "small")
    >>> batches = TaskBatches({"big": big, "small": small}, {"big": 3, "small": 2}, seed=0)
    >>> b = batches(5)                       # step 5: pass 1 of `big` (S = 4), pass 2 of `small` (S = 2)
    >>> b["images"].shape[0], b["task_slices"]
    (5, {'big': (0, 3), 'small': (3, 5)})
    >>> batches.passes(5)
    {'big': 1, 'small': 2}
"""
from __future__ import annotations

import zlib

import torch

from visrep.data.batches import epoch_permutation
from visrep.errors import ConfigError


def _one_size(sizes: set):
    """The one size every task's images share, or a clear error."""
    if len(sizes) != 1:
        raise ConfigError(f"the tasks' images differ in size ({sorted(sizes)}); set data.image_size")
    return next(iter(sizes))


class TaskBatches:
    """`batches(step, device)` → {"images": uint8 [Σ b_t, 3, H, W] (tasks in order), "task_slices": {task: (start,
    end)} rows of each task, "task_labels": {task: [b_t]}, "task_targets": {task: [b_t, T] or None}}, this rank's
    share ("labels" and "targets", the single-dataset fields, are None).

    datasets: {task: ImageDataset}, all at one image size; per_step: {task: samples per step (global batch)}.
    """

    def __init__(self, datasets: dict, per_step: dict, seed: int, rank: int = 0, world_size: int = 1):
        if list(datasets) != list(per_step):
            raise ConfigError(f"per-step counts for tasks {list(per_step)} do not match the datasets {list(datasets)}")
        _one_size({tuple(ds.images.shape[1:]) for ds in datasets.values()})  # the tasks' rows are concatenated
        self.datasets, self.seed = dict(datasets), int(seed)
        self.per_step, self.local, self.offset, self.steps_per_pass = {}, {}, {}, {}
        for i, (name, ds) in enumerate(self.datasets.items()):
            b = int(per_step[name])
            if b < world_size or b % world_size:
                raise ConfigError(f"task '{name}': {b} samples per step (train.batch_size shared by the tasks) must "
                                  f"be a positive multiple of the {world_size} processes")
            if len(ds) < b:
                raise ConfigError(f"task '{name}': {b} samples per step, but its dataset holds only {len(ds)} images")
            self.per_step[name] = b
            self.local[name] = b // world_size
            self.offset[name] = rank * (b // world_size)
            self.steps_per_pass[name] = len(ds) // b
        self._perm: dict[str, tuple[int, torch.Tensor]] = {}
        # One "epoch" of the run: the longest task's pass (used for epoch-based schedules and logging).
        self.steps_per_epoch = max(self.steps_per_pass.values())

    def passes(self, step: int) -> dict[str, int]:
        """Which pass over its dataset each task is in at `step` (0-based)."""
        return {name: step // s for name, s in self.steps_per_pass.items()}

    def indices(self, name: str, step: int) -> torch.Tensor:
        """This rank's sample indices of task `name` at `step`."""
        epoch, i = divmod(step, self.steps_per_pass[name])
        cached = self._perm.get(name)
        if cached is None or cached[0] != epoch:
            # (seed, task name, pass): each task's order is its own, unchanged when tasks are added or reordered
            perm = epoch_permutation(len(self.datasets[name]), self.seed * 1_000_033 + zlib.crc32(name.encode()), epoch)
            self._perm[name] = cached = (epoch, perm)
        start = i * self.per_step[name] + self.offset[name]
        return cached[1][start:start + self.local[name]]

    def __call__(self, step: int, device: torch.device | str = "cpu") -> dict:
        images, labels, targets, slices, row = [], {}, {}, {}, 0
        for name, ds in self.datasets.items():
            idx = self.indices(name, step)
            images.append(ds.images[idx])
            labels[name] = ds.labels[idx].to(device, non_blocking=True)
            targets[name] = ds.targets[idx].to(device, non_blocking=True) if ds.targets is not None else None
            slices[name] = (row, row + len(idx))
            row += len(idx)
        return {"images": torch.cat(images).to(device, non_blocking=True), "task_slices": slices,
                "task_labels": labels, "task_targets": targets, "labels": None, "targets": None}


class MultiTaskData:
    """The training data of a multi-task run: one dataset per task (all at one image size) and what the loop asks
    of training data: `image_size`, `batches(...)` (a `TaskBatches`), `len`, and no single label space
    (`classes` empty, `label_values` 0, so the online probe and the kNN monitor stay off).

    tasks: {name: (output, loss, λ_t)} for the objective's data-fitting hook; queries: {name: (output, Q)} for
    the model's task head.
    """

    classes: list = []
    targets = None
    label_values = 0

    def __init__(self, datasets: dict, specs: dict, queries: dict[str, tuple[str, int]]):
        self.datasets = dict(datasets)
        self.tasks = {n: (s.output, s.loss, float(s.weight)) for n, s in specs.items()}
        self.queries = {n: (str(o), int(q)) for n, (o, q) in queries.items()}  # may hold more tasks (stage 2)
        self.image_size = _one_size({ds.image_size for ds in self.datasets.values()})
        self.task_classes = {n: list(ds.classes) for n, ds in self.datasets.items()}

    def __len__(self) -> int:
        return sum(len(ds) for ds in self.datasets.values())

    def counts(self, batch_size: int) -> dict[str, int]:
        """Samples per step of each task: an equal share of train.batch_size (a multiple of the number of tasks)."""
        share, rest = divmod(int(batch_size), len(self.datasets))
        if share < 1 or rest:
            raise ConfigError(f"train.batch_size {batch_size} must be a positive multiple of the {len(self.datasets)} "
                              "tasks: every step draws the same number of samples from each task")
        return {name: share for name in self.datasets}

    def batches(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> TaskBatches:
        return TaskBatches(self.datasets, self.counts(batch_size), seed, rank, world_size)
