"""`visrep rank`: score a pool of backbones on one target task from frozen features, optionally against a truth.

    res = rank(["runs/byol", "runs/mae", "timm:resnet18"], dataset="utkface", root="~/data/faces",
               dataset_options={"task": "gender"}, scores=["logme", "tmi", "rankme"], truth="linear")

Per model: the training (and, with a truth, test) split's features through visrep's feature cache, then
every score on the training features. Source-probability scores (LEEP, NCE) use the model's own classifier
head on the training images; a model without one gets a note instead of a value. With truth="linear", the
ground truth is the L-BFGS linear probe's test top-1 (`lbfgs_probe`, Kornblith et al. 2019), and each score
is compared with it over the pool: Kendall τ, weighted τ (scipy.stats.weightedtau, the field's standard),
Pearson r, top-1 hit and relative top-1 accuracy (truth of the model the score ranks first / best truth).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import torch

from visrep.errors import ConfigError, DataError, VisrepError

TRUTHS = ("none", "linear")


def expand_pool(models: Sequence[str] | str) -> list[str]:
    """A list of model sources from: a list; a YAML file holding a list (or {models: [...]}); a folder of runs."""
    import yaml

    items = [models] if isinstance(models, str) else list(models)
    out: list[str] = []
    for m in items:
        p = Path(str(m)).expanduser()
        if p.is_file() and p.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(p.read_text())
            data = data.get("models") if isinstance(data, dict) else data
            if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
                raise ConfigError(f"pool file '{m}' must hold a list of models (or a 'models:' list)")
            out += data
        elif p.is_dir() and not (p / "checkpoints").is_dir():
            runs = sorted(str(d) for d in p.iterdir() if (d / "checkpoints" / "last.safetensors").is_file())
            if not runs:
                raise ConfigError(f"'{m}' is neither a run directory nor a folder of runs")
            out += runs
        else:
            out.append(str(m))
    if len(out) < 1:
        raise ConfigError("rank needs at least one model")
    if len(set(out)) != len(out):
        raise ConfigError("the pool names a model twice")
    return out


def _check_scores(names: Sequence[str] | None) -> list[str]:
    from visrep.rank import SCORES

    if names is None:
        return SCORES.names()
    for n in names:
        SCORES.get(n)  # unknown name: one sentence with a did-you-mean
    return list(names)


def _source_probs(model: str, train, image_size: int, device, force: bool):
    """Softmax of a visrep run's own classifier head on the training images, or None (with the reason)."""
    from visrep.evaluate.api import _has_classifier_head, _load_head
    from visrep.evaluate.features import extract_features
    from visrep.train.checkpoint import weights_fingerprint

    if not Path(model).expanduser().exists() or not _has_classifier_head(model, force):
        return None, "needs a classifier head (a supervised or fine-tuned visrep run)"
    head, cfg, _, _, size = _load_head(model, image_size, force)
    if cfg.objective.name == "regression":
        return None, "needs a classifier head; this run regresses"
    logits, _ = extract_features(head, train, image_size=size, device=device, progress=False,
                                 model_fingerprint=weights_fingerprint(head.state_dict()), channels_last=True)
    return torch.softmax(logits.double(), 1), None


def _agreement(values: list[float | None], truth: list[float]) -> dict:
    """How well one score's values order the pool like the truth does."""
    from scipy import stats

    pairs = [(v, t) for v, t in zip(values, truth) if v is not None and math.isfinite(v)]
    if len(pairs) < 2:
        return {"n": len(pairs), "note": "fewer than two models with a value"}
    v, t = zip(*pairs)
    constant = len(set(v)) == 1 or len(set(t)) == 1
    best = max(range(len(v)), key=lambda i: v[i])
    return {"n": len(pairs),
            "kendall_tau": None if constant else float(stats.kendalltau(v, t).statistic),
            "weighted_tau": None if constant else float(stats.weightedtau(v, t).statistic),
            "pearson_r": None if constant else float(stats.pearsonr(v, t).statistic),
            "top1_hit": bool(t[best] == max(t)),
            "relative_top1": float(t[best] / max(t)) if max(t) > 0 else None}


def rank(models: Sequence[str] | str, *, dataset: str = "digits", root: str | None = None,
         train_split: str = "train", test_split: str = "test", dataset_options: dict | None = None,
         scores: Sequence[str] | None = None, truth: str = "none", image_size: int | None = None,
         train_subset: int | None = None, test_subset: int | None = None, batch_size: int = 256,
         device: str = "cpu", seed: int = 0, backbone_options: dict | None = None, force: bool = False,
         out: str | None = None, plot: str | None = None, progress: bool = True) -> dict:
    """Score every model of the pool on the target; see the module docstring. Returns (and writes to `out`)
    {"models": [{"model", "scores": {name: value}, "ranks": {name: rank}, "notes", "truth"?}], "agreement"?,
    "protocol": {...}}; ranks are 1 = best within the pool."""
    from visrep.evaluate.api import _finish, _prepare
    from visrep.rank import SCORES

    if truth not in TRUTHS:
        raise ConfigError(f"truth must be one of {', '.join(TRUTHS)}, got {truth!r}")
    pool, names = expand_pool(models), _check_scores(scores)
    t0 = time.perf_counter()
    rows, score_seconds = [], {n: 0.0 for n in names}
    from tqdm.auto import tqdm

    for model in tqdm(pool, desc="rank: models", unit="model", disable=not progress):
        try:
            (ftr, ltr, fte, lte, c), record, _ = _prepare(
                model, dataset=dataset, root=root, train_split=train_split, test_split=test_split,
                image_size=image_size, branch="student", batch_size=batch_size, device=device, cache_dir=None,
                train_subset=train_subset, test_subset=test_subset, seed=seed, progress=False, mean=None,
                std=None, download=True, dataset_options=dataset_options, backbone_options=backbone_options,
                force=force)
        except VisrepError as e:
            raise type(e)(f"model '{model}': {e}") from None
        row = {"model": model, "fingerprint": record["model"].get("fingerprint"), "feature_dim": int(ftr.shape[1]),
               "scores": {}, "notes": {}}
        probs = None
        for n in names:
            fn = SCORES.get(n)
            t = time.perf_counter()
            try:
                if fn.needs == "probs":
                    if probs is None:
                        from visrep.data.sources import load_dataset

                        train = load_dataset(dataset, train_split, root, image_size=image_size,
                                             **dict(dataset_options or {})).subset(train_subset, seed)
                        from visrep.evaluate.api import resolve_device

                        probs = _source_probs(model, train, record["image_size"], resolve_device(device), force)
                    if probs[0] is None:
                        row["scores"][n], row["notes"][n] = None, probs[1]
                        continue
                    row["scores"][n] = float(fn(probs[0], ltr))
                else:
                    row["scores"][n] = float(fn(ftr) if fn.needs == "none" else fn(ftr, ltr))
            except DataError as e:  # e.g. a class too small for TMI: a note for this model, not a crash
                row["scores"][n], row["notes"][n] = None, str(e)
            score_seconds[n] += time.perf_counter() - t
        if truth == "linear":
            from visrep.evaluate.linear import lbfgs_probe

            row["truth"] = float(lbfgs_probe(ftr, ltr, fte, lte, seed=seed, num_classes=c)["top1"])
        rows.append(row)
    for n in names:  # rank 1 = highest value, ties share the better rank; models without a value get none
        values = [r["scores"][n] for r in rows if r["scores"][n] is not None]
        for r in rows:
            if r["scores"][n] is not None:
                r.setdefault("ranks", {})[n] = 1 + sum(v > r["scores"][n] for v in values)
    for r in rows:
        r.setdefault("ranks", {})
    result = {"protocol": "rank", "pool": pool, "models": rows, "scores": names, "score_seconds": score_seconds,
              "truth": truth, "dataset": {"name": dataset, "train_split": train_split, "test_split": test_split,
                                          "options": dict(dataset_options or {}), "train_subset": train_subset,
                                          "test_subset": test_subset}}
    if truth != "none":
        t = [r["truth"] for r in rows]
        result["truth_protocol"] = "lbfgs linear probe test top-1 (Kornblith et al. 2019)"
        result["agreement"] = {n: _agreement([r["scores"][n] for r in rows], t) for n in names}
        if plot is None and out is not None:
            plot = str(Path(out).expanduser().with_suffix(".png"))
        if plot:
            result["plot"] = str(_plot(result, plot))
    return _finish({}, result, t0, out)


def _plot(result: dict, path: str) -> Path:
    """One panel per score: its value against the truth, one point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result["scores"]
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax, n in zip(axes.flat, names):
        pts = [(r["scores"][n], r["truth"]) for r in result["models"] if r["scores"][n] is not None]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18)
        tau = result["agreement"][n].get("weighted_tau")
        ax.set_title(f"{n}" + (f"  τw {tau:.2f}" if tau is not None else ""), fontsize=9)
        ax.set_xlabel("score", fontsize=8)
        ax.set_ylabel("truth top-1", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(result: dict) -> str:
    """The ranked table the CLI prints (rich): one row per model, one column per score (value and rank)."""
    from rich.console import Console
    from rich.table import Table

    key = "truth" if result["truth"] != "none" else None
    order = sorted(result["models"], key=lambda r: -(r[key] if key else 0))
    table = Table(title=f"rank on {result['dataset']['name']}" + (" (truth: linear probe top-1)" if key else ""))
    table.add_column("model")
    for n in result["scores"]:
        table.add_column(n, justify="right")
    if key:
        table.add_column("truth", justify="right")
    for r in order:
        cells = [f"{r['scores'][n]:.4g} ({r['ranks'][n]})" if r["scores"][n] is not None else "–"
                 for n in result["scores"]]
        table.add_row(r["model"], *cells, *([f"{r['truth']:.4f}"] if key else []))
    if key:
        table.add_row("weighted τ", *[("–" if result["agreement"][n].get("weighted_tau") is None
                                       else f"{result['agreement'][n]['weighted_tau']:.3f}")
                                      for n in result["scores"]], "")
    import io

    console = Console(width=200, file=io.StringIO(), record=True)
    console.print(table)
    return console.export_text()
