"""`visrep rank` and `visrep.rank(...)`: a mixed pool (visrep runs, random init) on a real small target."""
import json
from pathlib import Path

import pytest

import visrep
from visrep.cli import run
from visrep.errors import ConfigError, VisrepError

from conftest import tiny_overrides

DATA = {"dataset": "synthetic", "options": {"n": 64, "num_classes": 4}}
RANDOM = ["--backbone-options", "{cifar_stem: true, width: 8}"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    sup = tiny_overrides(root / "sup", method="supervised", monitor={"knn_every": 0, "rankme_every": 0})
    sup["classifier"] = {"type": "linear"}
    visrep.pretrain(visrep.resolve(sup), quiet=True)
    ssl = tiny_overrides(root / "ssl", monitor={"knn_every": 0, "rankme_every": 0})
    visrep.pretrain(visrep.resolve(ssl), quiet=True)
    return root, [str(root / "sup" / "run"), str(root / "ssl" / "run")]


def test_rank_from_the_cli_with_and_without_a_truth(pool, tmp_path, capsys):
    root, runs = pool
    args = ["rank", "--models", *runs, "resnet18", *RANDOM, "--dataset", "synthetic",
            "--dataset-options", "{n: 64, num_classes: 4}", "--image-size", "16"]
    assert run(args + ["--scores", "logme,rankme,knn,leep", "--out", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "logme" in out and "resnet18" in out
    a = json.loads((tmp_path / "a.json").read_text())
    assert [m["model"] for m in a["models"]] == [*runs, "resnet18"] and "agreement" not in a
    sup, ssl, rnd = a["models"]
    assert sup["scores"]["leep"] is not None and ssl["scores"]["leep"] is None  # only the supervised run has a head
    assert "needs a classifier head" in ssl["notes"]["leep"]
    assert sorted(m["ranks"]["logme"] for m in a["models"]) == [1, 2, 3]

    assert run(args + ["--scores", "logme,hscore", "--truth", "linear", "--out", str(tmp_path / "b.json")]) == 0
    b = json.loads((tmp_path / "b.json").read_text())
    assert all(0 <= m["truth"] <= 1 for m in b["models"]) and (tmp_path / "b.png").is_file()
    agree = b["agreement"]["logme"]
    assert set(agree) >= {"kendall_tau", "weighted_tau", "pearson_r", "top1_hit", "relative_top1"}
    assert 0 < agree["relative_top1"] <= 1


def test_python_api_pools_from_a_folder_or_a_yaml_list(pool, tmp_path):
    root, runs = pool
    (tmp_path / "pool.yaml").write_text("models:\n" + "".join(f"  - {r}\n" for r in runs))
    kw = dict(dataset="synthetic", dataset_options={"n": 64, "num_classes": 4}, scores=["rankme"], progress=False)
    a = visrep.rank(str(tmp_path / "pool.yaml"), **kw)  # visrep.rank is the package and the function
    assert [m["model"] for m in a["models"]] == runs
    folder = tmp_path / "runs"
    folder.mkdir()
    for name, r in zip(("a", "b"), runs):
        (folder / name).symlink_to(r)
    b = visrep.rank([str(folder)], **kw)
    assert len(b["models"]) == 2 and {m["scores"]["rankme"] for m in b["models"]} == \
        {m["scores"]["rankme"] for m in a["models"]}


def test_rank_mistakes_are_one_sentence(pool, tmp_path):
    _, runs = pool
    kw = dict(dataset="synthetic", dataset_options={"n": 64, "num_classes": 4}, progress=False)
    with pytest.raises(ConfigError, match="did you mean 'logme'"):
        visrep.rank(runs, scores=["logmee"], **kw)
    with pytest.raises(VisrepError, match="model '.*nowhere'"):
        visrep.rank([runs[0], str(tmp_path / "nowhere")], scores=["logme"], **kw)
    with pytest.raises(ConfigError, match="truth must be one of"):
        visrep.rank(runs, truth="bogus", **kw)


def test_timm_models_give_leep_from_their_own_classifier_and_a_headless_model_gets_a_note(pool):
    _, runs = pool
    kw = dict(dataset="synthetic", dataset_options={"n": 64, "num_classes": 4}, image_size=16, progress=False)
    res = visrep.rank([runs[1], "timm:resnet18"], scores=["leep", "nce", "logme"], **kw)
    ssl, timm_model = res["models"]
    assert ssl["scores"]["leep"] is None and "needs a classifier head" in ssl["notes"]["leep"]
    assert timm_model["scores"]["leep"] is not None and timm_model["scores"]["nce"] is not None
    assert timm_model["scores"]["leep"] <= 0  # a mean log-likelihood
    assert "randomly initialised timm classifier" in timm_model["notes"]["source_classifier"]

    # the timm classifier's trunk is the very backbone the features came from: its penultimate output equals them
    import torch

    from visrep.evaluate.api import _load_model
    from visrep.rank.api import _timm_classifier

    net = _timm_classifier("timm:resnet18", 16, 0, None, False)
    backbone, _ = _load_model("timm:resnet18", 16, "student", 0)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(net.forward_head(net.forward_features(x), pre_logits=True), backbone(x), atol=1e-5)


def test_truth_finetune_chooses_the_lr_on_held_out_images_and_reuses_finished_runs(pool, tmp_path):
    _, runs = pool
    out = tmp_path / "ft.json"
    args = ["rank", "--models", *runs, "--dataset", "synthetic", "--dataset-options", "{n: 64, num_classes: 4}",
            "--scores", "logme", "--truth", "finetune", "--out", str(out),
            "--finetune-options", "{lrs: [1e-4, 1e-2], epochs: 1, batch_size: 16}"]  # 1e-4 is a number, as in YAML
    assert run(args) == 0
    a = json.loads(out.read_text())
    assert a["truth"] == "finetune" and a["truth_protocol"]["lrs"] == [1e-4, 1e-2]
    for m in a["models"]:
        ft = m["finetune"]
        held = {float(k): v for k, v in ft["holdout_top1"].items()}
        assert set(held) == {1e-4, 1e-2} and held[ft["lr"]] == max(held.values())
        assert 0 <= m["truth"] <= 1 and Path(ft["run_dir"]).parent.parent == tmp_path / "ft_finetune"
        summary = json.loads((Path(ft["run_dir"]) / "summary.json").read_text())
        assert summary["train_size"] == 64 - 12  # 3 of each class's 16 held out for the lr choice
    assert "weighted_tau" in a["agreement"]["logme"]
    checkpoints = sorted((tmp_path / "ft_finetune").glob("*/lr*/checkpoints/last.safetensors"))
    assert len(checkpoints) == 4
    stamps = [c.stat().st_mtime_ns for c in checkpoints]
    kw = dict(dataset="synthetic", dataset_options={"n": 64, "num_classes": 4}, progress=False, scores=["logme"],
              finetune_options={"lrs": [1e-4, 1e-2], "epochs": 1, "batch_size": 16})
    b = visrep.rank(runs, truth="finetune", out=str(out), **kw)  # finished runs are reused, not trained again
    assert [c.stat().st_mtime_ns for c in checkpoints] == stamps
    assert [m["truth"] for m in b["models"]] == [m["truth"] for m in a["models"]]
    # other training data (here: another task size) is another folder, never a finished run of the old data
    c = visrep.rank(runs[:1], truth="finetune", **{**kw, "dataset_options": {"n": 80, "num_classes": 4},
                                                   "finetune_dir": str(tmp_path / "ft_finetune")})
    assert Path(c["models"][0]["finetune"]["run_dir"]).parent not in {Path(m["finetune"]["run_dir"]).parent
                                                                      for m in a["models"]}

    # an exported fine-tuned backbone has weights but no head: ranked, with a note for LEEP
    export = str(Path(a["models"][0]["finetune"]["run_dir"]) / "export" / "backbone.safetensors")
    d = visrep.rank([export], scores=["leep", "logme"], dataset="synthetic",
                    dataset_options={"n": 64, "num_classes": 4}, progress=False)
    assert d["models"][0]["scores"]["logme"] is not None and "needs a classifier head" in d["models"][0]["notes"]["leep"]


def test_truth_finetune_needs_weights_and_sane_options(pool, capsys):
    _, runs = pool
    kw = dict(dataset="synthetic", dataset_options={"n": 64, "num_classes": 4}, progress=False)
    with pytest.raises(ConfigError, match="needs weights to start from, but 'resnet18'"):
        visrep.rank([runs[0], "resnet18"], truth="finetune", **kw)
    with pytest.raises(ConfigError, match="unknown finetune option.*lr_grid"):
        visrep.rank(runs, truth="finetune", finetune_options={"lr_grid": [1]}, **kw)
    with pytest.raises(ConfigError, match="lrs must be a list of positive numbers"):
        visrep.rank(runs, truth="finetune", finetune_options={"lrs": [-1]}, **kw)
    with pytest.raises(ConfigError, match="epochs must be a positive integer, got 'three'"):
        visrep.rank(runs, truth="finetune", finetune_options={"epochs": "three"}, **kw)
    with pytest.raises(ConfigError, match=r"data.holdout must be in \(0, 1\)"):
        visrep.rank(runs, truth="finetune", finetune_options={"holdout": 1.5}, **kw)
    from visrep.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["rank", "--models", runs[0], "resnet18", "--dataset", "synthetic", "--truth", "finetune"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("visrep: error: --truth finetune needs weights")
    assert len(err.strip().splitlines()) == 1


def test_truth_alone_means_the_linear_probe():
    from visrep.cli import build_parser

    args = build_parser().parse_args(["rank", "--models", "a", "--truth"])
    assert args.truth == "linear"
    assert build_parser().parse_args(["rank", "--models", "a"]).truth == "none"


def test_import_visrep_alone_makes_rank_callable():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import visrep; print(callable(visrep.rank))"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_score_options_reach_the_score_and_are_checked(pool):
    _, runs = pool
    kw = dict(dataset="synthetic", dataset_options={"n": 64, "num_classes": 4}, progress=False)
    raw = visrep.rank(runs, scores=["tmi"], score_options={"tmi": {"min_dist": 1e-9}}, **kw)
    per_d = visrep.rank(runs, scores=["tmi"], score_options={"tmi": {"min_dist": 1e-9, "normalize": True}}, **kw)
    for a, b in zip(raw["models"], per_d["models"]):
        assert b["scores"]["tmi"] == pytest.approx(a["scores"]["tmi"] / a["feature_dim"])
    assert per_d["score_options"] == {"tmi": {"min_dist": 1e-9, "normalize": True}}
    with pytest.raises(ConfigError, match="score 'tmi' takes no option 'normalise'; its options: k, min_dist"):
        visrep.rank(runs, scores=["tmi"], score_options={"tmi": {"normalise": True}}, **kw)
    with pytest.raises(ConfigError, match="not among the scores asked for"):
        visrep.rank(runs, scores=["logme"], score_options={"tmi": {"normalize": True}}, **kw)
    with pytest.raises(ConfigError, match="score 'knn' option 'k' must be int, got '5'"):
        visrep.rank(runs, scores=["knn"], score_options={"knn": {"k": "5"}}, **kw)  # before any feature is extracted
    with pytest.raises(ConfigError, match="score 'tmi' does not accept the options {'k': 0} .tmi k must be >= 1"):
        visrep.rank(runs, scores=["tmi"], score_options={"tmi": {"k": 0}}, **kw)  # a range: the dry run finds it


def test_rank_a_mixed_pool_of_runs_and_a_timm_model_on_real_digits_from_the_cli(pool, tmp_path, capsys):
    _, runs = pool
    out = tmp_path / "digits.json"
    args = ["rank", "--models", *runs, "timm:resnet18", "--dataset", "digits", "--image-size", "16",
            "--train-subset", "300", "--test-subset", "200", "--scores", "logme,sfda,leep", "--out", str(out)]
    assert run(args) == 0
    assert "timm:resnet18" in capsys.readouterr().out
    a = json.loads(out.read_text())
    assert {m["feature_dim"] for m in a["models"]} == {64, 512}  # mixed widths in one pool
    assert all(m["scores"]["leep"] is not None for m in a["models"] if m["model"] != runs[1])
    assert run(args + ["--truth"]) == 0
    b = json.loads(out.read_text())
    assert b["truth"] == "linear" and all(0 < m["truth"] <= 1 for m in b["models"])
    assert out.with_suffix(".png").is_file()


def test_agreement_with_a_constant_truth_claims_nothing():
    from visrep.rank.api import _agreement

    same = _agreement([0.1, 0.5, 0.3], [0.92, 0.92, 0.92])  # e.g. every probe predicts the majority class
    assert same["weighted_tau"] is None and same["top1_hit"] is None and "same for every model" in same["note"]
    ok = _agreement([0.1, 0.5, 0.3], [0.2, 0.9, 0.4])
    assert ok["top1_hit"] is True and ok["kendall_tau"] == pytest.approx(1.0) and ok["relative_top1"] == 1.0
    wrong = _agreement([0.5, 0.1, 0.3], [0.2, 0.9, 0.4])
    assert wrong["top1_hit"] is False and wrong["relative_top1"] == pytest.approx(0.2 / 0.9)


def test_a_pool_file_gives_options_per_model_and_bad_pool_files_are_one_sentence(pool, tmp_path):
    _, runs = pool
    (tmp_path / "pool.yaml").write_text(
        "models:\n"
        f"  - {runs[0]}\n"
        "  - {model: resnet18, backbone_options: {cifar_stem: true, width: 8}}   # a narrow random init ...\n"
        "  - timm:resnet18                                                        # ... beside a standard timm one\n")
    kw = dict(dataset="synthetic", dataset_options={"n": 64, "num_classes": 4}, scores=["logme"], progress=False)
    res = visrep.rank(str(tmp_path / "pool.yaml"), **kw)
    assert [m["feature_dim"] for m in res["models"]] == [64, 64, 512]
    assert res["models"][1]["backbone_options"] == {"cifar_stem": True, "width": 8}
    assert "backbone_options" not in res["models"][2]
    for text, match in (("models: [a, [b]]", "a pool entry is a model name or path"),
                        ("models: [{model: a, options: {}}]", "a pool entry is a model name or path"),
                        ("models: [a\n", "not valid YAML at line"),
                        ("models: [a, a]", "names model .a. twice")):
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(ConfigError, match=match):
            visrep.rank(str(tmp_path / "bad.yaml"), **kw)


def test_options_on_a_run_and_the_same_model_twice_are_refused(pool, tmp_path):
    _, runs = pool
    kw = dict(dataset="synthetic", dataset_options={"n": 64, "num_classes": 4}, scores=["logme"], progress=False)
    with pytest.raises(ConfigError, match="is a run or checkpoint, whose architecture comes from its own config"):
        visrep.rank([{"model": runs[0], "backbone_options": {"width": 8}}], **kw)
    with pytest.raises(ConfigError, match="names model 'resnet18' twice"):  # the default options are the same ones
        visrep.rank(["resnet18", {"model": "resnet18", "backbone_options": {"width": 8}}],
                    backbone_options={"width": 8}, **kw)
    with pytest.raises(ConfigError, match="twice"):
        visrep.rank([runs[0], runs[0] + "/"], **kw)


def test_a_score_that_is_the_same_for_every_model_picks_no_model():
    from visrep.rank.api import _agreement

    same = _agreement([2.0, 2.0, 2.0], [0.2, 0.9, 0.4])  # H-score = C − 1 for every model when N <= D
    assert same["top1_hit"] is None and same["relative_top1"] is None and "score is the same" in same["note"]


def test_mistakes_are_caught_before_any_feature_is_extracted(pool, tmp_path, monkeypatch):
    _, runs = pool
    import visrep.evaluate.api as evaluate_api

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted before the mistake was found")
    monkeypatch.setattr(evaluate_api, "_prepare", no_extraction)
    kw = dict(dataset="synthetic", dataset_options={"n": 64, "num_classes": 4}, progress=False)
    cases = [
        (dict(models=[runs[0], "timm:resnet18"], backbone_options={"cifar_stem": True, "width": 8}),
         "model 'timm:resnet18': .*give it its own options in a YAML pool"),
        (dict(models=runs, scores=[]), "no score named"),
        (dict(models=runs, scores=["logme", "logme"]), "'logme' is asked for twice"),
        (dict(models=runs, scores=["tmi"], score_options={"tmi": {"normalize": "yes please"}}),
         "option 'normalize' must be bool"),
        (dict(models=runs, scores=["logme"], finetune_options={"epochs": 1}), "apply to truth='finetune' only"),
        (dict(models=runs, scores=["logme"], plot=str(tmp_path / "p.png")), "ask for one"),
        (dict(models=runs, scores=["logme"], dataset_options={"n": 64, "num_classes": 1}), None),
    ]
    for extra, match in cases:
        with pytest.raises(VisrepError, match=match) as err:
            visrep.rank(**{**kw, **extra})
        assert not str(err.value).startswith("model '" + runs[0])  # a dataset mistake is not blamed on a model


def test_the_table_says_why_a_cell_is_empty_and_what_chance_is(pool, tmp_path):
    from visrep.rank.api import format_table

    _, runs = pool
    res = visrep.rank(runs, dataset="synthetic", dataset_options={"n": 64, "num_classes": 4}, scores=["logme", "leep"],
                      truth="linear", progress=False)
    text = format_table(res)
    assert "note: " + runs[1] + ": leep: needs a classifier head" in text
    assert "(n=1)" in text or "weighted τ of leep" in text  # LEEP rests on the one supervised run only
    assert "always the commonest class: top-1 0.2500" in text and res["majority_class_top1"] == 0.25
