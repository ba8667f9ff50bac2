"""Faceptor's parts: multi-dataset batches (one sampler per task), and their resume."""
import doctest
import importlib

import pytest
import torch

from visrep.data.multitask import TaskBatches
from visrep.data.sources import ImageDataset
from visrep.errors import ConfigError


def _ds(n: int, name: str, size: int = 4) -> ImageDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
    return ImageDataset(images, torch.arange(n), [str(i) for i in range(n)], name)


@pytest.mark.parametrize("module", ["visrep.data.multitask", "visrep.data.batches"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0


def test_each_task_sees_every_sample_once_per_pass_and_restarts_on_its_own():
    batches = TaskBatches({"big": _ds(12, "big"), "small": _ds(5, "small")}, {"big": 3, "small": 2}, seed=0)
    assert batches.steps_per_pass == {"big": 4, "small": 2} and batches.steps_per_epoch == 4
    seen = {"big": [], "small": []}
    for step in range(8):
        b = batches(step)
        for name, (lo, hi) in b["task_slices"].items():
            assert torch.equal(b["images"][lo:hi, 0, 0, 0].long(), b["labels"][name])  # rows and labels agree
            seen[name].append(b["labels"][name].tolist())
    big = [x for batch in seen["big"] for x in batch]
    assert sorted(big[:12]) == list(range(12)) and sorted(big[12:]) == list(range(12))  # two whole passes
    small = [x for batch in seen["small"] for x in batch]
    for p in range(4):  # 2 steps per pass: 4 of its 5 images each pass (the remainder is dropped), new order each
        assert len(set(small[4 * p:4 * p + 4])) == 4
    assert small[0:4] != small[4:8]  # each pass is a new permutation


def test_a_resumed_sampler_draws_what_an_uninterrupted_one_does_and_ranks_split_each_task():
    data = {"a": _ds(10, "a"), "b": _ds(7, "b")}
    run = TaskBatches(data, {"a": 4, "b": 2}, seed=3)
    history = [run(s) for s in range(9)]
    resumed = TaskBatches(data, {"a": 4, "b": 2}, seed=3)  # a new process, started at step 6
    for s in range(6, 9):
        assert torch.equal(resumed(s)["images"], history[s]["images"])
    ranks = [TaskBatches(data, {"a": 4, "b": 2}, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in range(9):
        for name in data:
            joined = torch.cat([r(s)["labels"][name] for r in ranks])
            assert torch.equal(joined, history[s]["labels"][name])
    # adding a task leaves the others' order as it was
    more = TaskBatches({**data, "c": _ds(6, "c")}, {"a": 4, "b": 2, "c": 3}, seed=3)
    assert torch.equal(more(5)["labels"]["b"], history[5]["labels"]["b"])


def test_sampler_mistakes_are_one_sentence():
    with pytest.raises(ConfigError, match="holds only 3 images"):
        TaskBatches({"a": _ds(3, "a")}, {"a": 4}, seed=0)
    with pytest.raises(ConfigError, match="differ in size"):
        TaskBatches({"a": _ds(8, "a", 4), "b": _ds(8, "b", 6)}, {"a": 2, "b": 2}, seed=0)
    with pytest.raises(ConfigError, match="multiple of the 2 processes"):
        TaskBatches({"a": _ds(8, "a")}, {"a": 3}, seed=0, world_size=2)
