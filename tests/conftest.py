import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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


def _jpeg(w, h, value=128):
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def fake_utk_archive(path: Path) -> Path:
    """A small utkface-96.tar.gz at `path`: 8 well-named faces, then 3 malformed records (no race, a stray
    space in the name, an image that does not decode)."""
    names = [f"{age}_{g}_{r}_2017010{i}.jpg.chip.jpg" for i, (age, g, r) in
             enumerate([(1, 0, 0), (5, 1, 1), (25, 0, 2), (25, 1, 3), (45, 0, 4), (80, 1, 0), (33, 0, 1), (61, 1, 2)])]
    with tarfile.open(path, "w:gz") as tf:
        for n in names:
            _add(tf, f"utkface-96/UTKFace/{n}", _jpeg(96, 96))
        _add(tf, "utkface-96/UTKFace/61_1_20170109150557335.jpg.chip.jpg", _jpeg(96, 96))     # no race
        _add(tf, "utkface-96/UTKFace/24_0_1_20170116220224657 .jpg.chip.jpg", _jpeg(96, 96))  # stray space
        _add(tf, "utkface-96/UTKFace/30_0_1_20170116220224658.jpg.chip.jpg", b"not a jpeg")    # corrupt
    return path
