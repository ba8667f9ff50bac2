"""`visrep study report`: the aggregation formulas on hand-computed cases, the exports, models beside a grid, the
submitit path, and the demo study end to end with its report opened in a real (headless) browser."""
import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest

from visrep.errors import ConfigError
from visrep.study import aggregate as agg
from visrep.study import plan, report, run_study, status

from test_study_run import SYN, tiny  # the same tiny synthetic study

ROOT = Path(__file__).resolve().parents[1]


# --- the formulas, on cases small enough to compute by hand ------------------------------------------------------

def test_t_interval_of_the_mean():
    # n = 3, sd = 1: t_{0.975, 2} = 4.302653 -> 4.302653 / sqrt(3) = 2.484138
    assert agg.t_ci95([1.0, 2.0, 3.0]) == pytest.approx(2.484138, abs=1e-6)
    # n = 2, values 0.5 and 0.7: sd = 0.141421, t_{0.975, 1} = 12.7062 -> 12.7062 * 0.141421 / sqrt(2) = 1.27062
    assert agg.t_ci95([0.5, 0.7]) == pytest.approx(1.270620, abs=1e-5)
    assert agg.t_ci95([0.5]) is None


def test_z_scores_and_mean_ranks_as_battle_of_the_backbones():
    # task 1 (higher better): 1, 2, 3 -> z -1.2247, 0, 1.2247; ranks 3, 2, 1
    # task 2 (lower better, e.g. ECE): 0.3, 0.1, 0.2 -> flipped -0.3, -0.1, -0.2 -> z -1.2247, 1.2247, 0; ranks 3, 1, 2
    z, r = agg.zscores_and_ranks(np.array([[1.0, 0.3], [2.0, 0.1], [3.0, 0.2]]), np.array([1.0, -1.0]))
    assert z == pytest.approx([-1.224745, 0.612372, 0.612372], abs=1e-6)
    assert r == pytest.approx([3.0, 1.5, 1.5])
    z, r = agg.zscores_and_ranks(np.array([[0.5], [0.5]]), np.array([1.0]))  # a tie on every task: z 0, shared rank
    assert z == pytest.approx([0.0, 0.0]) and r == pytest.approx([1.5, 1.5])


def _table():
    recs = []
    for config, seeds in {"a": {0: (0.9, 0.1), 1: (0.7, 0.3)}, "b": {0: (0.5, 0.2), 1: (0.5, 0.2)},
                          "c": {0: (0.1, 0.4)}}.items():
        for s, (acc, ece) in seeds.items():
            recs.append({"factors": {"m": config, "seed": s}, "task": "acc", "value": acc})
            recs.append({"factors": {"m": config, "seed": s}, "task": "ece", "value": ece})
    return agg.build_table(recs, {"acc": 1.0, "ece": -1.0}, lambda f: f["m"])


def test_per_task_means_and_the_aggregate_with_bootstrap_intervals():
    t = _table()
    s = agg.per_task(t)
    assert s["acc"]["a"]["mean"] == pytest.approx(0.8) and s["acc"]["a"]["n"] == 2
    assert s["acc"]["a"]["ci95"] == pytest.approx(12.7062 * 0.141421 / 2 ** 0.5, rel=1e-4)
    assert s["acc"]["c"]["ci95"] is None  # one seed: no interval
    res = agg.aggregate(t, bootstrap=300)
    # means: acc a .8, b .5, c .1 ; ece a .2, b .2, c .4 (lower better) -> a and b tie on ece
    # acc: mean .46667, deviations .33333 .03333 -.36667, sd (ddof 0) .286744 -> z 1.162476, .116248, -1.278724
    # ece flipped (-.2, -.2, -.4): mean -.26667, sd .094281 -> z .707107, .707107, -1.414214
    by = {r["config"]: r for r in res["rows"]}
    assert [r["config"] for r in res["rows"]] == ["a", "b", "c"]
    assert by["a"]["mean_z"] == pytest.approx((1.162476 + 0.707107) / 2, abs=1e-5)
    assert by["b"]["mean_z"] == pytest.approx((0.116248 + 0.707107) / 2, abs=1e-5)
    assert by["c"]["mean_rank"] == pytest.approx(3.0) and by["a"]["mean_rank"] == pytest.approx(1.25)
    # a's seeds differ, so its resamples move (and with them everyone's z); c has one seed: no interval of its own
    assert by["a"]["mean_z_ci"][0] < by["a"]["mean_z_ci"][1] and by["c"]["mean_z_ci"] is None
    assert by["a"]["seeds"] == 2 and by["c"]["seeds"] == 1


def test_task_correlation_is_spearman_over_configurations():
    recs = [{"factors": {"m": m}, "task": t, "value": v} for m, a, b in
            [("p", 1, 10), ("q", 2, 30), ("r", 3, 20), ("s", 4, 40)] for t, v in (("x", a), ("y", b))]
    t = agg.build_table(recs, {"x": 1.0, "y": 1.0}, lambda f: f["m"])
    # ranks x 1 2 3 4, y 1 3 2 4: d^2 = 0+1+1+0 = 2 -> rho = 1 - 6*2/(4*15) = 0.8
    assert agg.task_correlation(t)[("x", "y")] == pytest.approx(0.8)


def test_factor_effects_contrasts_ranges_and_which_factor_is_larger():
    runs = []
    for alg, alg_gain in (("simclr", 0.0), ("byol", 0.01)):
        for aug, aug_gain in (("light", 0.0), ("strong", 0.05)):
            for seed, noise in ((0, -0.002), (1, 0.0), (2, 0.002)):
                runs.append({"factors": {"method": alg, "views": aug, "seed": seed},
                             "values": {"t": 0.5 + alg_gain + aug_gain + noise}})
    fx = agg.factor_effects(runs, ["method", "views", "seed"], ["t"], bootstrap=500)
    e = {x["factor"]: x for x in fx["effects"]}
    assert e["method"]["contrasts"][0]["mean"] == pytest.approx(0.01) and e["method"]["contrasts"][0]["pairs"] == 6
    assert e["views"]["contrasts"][0]["mean"] == pytest.approx(0.05)
    assert e["views"]["contrasts"][0]["ci95"] == pytest.approx(0.0, abs=1e-9)  # additive: every pair differs by .05
    assert e["views"]["range"] == pytest.approx(0.05) and e["method"]["range"] == pytest.approx(0.01)
    assert e["views"]["level_means"] == pytest.approx({"light": 0.505, "strong": 0.555})
    # effect sd: var_ddof1(.505, .555) = .00125, minus the noise of a level mean: pooled s² = 4e-6 (seeds -.002, 0,
    # .002), 2 configurations of 3 seeds per level -> 4e-6 * (2/3) / 2² = 6.667e-7 -> sqrt(.00124933) = .035346
    assert e["views"]["effect_sd"] == pytest.approx(0.035346, abs=1e-6)
    assert e["method"]["effect_sd"] == pytest.approx((0.00005 - 4e-6 / 6) ** 0.5, abs=1e-7)  # .0070238
    (c,) = fx["comparisons"]
    assert (c["a"], c["b"]) == ("method", "views") and c["difference"] == pytest.approx(0.0070238 - 0.035346, abs=1e-6)
    assert c["ci95"][1] < 0 and c["p_a_larger"] == 0.0  # the views move results more, outside the noise


def test_effect_sizes_do_not_favour_the_factor_with_more_levels():
    # no effect at all: 4 methods x 2 views x 3 seeds of pure noise. The range of 4 noisy means beats the range of
    # 2 by chance; the noise-corrected effect sd does not, so the comparison rarely claims a winner.
    rng = np.random.default_rng(0)
    claims = 0
    for trial in range(20):
        runs = [{"factors": {"method": m, "views": v, "seed": s}, "values": {"t": float(rng.normal(0.5, 0.01))}}
                for m in "abcd" for v in "xy" for s in range(3)]
        (c,) = agg.factor_effects(runs, ["method", "views", "seed"], ["t"], bootstrap=200, seed=trial)["comparisons"]
        claims += c["ci95"][0] > 0 or c["ci95"][1] < 0
    assert claims <= 3


def test_without_replicates_there_are_no_intervals_and_list_values_are_levels():
    runs = [{"factors": {"backbone.options": {"width": w}, "views": v}, "values": {"t": x}}
            for (w, v), x in zip([(8, "a"), (8, "b"), (16, "a"), (16, "b")], [0.1, 0.2, 0.3, 0.5])]
    fx = agg.factor_effects(runs, ["backbone.options", "views"], ["t"], bootstrap=100)
    e = {x["factor"]: x for x in fx["effects"]}
    assert e["backbone.options"]["levels"] == ["{'width': 8}", "{'width': 16}"]
    assert e["backbone.options"]["contrasts"][0]["mean"] == pytest.approx(0.25)
    assert e["views"]["effect_sd"] is None and e["views"]["effect_sd_ci"] is None and not fx["comparisons"]
    t = agg.build_table([{"factors": {"m": m}, "task": "t", "value": v} for m, v in (("a", 1.0), ("b", 2.0))],
                        {"t": 1.0}, lambda f: f["m"])
    res = agg.aggregate(t, bootstrap=100)
    assert res["bootstrap"] == 0 and all(r["mean_z_ci"] is None for r in res["rows"])


def test_weighted_tau_of_a_perfect_and_a_reversed_score():
    assert agg.weighted_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert agg.weighted_tau([4, 3, 2, 1], [10, 20, 30, 40]) == pytest.approx(-1.0)
    assert agg.weighted_tau([1, 1, 1], [1, 2, 3]) is None


# --- the report of a small study ---------------------------------------------------------------------------------

def test_report_writes_every_part_and_rerunning_it_duplicates_nothing(tmp_path):
    spec = tiny(tmp_path / "s", models=[{"name": "random_init", "source": "resnet18",
                                          "backbone_options": {"cifar_stem": True, "width": 8}}])
    with pytest.raises(ConfigError, match="has not run yet"):
        report(spec)
    res = run_study(spec, progress=False)
    assert len(res["done"]) == 5 and not res["failed"]
    out = report(spec, bootstrap=50, tensorboard=True)
    folder = Path(out["out"])
    assert {"per_task", "aggregate", "task_correlation", "factor_effects", "cost"} <= set(out["figures"])
    for name in ("per_task", "aggregate", "task_correlation", "factor_effects", "cost"):
        assert (folder / f"{name}.png").stat().st_size > 1000
    numbers = json.loads((folder / "report.json").read_text())
    assert "random_init (model)" in numbers["per_task"]["knn synthetic"]
    # the reference model is evaluated beside the grid but is not part of the factor effects
    assert all(e["runs"] == 4 for e in numbers["factor_effects"]) and numbers["cost"]["random_init (model)"]["steps"] == 0
    html = Path(out["html"]).read_text()
    assert "<table" in html and html.count("data:image/png;base64,") == len(out["figures"])
    assert 'src="http' not in html and 'href="http' not in html  # self-contained: no CDN
    import pyarrow.parquet as pq

    store = sqlite3.connect(Path(spec["out_dir"]) / "results.sqlite")
    n = store.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    assert pq.read_table(folder / "results.parquet").num_rows == n
    assert len((folder / "results.csv").read_text().splitlines()) == n + 1
    assert list((folder / "tensorboard").rglob("events.out.tfevents.*"))
    report(spec, bootstrap=10)
    assert store.execute("SELECT COUNT(*) FROM results").fetchone()[0] == n
    assert store.execute("SELECT COUNT(DISTINCT run_id) FROM results").fetchone()[0] == 5


def test_a_study_of_models_alone_needs_no_budget(tmp_path):
    spec = {"name": "pool", "out_dir": str(tmp_path / "pool"),
            "models": [{"name": f"w{w}" if w != 4 else "w<i>4</i>", "source": "resnet18",
                        "backbone_options": {"cifar_stem": True, "width": w}} for w in (4, 8, 16)],
            "evaluations": [{"protocol": "knn", "dataset": "synthetic", "options": SYN}]}
    p = plan(spec)
    assert p.factor_keys == ["model"] and [r.trained for r in p.runs] == [False] * 3 and not p.budget
    assert run_study(spec, progress=False)["failed"] == {}
    out = report(spec, bootstrap=20)
    numbers = json.loads(Path(out["json"]).read_text())
    assert set(numbers["per_task"]["knn synthetic"]) == {"w16", "w<i>4</i>", "w8"}
    assert numbers["cost"]["w16"]["backbone_params"] > numbers["cost"]["w<i>4</i>"]["backbone_params"]
    html = Path(out["html"]).read_text()
    assert "w&lt;i&gt;4&lt;/i&gt;" in html and "<i>4</i>" not in html  # names are escaped, not markup
    assert numbers["aggregate"]["bootstrap"] == 0  # one result per model: no intervals claimed
    with pytest.raises(ConfigError, match="trains nothing"):
        plan({**spec, "budget": {"steps": 3}})
    with pytest.raises(ConfigError, match="no run folder or checkpoint"):
        plan({**spec, "models": [{"name": "x", "source": "runs/does/not/exist"}]})
    with pytest.raises(ConfigError, match="did you mean 'backbone_options'"):
        plan({**spec, "models": [{"name": "x", "source": "resnet18", "backbone_option": {}}]})


def test_models_from_another_studys_finished_runs(tmp_path):
    import yaml

    grid = tiny(tmp_path / "grid")
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump({"name": "pool", "out_dir": str(tmp_path / "pool"),
                                    "models": [{"from_study": "grid.yaml", "where": {"seed": 0}}],
                                    "evaluations": [{"protocol": "knn", "dataset": "synthetic", "options": SYN}]}))
    with pytest.raises(ConfigError, match="have not run .* run `visrep study run"):
        plan(str(pool))
    run_study(grid, progress=False)
    p = plan(str(pool))
    assert [r.factors["model"] for r in p.runs] == ["tiny:simclr", "tiny:byol"]
    assert all(Path(r.model["source"]).is_dir() for r in p.runs)
    assert run_study(str(pool), progress=False)["failed"] == {}
    from visrep.cli import main

    with pytest.raises(SystemExit) as done:
        main(["study", "report", str(pool), "--bootstrap", "5", "--out", str(tmp_path / "rep")])
    assert done.value.code == 0 and "tiny:byol" in (tmp_path / "rep" / "index.html").read_text()
    with pytest.raises(SystemExit) as done:  # a YAML mistake in the options: one sentence, no traceback
        main(["study", "run", str(pool), "--executor", "slurm", "--executor-options", "{cluster: [local"])
    assert done.value.code != 0
    with pytest.raises(ConfigError, match="has no factor 'sed' .*did you mean 'seed'"):
        plan({"name": "x", "models": [{"from_study": str(tmp_path / "grid.yaml"), "where": {"sed": 0}}],
              "evaluations": [{"protocol": "knn", "dataset": "digits"}]})


@pytest.mark.parametrize("cluster", ["debug", "local"])
def test_the_slurm_path_through_submitits_local_executors(tmp_path, cluster):
    spec = tiny(tmp_path / "s", steps=2)
    spec["factors"] = {"method": ["simclr"], "seed": [0, 1]}
    res = run_study(spec, workers=2, executor="slurm", executor_options={"cluster": cluster})  # default time limit
    assert len(res["done"]) == 2 and not res["failed"], res
    assert status(spec)["counts"]["done"] == 2
    if cluster == "local":  # real subprocesses, with submitit's logs in the study's folder
        assert list((tmp_path / "s" / "submitit").rglob("*_log.out"))
    assert run_study(spec, executor="slurm", executor_options={"cluster": cluster})["skipped"]


@pytest.mark.slow
def test_a_run_of_several_submitit_tasks_trains_as_one_process_group(tmp_path):
    """{tasks_per_node: 2}: the job's two tasks join one torch.distributed group (the variables torchrun would
    set, from submitit's job environment) and train one run; task 0 evaluates it and records the results."""
    import os

    spec = tiny(tmp_path / "s", steps=2)
    spec["factors"] = {"method": ["simclr"], "seed": [0]}
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        res = run_study(spec, executor="slurm", executor_options={"cluster": "local", "tasks_per_node": 2,
                                                                  "cpus_per_task": 1}, progress=False)
    finally:
        os.environ.pop("OMP_NUM_THREADS") if old is None else os.environ.__setitem__("OMP_NUM_THREADS", old)
    assert len(res["done"]) == 1 and not res["failed"], res
    run = next((tmp_path / "s" / "runs").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2
    assert status(spec)["counts"]["done"] == 1 and (run / "eval").is_dir()
    with pytest.raises(ConfigError, match="tasks_per_node must be a positive integer"):
        run_study(spec, executor="slurm", executor_options={"cluster": "local", "tasks_per_node": 0})


def test_executor_options_are_checked(tmp_path):
    spec = tiny(tmp_path / "s")
    with pytest.raises(ConfigError, match="did you mean 'timeout_min'"):
        run_study(spec, executor="slurm", executor_options={"timeout_mins": 5})
    with pytest.raises(ConfigError, match="with --executor slurm"):
        run_study(spec, executor_options={"timeout_min": 5})
    with pytest.raises(ConfigError, match="executor must be local or slurm"):
        run_study(spec, executor="kubernetes")
    with pytest.raises(ConfigError, match="submitit refused the executor options"):
        run_study(spec, executor="slurm", executor_options={"cluster": "local", "timeout_min": "soon"})


# --- the demo study, end to end, in a real browser ---------------------------------------------------------------

def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _browse(html: Path, *flags) -> subprocess.CompletedProcess:
    return subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--enable-logging=stderr", "--v=0", *flags, html.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_the_demo_study_end_to_end_and_its_report_in_a_browser(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo's runs go to ./runs/studies/demo_digits
    study = ROOT / "studies" / "demo.yaml"
    res = run_study(str(study), workers=2, progress=False)
    assert not res["failed"] and len(res["done"]) == 8
    out = report(str(study))
    html = Path(out["html"])
    numbers = json.loads(Path(out["json"]).read_text())
    assert set(numbers["factor_keys"]) == {"method", "views.policy", "seed"} and len(numbers["factor_effects"]) == 4
    if _chromium() is None:
        pytest.skip("chromium is not installed (apt-get install chromium); the browser half of this test needs it")
    shot = tmp_path / "shot.png"
    run = _browse(html, "--window-size=1280,4000", f"--screenshot={shot}")
    assert run.returncode == 0, run.stderr[-2000:]
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"))
    assert img.shape == (4000, 1280) and img.std() > 10  # rendered: not a blank page
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    dom = _browse(html, "--dump-dom").stdout
    for element in ('id="long-table"', 'id="per-task-table"', 'id="aggregate-table"', 'id="effects-table"'):
        assert element in dom
    for fig in ("fig-per-task", "fig-aggregate", "fig-task-correlation", "fig-factor-effects", "fig-cost"):
        assert f'id="{fig}"' in dom
    assert dom.count('data-sortable="ready"') >= 4  # the inline script ran on every table
    # sorting works in the browser: click the kNN column of the per-task table and read the order back
    clicked = tmp_path / "clicked.html"
    clicked.write_text(html.read_text().replace(
        "</body>", "<script>document.querySelectorAll('#per-task-table th.sortable')[1].click();</script></body>"))
    dom = _browse(clicked, "--dump-dom").stdout
    body = dom.split('id="per-task-table"')[1].split("</tbody>")[0]
    values = [float(v) for v in __import__("re").findall(r'data-value="([0-9.]+)"', body)[0::2]]
    assert len(values) == 4 and values == sorted(values)
