"""The command line: listing, one-line errors, and every preset pretraining + evaluating on CIFAR-10."""
import json
import os
import subprocess
import sys

import pytest

from visrep.cli import run
from conftest import CIFAR_ARCHIVE

PRESETS = ["simclr", "moco_v2", "moco_v3", "byol", "simsiam", "barlow_twins", "vicreg", "dino", "swav"]


def test_list_shows_every_kind(capsys):
    from visrep.methods import METHODS

    assert run(["list", "methods"]) == 0
    out = capsys.readouterr().out
    for m in METHODS.names():
        assert f"  {m}" in out
    assert run(["list"]) == 0
    out = capsys.readouterr().out
    for kind in ("methods:", "views:", "masks:", "backbones:", "datasets:", "objectives:", "heads:", "decoders:"):
        assert kind in out
    for name in ("digits", "cifar10", "cifar100", "imagefolder", "synthetic", "multicrop", "vit_tiny", "resnet50",
                 "illama_tiny", "illama_base", "hard_patches", "block", "mae", "hpm", "simmim", "supervised"):
        assert name in out


def _cli(*args, env=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "visrep.cli", *args], capture_output=True, text=True, env=e,
                          timeout=300)


@pytest.mark.parametrize("args, fragment", [
    (["pretrain", "optim.lrr=1"], "unknown config key 'optim.lrr' (did you mean 'optim.lr'?); valid keys:"),
    (["pretrain", "method=simclr", "data.dataset=cifar10", "data.download=false", "data.root=/nonexistent"],
     "error:"),
    (["eval", "knn", "--model", "/nonexistent/run"], "error:"),
    (["list", "gizmos"], "cannot list 'gizmos'; valid choices:"),
])
def test_user_mistakes_are_one_line_errors(tmp_path, args, fragment):
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    assert fragment in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.skipif(not os.path.exists(CIFAR_ARCHIVE), reason="offline CIFAR-10 archive not available")
@pytest.mark.parametrize("method", PRESETS)
def test_each_preset_pretrains_an_epoch_on_cifar10_and_evaluates(tmp_path, method, capsys):
    """`visrep pretrain` (1 epoch on a 256-image CIFAR-10 subset) then `visrep eval knn` and `eval linear`."""
    out = tmp_path / method
    args = ["pretrain", "--data-dir", CIFAR_ARCHIVE, f"method={method}", "data.dataset=imagefolder",
            "data.subset=256", f"out_dir={out}", "train.epochs=1", "train.batch_size=128", "train.progress=false",
            "backbone.options.width=8", "monitor.bank_size=256", "monitor.test_size=128"]
    if method in ("dino", "swav"):  # keep the multi-crop presets' heads small for a CPU test
        args += ["projector.hidden_dim=64", "projector.bottleneck_dim=32" if method == "dino" else
                 "projector.num_prototypes=50"]
        args += ["projector.out_dim=256", "objective.params.out_dim=256"] if method == "dino" else []
    assert run(args) == 0
    assert "done: 2/2 steps" in capsys.readouterr().out
    for protocol in ("knn", "linear"):
        res_path = tmp_path / f"{method}_{protocol}.json"
        extra = ["--epochs", "5"] if protocol == "linear" else []
        assert run(["eval", protocol, "--model", str(out), "--dataset", "imagefolder", "--data-dir", CIFAR_ARCHIVE,
                    "--train-subset", "512", "--test-subset", "256", "--out", str(res_path), *extra]) == 0
        res = json.loads(res_path.read_text())
        assert 0.0 <= res["top1"] <= 1.0 and res["top5"] >= res["top1"]
        assert res["protocol"] == protocol and res["model"]["method"] == method


@pytest.mark.skipif(not os.path.exists(CIFAR_ARCHIVE), reason="offline CIFAR-10 archive not available")
@pytest.mark.parametrize("method, backbone", [("mae", "illama_tiny"), ("simmim", "vit_tiny"), ("hpm", "illama_small"),
                                              ("hpm_loss_pred_only", "vit_small"), ("supervised", "illama_base")])
def test_mim_supervised_and_illama_from_the_cli(tmp_path, method, backbone, capsys):
    """`visrep pretrain method=... backbone.name=...` (1 epoch, CIFAR-10 subset, 1 block), then eval knn/linear."""
    out = tmp_path / method
    args = ["pretrain", "--data-dir", CIFAR_ARCHIVE, f"method={method}", "data.dataset=imagefolder",
            "data.subset=256", f"out_dir={out}", "train.epochs=1", "train.batch_size=128", "train.progress=false",
            f"backbone.name={backbone}", "backbone.options.depth=1", "monitor.bank_size=256", "monitor.test_size=128"]
    if method in ("mae", "hpm", "hpm_loss_pred_only"):
        args += ["decoder.dim=32", "decoder.depth=1", "decoder.heads=2"]
    if method.startswith("hpm"):
        args += ["loss_predictor.dim=32", "loss_predictor.depth=1", "loss_predictor.heads=2"]
    assert run(args) == 0
    assert "done: 2/2 steps" in capsys.readouterr().out
    protocols = ("knn", "linear", "classifier") if method == "supervised" else ("knn", "linear")
    for protocol in protocols:
        res_path = tmp_path / f"{protocol}.json"
        extra = ["--epochs", "2"] if protocol == "linear" else []
        assert run(["eval", protocol, "--model", str(out), "--dataset", "imagefolder", "--data-dir", CIFAR_ARCHIVE,
                    "--train-subset", "256", "--test-subset", "128", "--out", str(res_path), *extra]) == 0
        res = json.loads(res_path.read_text())
        assert 0.0 <= res["top1"] <= res["top5"] <= 1.0 and res["model"]["method"] == method
