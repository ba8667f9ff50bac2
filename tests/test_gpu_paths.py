"""The GPU-minded training switches, checked on the CPU: channels-last layout and torch.compile with its fallback."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import visrep
from visrep.train.state import _guard_compiled, use_channels_last

from conftest import tiny_overrides


def _first_losses(tmp_path, **train):
    over = tiny_overrides(tmp_path, method="simclr")
    over["train"].update(epochs=1, deterministic=True, **train)
    over["monitor"] = {"knn_every": 0, "online_probe": False}
    visrep.pretrain(visrep.resolve(over), quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_channels_last_trains_to_the_same_losses(tmp_path):
    plain = _first_losses(tmp_path / "a", channels_last=False)
    nhwc = _first_losses(tmp_path / "b", channels_last=True)
    assert len(plain) == len(nhwc) == 2
    assert nhwc == pytest.approx(plain, rel=1e-4, abs=1e-5)


def test_channels_last_only_for_convolutional_backbones():
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    vit_like = nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.Linear(4, 4))  # a patch embedding only
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_channels_last(None, cnn, cuda) and not use_channels_last(None, cnn, cpu)
    assert use_channels_last(True, cnn, cpu) and not use_channels_last(True, vit_like, cuda)
    assert not use_channels_last(False, cnn, cuda)


def test_a_failing_compile_falls_back_to_eager_with_one_warning():
    module = nn.Linear(3, 2)
    x = torch.randn(4, 3)

    def broken(*args, **kwargs):
        raise RuntimeError("inductor: no C++ compiler found\nlong details")

    _guard_compiled(module, broken, "backbone 'toy'")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = module(x)
        again = module(x)
    assert torch.equal(out, module.forward(x)) and torch.equal(again, out)
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "torch.compile failed for the backbone 'toy' (RuntimeError: inductor: no C++" in msgs[0]
    assert module._compiled_call_impl is None  # eager from then on


@pytest.mark.slow
def test_compile_option_trains(tmp_path):
    """train.compile=true: the run finishes, compiled where this machine can compile, eager after one warning where not."""
    losses = _first_losses(tmp_path, compile=True)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def _gpu_check(*args, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=900,
                          cwd=tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_refuses_without_cuda(tmp_path):
    r = _gpu_check("--out", str(tmp_path / "g.json"), tmp_path=tmp_path)
    assert r.returncode == 2 and "CUDA is not available" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "g.json").exists()


@pytest.mark.slow
def test_gpu_check_cpu_mode(tmp_path):
    """The prepared GPU check at its tiny CPU size: every part runs and lands in the JSON."""
    r = _gpu_check("--cpu", "--out", str(tmp_path / "g.json"), tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "g.json").read_text())
    assert set(res["simclr_resnet18"]) == {"fp32", "bf16", "bf16_channels_last_compile"}
    assert all(v["images_per_s"] > 0 for v in res["simclr_resnet18"].values())
    assert res["mae_vit_base"]["images_per_s"] > 0 and res["illama_attention"]["soft_over_fused"] > 0
    assert res["streaming"]["decode_images_per_s"] > 0 and res["byol_cpu_vs_gpu"]["agree"]
    assert res["machine"] and res["mode"] == "cpu"
