"""`visrep rank`: score a pool of backbones on one target task from frozen features, optionally against a truth.

    res = rank(["runs/byol", "runs/mae", "timm:resnet18"], dataset="utkface", root="~/data/faces",
               dataset_options={"task": "gender"}, scores=["logme", "tmi", "rankme"], truth="linear")

Per model: the training (and, with a truth, test) split's features through visrep's feature cache, then
every score on the training features. Source-probability scores (LEEP, NCE) use the model's own classifier
head on the training images: a supervised or fine-tuned visrep run's head, or a timm model's own classifier
(`timm:NAME`; ImageNet's with `pretrained=True`, a seeded random one offline); a model without one gets a
note instead of a value.

Ground truth, and how each score is compared with it over the pool: Kendall τ, weighted τ
(scipy.stats.weightedtau, the field's standard), Pearson r, top-1 hit and relative top-1 accuracy (truth of
the model the score ranks first / best truth).

- truth="linear": the L-BFGS linear probe's test top-1 (`lbfgs_probe`, Kornblith et al. 2019: L2 chosen on
  a held-out slice of the training split, refit on all of it).
- truth="finetune": `visrep finetune` (full, AdamW, a linear head) for every learning rate of a small grid,
  trained on the training split minus a seeded, stratified held-out part (`data.holdout`); the rate with
  the best held-out top-1 is chosen, and that run's test top-1 is the truth. Runs are folders under
  `finetune_dir` and are resumed, so a killed `rank` continues where it stopped.
"""
from __future__ import annotations

import hashlib
import inspect
import io
import json
import math
import time
from pathlib import Path
from typing import Sequence

import torch

from visrep.checkpoint import weights_fingerprint
from visrep.config import read_yaml_file, resolve_config
from visrep.data.sources import cache_dir
from visrep.device import resolve_device
from visrep.errors import ConfigError, DataError, VisrepError
from visrep.evaluate.api import (_finish, _load_head, _load_model, _load_split, _prepare, check_evaluable,
                                 evaluate_classifier)
from visrep.evaluate.features import extract_features
from visrep.evaluate.linear import lbfgs_probe
from visrep.models.backbones import _timm, apply_cifar_stem
from visrep.rank import SCORES
from visrep.train.finetune import finetune

TRUTHS = ("none", "linear", "finetune")
# The fine-tuning truth's protocol (override any key with finetune_options). lrs: the AdamW grid; holdout:
# the fraction of the training split held out to choose the lr; layer_decay: None or BEiT's decay.
FINETUNE_DEFAULTS = {"lrs": [1e-4, 3e-4, 1e-3], "epochs": 3, "batch_size": 128, "weight_decay": 0.05,
                     "warmup_epochs": 0.5, "holdout": 0.2, "layer_decay": None, "mode": "full"}


def _pool_entry(item, where: str) -> dict:
    """{"model": source, "backbone_options": dict | None} from a string or a {model, backbone_options} mapping."""
    if isinstance(item, str) and item:
        return {"model": item, "backbone_options": None}
    if isinstance(item, dict):
        unknown = sorted(set(item) - {"model", "backbone_options"})
        if unknown or not isinstance(item.get("model"), str) or not item["model"]:
            raise ConfigError(f"{where}: a pool entry is a model name or path, or a mapping with 'model' and optional "
                              f"'backbone_options', got {item!r}")
        opts = item.get("backbone_options")
        if opts is not None and not isinstance(opts, dict):
            raise ConfigError(f"{where}: backbone_options of '{item['model']}' must be a mapping, got {opts!r}")
        if opts is not None and Path(item["model"]).expanduser().exists():
            raise ConfigError(f"{where}: '{item['model']}' is a run or checkpoint, whose architecture comes from its "
                              "own config; backbone_options are for random-init and timm: models")
        return {"model": item["model"], "backbone_options": opts}
    raise ConfigError(f"{where}: a pool entry is a model name or path, or a mapping with 'model' and optional "
                      f"'backbone_options', got {item!r}")


def expand_pool(models) -> list[dict]:
    """The pool as entries {"model", "backbone_options"} from: a list of names/paths or {model, backbone_options}
    mappings (per-model options, e.g. a narrow random-init ResNet beside timm models); a YAML file holding such a
    list (or {models: [...]}); a folder of runs."""
    items = [models] if isinstance(models, (str, dict)) else list(models)
    out: list[dict] = []
    for m in items:
        if isinstance(m, dict):
            out.append(_pool_entry(m, "pool"))
            continue
        p = Path(str(m)).expanduser()
        if p.is_file() and p.suffix in (".yaml", ".yml"):
            data = read_yaml_file(p, "pool file")
            data = data.get("models") if isinstance(data, dict) else data
            if not isinstance(data, list):
                raise ConfigError(f"pool file '{m}' must hold a list of models (or a 'models:' list)")
            out += [_pool_entry(x, f"pool file '{m}'") for x in data]
        elif p.is_dir() and not (p / "checkpoints").is_dir():
            runs = sorted(str(d) for d in p.iterdir() if (d / "checkpoints" / "last.safetensors").is_file())
            if not runs:
                raise ConfigError(f"'{m}' is neither a run directory nor a folder of runs")
            out += [_pool_entry(r, "pool") for r in runs]
        else:
            out.append(_pool_entry(str(m), "pool"))
    if len(out) < 1:
        raise ConfigError("rank needs at least one model")
    return out


def _check_distinct(entries: list[dict], default_options: dict | None) -> None:
    """Two entries that load the same model (same source and the options it is really built with) would be counted
    twice in every correlation."""
    seen = set()
    for e in entries:
        is_path = Path(e["model"]).expanduser().exists()
        used = None if is_path else (e["backbone_options"] if e["backbone_options"] is not None else default_options)
        key = json.dumps([str(Path(e["model"]).expanduser().resolve()) if is_path else e["model"], used or {}],
                         sort_keys=True, default=str)
        if key in seen:
            raise ConfigError(f"the pool names model '{e['model']}' twice (with the same backbone options)")
        seen.add(key)


def _display_name(entry: dict) -> str:
    if entry["backbone_options"] is None:
        return entry["model"]
    opts = ", ".join(f"{k}: {v}" for k, v in sorted(entry["backbone_options"].items()))
    return f"{entry['model']} {{{opts}}}"


def _check_scores(names: Sequence[str] | None) -> list[str]:
    if names is None:
        return SCORES.names()
    names = list(names)
    if not names:
        raise ConfigError("no score named; give one or more of: " + ", ".join(SCORES.names()))
    for n in names:
        SCORES.get(n)  # unknown name: one sentence with a did-you-mean
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"score {', '.join(map(repr, twice))} is asked for twice")
    return names


def _check_score_options(options: dict | None, names: list[str]) -> dict:
    """{score: {keyword: value}} for the scores' own keyword arguments (e.g. {"tmi": {"normalize": True}}),
    every name and keyword checked before any feature is extracted."""
    options = dict(options or {})
    for n, kw in options.items():
        if n not in names:
            SCORES.get(n)  # unknown: did-you-mean
            raise ConfigError(f"score options are given for '{n}', which is not among the scores asked for")
        if not isinstance(kw, dict):
            raise ConfigError(f"score options for '{n}' must be a mapping of keyword: value, got {kw!r}")
        params = [p.name for p in inspect.signature(SCORES.get(n)).parameters.values()
                  if p.kind == inspect.Parameter.KEYWORD_ONLY]
        bad = sorted(set(kw) - set(params))
        if bad:
            raise ConfigError(f"score '{n}' takes no option {', '.join(map(repr, bad))}; its options: "
                              f"{', '.join(params) or '(none)'}")
        kinds = {"bool": (bool,), "int": (int,), "float": (int, float)}  # the annotations the scores use
        for key, value in kw.items():
            annotation = str(inspect.signature(SCORES.get(n)).parameters[key].annotation)
            want = kinds.get(annotation.split(" |")[0])
            if value is None and "None" in annotation:
                continue
            if want and (not isinstance(value, want) or (bool not in want and isinstance(value, bool))):
                raise ConfigError(f"score '{n}' option '{key}' must be {' or '.join(t.__name__ for t in want)}, "
                                  f"got {value!r}")
        _try_options(n, kw)
    return options


def _check_models_load(entries: list[dict], default_options: dict | None, image_size, seed, pretrained) -> None:
    """Build every random-init / timm model once before any feature is extracted, so a bad name or option fails
    first, in one sentence naming the model (checkpoints are verified when they load)."""
    for e in entries:
        if Path(e["model"]).expanduser().exists() or (pretrained and e["model"].startswith("timm:")):
            continue  # checkpoints are checked on load; pretrained weights are fetched once, later
        options = e["backbone_options"] if e["backbone_options"] is not None else default_options
        try:
            _load_model(e["model"], image_size or 32, "student", seed, options)
        except VisrepError as err:
            hint = ("; give it its own options in a YAML pool ({model: ..., backbone_options: {...}})"
                    if e["backbone_options"] is None and default_options else "")
            raise type(err)(f"model '{e['model']}': {err}{hint}") from None


def _try_options(name: str, kw: dict) -> None:
    """Run the score once on a tiny seeded case so a value of the wrong type or range fails now, in one sentence,
    not after the pool's features have been extracted."""
    fn = SCORES.get(name)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=g, dtype=torch.float64), torch.arange(40) % 2
    args = (torch.softmax(x, 1), y) if fn.needs == "probs" else (x,) if fn.needs == "none" else (x, y)
    try:
        fn(*args, **kw)
    except (ConfigError, TypeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"score '{name}' does not accept the options {kw} ({msg})") from None
    except DataError:  # the tiny case itself does not suit the score; the real features will tell
        pass


def _logits(net, ds, size: int, device) -> torch.Tensor:
    logits, _ = extract_features(net, ds, image_size=size, device=device, progress=False,
                                 model_fingerprint=weights_fingerprint(net.state_dict()), channels_last=True)
    return logits


def _timm_classifier(model: str, size: int, seed: int, options: dict | None, pretrained: bool):
    """A timm model with its own classifier whose trunk is exactly the backbone the features came from, or None."""
    name = model[5:]
    backbone, _ = _load_model(model, size, "student", seed, options, pretrained=pretrained)
    opts = {k: v for k, v in dict(options or {}).items() if k not in ("image_size", "cifar_stem", "width")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))  # offline: a seeded random head, reproducible like the random trunk
        net = _timm().create_model(name, pretrained=pretrained, **opts)
    if getattr(net, "num_classes", 0) in (0, None):
        return None
    if (options or {}).get("cifar_stem"):
        apply_cifar_stem(net)
    loaded = net.load_state_dict(backbone.state_dict(), strict=False)
    head = net.pretrained_cfg.get("classifier") or ()
    head = (head,) if isinstance(head, str) else tuple(head)
    if loaded.unexpected_keys or not all(k.startswith(head) for k in loaded.missing_keys) or not head:
        return None  # the trunk must be exactly the features' backbone; only the classifier is new
    return net.eval()


def _source_probs(model: str, train, image_size: int, device, force: bool, seed: int = 0,
                  options: dict | None = None, pretrained: bool = False):
    """Softmax of the model's own classifier on the training images, or None (with the reason): a visrep run's
    head, or a timm model's classifier."""
    no_head = "needs a classifier head (a supervised or fine-tuned visrep run, or a timm:NAME model with one)"
    if str(model).startswith("timm:"):
        net = _timm_classifier(model, image_size, seed, options, pretrained)
        if net is None:
            return None, no_head
        return torch.softmax(_logits(net, train, image_size, device).double(), 1), None
    if not Path(model).expanduser().exists():
        return None, no_head
    try:  # one verified load of the run: a run without head tensors (self-supervised, an export) has no head
        head, cfg, _, _, size = _load_head(model, image_size, force)
    except ConfigError:
        return None, no_head
    if cfg.objective.name == "regression":
        return None, "needs a classifier head; this run regresses"
    return torch.softmax(_logits(head, train, size, device).double(), 1), None


def _check_finetunable(pool: list[str]) -> None:
    for m in pool:
        if not Path(m).expanduser().exists():
            raise ConfigError(f"--truth finetune needs weights to start from, but '{m}' is a random-init or timm "
                              "name, not a visrep run or checkpoint; use --truth linear or leave it out of the pool")


def _finetune_truth(model: str, fingerprint: str, train, *, dataset, root, train_split, test_split,
                    dataset_options, image_size, train_subset, test_subset, seed, device, options: dict,
                    work_dir: Path, force: bool) -> dict:
    """Fine-tune `model` for every lr of the grid on the training split minus its held-out part, choose the lr
    on the held-out part, and return {"truth": test top-1 of that run, "lr", "holdout_top1": {lr: top-1}, ...}."""
    # The folder of a model's runs is named by everything that changes them: the weights, the training images and
    # labels (content, so another root or task is another folder), image size, seed and the recipe; each lr of
    # the grid is its own run inside it, so widening the grid reuses the runs already there.
    recipe = {k: v for k, v in options.items() if k != "lrs"}
    key = json.dumps([fingerprint, train.meta.get("fingerprint"), dataset, image_size, seed, recipe], sort_keys=True,
                     default=str)
    slug = "".join(ch if ch.isalnum() else "_" for ch in Path(str(model)).name)[:40]
    run_root = work_dir / f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    held = train.holdout(options["holdout"], seed)[1]  # the part each run below leaves out (same split, same seed)
    dev = resolve_device(device)
    per_lr = {}
    for lr in options["lrs"]:
        out_dir = run_root / f"lr{float(lr):g}"
        cfg = resolve_config(None, None, base={
            "method": "supervised", "seed": seed, "out_dir": str(out_dir),
            "data": {"dataset": dataset, "root": root, "split": train_split, "image_size": image_size,
                     "subset": train_subset, "holdout": options["holdout"], "options": dict(dataset_options or {})},
            "projector": None, "classifier": {"type": "linear"},
            "finetune": {"init": str(model), "mode": options["mode"], "layer_decay": options["layer_decay"]},
            "optim": {"name": "adamw", "lr": float(lr), "lr_scaling": "none", "weight_decay": options["weight_decay"],
                      "warmup_epochs": options["warmup_epochs"]},
            "train": {"epochs": int(options["epochs"]), "batch_size": int(options["batch_size"]),
                      "device": str(device), "progress": False},
            "monitor": {"online_probe": False, "knn_every": 0, "rankme_every": 0}})
        resume = (out_dir / "checkpoints" / "last.safetensors").is_file()
        finetune(cfg, resume=resume, quiet=True, evaluate=False, force=force)
        head, _, _, _, size = _load_head(str(out_dir), image_size, force)
        pred = _logits(head, held, size, dev).argmax(1)
        per_lr[float(lr)] = float((pred == held.labels).double().mean())
    best = max(per_lr, key=lambda lr: (per_lr[lr], -lr))  # ties: the smaller lr
    test = evaluate_classifier(str(run_root / f"lr{best:g}"), dataset=dataset, root=root, test_split=test_split,
                               test_subset=test_subset, seed=seed, dataset_options=dataset_options,
                               device=device, progress=False, force=force)
    return {"truth": float(test["top1"]), "lr": best, "holdout_top1": per_lr, "run_dir": str(run_root / f"lr{best:g}")}


def _agreement(values: list[float | None], truth: list[float]) -> dict:
    """How well one score's values order the pool like the truth does."""
    from scipy import stats

    pairs = [(v, t) for v, t in zip(values, truth) if v is not None and math.isfinite(v)]
    if len(pairs) < 2:
        return {"n": len(pairs), "note": "fewer than two models with a value"}
    v, t = zip(*pairs)
    if len(set(t)) == 1:  # e.g. every probe predicts the majority class: no order to agree with
        return {"n": len(pairs), "note": "the truth is the same for every model", "kendall_tau": None,
                "weighted_tau": None, "pearson_r": None, "top1_hit": None, "relative_top1": None}
    if len(set(v)) == 1:  # e.g. H-score is C − 1 for every model when N ≤ D: it picks no model
        return {"n": len(pairs), "note": "the score is the same for every model", "kendall_tau": None,
                "weighted_tau": None, "pearson_r": None, "top1_hit": None, "relative_top1": None}
    best = max(range(len(v)), key=lambda i: v[i])
    return {"n": len(pairs),
            "kendall_tau": float(stats.kendalltau(v, t).statistic),
            "weighted_tau": float(stats.weightedtau(v, t).statistic),
            "pearson_r": float(stats.pearsonr(v, t).statistic),
            "top1_hit": bool(t[best] == max(t)),
            "relative_top1": float(t[best] / max(t)) if max(t) > 0 else None}


def rank(models: Sequence[str] | str, *, dataset: str = "digits", root: str | None = None,
         train_split: str = "train", test_split: str = "test", dataset_options: dict | None = None,
         scores: Sequence[str] | None = None, truth: str = "none", image_size: int | None = None,
         train_subset: int | None = None, test_subset: int | None = None, batch_size: int = 256,
         device: str = "cpu", seed: int = 0, backbone_options: dict | None = None, force: bool = False,
         pretrained: bool = False, score_options: dict | None = None,
         finetune_options: dict | None = None, finetune_dir: str | None = None,
         out: str | None = None, plot: str | None = None, progress: bool = True) -> dict:
    """Score every model of the pool on the target; see the module docstring. Returns (and writes to `out`)
    {"models": [{"model", "scores": {name: value}, "ranks": {name: rank}, "notes", "truth"?}], "agreement"?,
    "protocol": {...}}; ranks are 1 = best within the pool.

    score_options: keyword arguments per score, e.g. {"tmi": {"normalize": True}} for a pool of mixed widths.
    pretrained: `timm:NAME` models load timm's pretrained weights (needs internet or timm's local cache).
    finetune_options: overrides of FINETUNE_DEFAULTS for truth="finetune" (lrs, epochs, batch_size, ...).
    finetune_dir: where the fine-tuning runs go (default: beside `out`, else under visrep's cache)."""
    if truth not in TRUTHS:
        raise ConfigError(f"truth must be one of {', '.join(TRUTHS)}, got {truth!r}")
    entries, names = expand_pool(models), _check_scores(scores)
    _check_distinct(entries, backbone_options)
    pool = [e["model"] for e in entries]
    score_options = _check_score_options(score_options, names)
    ft = None
    if truth == "finetune":
        _check_finetunable(pool)
        ft, work_dir = _finetune_setup(finetune_options, finetune_dir, out)
    elif finetune_options is not None or finetune_dir is not None:
        raise ConfigError("finetune options and finetune_dir apply to truth='finetune' only")
    if plot is not None and truth == "none":
        raise ConfigError("a plot shows the scores against a truth; ask for one (--truth) or leave out --plot")
    _check_models_load(entries, backbone_options, image_size, seed, pretrained)
    # The target once, before any model: a dataset mistake is the dataset's, not the first model's.
    train = _load_split(dataset, train_split, root, True, dict(dataset_options or {}), train_subset, seed, image_size)
    check_evaluable(train, train, dataset, train_split, train_split)
    majority = None
    t0 = time.perf_counter()
    rows, score_seconds = [], {n: 0.0 for n in names}
    from tqdm.auto import tqdm

    for entry in tqdm(entries, desc="rank: models", unit="model", disable=not progress):
        model = entry["model"]
        options = entry["backbone_options"] if entry["backbone_options"] is not None else backbone_options
        try:
            (ftr, ltr, fte, lte, c), record, _ = _prepare(
                model, dataset=dataset, root=root, train_split=train_split, test_split=test_split,
                image_size=image_size, branch="student", batch_size=batch_size, device=device, cache_dir=None,
                train_subset=train_subset, test_subset=test_subset, seed=seed, progress=False, mean=None,
                std=None, download=True, dataset_options=dataset_options, backbone_options=options,
                force=force, pretrained=pretrained)
        except VisrepError as e:
            raise type(e)(f"model '{model}': {e}") from None
        if majority is None:  # the truth of always answering the commonest test class
            majority = float(torch.bincount(lte).max()) / len(lte)
        row = {"model": model, "fingerprint": record["model"].get("fingerprint"), "feature_dim": int(ftr.shape[1]),
               "scores": {}, "notes": {}}
        if entry["backbone_options"] is not None:
            row["backbone_options"] = entry["backbone_options"]
            row["name"] = _display_name(entry)
        probs = None
        for n in names:
            fn = SCORES.get(n)
            if fn.needs == "probs" and probs is None:  # the source classifier's pass is timed apart from the scores
                t = time.perf_counter()
                probs = _source_probs(model, train, record["image_size"], resolve_device(device), force,
                                      seed, options, pretrained)
                row["source_classifier_seconds"] = time.perf_counter() - t
                if probs[0] is not None and str(model).startswith("timm:") and not pretrained:
                    row["notes"]["source_classifier"] = ("a randomly initialised timm classifier (offline); pass "
                                                         "--pretrained for timm's trained one")
            t = time.perf_counter()
            try:
                if fn.needs == "probs":
                    if probs[0] is None:
                        row["scores"][n], row["notes"][n] = None, probs[1]
                        continue
                    row["scores"][n] = float(fn(probs[0], ltr, **score_options.get(n, {})))
                else:
                    inputs = (ftr,) if fn.needs == "none" else (ftr, ltr)
                    row["scores"][n] = float(fn(*inputs, **score_options.get(n, {})))
            except DataError as e:  # e.g. a class too small for TMI: a note for this model, not a crash
                row["scores"][n], row["notes"][n] = None, str(e)
            score_seconds[n] += time.perf_counter() - t
        if truth == "linear":
            row["truth"] = float(lbfgs_probe(ftr, ltr, fte, lte, seed=seed, num_classes=c)["top1"])
        elif truth == "finetune":
            found = _finetune_truth(model, row["fingerprint"], train,
                                    dataset=dataset, root=root, train_split=train_split,
                                    test_split=test_split, dataset_options=dataset_options, image_size=image_size,
                                    train_subset=train_subset, test_subset=test_subset, seed=seed, device=device,
                                    options=ft, work_dir=work_dir, force=force)
            row["truth"] = found.pop("truth")
            row["finetune"] = found
        rows.append(row)
    for n in names:  # rank 1 = highest value, ties share the better rank; models without a value get none
        values = [r["scores"][n] for r in rows if r["scores"][n] is not None]
        for r in rows:
            if r["scores"][n] is not None:
                r.setdefault("ranks", {})[n] = 1 + sum(v > r["scores"][n] for v in values)
    for r in rows:
        r.setdefault("ranks", {})
    result = {"protocol": "rank", "pool": [e if e["backbone_options"] is not None else e["model"] for e in entries],
              "majority_class_top1": majority, "models": rows, "scores": names, "score_options": score_options,
              "score_seconds": score_seconds,
              "truth": truth, "dataset": {"name": dataset, "train_split": train_split, "test_split": test_split,
                                          "options": dict(dataset_options or {}), "train_subset": train_subset,
                                          "test_subset": test_subset}}
    if truth != "none":
        t = [r["truth"] for r in rows]
        result["truth_protocol"] = ("lbfgs linear probe test top-1 (Kornblith et al. 2019)" if truth == "linear" else
                                    {"what": "test top-1 of visrep finetune at the lr chosen on a held-out part of "
                                             "the training split", **ft, "finetune_dir": str(work_dir)})
        result["agreement"] = {n: _agreement([r["scores"][n] for r in rows], t) for n in names}
        if plot is None and out is not None:
            plot = str(Path(out).expanduser().with_suffix(".png"))
        if plot:
            result["plot"] = str(_plot(result, plot))
    return _finish({}, result, t0, out)


def _finetune_setup(options: dict | None, finetune_dir: str | None, out: str | None) -> tuple[dict, Path]:
    """The fine-tuning truth's protocol (defaults + the caller's keys, checked) and where its runs go."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(FINETUNE_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown finetune option(s) {', '.join(unknown)}; valid: {', '.join(FINETUNE_DEFAULTS)}")
    ft = {**FINETUNE_DEFAULTS, **options}
    lrs = ft["lrs"] if isinstance(ft["lrs"], (list, tuple)) else [ft["lrs"]]
    if not lrs or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
                          for x in lrs):
        raise ConfigError(f"finetune lrs must be a list of positive numbers, got {ft['lrs']!r}")
    ft["lrs"] = [float(x) for x in lrs]
    for k in ("epochs", "batch_size"):
        if isinstance(ft[k], bool) or not isinstance(ft[k], int) or ft[k] < 1:
            raise ConfigError(f"finetune {k} must be a positive integer, got {ft[k]!r}")
    for k in ("weight_decay", "warmup_epochs", "holdout") + (("layer_decay",) if ft["layer_decay"] is not None else ()):
        if isinstance(ft[k], bool) or not isinstance(ft[k], (int, float)) or not math.isfinite(ft[k]):
            raise ConfigError(f"finetune {k} must be a number, got {ft[k]!r}")
    if ft["mode"] not in ("full", "lora"):
        raise ConfigError(f"finetune mode must be full or lora, got {ft['mode']!r}")
    # ranges, before any work is done
    resolve_config(None, None, base={
        "method": "supervised", "classifier": {"type": "linear"}, "data": {"holdout": ft["holdout"]},
        "finetune": {"init": "pool", "mode": ft["mode"], "layer_decay": ft["layer_decay"]},
        "optim": {"name": "adamw", "lr": max(ft["lrs"]), "weight_decay": ft["weight_decay"],
                  "warmup_epochs": ft["warmup_epochs"]}})
    if finetune_dir is not None:
        work = Path(finetune_dir).expanduser()
    elif out is not None:
        p = Path(out).expanduser()
        work = p.with_name(p.stem + "_finetune")
    else:
        work = cache_dir() / "rank_finetune"
    return ft, work


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
        pts = [(r["scores"][n], r["truth"], r.get("name", Path(r["model"]).name or r["model"]))
               for r in result["models"] if r["scores"][n] is not None]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18)
            for x, y, label in pts:  # which model is which point
                ax.annotate(label, (x, y), fontsize=5, xytext=(2, 2), textcoords="offset points")
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.locator_params(axis="x", nbins=4)
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
    what = {"linear": "linear probe top-1", "finetune": "fine-tuned top-1"}.get(result["truth"])
    table = Table(title=f"rank on {result['dataset']['name']}" + (f" (truth: {what})" if key else ""))
    table.add_column("model")
    for n in result["scores"]:
        table.add_column(n, justify="right")
    if key:
        table.add_column("truth", justify="right")
    for r in order:
        cells = [f"{r['scores'][n]:.4g} ({r['ranks'][n]})" if r["scores"][n] is not None else "–"
                 for n in result["scores"]]
        table.add_row(r.get("name", r["model"]), *cells, *([f"{r['truth']:.4f}"] if key else []))
    notes = []
    if key:
        pool_size = len(result["models"])

        def tau_cell(n):
            a = result["agreement"][n]
            if a.get("weighted_tau") is None:
                notes.append(f"weighted τ of {n}: {a.get('note', 'undefined')}")
                return "–"
            return f"{a['weighted_tau']:.3f}" + (f" (n={a['n']})" if a["n"] < pool_size else "")
        table.add_row("weighted τ", *[tau_cell(n) for n in result["scores"]], "")
        if result.get("majority_class_top1") is not None:
            table.caption = f"always the commonest class: top-1 {result['majority_class_top1']:.4f}"
    for r in order:  # why a cell is empty, and what a value rests on
        for n, text in r.get("notes", {}).items():
            notes.append(f"{r.get('name', r['model'])}: {n}: {text}")
    console = Console(width=200, file=io.StringIO(), record=True)
    console.print(table)
    for line in notes:
        console.print(f"  note: {line}", highlight=False, markup=False)
    return console.export_text()
