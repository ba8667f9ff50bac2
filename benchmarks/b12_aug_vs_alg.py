"""B12: "Augmentations vs Algorithms" at CPU scale: run studies/aug_vs_alg.yaml for real and summarise it.

    .venv/bin/python benchmarks/b12_aug_vs_alg.py [--workers 2]      # resumable: finished runs are skipped
    .venv/bin/python benchmarks/b12_aug_vs_alg.py --report-only --markdown   # the tables of docs/benchmarks.md

Runs every missing run and evaluation of the study (`visrep study run`), writes its report (`visrep study
report`), then copies into benchmarks/results/b12_aug_vs_alg/ the results store (results.sqlite), report.json,
results.csv and the report's figures, and writes benchmarks/results/b12_aug_vs_alg.json: the machine, the recipe
(the study file), every run's measured steps and training seconds, each configuration's margin over random init
per task, the factor effects and the answer to the paper's question with its intervals.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

STUDY = common.REPO_ROOT / "studies" / "aug_vs_alg.yaml"
OUT_DIR = common.RESULTS_DIR / "b12_aug_vs_alg"


def _margins(numbers: dict) -> dict:
    """Per task: each trained configuration's mean minus random init's, and the smallest such margin."""
    out = {}
    for task, per in numbers["per_task"].items():
        ref = per.get("random_init (model)")
        if ref is None:
            continue
        sign = 1.0 if numbers["tasks"][task]["higher_is_better"] else -1.0
        margins = {c: sign * (s["mean"] - ref["mean"]) for c, s in per.items() if c != "random_init (model)"}
        out[task] = {"random_init": ref["mean"], "margins": margins, "smallest_margin": min(margins.values()),
                     "smallest_margin_config": min(margins, key=margins.get)}
    return out


def below_random_init(margins: dict, factor: str = "method") -> list[str]:
    """Levels of `factor` whose every configuration is at or below random init on the CIFAR-10 tasks."""
    cifar = [t for t in margins if "cifar10" in t]
    levels: dict = {}
    for t in cifar:
        for config, m in margins[t]["margins"].items():
            levels.setdefault(config.split(" / ")[0], []).append(m)
    return sorted(lv for lv, ms in levels.items() if ms and max(ms) <= 0)


def effects_without(numbers_runs: list[dict], drop: list[str], tasks: list[str], bootstrap: int) -> dict:
    """Factor effects recomputed without the runs of the dropped methods (a secondary, post-hoc reading)."""
    from visrep.study import aggregate as agg

    runs = [r for r in numbers_runs if r["factors"].get("method") not in drop]
    return agg.factor_effects(runs, ["method", "views.policy", "seed"], tasks, bootstrap=bootstrap)


def _run_values(numbers: dict, runs: list[dict]) -> list[dict]:
    """Each trained run's main metric per task, from the study's store (via its CSV in the report folder)."""
    import csv

    task_of = {t["evaluation_id"]: (name, t["metric"]) for name, t in numbers["tasks"].items()}
    values: dict = {}
    with (OUT_DIR / "results.csv").open() as f:
        for row in csv.DictReader(f):
            name, metric = task_of.get(row["evaluation_id"], (None, None))
            if name and row["metric"] == metric:
                values.setdefault(row["run_id"], {})[name] = float(row["value"])
    return [{"factors": r["factors"], "values": values.get(r["id"], {})} for r in runs if "model" not in r["factors"]]


def markdown(res: dict) -> str:
    numbers = res["report"]
    tasks = list(numbers["tasks"])
    lines = ["| method / views | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for c in list(next(iter(numbers["per_task"].values()))):
        cells = []
        for t in tasks:
            s = numbers["per_task"][t].get(c)
            cells.append("–" if s is None else (f"{s['mean']:.3f} ± {s['ci95']:.3f}" if s["ci95"] is not None
                                                else f"{s['mean']:.3f}"))
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", "| task | factor | level means | effect sd [95 % CI] | contrasts vs first level ± 95 % CI |",
              "|---|---|---|---|---|"]
    for e in numbers["factor_effects"]:
        contrasts = "; ".join(f"{c['level']} − {c['reference']}: {c['mean']:+.4f} ± {c['ci95']:.4f}"
                              for c in e["contrasts"] if c["mean"] is not None and c["ci95"] is not None)
        means = ", ".join(f"{k} {v:.3f}" for k, v in e["level_means"].items())
        ci = e["effect_sd_ci"]
        lines.append(f"| {e['task']} | {e['factor']} | {means} | {e['effect_sd']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}] "
                     f"| {contrasts} |")
    lines += ["", "| task | views.policy effect sd − method effect sd [95 % CI] | share of resamples where views > method |",
              "|---|---|---|"]
    for c in numbers["factor_comparisons"]:
        sign = -1 if c["a"] == "method" else 1  # report views minus method
        lo, hi = sorted((sign * c["ci95"][0], sign * c["ci95"][1]))
        share = 1 - c["p_a_larger"] if c["a"] == "method" else c["p_a_larger"]
        lines.append(f"| {c['task']} | {sign * c['difference']:+.4f} [{lo:+.4f}, {hi:+.4f}] | {share:.2f} |")
    post = res.get("without_methods_below_random_init")
    if post and post["dropped"]:
        lines += ["", f"Without {', '.join(post['dropped'])} (every configuration at or below random init on CIFAR-10; "
                  "post hoc):", "", "| task | views.policy effect sd − method effect sd [95 % CI] | share of resamples "
                  "where views > method |", "|---|---|---|"]
        for c in post["comparisons"]:
            sign = -1 if c["a"] == "method" else 1
            lo, hi = sorted((sign * c["ci95"][0], sign * c["ci95"][1]))
            share = 1 - c["p_a_larger"] if c["a"] == "method" else c["p_a_larger"]
            lines.append(f"| {c['task']} | {sign * c['difference']:+.4f} [{lo:+.4f}, {hi:+.4f}] | {share:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--report-only", action="store_true", help="only aggregate what has run")
    ap.add_argument("--markdown", action="store_true", help="print the tables of docs/benchmarks.md")
    ap.add_argument("--refresh", action="store_true", help="with --report-only: aggregate again, then print")
    args = ap.parse_args()
    from visrep.study import plan, report, run_study

    result_path = common.result_path("b12_aug_vs_alg")
    if args.markdown and args.report_only and result_path.is_file() and not args.refresh:
        print(markdown(json.loads(result_path.read_text())))
        return
    load = common.load_check("b12")
    t0 = time.perf_counter()
    run = None if args.report_only else run_study(str(STUDY), workers=args.workers)
    wall = time.perf_counter() - t0
    rep = report(str(STUDY), bootstrap=args.bootstrap)
    numbers = json.loads(Path(rep["json"]).read_text())
    p = plan(str(STUDY), check_build=False)
    runs = []
    for r in p.runs:
        try:
            st = json.loads((Path(r.config["out_dir"]) / "study_status.json").read_text())
        except (OSError, json.JSONDecodeError):
            st = {}
        runs.append({"id": r.id, "factors": r.factors, "state": st.get("state"), "steps": st.get("steps"),
                     "train_seconds": st.get("train_seconds"), "wall_seconds": st.get("wall_seconds")})
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(p.out_dir) / "results.sqlite", OUT_DIR / "results.sqlite")
    for name in ("report.json", "results.csv", "index.html", *[f"{f}.png" for f in rep["figures"]]):
        shutil.copy2(Path(rep["out"]) / name, OUT_DIR / name)
    trained = [r for r in runs if "model" not in r["factors"]]
    res = {"benchmark": "b12_aug_vs_alg", "machine": common.machine_info(), "load": load,
           "recipe": {"study": str(STUDY.relative_to(common.REPO_ROOT)), "definition": STUDY.read_text(),
                      "workers": args.workers, "bootstrap": args.bootstrap},
           "this_invocation_wall_seconds": wall,
           "ran_now": None if run is None else {"done": len(run["done"]), "skipped": len(run["skipped"]),
                                                "failed": run["failed"]},
           "runs": runs,
           "total_train_seconds": sum(r["train_seconds"] or 0 for r in trained),
           "total_wall_seconds_of_runs": sum(r["wall_seconds"] or 0 for r in runs),
           "margins_over_random_init": _margins(numbers), "report": numbers,
           "without_methods_below_random_init": None,
           "files": sorted(str(f.relative_to(common.BENCH_DIR)) for f in OUT_DIR.iterdir())}
    drop = below_random_init(res["margins_over_random_init"])
    fx = effects_without(_run_values(numbers, runs), drop, list(numbers["tasks"]), args.bootstrap)
    res["without_methods_below_random_init"] = {"dropped": drop, **fx}
    common.write_json(result_path, res)
    print(f"wrote {result_path}")
    if args.markdown:
        print(markdown(res))


if __name__ == "__main__":
    main()
