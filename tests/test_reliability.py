"""Nothing lost, nothing run, nothing silently wrong (issue 9): checkpoints, the NaN guard, resume, validation.

Each test reproduces one defect found by fault injection; every one of them failed on commit 787f23d.
The data-side reproductions (crafted pickles, symlink loops, split leaks, cache races) are in
tests/test_reliability_data.py.
"""
import json
import shutil

import numpy as np
import pytest
import torch

import visrep
from visrep import cli
from visrep.errors import ConfigError, DataError, TrainingError, VisrepError
from visrep.checkpoint import (CheckpointError, checkpoint_sha256, first_non_finite, load_checkpoint,
                                     save_checkpoint)

from conftest import tiny_overrides

CKPT = ("run", "checkpoints", "last.safetensors")


def _byol(tmp_path, **extra):
    over = tiny_overrides(tmp_path, method="byol", projector={"hidden_dim": 32, "out_dim": 16},
                          predictor={"hidden_dim": 32, "out_dim": 16})
    over["monitor"] = {"knn_every": 0}
    from visrep.config import deep_merge

    return deep_merge(over, extra)


def _run_cli(argv, capsys):
    """`visrep ARGV` in-process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("visrep: warning")]
    assert len(lines) == 1 and lines[0].startswith("visrep: error: "), err
    return lines[0]


def _header(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return raw, n, json.loads(raw[8:8 + n])


def _rewrite_visrep_meta(path, edit):
    """Edit the JSON metadata string of a safetensors file in place, as a user with a text editor could."""
    raw, n, header = _header(path)
    header["__metadata__"]["visrep"] = edit(header["__metadata__"]["visrep"])
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def _set_meta(path, **fields):
    def edit(text):
        meta = json.loads(text)
        for k, v in fields.items():
            if v is None:
                meta.pop(k)
            else:
                meta[k] = v
        return json.dumps(meta)

    _rewrite_visrep_meta(path, edit)


# ----------------------------------------------------------------------------------- 1. the NaN guard
def test_first_non_finite_names_the_first_bad_tensor_and_ignores_integers():
    ok = {"a": torch.ones(3), "n": torch.tensor(7), "b": torch.zeros(2, 2, dtype=torch.bfloat16)}
    assert first_non_finite(ok) is None
    bad = {"a": torch.ones(3), "b": torch.tensor([1.0, float("inf")]), "c": torch.tensor([float("nan")])}
    assert first_non_finite(bad) == "b"
    assert first_non_finite({"x": torch.full((4,), 3e38), "y": torch.tensor([float("nan")])}) == "y"  # no overflow


def test_nan_guard_keeps_the_last_finite_checkpoint_and_names_the_tensor(tmp_path):
    # The reproduction at test size: BYOL with an absurd lr. The loss stays finite for a while, but the
    # BatchNorm running variances overflow first; 787f23d saved them as the "last good checkpoint".
    cfg = visrep.resolve(_byol(tmp_path, train={"epochs": 6}, optim={"lr": 1e12, "warmup_epochs": 4}))
    with pytest.raises(TrainingError) as e:
        visrep.pretrain(cfg, quiet=True)
    msg = str(e.value)
    assert "no longer finite" in msg and "running_var" in msg
    assert f"last good checkpoint (step 2) is kept at {tmp_path.joinpath(*CKPT)}" in msg
    assert "fp32" not in msg
    tensors, meta = load_checkpoint(tmp_path.joinpath(*CKPT))
    assert meta["step"] == 2 and first_non_finite(tensors) is None
    res = visrep.evaluate_knn(str(tmp_path / "run"), dataset="synthetic", dataset_options={"n": 64, "num_classes": 4},
                              image_size=16, progress=False)
    assert 0 <= res["top1"] <= 1


def test_the_finiteness_check_is_one_fused_reduction(monkeypatch):
    calls = []
    real = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm", lambda ts, *a, **k: calls.append(len(ts)) or real(ts, *a, **k))
    tensors = {f"t{i}": torch.randn(5) for i in range(50)}
    tensors["t37"][2] = float("nan")
    assert first_non_finite(tensors) == "t37" and calls == [50]


def test_eval_refuses_non_finite_weights(tmp_path):
    visrep.pretrain(visrep.resolve(tiny_overrides(tmp_path, train={"epochs": 1})), quiet=True)
    path = tmp_path.joinpath(*CKPT)
    tensors, meta = load_checkpoint(path)
    key = next(k for k in tensors if k.endswith("running_var"))
    tensors[key][0] = float("inf")
    save_checkpoint(path, tensors, meta)  # a well-formed file (valid hash) that holds an Inf
    with pytest.raises(VisrepError, match="non-finite weights"):
        visrep.evaluate_knn(str(tmp_path / "run"), dataset="synthetic", dataset_options={"n": 64, "num_classes": 4},
                            progress=False)
    from visrep.train.finetune import prepare_finetune_config  # and fine-tuning does not start from them

    ft = visrep.resolve({"method": "supervised", "finetune": {"init": str(tmp_path / "run")},
                         "out_dir": str(tmp_path / "ft")})
    with pytest.raises(VisrepError, match="non-finite weights"):
        prepare_finetune_config(ft)


@pytest.mark.parametrize("precision,advice", [("fp32", False), ("bf16", True)])
def test_nan_loss_message_advises_fp32_only_when_not_fp32(tmp_path, monkeypatch, precision, advice):
    from visrep.objectives.contrastive import NTXentLoss

    monkeypatch.setattr(NTXentLoss, "forward", lambda self, *a, **k: torch.tensor(float("nan"), requires_grad=True))
    cfg = visrep.resolve(tiny_overrides(tmp_path, train={"precision": precision}))
    with pytest.raises(TrainingError) as e:
        visrep.pretrain(cfg, quiet=True)
    assert "the loss became nan at step 0" in str(e.value)
    assert ("train.precision=fp32" in str(e.value)) is advice


# ----------------------------------------------------------------------------------- 3. integrity
def _flip_bytes_in(path, name, n=64):
    raw, hlen, header = _header(path)
    start, end = header[name]["data_offsets"]
    base = 8 + hlen + start + (end - start) // 2 - n // 2
    data = bytearray(raw)
    for i in range(n):
        data[base + i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_detected_on_resume_and_eval_and_the_file_is_never_overwritten(tmp_path, capsys):
    over = tiny_overrides(tmp_path, train={"epochs": 1})
    visrep.pretrain(visrep.resolve(over), quiet=True)
    path = tmp_path.joinpath(*CKPT)
    _flip_bytes_in(path, "model.backbone.conv1.weight")
    corrupted = path.read_bytes()

    over["train"]["epochs"] = 2
    with pytest.raises(CheckpointError, match="integrity check"):
        visrep.pretrain(visrep.resolve(over), resume=True, quiet=True)
    assert path.read_bytes() == corrupted
    code, _, err = _run_cli(["eval", "knn", "--model", str(tmp_path / "run"), "--dataset", "synthetic",
                             "--dataset-options", "{n: 64, num_classes: 4}"], capsys)
    assert code == 2 and "fails its integrity check" in _one_line_error(err) and "--force" in err
    assert path.read_bytes() == corrupted

    with pytest.warns(UserWarning, match="--force"):  # the user's explicit choice: load it anyway
        res = visrep.evaluate_knn(str(tmp_path / "run"), dataset="synthetic", force=True, progress=False,
                                  dataset_options={"n": 64, "num_classes": 4})
    assert 0 <= res["top1"] <= 1


def test_the_hash_covers_names_dtypes_shapes_bytes_and_metadata():
    import hashlib

    a = {"w": torch.arange(6, dtype=torch.float32)}
    h = checkpoint_sha256(a)
    # by hand: name, dtype, shape, then the raw little-endian bytes
    assert h == hashlib.sha256(b"w\0torch.float32\0(6,)\0" + np.arange(6, dtype="<f4").tobytes()).hexdigest()
    assert h != checkpoint_sha256({"v": a["w"]})
    assert h != checkpoint_sha256({"w": a["w"].reshape(2, 3)})
    assert h != checkpoint_sha256({"w": a["w"].double()})
    b = a["w"].clone()
    b[3] = 3.0000002
    assert h != checkpoint_sha256({"w": b})
    meta = {"step": 2, "config": {"optim": {"lr": 0.4}}}
    assert checkpoint_sha256(a, meta) == checkpoint_sha256(a, {"config": {"optim": {"lr": 0.4}}, "step": 2})
    assert checkpoint_sha256(a, meta) != checkpoint_sha256(a, {**meta, "config": {"optim": {"lr": 0.5}}})


def test_an_edited_header_field_fails_the_integrity_check(tmp_path, capsys):
    over = tiny_overrides(tmp_path, train={"epochs": 2, "max_steps": 2})
    visrep.pretrain(visrep.resolve(over), quiet=True)
    path = tmp_path.joinpath(*CKPT)
    def edit(text):  # one changed number, as a flipped bit or an editor could make
        meta = json.loads(text)
        meta["config"]["optim"]["lr"] *= 1.25
        return json.dumps(meta)

    _rewrite_visrep_meta(path, edit)
    before = path.read_bytes()
    code, _, err = _run_cli(["pretrain", "--resume", str(tmp_path / "run"), "train.max_steps=null"], capsys)
    assert code == 2 and "fails its integrity check" in _one_line_error(err)
    assert path.read_bytes() == before
    s = visrep.pretrain(visrep.resume_config(str(tmp_path / "run"), ["train.max_steps=null"]), resume=True,
                        force=True, quiet=True)  # --force: the user's choice
    assert s["steps"] == 4


def test_a_checkpoint_of_another_shape_or_with_nan_weights_is_not_resumed(tmp_path, capsys):
    over = tiny_overrides(tmp_path, train={"epochs": 2, "max_steps": 2})
    visrep.pretrain(visrep.resolve(over), quiet=True)
    path = tmp_path.joinpath(*CKPT)
    tensors, meta = load_checkpoint(path)
    good = dict(tensors)
    del tensors["rng.torch"]
    save_checkpoint(path, tensors, meta)  # well-formed, valid hash, but not this run's full state
    code, _, err = _run_cli(["pretrain", "--resume", str(tmp_path / "run"), "train.max_steps=null"], capsys)
    assert code == 2 and "does not hold this run's state" in _one_line_error(err)
    good["model.backbone.conv1.weight"] = good["model.backbone.conv1.weight"] * float("nan")
    save_checkpoint(path, good, meta)
    code, _, err = _run_cli(["pretrain", "--resume", str(tmp_path / "run"), "train.max_steps=null"], capsys)
    assert code == 2 and "holds non-finite weights ('model.backbone.conv1.weight'" in _one_line_error(err)


@pytest.mark.parametrize("edit,flags,expect", [
    (lambda p: _rewrite_visrep_meta(p, lambda t: t[:-7]), [], "not JSON"),
    (lambda p: _set_meta(p, step="abc"), [], "invalid metadata field 'step'"),
    (lambda p: _set_meta(p, optimizer=None), [], "fails its integrity check"),
    (lambda p: _set_meta(p, optimizer=None), ["--force"], "no 'optimizer'"),  # past the hash, the schema holds
    (lambda p: _set_meta(p, step=1), [], "says step 1 in its metadata but its tensors were saved at step 2"),
    (lambda p: _set_meta(p, step=1000000), [], "says step 1000000 in its metadata but its tensors were saved at step 2"),
])
def test_bad_checkpoint_metadata_is_one_sentence_and_changes_nothing(tmp_path, capsys, edit, flags, expect):
    over = tiny_overrides(tmp_path, train={"epochs": 2, "max_steps": 2})
    visrep.pretrain(visrep.resolve(over), quiet=True)
    path = tmp_path.joinpath(*CKPT)
    edit(path)
    before = path.read_bytes()
    code, _, err = _run_cli(["pretrain", "--resume", str(tmp_path / "run"), "train.max_steps=null", *flags], capsys)
    assert code == 2 and expect in _one_line_error(err)
    assert path.read_bytes() == before


def test_stray_temporary_files_of_killed_writes_are_removed_at_the_next_start(tmp_path):
    over = tiny_overrides(tmp_path, train={"epochs": 2, "max_steps": 2})
    visrep.pretrain(visrep.resolve(over), quiet=True)
    folder = tmp_path / "run" / "checkpoints"
    for name in ("last.safetensors.tmp", ".tmpa1b2c3"):
        (folder / name).write_bytes(b"half a checkpoint")
    over["train"]["max_steps"] = None
    visrep.pretrain(visrep.resolve(over), resume=True, quiet=True)
    assert sorted(p.name for p in folder.iterdir()) == ["last.safetensors"]


# ----------------------------------------------------------------------------------- 4. resume is about the run
def test_resume_accepts_the_same_folder_spelled_differently_or_moved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    over = tiny_overrides(tmp_path, train={"epochs": 3, "max_steps": 2})
    over["out_dir"] = "runs/a"
    visrep.pretrain(visrep.resolve(over), quiet=True)
    for spelling in (str(tmp_path / "runs" / "a"), "./runs/a"):
        s = visrep.pretrain(visrep.resolve({**over, "out_dir": spelling}, ["train.max_steps=3"]), resume=True,
                            quiet=True)
        assert s["steps"] == 3
        over["train"]["max_steps"] = 4
    shutil.copytree(tmp_path / "runs" / "a", tmp_path / "moved")
    s = visrep.pretrain(visrep.resolve({**over, "out_dir": "moved"}, ["train.max_steps=null"]), resume=True, quiet=True)
    assert s["steps"] == 6 and s["stop_reason"] == "completed"


def test_resume_run_dir_needs_nothing_else_and_a_finished_run_is_left_alone(tmp_path, capsys):
    over = tiny_overrides(tmp_path, train={"epochs": 2, "max_steps": 2})
    visrep.pretrain(visrep.resolve(over), quiet=True)
    run = tmp_path / "run"
    code, out, err = _run_cli(["pretrain", "--resume", str(run), "train.max_steps=null"], capsys)
    assert code == 0 and "done: 4/4 steps (completed)" in out, err
    summary = (run / "summary.json").read_bytes()
    assert json.loads(summary)["final_loss"] == json.loads(summary)["final_loss"]  # a number, not NaN
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    code, out, err = _run_cli(["pretrain", "--resume", str(run)], capsys)
    assert code == 0 and "already finished at step 4/4; nothing was changed" in out, err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files
    # the Python API says so too
    again = visrep.pretrain(visrep.resume_config(str(run)), resume=True, quiet=True)
    assert again["already_finished"] == "completed" and again["final_loss"] == json.loads(summary)["final_loss"]


def test_metrics_hold_each_step_once_after_a_resume(tmp_path):
    # A kill between logging step 4 and writing its checkpoint: resume restarts at step 2 and logs 3, 4 again.
    over = tiny_overrides(tmp_path, train={"epochs": 2, "max_steps": 2})
    visrep.pretrain(visrep.resolve(over), quiet=True)
    path = tmp_path.joinpath(*CKPT)
    at_step_2 = path.read_bytes()
    visrep.pretrain(visrep.resolve(over, ["train.max_steps=null"]), resume=True, quiet=True)
    path.write_bytes(at_step_2)
    visrep.pretrain(visrep.resolve(over, ["train.max_steps=null"]), resume=True, quiet=True)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "step" in r]
    epochs = [r["epoch"] for r in records if "knn_top1" in r]
    assert steps == [1, 2, 3, 4] and epochs == [0, 1.0, 2.0]


# ----------------------------------------------------------------------------------- 6. mistakes that passed
@pytest.mark.parametrize("override,expect", [
    ("optim.lr=-0.1", "optim.lr must be in [0, inf)"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay must be in [0, inf)"),
    ("optim.momentum=1.0", "optim.momentum must be in [0, 1)"),
    ("optim.momentum=-0.5", "optim.momentum must be in [0, 1)"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs must be in [0, inf)"),
    ("train.max_steps=0", "train.max_steps must be in [1, inf)"),
    ("optim.betas=[0.9, 1.5]", "optim.betas must be two numbers in [0, 1)"),
    ("optim.lr=.nan", "optim.lr must be a finite number"),
    ("optim.momentum=.nan", "optim.momentum must be a finite number"),
])
def test_values_that_make_no_sense_are_config_errors(override, expect, capsys):
    with pytest.raises(ConfigError, match=expect.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        visrep.resolve(overrides=[override])
    code, _, err = _run_cli(["pretrain", override, "--print-config"], capsys)
    assert code == 2 and expect in _one_line_error(err)


def _png_tree(root, layout):
    """layout: {"train/cat": [(h, w), ...], ...} -> PNG files of those sizes (seeded noise)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for folder, sizes in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / folder / f"{i}.png")
    return root


def test_one_class_is_refused_for_a_classifier_and_for_eval(tmp_path):
    data = _png_tree(tmp_path / "one", {"train/cat": [(16, 16)] * 32, "test/cat": [(16, 16)] * 4})
    over = tiny_overrides(tmp_path, method="supervised")
    over.update(classifier={"type": "linear"}, data={"dataset": "imagefolder", "root": str(data)})
    with pytest.raises(ConfigError, match="needs at least two"):
        visrep.pretrain(visrep.resolve(over), quiet=True)
    for fn in (visrep.evaluate_knn, visrep.evaluate_linear):
        with pytest.raises(DataError, match="holds 1 class"):
            fn("resnet18", dataset="imagefolder", root=str(data), progress=False,
               backbone_options={"cifar_stem": True, "width": 8})


def test_eval_refuses_a_test_split_that_is_the_training_split(tmp_path):
    data = _png_tree(tmp_path / "d", {"train/cat": [(16, 16)] * 4, "train/dog": [(16, 16)] * 4})
    shutil.copytree(data / "train", data / "test")  # the "test" folder is a copy of the training images
    with pytest.raises(DataError, match="hold the same images"):
        visrep.evaluate_knn("resnet18", dataset="imagefolder", root=str(data), progress=False,
                            backbone_options={"cifar_stem": True, "width": 8})


def test_yaml_syntax_errors_name_the_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: byol\ntrain:\n  epochs: 2\n  batch_size: [1, 2\n")
    code, _, err = _run_cli(["pretrain", "--config", str(bad), "--print-config"], capsys)
    assert code == 2 and "is not valid YAML at line 5, column 1" in _one_line_error(err)
    code, _, err = _run_cli(["eval", "knn", "--model", "resnet18", "--dataset-options", "{task: [age"], capsys)
    assert code == 2 and "--dataset-options is not valid YAML at line 1" in _one_line_error(err)


def test_a_config_that_is_not_text_is_one_sentence(tmp_path, capsys):
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"\xff\xfe\x00method")
    code, _, err = _run_cli(["pretrain", "--config", str(bad), "--print-config"], capsys)
    assert code == 2 and "is not UTF-8 text" in _one_line_error(err)


def test_a_second_process_in_the_same_run_folder_is_refused(tmp_path):
    import subprocess
    import sys
    import time

    from test_kill_and_torchrun import _dotted

    over = tiny_overrides(tmp_path, train={"epochs": 200})
    proc = subprocess.Popen([sys.executable, "-m", "visrep.cli", "pretrain", *_dotted(over)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        ckpt = tmp_path.joinpath(*CKPT)
        while not ckpt.exists() and time.time() < deadline:  # the first run holds the folder
            time.sleep(0.05)
        assert ckpt.exists()
        with pytest.raises(ConfigError, match="another visrep process is training in"):
            visrep.pretrain(visrep.resolve({**over, "out_dir": str(tmp_path / "." / "run")}), resume=True, quiet=True)
    finally:
        proc.kill()
        proc.wait()


def test_resume_run_dir_whose_name_holds_an_equals_sign(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    over = tiny_overrides(tmp_path, train={"epochs": 2, "max_steps": 2})
    over["out_dir"] = "lr=0.1"
    visrep.pretrain(visrep.resolve(over), quiet=True)
    code, out, err = _run_cli(["pretrain", "--resume", "lr=0.1"], capsys)
    assert code == 0 and "reached train.max_steps at step 2/4" in out and "train.max_steps=N (or null)" in out, err


def test_a_finetune_killed_before_its_export_finishes_it_on_resume_even_when_moved(tmp_path, monkeypatch):
    from test_transfer import _pretrained

    pre = _pretrained(tmp_path / "p")
    over = {"method": "supervised", "out_dir": str(tmp_path / "ft"),
            "data": {"dataset": "synthetic", "options": {"n": 64, "num_classes": 4}},
            "train": {"epochs": 1, "batch_size": 32, "progress": False}, "monitor": {"knn_every": 0},
            "finetune": {"init": pre}}
    first = visrep.finetune(visrep.resolve(over), quiet=True)
    shutil.rmtree(tmp_path / "ft" / "export")  # killed after training, before the export and evaluation
    (tmp_path / "ft" / "eval.json").unlink()
    shutil.move(tmp_path / "ft", tmp_path / "moved")
    shutil.rmtree(pre)  # its init is gone too: a resumed run no longer needs it
    again = visrep.finetune(visrep.resume_config(str(tmp_path / "moved")), resume=True, quiet=True)
    assert "already_finished" not in again and again["eval"]["top1"] == first["eval"]["top1"]
    assert (tmp_path / "moved" / "export" / "backbone.safetensors").is_file()
    files = {p: p.read_bytes() for p in (tmp_path / "moved").rglob("*") if p.is_file()}
    assert visrep.finetune(visrep.resume_config(str(tmp_path / "moved")), resume=True, quiet=True)["already_finished"]
    assert {p: p.read_bytes() for p in (tmp_path / "moved").rglob("*") if p.is_file()} == files


def test_dotted_overrides_are_accepted_anywhere_on_the_line(tmp_path, capsys):
    code, out, err = _run_cli(["pretrain", "method=byol", "--data-dir", str(tmp_path), "train.epochs=2",
                               "--print-config", "optim.lr=0.5"], capsys)
    assert code == 0, err
    import yaml

    cfg = yaml.safe_load(out)
    assert (cfg["method"], cfg["train"]["epochs"], cfg["optim"]["lr"], cfg["data"]["root"]) == \
        ("byol", 2, 0.5, str(tmp_path))
    code, _, err = _run_cli(["pretrain", "--print-config", "--no-such-flag"], capsys)
    assert code == 2 and "unrecognized argument --no-such-flag" in _one_line_error(err)


def test_eval_image_size_flag_resizes_a_folder_of_mixed_sizes(tmp_path):
    sizes = [(16, 16), (24, 20), (20, 28)]
    data = _png_tree(tmp_path / "mixed", {f"{s}/{c}": sizes for s in ("train", "test") for c in ("cat", "dog")})
    res = visrep.evaluate_knn("resnet18", dataset="imagefolder", root=str(data), image_size=16, progress=False,
                              backbone_options={"cifar_stem": True, "width": 8})
    assert res["image_size"] == 16 and res["dataset"]["train_size"] == 6


def test_crafted_tar_members_write_nothing_and_links_are_ignored(tmp_path):
    import io
    import tarfile

    from PIL import Image

    from visrep.data.sources import load_dataset

    def png():
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    work = tmp_path / "work"
    work.mkdir()
    archive = work / "crafted.tar"
    with tarfile.open(archive, "w") as tf:
        def add(name, data=None, link=None):
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        for i in range(3):
            add(f"train/cat/{i}.png", png())
            add(f"train/dog/{i}.png", png())
        add("../escaped/x.png", png())
        add(str(tmp_path / "absolute.png"), png())
        add("train/cat/link.png", link="/etc/passwd")
    before = sorted(p for p in tmp_path.rglob("*"))
    ds = load_dataset("imagefolder", "train", archive, cache=False)
    assert len(ds) == 6 and ds.classes == ["cat", "dog"]
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing was written anywhere


def test_a_class_missing_from_one_split_does_not_shift_the_labels_of_another(tmp_path):
    from visrep.data.sources import load_dataset

    data = _png_tree(tmp_path / "d", {"train/cat": [(8, 8)] * 2, "train/dog": [(8, 8)] * 2, "test/dog": [(8, 8)] * 2})
    train, test = (load_dataset("imagefolder", s, data, cache=False) for s in ("train", "test"))
    assert train.classes == test.classes == ["cat", "dog"]
    assert test.labels.tolist() == [1, 1]  # dog is 1 in both splits (787f23d: 0 in test, 1 in train)
