"""`visrep study plan`: a grid resolved and validated before anything runs, with content ids and a fair budget."""
import json
from pathlib import Path

import pytest

from visrep.cli import main
from visrep.errors import ConfigError
from visrep.study import plan

ROOT = Path(__file__).resolve().parent.parent
BASE = {"data": {"dataset": "digits", "image_size": 16},
        "backbone": {"name": "resnet18", "options": {"cifar_stem": True, "width": 8}},
        "monitor": {"knn_every": 0, "rankme_every": 0}}


def study(**extra):
    return {"name": "t", "base": BASE, "budget": {"steps": 5}, **extra}


def test_a_grid_is_every_combination_in_order_with_the_budget_and_content_ids():
    p = plan(study(factors={"method": ["simclr", "byol"], "seed": [0, 1, 2]},
                   evaluations=[{"protocol": "knn", "dataset": "digits"},
                                {"protocol": "linear", "dataset": "digits", "solver": "lbfgs"}]))
    assert [(r.factors["method"], r.factors["seed"]) for r in p.runs] == \
        [(m, s) for m in ("simclr", "byol") for s in (0, 1, 2)]
    assert all(r.config["train"]["steps"] == 5 and r.steps == 5 for r in p.runs)
    assert len({r.id for r in p.runs}) == 6 and all(r.config["out_dir"].endswith("/runs/" + r.id) for r in p.runs)
    assert p.runs[3].config["method"] == "byol" and p.runs[3].config["seed"] == 0
    cost = p.cost()
    assert cost["runs"] == 6 and cost["evaluation_jobs"] == 12 and cost["training_steps"] == 30
    assert cost["training_images"] == 30 * p.runs[0].batch_size
    assert plan(study(factors={"method": ["simclr", "byol"], "seed": [0, 1, 2]})).runs[0].id == p.runs[0].id  # stable



def test_a_run_id_hashes_the_config_as_written_before_the_classifier_section():
    """Sections added later must not change the ids of runs planned before them (their runs would be retrained):
    unset `classifier`, `tasks` and `task_head` are left out, and a supervised run's head is hashed where it used to
    live, `projector`."""
    from visrep.study.plan import short_hash

    p = plan(study(factors={"method": ["simclr", "supervised"]}))
    for run in p.runs:
        old = {k: v for k, v in run.config.items() if k not in ("out_dir", "classifier", "tasks", "task_head")}
        old["train"] = {k: v for k, v in old["train"].items()
                        if k not in ("progress", "log_every", "num_threads", "device")}
        if run.config["classifier"] is not None:
            old["projector"] = run.config["classifier"]
        assert run.id == short_hash(old), run.factors


def test_explicit_points_and_an_epoch_or_seconds_budget():
    p = plan({**study(points=[{"method": "simclr"}, {"method": "byol", "views.policy": "simclr"}]),
              "budget": {"epochs": 2}})
    assert p.factor_keys == ["method", "views.policy"] and [r.config["train"]["epochs"] for r in p.runs] == [2, 2]
    assert p.runs[0].config["train"]["steps"] is None and p.cost()["training_steps"] is None
    s = plan({**study(factors={"seed": [0, 1]}), "budget": {"seconds": 30}})
    assert [r.config["train"]["time_budget_s"] for r in s.runs] == [30, 30] and s.cost()["training_seconds_budget"] == 60


@pytest.mark.parametrize("bad, match", [
    (dict(factors={"views.polcy": ["byol"]}), r"unknown config key 'views.polcy' \(did you mean 'views.policy'\?\)"),
    (dict(factors={}), "factors must be a non-empty mapping"),
    (dict(factors={"seed": []}), "factor 'seed' needs a non-empty list"),
    (dict(factors={"method": ["simclr", "simclr"]}), "resolves to the same run as run method=simclr"),
    (dict(points=[{"method": "simclr"}, {"method": "simclr", "seed": 0}]), "resolves to the same run"),
    (dict(factors={"train.steps": [1, 2]}), "changes the budget"),
    (dict(factors={"seed": [0]}, points=[{"seed": 0}]), "either factors .* or points"),
    (dict(), "needs factors"),
    (dict(factors={"method": ["mae"], "views.policy": ["multicrop"], "backbone.name": ["vit_tiny"],
                   "backbone.options": [{}]}),
     "run method=mae, views.policy=multicrop.*masked image modelling reads one view"),
    (dict(factors={"seed": [0]}, evaluations=[{"protocol": "knnn"}]), r"unknown protocol 'knnn' \(did you mean 'knn'"),
    (dict(factors={"seed": [0]}, evaluations=[{"protocol": "knn", "kk": 3}]), r"unknown key 'kk' \(did you mean 'k'"),
    (dict(factors={"seed": [0]}, evaluations=[{"protocol": "knn", "out": "x.json"}]), "unknown key 'out'"),
    (dict(factor={"seed": [0]}), r"unknown study key 'factor' \(did you mean 'factors'"),
])
def test_study_mistakes_are_one_sentence_at_plan_time(bad, match):
    with pytest.raises(ConfigError, match=match):
        plan(study(**bad))


def test_budgets_are_set_once_and_a_study_needs_a_name_and_a_budget():
    with pytest.raises(ConfigError, match="exactly one of"):
        plan({"name": "t", "base": BASE, "factors": {"seed": [0]}})
    with pytest.raises(ConfigError, match="budget steps must be a positive integer"):
        plan({**study(factors={"seed": [0]}), "budget": {"steps": 2.5}})
    with pytest.raises(ConfigError, match="not in base"):
        plan({**study(factors={"seed": [0]}), "base": {**BASE, "train": {"epochs": 3}}})
    with pytest.raises(ConfigError, match="usable as a folder name"):
        plan({**study(factors={"seed": [0]}), "name": "../x"})


def test_the_demo_study_plans_from_the_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["study", "plan", str(ROOT / "studies" / "demo.yaml"), "--json", str(tmp_path / "plan.json")])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "study demo_digits: 8 runs" in out and "evaluation knn-" in out and "320 training steps" in out
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert len(saved["runs"]) == 8 and saved["budget"] == {"steps": 40} and len(saved["evaluations"]) == 2
    (tmp_path / "bad.yaml").write_text("name: x\nbudget: {steps: 1\n")
    with pytest.raises(SystemExit) as failed:
        main(["study", "plan", str(tmp_path / "bad.yaml")])
    assert failed.value.code == 2 and "not valid YAML at line" in capsys.readouterr().err
