"""Transfer protocols: LoRA (peft), layer-wise lr decay, fine-tuning runs, few-shot, calibration, regression
metrics, low-label subsets, and their CLI commands."""
import json
import math

import pytest
import torch

from visrep.cli import run
from visrep.errors import ConfigError

from conftest import tiny_overrides


# ------------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("name, linears", [("vit_tiny", ("qkv", "proj", "fc1", "fc2")),
                                           ("illama_tiny", ("qkv", "proj", "fc1_g", "fc1_x", "fc2"))])
def test_lora_counts_starts_at_identity_and_merges(name, linears):
    from visrep.models.backbones import build_backbone
    from visrep.models.lora import apply_lora, count_parameters, merge_lora

    torch.manual_seed(0)
    base = build_backbone(name, image_size=16, patch_size=4, depth=2)
    keys = list(base.state_dict())
    x = torch.randn(2, 3, 16, 16)
    y0 = base(x).detach()
    model = apply_lora(base, {"r": 4, "alpha": 8})
    # trainable = r·(in + out) for every targeted linear of every block
    expected = 0
    for n, m in model.base_model.model.named_modules():
        if n.split(".")[-1] in linears and hasattr(m, "base_layer"):
            expected += 4 * (m.base_layer.in_features + m.base_layer.out_features)
    trainable, total = count_parameters(model)
    assert trainable == expected > 0 and total > trainable
    torch.testing.assert_close(model(x), y0)  # B = 0 at init: the adapted model is the base model
    for n, p in model.named_parameters():  # give B a value, so merging has something to fold in
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    y1 = model(x).detach()
    assert not torch.allclose(y1, y0)
    merged = merge_lora(model)
    assert list(merged.state_dict()) == keys  # plain timm-style keys again
    torch.testing.assert_close(merged(x), y1, rtol=1e-4, atol=1e-4)


def test_lora_spec_errors():
    from visrep import api

    with pytest.raises(ConfigError, match="unknown option 'finetune.lora.rank'"):
        api.resolve({"method": "supervised", "finetune": {"init": "x", "mode": "lora", "lora": {"rank": 4}}})
    with pytest.raises(ConfigError, match="needs finetune.init"):
        api.resolve({"method": "supervised", "finetune": {"mode": "lora"}})
    with pytest.raises(ConfigError, match="finetune.mode must be one of full, lora"):
        api.resolve({"method": "supervised", "finetune": {"mode": "adapter"}})


# --------------------------------------------------------------------------------- layer-wise lr decay
def test_layer_decay_scales_by_hand():
    """depth 2, decay 0.5: stem 0.5³, block 0 0.5², block 1 (and the final norm) 0.5, head 1 (BEiT)."""
    from visrep import api
    from visrep.methods import build_template
    from visrep.train.optim import build_param_groups

    cfg = api.resolve({"method": "supervised", "backbone": {"name": "vit_tiny", "options": {"depth": 2}},
                       "finetune": {"layer_decay": 0.5}})
    model = build_template(cfg, 16, 3)
    groups, manifold = build_param_groups(model, cfg)
    scale = {id(p): g.get("lr_scale", 1.0) for g in groups for p in g["params"]}
    bb = model.backbone
    assert scale[id(bb.patch_embed.proj.weight)] == pytest.approx(0.125)
    assert scale[id(bb.cls_token)] == pytest.approx(0.125)
    assert scale[id(bb.blocks[0].attn.qkv.weight)] == pytest.approx(0.25)
    assert scale[id(bb.blocks[1].mlp.fc2.weight)] == pytest.approx(0.5)
    assert scale[id(bb.norm.weight)] == pytest.approx(0.5)
    assert scale[id(model.classifier.fc.weight)] == 1.0 and manifold == []
    wd = {id(p): g["wd_scale"] for g in groups for p in g["params"]}
    assert wd[id(bb.cls_token)] == 0 and wd[id(bb.pos_embed)] == 0 and wd[id(bb.blocks[0].attn.qkv.weight)] == 1


# ------------------------------------------------------------------------------------ few-shot, ECE, NME
def test_fewshot_by_hand():
    from visrep.evaluate.fewshot import episode_accuracy, fewshot_eval, mean_ci95

    m, ci = mean_ci95([0.5, 0.7, 0.6])
    assert m == pytest.approx(0.6) and ci == pytest.approx(1.96 * 0.1 / math.sqrt(3))
    # CL2N + nearest centroid: supports at ±e1 (after centring), queries on either side
    sup = torch.tensor([[3.0, 0.0], [1.0, 0.0]])
    assert episode_accuracy(sup, torch.tensor([0, 1]), torch.tensor([[2.5, 0.1], [0.2, 0.0]]),
                            torch.tensor([0, 1])) == 1.0
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=g) * 10
    ytr, yte = torch.arange(4).repeat(20), torch.arange(4).repeat(10)
    ftr = centers[ytr] + torch.randn(80, 8, generator=g)
    fte = centers[yte] + torch.randn(40, 8, generator=g)
    res = fewshot_eval(ftr, ytr, fte, yte, shots=1, ways=3, queries=5, episodes=30, seed=0)
    assert res["top1"] > 0.9 and res["ways"] == 3 and res["episodes"] == 30
    assert res == fewshot_eval(ftr, ytr, fte, yte, shots=1, ways=3, queries=5, episodes=30, seed=0)
    with pytest.raises(ConfigError, match="ways must be in"):
        fewshot_eval(ftr, ytr, fte, yte, shots=1, ways=9)


def test_ece_and_reliability_diagram_by_hand(tmp_path):
    from visrep.evaluate.calibration import expected_calibration_error, reliability_diagram

    p = torch.tensor([[0.85, 0.15], [0.85, 0.15], [0.55, 0.45], [0.35, 0.65]])
    r = expected_calibration_error(p, torch.tensor([0, 1, 0, 1]), n_bins=10)
    # bins: (0.8, 0.9] acc 0.5 conf 0.85 (2 images); (0.5, 0.6] acc 1 conf 0.55; (0.6, 0.7] acc 1 conf 0.65
    assert r["ece"] == pytest.approx(2 / 4 * 0.35 + 1 / 4 * 0.45 + 1 / 4 * 0.35)
    assert r["mce"] == pytest.approx(0.45) and r["top1"] == 0.75
    assert [b["count"] for b in r["bins"]] == [0, 0, 0, 0, 0, 1, 1, 0, 2, 0]
    perfect = expected_calibration_error(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    assert perfect["ece"] == 0.0
    path = reliability_diagram(r, tmp_path / "rel.png")
    assert path.stat().st_size > 1000


def test_landmark_nme_and_regression_metrics_by_hand():
    from visrep.evaluate.regression import landmark_nme, regression_metrics

    # two points, eyes (0, 0) and (2, 0): d = 2; the first prediction is 1 off -> (1/2 + 0)/2 = 0.25
    gt = torch.tensor([[0.0, 2.0, 0.0, 0.0]])
    r = landmark_nme(torch.tensor([[0.0, 2.0, 1.0, 0.0]]), gt)
    assert r["nme"] == pytest.approx(0.25) and r["failure_rate"] == 1.0
    assert r["nme_per_point"] == pytest.approx([0.5, 0.0])
    m = regression_metrics(torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [6.0]]))
    assert m["mae"] == pytest.approx(2.0) and m["rmse"] == pytest.approx(math.sqrt(5.0))


def test_label_fraction_is_class_balanced():
    from visrep.data import load_dataset

    ds = load_dataset("synthetic", "train", n=400, num_classes=4)
    one = ds.fraction(0.01, seed=0)
    assert len(one) == 4 and sorted(one.labels.tolist()) == [0, 1, 2, 3]  # at least one per class
    ten = ds.fraction(0.1, seed=0)
    assert len(ten) == 40 and torch.bincount(ten.labels).tolist() == [10, 10, 10, 10]
    with pytest.raises(ConfigError, match="label fraction"):
        ds.fraction(0.0)


def test_low_label_probe_sees_the_same_images_as_low_label_finetuning(monkeypatch):
    """eval knn/linear/calibration with label_fraction take the subset the training loop takes for
    data.label_fraction with the same seed, so 1 % probes and 1 % fine-tunings compare on equal labels."""
    from visrep.data import load_dataset
    from visrep.evaluate import api as eval_api

    seen = []
    real = eval_api.extract_features_with_info

    def spy(model, ds, **kw):
        seen.append(ds)
        return real(model, ds, **kw)

    monkeypatch.setattr(eval_api, "extract_features_with_info", spy)
    opts = {"n": 200, "num_classes": 4}
    res = eval_api.evaluate_knn("resnet18", dataset="synthetic", dataset_options=opts, label_fraction=0.1, seed=3,
                                backbone_options={"cifar_stem": True, "width": 8}, cache_dir=False, progress=False)
    loop_subset = load_dataset("synthetic", "train", **opts).fraction(0.1, 3)
    assert res["dataset"]["train_size"] == 20 and torch.equal(seen[0].images, loop_subset.images)
    with pytest.raises(ConfigError, match="label fraction"):
        eval_api.evaluate_linear("resnet18", dataset="synthetic", dataset_options=opts, label_fraction=1.5,
                                 cache_dir=False, progress=False)


# --------------------------------------------------------------------------------------- fine-tuning runs
def _pretrained(tmp_path):
    """A tiny supervised ViT run to fine-tune from."""
    from visrep import api

    over = tiny_overrides(tmp_path, out_dir=str(tmp_path / "pre"), method="supervised", monitor={"knn_every": 0})
    over["classifier"] = {"type": "linear"}
    over["backbone"] = {"name": "vit_tiny", "options": {"depth": 1, "patch_size": 4}}
    api.pretrain(api.resolve(over), quiet=True)
    return str(tmp_path / "pre")


def test_finetune_full_lora_lowlabel_and_regression(tmp_path):
    from visrep import api

    pre = _pretrained(tmp_path)
    base = {"method": "supervised", "data": {"dataset": "synthetic", "options": {"n": 64, "num_classes": 4}},
            "train": {"epochs": 1, "batch_size": 16, "progress": False}, "monitor": {"knn_every": 0}}
    lora = api.finetune(api.resolve({**base, "out_dir": str(tmp_path / "lora"),
                                     "finetune": {"init": pre, "mode": "lora", "lora": {"r": 2}}}), quiet=True)
    full = api.finetune(api.resolve({**base, "out_dir": str(tmp_path / "full"),
                                     "finetune": {"init": pre, "layer_decay": 0.75}}), quiet=True)
    assert lora["trainable_parameters"] < full["trainable_parameters"] == full["total_parameters"]
    assert 0 <= lora["eval"]["top1"] <= 1 and (tmp_path / "lora" / "eval.json").is_file()
    # the export holds the merged backbone with plain keys; it evaluates like any checkpoint
    knn_export = api.evaluate_knn(lora["export"], dataset="synthetic", dataset_options={"n": 64, "num_classes": 4},
                                  progress=False)
    knn_run = api.evaluate_knn(str(tmp_path / "lora"), dataset="synthetic",
                               dataset_options={"n": 64, "num_classes": 4}, progress=False)
    assert knn_export["top1"] == knn_run["top1"]
    low = api.finetune(api.resolve({**base, "out_dir": str(tmp_path / "low"), "data": {
        **base["data"], "label_fraction": 0.25}, "finetune": {"init": pre}}), quiet=True)
    assert low["label_fraction"] == 0.25 and low["train_size"] == 16 and low["steps"] == 1  # 16 of 64 images, batch 16
    with pytest.raises(ConfigError, match="classifier head"):
        api.finetune(api.resolve({**base, "out_dir": str(tmp_path / "bad"), "projector": {"type": "mlp"},
                                  "classifier": None, "finetune": {"init": pre}}), quiet=True)


def test_finetune_regression_on_landmark_like_targets(tmp_path, monkeypatch):
    """A regression head + objective on a dataset with float targets, evaluated as MAE."""
    import visrep.data.sources as sources
    from visrep import api
    from visrep.data.sources import ImageDataset

    def fake(*, split, root, image_size, download, n: int = 64):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        images = torch.randint(0, 255, (n, 3, 16, 16), dtype=torch.uint8, generator=g)
        targets = images.float().mean((1, 2, 3)).unsqueeze(1) / 10  # learnable: mean brightness
        return ImageDataset(images, torch.zeros(n, dtype=torch.long), ["face"], f"fake/{split}",
                            {"task_type": "regression", "target_names": ["brightness"]}, targets)

    monkeypatch.setitem(sources.SOURCES._items, "fake_regression", fake)
    pre = _pretrained(tmp_path)
    s = api.finetune(api.resolve({"method": "supervised", "out_dir": str(tmp_path / "reg"),
                                  "data": {"dataset": "fake_regression"}, "objective": {"name": "regression"},
                                  "views": {"policy": "none"}, "finetune": {"init": pre},
                                  "train": {"epochs": 2, "batch_size": 16, "progress": False},
                                  "monitor": {"knn_every": 0}}), quiet=True)
    assert s["eval"]["protocol"] == "regression" and math.isfinite(s["eval"]["mae"])
    with pytest.raises(ConfigError, match="needs regression targets"):
        api.finetune(api.resolve({"method": "supervised", "out_dir": str(tmp_path / "reg2"),
                                  "data": {"dataset": "synthetic"}, "objective": {"name": "regression"},
                                  "finetune": {"init": pre}, "monitor": {"knn_every": 0}}), quiet=True)


def test_transfer_commands_from_the_cli(tmp_path, capsys):
    pre = _pretrained(tmp_path)
    data = ["data.dataset=synthetic", "data.options={n: 64, num_classes: 4}", "train.epochs=1",
            "train.batch_size=16", "train.progress=false", "monitor.knn_every=0"]
    assert run(["finetune", "method=supervised", f"finetune.init={pre}", "finetune.mode=lora",
                f"out_dir={tmp_path / 'ft'}", *data]) == 0
    out = capsys.readouterr().out
    assert "mode lora, trainable parameters" in out and "exported" in out
    opts = ["--dataset", "synthetic", "--dataset-options", "{n: 64, num_classes: 4}"]
    assert run(["eval", "fewshot", "--model", pre, *opts, "--shots", "1", "2", "--episodes", "5",
                "--queries", "3", "--out", str(tmp_path / "fs.json")]) == 0
    res = json.loads((tmp_path / "fs.json").read_text())
    assert [r["shots"] for r in res["results"]] == [1, 2] and "ci95" in res
    assert run(["eval", "calibration", "--model", str(tmp_path / "ft"), *opts, "--out",
                str(tmp_path / "cal.json")]) == 0
    cal = json.loads((tmp_path / "cal.json").read_text())
    assert cal["head"] == "own classifier" and 0 <= cal["ece"] <= 1 and (tmp_path / "cal.png").is_file()
    assert run(["eval", "calibration", "--model", "vit_tiny", *opts, "--backbone-options",
                "{depth: 1, patch_size: 4}", "--out", str(tmp_path / "cal2.json")]) == 0
    assert json.loads((tmp_path / "cal2.json").read_text())["head"] == "linear probe"
    assert run(["eval", "classifier", "--model", str(tmp_path / "ft"), *opts]) == 0
    # low-label probe: 25 % of the 64 synthetic training labels, class-balanced
    assert run(["eval", "linear", "--model", pre, *opts, "--label-fraction", "0.25", "--epochs", "2",
                "--out", str(tmp_path / "lin25.json")]) == 0
    lin = json.loads((tmp_path / "lin25.json").read_text())
    assert lin["dataset"]["train_size"] == 16 and lin["dataset"]["label_fraction"] == 0.25
    with pytest.raises(ConfigError, match="--label-fraction applies to"):
        run(["eval", "fewshot", "--model", pre, *opts, "--label-fraction", "0.1"])


def test_transfer_mistakes_are_one_line_errors(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "visrep.cli", "finetune", "finetune.init=/nonexistent",
                        "method=supervised", "data.dataset=synthetic"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no checkpoint or run directory at '/nonexistent'" in r.stderr
    assert "Traceback" not in r.stderr


def test_every_bundled_config_resolves():
    from pathlib import Path

    from visrep import api

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert any("finetune" in c.name for c in configs)
    for c in configs:
        api.resolve(str(c))


def test_finetune_resumes_after_a_kill_and_chains_from_a_lora_run(tmp_path):
    from visrep import api
    from visrep.runs import load_run

    pre = _pretrained(tmp_path)
    base = {"method": "supervised", "data": {"dataset": "synthetic", "options": {"n": 64, "num_classes": 4}},
            "train": {"epochs": 2, "batch_size": 16, "progress": False, "deterministic": True},
            "monitor": {"knn_every": 0}, "finetune": {"init": pre, "mode": "lora"}}
    whole = api.finetune(api.resolve({**base, "out_dir": str(tmp_path / "whole")}), quiet=True)
    cut = {**base, "out_dir": str(tmp_path / "cut"), "train": {**base["train"], "max_steps": 3}}
    assert api.finetune(api.resolve(cut), quiet=True)["stop_reason"] == "max_steps"
    resumed = api.finetune(api.resolve({**base, "out_dir": str(tmp_path / "cut")}), resume=True, quiet=True)
    assert resumed["steps"] == whole["steps"] == 8
    a, b = load_run(str(tmp_path / "whole"))[0], load_run(str(tmp_path / "cut"))[0]
    for k in a:
        if k.startswith("model."):
            torch.testing.assert_close(a[k], b[k])
    # a LoRA run can itself initialise a new fine-tuning (its adapters are merged first)
    again = api.finetune(api.resolve({**base, "out_dir": str(tmp_path / "again"),
                                      "finetune": {"init": str(tmp_path / "whole"), "mode": "full"}}), quiet=True)
    assert again["stop_reason"] == "completed"
