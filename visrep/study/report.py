"""`visrep study report`: collect a study's results, aggregate them and write a self-contained HTML report.

    visrep study report studies/demo.yaml [--out report/] [--tensorboard]

Writes into the report folder:

    index.html          one page, no network needed (figures inlined, sorting by a few lines of inline JS)
    *.png               the figures: per-task bars with CIs, aggregate ranking, task correlation, factor
                        effects, accuracy against cost, and tau_w per score where runs were ranked
    report.json         every number of the page (see visrep.study.aggregate for the formulas)
    results.csv / results.parquet   the long table: run x factors x evaluation x metric x value
    tensorboard/        with --tensorboard: every run's factors and metrics as TensorBoard HParams

The run folders' JSON files are the source of truth: the report first collects every finished evaluation into
the SQLite store (replacing, never duplicating, a run's rows), then reads the store.
"""
from __future__ import annotations

import base64
import datetime as _dt
import io
import json
from pathlib import Path

import numpy as np

from visrep.errors import ConfigError
from visrep.study import aggregate as agg
from visrep.study.plan import plan
from visrep.study.run import _status_path, _write_json, backbone_params
from visrep.study.store import ResultsStore, metrics_of


FIGURE_DPI = 110


def _task_label(spec: dict, used: set) -> str:
    """A short name for an evaluation: protocol, dataset (or its file's stem), and its task option."""
    data = spec.get("dataset", "digits")
    if data in ("imagefolder", "folder") and spec.get("data_dir"):
        data = Path(str(spec["data_dir"])).name.split(".")[0]
    task = (spec.get("options") or {}).get("task")
    label = f"{spec['protocol']} {data}" + (f"/{task}" if task else "")
    if spec.get("metric"):
        label += f" ({spec['metric']})"
    base, i = label, 2
    while label in used:
        label, i = f"{base} #{i}", i + 1
    used.add(label)
    return label


def _config_label(factors: dict, trained: bool, only_models: bool = False) -> str:
    if not trained:
        return str(factors["model"]) if only_models else f"{factors['model']} (model)"
    parts = [str(v) for k, v in factors.items() if k != "seed"]
    return " / ".join(parts) if parts else "all runs"


def collect(p) -> dict:
    """Record every finished evaluation JSON of the plan into the store; return what the report needs per run."""
    store = ResultsStore(Path(p.out_dir) / "results.sqlite", p.name)
    runs = []
    missing = 0
    for r in p.runs:
        run_dir = Path(r.config["out_dir"])
        try:
            status = json.loads(_status_path(run_dir).read_text())
        except (OSError, json.JSONDecodeError):
            status = {}
        results = {}
        for e in p.evaluations:
            path = run_dir / "eval" / f"{e.id}.json"
            try:
                results[e.id] = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                missing += 1
                continue
            store.record(r.id, r.factors, e.id, e.protocol, results[e.id])
        runs.append({"run": r, "status": status, "results": results})
    return {"store": store, "runs": runs, "missing": missing}


def _primary(e) -> tuple[str, float]:
    metric = e.spec.get("metric") or agg.PRIMARY.get(e.protocol, "top1")
    return metric, agg.sign_of(metric)


def _png(fig, path: Path) -> str:
    """Save a figure as PNG next to the page and return it base64-encoded for inlining."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
    plt.close(fig)
    data = buf.getvalue()
    path.write_bytes(data)
    return base64.b64encode(data).decode("ascii")


def _short(label: str, n: int = 28) -> str:
    return label if len(label) <= n else label[: n - 1] + "…"


def _fig_per_task(table, summary, models: set, out: Path) -> str:
    import matplotlib.pyplot as plt

    n = len(table.tasks)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 0.35 * len(table.configs) * rows + 1.6 * rows),
                             squeeze=False)
    for ax, t in zip(axes.flat, table.tasks):
        configs = [c for c in table.configs if c in summary[t]]
        means = [summary[t][c]["mean"] for c in configs]
        errs = [summary[t][c]["ci95"] or 0.0 for c in configs]
        colors = ["0.6" if c in models else "tab:blue" for c in configs]
        y = np.arange(len(configs))
        ax.barh(y, means, xerr=errs, color=colors, capsize=3)
        ax.set_yticks(y, [_short(c) for c in configs], fontsize=8)
        ax.invert_yaxis()
        lo = min(m - e for m, e in zip(means, errs))
        hi = max(m + e for m, e in zip(means, errs))
        pad = 0.1 * (hi - lo or abs(hi) or 1.0)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_title(t, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("per task: mean over seeds, 95 % CI (grey: models evaluated as they are)", fontsize=10)
    fig.tight_layout()
    return _png(fig, out / "per_task.png")


def _fig_aggregate(rows: list[dict], out: Path) -> str:
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 0.35 * len(rows) + 1.6))
    y = np.arange(len(rows))
    for ax, key, title in ((a1, "mean_z", "mean z-score across tasks (higher is better)"),
                           (a2, "mean_rank", "mean rank across tasks (1 is best)")):
        v = np.array([r[key] for r in rows])
        ci = np.array([r.get(f"{key}_ci") or [r[key], r[key]] for r in rows])
        # a percentile interval need not contain its point estimate: clip, never a negative error bar
        ax.errorbar(v, y, xerr=[np.maximum(v - ci[:, 0], 0), np.maximum(ci[:, 1] - v, 0)], fmt="o", capsize=3)
        ax.set_yticks(y, [_short(r["config"]) for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    a2.invert_xaxis()
    fig.tight_layout()
    return _png(fig, out / "aggregate.png")


def _fig_correlation(tasks: list[str], corr: dict, out: Path) -> str:
    import matplotlib.pyplot as plt

    m = np.array([[np.nan if corr[(a, b)] is None else corr[(a, b)] for b in tasks] for a in tasks])
    fig, ax = plt.subplots(figsize=(1.0 * len(tasks) + 3, 0.8 * len(tasks) + 2))
    im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu")
    ax.set_xticks(range(len(tasks)), [_short(t, 20) for t in tasks], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(tasks)), [_short(t, 20) for t in tasks], fontsize=8)
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            ax.text(j, i, "–" if np.isnan(m[i, j]) else f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="Spearman ρ over configurations")
    ax.set_title("task-to-task rank correlation", fontsize=10)
    fig.tight_layout()
    return _png(fig, out / "task_correlation.png")


def _fig_effects(effects: list[dict], tasks: list[str], out: Path) -> str:
    import matplotlib.pyplot as plt

    factors = list(dict.fromkeys(e["factor"] for e in effects))
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(tasks) * len(factors) + 1.5))
    width = 0.8 / max(len(factors), 1)
    for k, f in enumerate(factors):
        ys, vs, lo, hi = [], [], [], []
        for i, t in enumerate(tasks):
            e = next((e for e in effects if e["factor"] == f and e["task"] == t), None)
            if e is None:
                continue
            value = e["effect_sd"] if e["effect_sd"] is not None else e["range"]
            ys.append(i + (k - (len(factors) - 1) / 2) * width)
            vs.append(value)
            ci = e["effect_sd_ci"] or [value, value]
            lo.append(max(value - ci[0], 0.0))
            hi.append(max(ci[1] - value, 0.0))
        ax.barh(ys, vs, height=width, xerr=[lo, hi], capsize=3, label=f)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("effect sd: noise-corrected spread of the factor's level means (bootstrap 95 % CI over seeds;\n"
                  "the range of the level means where a study has one seed)")
    ax.set_title("factor effects: how much each factor moves each task", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig, out / "factor_effects.png")


def _fig_cost(points: list[dict], y_label: str, out: Path) -> str:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, key, name in zip(axes, ("steps", "train_seconds", "backbone_params"),
                             ("training steps", "training seconds (measured)", "backbone parameters")):
        pts = [p for p in points if p.get(key) is not None]
        ax.scatter([p[key] for p in pts], [p["y"] for p in pts], c=["0.5" if p["model"] else "tab:blue" for p in pts])
        for p in pts:
            ax.annotate(_short(p["config"], 18), (p[key], p["y"]), fontsize=6, alpha=0.8)
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
        xs = [p[key] for p in pts]
        if xs and min(xs) > 0 and max(xs) > 20 * min(xs):  # zeros (models: no training) stay on a linear axis
            ax.set_xscale("log")
        ax.xaxis.set_major_formatter(EngFormatter())
    axes[0].set_ylabel(y_label)
    fig.suptitle("accuracy against cost (mean over seeds; grey: models, not trained by the study)", fontsize=10)
    fig.tight_layout()
    return _png(fig, out / "cost.png")


def _fig_tau(taus: dict, out: Path) -> str:
    import matplotlib.pyplot as plt

    rows = [(t, s, v) for t, per in taus.items() for s, v in per.items() if v is not None]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.5))
    ax.barh(range(len(rows)), [v for _, _, v in rows], color="tab:green")
    ax.set_yticks(range(len(rows)), [f"{s} · {_short(t, 20)}" for t, s, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlim(-1, 1)
    ax.set_xlabel("weighted Kendall τ of the score against the truth, over the study's configurations")
    fig.tight_layout()
    return _png(fig, out / "rank_tau.png")


def _rank_taus(p, collected: dict, labels: dict) -> dict:
    """For every rank evaluation with a truth: τw of each score against the truth over configurations."""
    label_of = _labels(p, _only_models(p))
    out = {}
    for e in p.evaluations:
        if e.protocol != "rank":
            continue
        per_config: dict = {}
        for item in collected["runs"]:
            res = item["results"].get(e.id)
            rows = (res or {}).get("models") or []
            if not rows or rows[0].get("truth") is None:
                continue
            c = label_of[json.dumps(item["run"].factors, sort_keys=True, default=str)]
            per_config.setdefault(c, []).append(rows[0])
        if len(per_config) < 3:
            continue
        scores = sorted({s for rows in per_config.values() for r in rows for s in (r.get("scores") or {})})
        truth = [np.mean([r["truth"] for r in rows]) for rows in per_config.values()]
        out[labels[e.id]] = {}
        for s in scores:
            vals = [[(r.get("scores") or {}).get(s) for r in rows] for rows in per_config.values()]
            if any(v is None for vs in vals for v in vs):
                continue
            out[labels[e.id]][s] = agg.weighted_tau([np.mean(v) for v in vals], truth)
    return out


def _export_parquet(rows: list[dict], path: Path) -> Path | None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return None
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return path


def _export_tensorboard(collected: dict, labels: dict, out: Path) -> Path:
    """One TensorBoard run per study run: its factor values as hparams, every metric of every evaluation."""
    from torch.utils.tensorboard import SummaryWriter

    import shutil

    root = out / "tensorboard"
    shutil.rmtree(root, ignore_errors=True)  # a second report must not add a second copy of every run
    for item in collected["runs"]:
        r = item["run"]
        metrics = {}
        for eid, res in item["results"].items():
            for m, v in metrics_of(res).items():
                metrics[f"{labels[eid]}/{m}"] = v
        if not metrics:
            continue
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in r.factors.items()}
        with SummaryWriter(log_dir=str(root / r.id)) as w:
            w.add_hparams(hparams, metrics, run_name=".")
    return root


def report(study, *, out: str | Path | None = None, bootstrap: int = 1000, tensorboard: bool = False) -> dict:
    """Aggregate a study's results and write its report; returns paths and the aggregate numbers."""
    import matplotlib

    matplotlib.use("Agg")
    from jinja2 import Environment, PackageLoader

    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ConfigError(f"bootstrap must be a non-negative integer, got {bootstrap!r}")
    p = plan(study, check_build=False)
    if not (Path(p.out_dir) / "study.json").is_file():
        raise ConfigError(f"study '{p.name}' has not run yet (no {Path(p.out_dir) / 'study.json'}); "
                          "run `visrep study run` first")
    collected = collect(p)
    out = Path(out).expanduser() if out else Path(p.out_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)

    only_models = _only_models(p)
    used: set = set()
    labels = {e.id: _task_label(e.spec, used) for e in p.evaluations}
    primary = {e.id: _primary(e) for e in p.evaluations}
    signs = {labels[e.id]: primary[e.id][1] for e in p.evaluations}
    label_of = _labels(p, only_models)
    records, run_values, cost, no_metric = [], [], {}, set()
    for item in collected["runs"]:
        r = item["run"]
        values = {}
        for e in p.evaluations:
            res = item["results"].get(e.id)
            if res is None:
                continue
            metrics = metrics_of(res)
            v = metrics.get(primary[e.id][0])
            if v is None and not e.spec.get("metric") and "mae" in metrics:  # a regression head: judged by MAE
                primary[e.id] = ("mae", -1.0)
                signs[labels[e.id]] = -1.0
                v = metrics["mae"]
            if v is None:
                no_metric.add(labels[e.id])
                continue
            values[labels[e.id]] = v
            records.append({"factors": r.factors, "task": labels[e.id], "value": v})
        if r.trained and values:
            run_values.append({"factors": r.factors, "values": values})
        c = label_of[json.dumps(r.factors, sort_keys=True, default=str)]
        st = item["status"]
        if st.get("state") == "done" and st.get("backbone_params") is None:  # a status from before it was recorded

            try:
                st["backbone_params"] = backbone_params(r.model["source"] if r.model else r.config["out_dir"], r.model)
                _write_json(_status_path(Path(r.config["out_dir"])), st)  # counted once, not at every report
            except Exception:  # noqa: BLE001 - the cost axis is optional; the accuracy numbers are not
                pass
        cost.setdefault(c, {"steps": [], "train_seconds": [], "backbone_params": [], "model": not r.trained})
        for k in ("steps", "train_seconds", "backbone_params"):
            if st.get(k) is not None:
                cost[c][k].append(float(st[k]))
    if not records:
        raise ConfigError(f"study '{p.name}' has no finished evaluation yet; `visrep study status` shows its runs")
    trained_of = {label_of[json.dumps(r.factors, sort_keys=True, default=str)]: r.trained for r in p.runs}
    table = agg.build_table(records, signs, lambda f: label_of[json.dumps(f, sort_keys=True, default=str)])
    summary = agg.per_task(table)
    ranking = agg.aggregate(table, bootstrap=bootstrap)
    corr = agg.task_correlation(table)
    fx = agg.factor_effects(run_values, p.factor_keys, table.tasks, bootstrap=bootstrap)
    effects, comparisons = fx["effects"], fx["comparisons"]
    taus = _rank_taus(p, collected, labels)
    models = set() if only_models else {c for c, t in trained_of.items() if not t}

    figures = {"per_task": _fig_per_task(table, summary, models, out)}
    if ranking["rows"] and len(table.tasks) >= 1 and len(ranking["rows"]) >= 2:
        figures["aggregate"] = _fig_aggregate(ranking["rows"], out)
    if len(table.tasks) >= 2:
        figures["task_correlation"] = _fig_correlation(table.tasks, corr, out)
    if effects:
        figures["factor_effects"] = _fig_effects(effects, table.tasks, out)
    z_of = {r["config"]: r["mean_z"] for r in ranking["rows"]}
    one_task = len(table.tasks) == 1
    points = []
    for c in table.configs:
        y = summary[table.tasks[0]].get(c, {}).get("mean") if one_task else z_of.get(c)
        if y is None:
            continue
        k = cost.get(c, {})
        points.append({"config": c, "y": y, "model": c in models,
                       **{key: (float(np.mean(k[key])) if k.get(key) else None)
                          for key in ("steps", "train_seconds", "backbone_params")}})
    figures["cost"] = _fig_cost(points, table.tasks[0] if one_task else "mean z-score across tasks", out)
    if any(v is not None for per in taus.values() for v in per.values()):
        figures["rank_tau"] = _fig_tau(taus, out)

    long_rows = []
    in_plan = ({r.id for r in p.runs}, set(labels))
    for row in collected["store"].rows():
        if row["run_id"] not in in_plan[0] or row["evaluation_id"] not in in_plan[1]:
            continue  # runs or evaluations since removed from the study stay in the store, not in the report
        f = json.loads(row["factors"])
        long_rows.append({"run_id": row["run_id"], **{k: str(f.get(k, "")) for k in _all_keys(p)},
                          "evaluation": labels.get(row["evaluation_id"], row["evaluation_id"]),
                          "evaluation_id": row["evaluation_id"], "protocol": row["protocol"],
                          "metric": row["metric"], "value": row["value"], "fingerprint": row["fingerprint"] or ""})
    csv_path = collected["store"].export_csv(out / "results.csv", run_ids=in_plan[0], evaluation_ids=in_plan[1])
    parquet_path = _export_parquet(long_rows, out / "results.parquet")
    tb_path = _export_tensorboard(collected, labels, out) if tensorboard else None

    numbers = {
        "study": p.name, "budget": p.budget, "factor_keys": p.factor_keys,
        "tasks": {labels[e.id]: {"evaluation_id": e.id, "metric": primary[e.id][0],
                                 "higher_is_better": primary[e.id][1] > 0, "spec": e.spec} for e in p.evaluations},
        "per_task": summary, "aggregate": ranking,
        "task_correlation": [{"a": a, "b": b, "spearman": v} for (a, b), v in corr.items()],
        "factor_effects": effects, "factor_comparisons": comparisons, "rank_weighted_tau": taus,
        "cost": {c: {k: ((float(np.mean(v)) if v else None) if isinstance(v, list) else v) for k, v in d.items()}
                 for c, d in cost.items()},
        "missing_results": collected["missing"],
        "tasks_without_their_metric": sorted(no_metric - set(table.tasks)),
        "generated_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / "report.json").write_text(json.dumps(numbers, indent=2, default=str) + "\n")

    env = Environment(loader=PackageLoader("visrep.study", "templates"), autoescape=True)
    definition = Path(p.path).read_text() if p.path else json.dumps(study, indent=2, default=str)
    html = env.get_template("report.html.j2").render(
        p=p, numbers=numbers, figures=figures, long_rows=long_rows, long_keys=_all_keys(p), tables=table,
        summary=summary, ranking=ranking, effects=effects, comparisons=comparisons, taus=taus,
        definition=definition, models=models, reading=_reading(effects, comparisons, table.tasks))
    html_path = out / "index.html"
    html_path.write_text(html)
    return {"study": p.name, "html": str(html_path), "out": str(out), "json": str(out / "report.json"),
            "csv": str(csv_path), "parquet": str(parquet_path) if parquet_path else None,
            "tensorboard": str(tb_path) if tb_path else None, "runs_reported": len(table.configs),
            "tasks": len(table.tasks), "missing": collected["missing"], "figures": sorted(figures),
            "aggregate": ranking, "factor_effects": effects, "factor_comparisons": comparisons}


def _labels(p, only_models: bool) -> dict:
    """factor values (as JSON) -> configuration label (seeds share one). Values alone ("simclr / byol") unless two
    configurations would share a label (points with different keys): then key=value pairs."""
    def conf(r):
        return json.dumps({k: v for k, v in r.factors.items() if k != "seed"}, sort_keys=True, default=str)

    labels = {json.dumps(r.factors, sort_keys=True, default=str): (conf(r), _config_label(r.factors, r.trained,
                                                                                          only_models))
              for r in p.runs}
    seen: dict = {}
    for c, lab in labels.values():
        seen.setdefault(lab, set()).add(c)
    if all(len(v) == 1 for v in seen.values()):
        return {k: lab for k, (_, lab) in labels.items()}
    out = {}
    for r in p.runs:
        parts = ", ".join(f"{k}={v}" for k, v in r.factors.items() if k != "seed") or "all runs"
        out[json.dumps(r.factors, sort_keys=True, default=str)] = parts if r.trained else labels[
            json.dumps(r.factors, sort_keys=True, default=str)][1]
    return out


def _only_models(p) -> bool:
    return not any(r.trained for r in p.runs)


def _all_keys(p) -> list[str]:
    keys = list(p.factor_keys)
    if any(not r.trained for r in p.runs) and "model" not in keys:
        keys.append("model")
    return keys


def _reading(effects: list[dict], comparisons: list[dict], tasks: list[str]) -> list[str]:
    """One sentence per task: each factor's effect sd and contrasts, and whether the larger effect is larger than
    the next one (the interval of their difference)."""
    lines = []
    for t in tasks:
        es = sorted([e for e in effects if e["task"] == t], key=lambda e: -(e["effect_sd"] or 0.0))
        if not es:
            continue
        parts = []
        for e in es:
            sig = [c for c in e["contrasts"] if c["ci95"] is not None and abs(c["mean"]) > c["ci95"]]
            if e["effect_sd"] is None:
                size = f"level means span {e['range']:.4f} (one seed: no interval)"
            else:
                ci = e["effect_sd_ci"]
                size = f"effect sd {e['effect_sd']:.4f}" + (f" (95 % CI {ci[0]:.4f} to {ci[1]:.4f})" if ci else "")
            parts.append(f"{e['factor']}: {size}, {len(sig)} of {len(e['contrasts'])} contrasts exclude 0")
        line = f"{t}: " + "; ".join(parts)
        if len(es) >= 2:
            c = next((c for c in comparisons if c["task"] == t and {c["a"], c["b"]} == {es[0]["factor"],
                                                                                  es[1]["factor"]}), None)
            if c is not None:
                sign = 1 if c["a"] == es[0]["factor"] else -1
                lo, hi = sorted((sign * c["ci95"][0], sign * c["ci95"][1]))
                if lo > 0:
                    verdict = f"so {es[0]['factor']} moves this task more"
                elif hi < 0:
                    verdict = f"so {es[1]['factor']} moves this task more"
                else:
                    verdict = "an interval that includes 0, so this study cannot say which moves it more"
                line += (f". {es[0]['factor']} minus {es[1]['factor']}: {sign * c['difference']:+.4f} "
                         f"(95 % CI {lo:+.4f} to {hi:+.4f}), {verdict}")
        lines.append(line + ".")
    return lines
