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
    """A run small enough for a test: synthetic data, a narrow ResNet, 2 epochs of 2 steps (and a narrow projector
    for the methods that have one; a classifier's width follows the data)."""
    from visrep.config import deep_merge
    from visrep.methods import METHODS

    base = {
        "out_dir": str(tmp_path / "run"),
        "data": {"dataset": "synthetic", "image_size": 16, "options": {"n": 64, "num_classes": 4}},
        "backbone": {"name": "resnet18", "options": {"cifar_stem": True, "width": 8}},
        "projector": {"type": "mlp", "hidden_dim": 32, "out_dim": 16, "num_layers": 2},
        "train": {"epochs": 2, "batch_size": 32, "progress": False, "deterministic": True, "log_every": 1},
        "monitor": {"knn_every": 1, "bank_size": None, "test_size": None},
    }
    if "projector" not in extra and METHODS.get(extra.get("method", "simclr")).config.get("projector") is None:
        base.pop("projector")  # supervised (a classifier instead) and masked image modelling
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


def preset_overrides(tmp_path, method, **extra):
    """`tiny_overrides` for any registered method, keeping its preset's structure but shrinking it: narrow
    projector/predictor/prototype widths, a short queue, and for masked image modelling a 2-block ViT with
    patch 4 and one-block decoders. Works for a method registered from a test file too."""
    from visrep.config import deep_merge
    from visrep.methods import METHODS

    preset = METHODS.get(method).config
    over = tiny_overrides(tmp_path, method=method)
    over.pop("projector", None)
    small = {"hidden_dim": 32, "out_dim": 16}
    proj = preset.get("projector")
    if isinstance(proj, dict) and proj.get("type") == "mlp":
        over["projector"] = small
    elif isinstance(proj, dict) and proj.get("type") == "dino":
        over["projector"] = {"hidden_dim": 32, "bottleneck_dim": 16, "out_dim": 64}
    elif isinstance(proj, dict) and proj.get("type") == "swav":
        over["projector"] = {"hidden_dim": 32, "out_dim": 16, "num_prototypes": 20}
    if isinstance(preset.get("predictor"), dict):
        over["predictor"] = small
    params = (preset.get("objective") or {}).get("params", {})
    shrink = {k: v for k, v in (("queue_size", 128), ("out_dim", over.get("projector", {}).get("out_dim", 16)))
              if k in params}
    if shrink:
        over["objective"] = {"params": shrink}
    if preset.get("masking"):
        over["backbone"] = {"name": "vit_tiny", "options": {"depth": 2, "patch_size": 4}}
        dec = {"type": "mae", "dim": 32, "depth": 1, "heads": 2}
        for part in ("decoder", "loss_predictor"):
            if (preset.get(part) or {}).get("type") == "mae":
                over[part] = dec
    if preset.get("tasks"):  # multi-task: two synthetic classification tasks, a narrow head, no monitors
        over["backbone"] = {"name": "vit_tiny", "options": {"depth": 2, "patch_size": 4}}
        over["tasks"] = [{"name": f"synthetic_{k}", "dataset": "synthetic", "output": "classification",
                          "options": {"n": 32, "num_classes": k, "seed": k}} for k in (3, 4)]
        kind = (preset.get("task_head") or {}).get("type", "faceptor")
        over["task_head"] = {"dim": 16, "depth": 1, "heads": 2, "ffn_dim": 32} if kind == "faceptor" else {"dim": 16}
        over["monitor"] = {"knn_every": 0, "rankme_every": 0, "online_probe": False}
    return deep_merge(over, extra)


def fake_mtfl_folder(root: Path, n_train: int = 8, n_test: int = 4) -> Path:
    """An MTFL/ folder under `root` with well-formed annotation lines: seeded noise faces of 40×40 px, landmarks
    inside the image, every attribute code in range."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = root / "MTFL" / "lfw_5590"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("training", n_train), ("testing", n_test)):
        lines = []
        for i in range(n):
            name = f"{split}_{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / name)
            pts = " ".join(str(int(v)) for v in rng.integers(5, 35, 10))
            attrs = f"{1 + i % 2} {1 + (i // 2) % 2} {1 + (i // 3) % 2} {1 + i % 5}"
            lines.append(f"lfw_5590\\{name} {pts} {attrs}")
        (root / "MTFL" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root
