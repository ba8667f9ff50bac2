import os

import pytest
import torch

# Tests run on 2 shared cores: keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))

CIFAR_ARCHIVE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10", "cifar10-jpeg.tar.gz")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Feature/dataset caches go to one session-wide temp dir unless the caller chose one."""
    if "VISREP_CACHE" not in os.environ:
        monkeypatch.setenv("VISREP_CACHE", str(tmp_path_factory.getbasetemp() / "visrep-cache"))


def tiny_overrides(tmp_path, **extra):
    """A run small enough for a test: synthetic data, a narrow ResNet, 2 epochs of 2 steps."""
    from visrep.config import deep_merge

    base = {
        "out_dir": str(tmp_path / "run"),
        "data": {"dataset": "synthetic", "image_size": 16, "options": {"n": 64, "num_classes": 4}},
        "backbone": {"name": "resnet18", "options": {"cifar_stem": True, "width": 8}},
        "projector": {"type": "mlp", "hidden_dim": 32, "out_dim": 16, "num_layers": 2},
        "train": {"epochs": 2, "batch_size": 32, "progress": False, "deterministic": True, "log_every": 1},
        "monitor": {"knn_every": 1, "bank_size": None, "test_size": None},
    }
    return deep_merge(base, extra)
