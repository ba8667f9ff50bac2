"""A study: a YAML grid of runs (factors over one base config), a fair budget, and the evaluations every run gets.

    name: aug_vs_alg_digits
    base: {config: configs/digits_simclr.yaml, train: {batch_size: 128}}   # a config file + overrides
    budget: {steps: 60}              # exactly one of steps | epochs | seconds, the same for every run
    factors:                         # every combination, in this order (or `points:`, a list of explicit ones)
      method: [simclr, byol]
      views.policy: [simclr, byol]   # any dotted config key: augmentation, algorithm, backbone, head, ...
      seed: [0, 1, 2]
    models:                          # optional: backbones evaluated as they are, not trained by the study
      - {name: random_init, source: resnet18, backbone_options: {cifar_stem: true, width: 16}}
      - {name: simclr_200ep, source: runs/cifar10}          # a visrep run folder or checkpoint, or timm:NAME
    evaluations:
      - {protocol: knn, dataset: digits}
      - {protocol: linear, dataset: utkface, data_dir: ~/data/faces, options: {task: gender}, solver: lbfgs}

Relative paths (base.config, data.root, an evaluation's data_dir, a model's source) are relative to the study
file. A study of `models` alone (Battle-of-the-Backbones style) needs no factors and no budget; in a grid study
they are references (e.g. random init), evaluated and shown beside the grid but not part of its factor effects.

`plan(study)` resolves and validates every run's config and builds its composition once (so a factor value
that does not fit a method, e.g. the multicrop views with MAE, fails here, not halfway through the grid),
checks every evaluation's arguments, and gives each run and evaluation a content id: a run's id hashes its
resolved config, so two factor points that resolve to the same run are refused. Budgets are fair by
construction: the budget is set once for the study, and a factor that changes it is refused.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from visrep.config import deep_merge, read_yaml_file, resolve_config
from visrep.data.views import build_views
from visrep.errors import ConfigError
from visrep.evaluate import api as ev
from visrep.evaluate.api import _looks_like_path
from visrep.methods import build_template
from visrep.objectives import build_objective
from visrep.rank.api import rank


BUDGETS = {"steps": "train.steps", "epochs": "train.epochs", "seconds": "train.time_budget_s"}
BUDGET_KEYS = ("train.steps", "train.epochs", "train.time_budget_s", "train.max_steps")
STUDY_KEYS = ("name", "base", "budget", "factors", "points", "models", "evaluations", "out_dir")
MODEL_KEYS = ("name", "source", "backbone_options", "pretrained")
FROM_STUDY_KEYS = ("from_study", "where")
# Keys of an evaluation that are not arguments of its evaluate_* function.
EVAL_KEYS = ("protocol", "dataset", "data_dir", "options", "metric")  # metric: the one the report judges by
# Arguments a study sets itself (the model, where results go) or that would make one run differ from another.
EVAL_RESERVED = ("source", "models", "out", "progress", "root", "dataset_options", "plot")


def _protocols() -> dict:
    """protocol name -> the function that runs it (its signature is what an evaluation may set)."""
    return {"knn": ev.evaluate_knn, "linear": ev.evaluate_linear, "fewshot": ev.evaluate_fewshot,
            "calibration": ev.evaluate_calibration, "classifier": ev.evaluate_classifier, "rank": rank}


# Config sections added after studies were first planned: left out of a run's id while unset, so a study planned
# before them keeps its run ids (and its finished runs) when visrep gains a section.
_SECTIONS_ADDED_LATER = ("classifier", "tasks", "task_head")


def short_hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclass
class PlannedRun:
    id: str
    factors: dict                    # the factor values of this point, by dotted key
    overrides: dict                  # base overrides + factors + budget, nested (what resolve() got)
    config: dict                     # the resolved config (out_dir: the run's folder in the study)
    steps: int | None                # planned optimisation steps (None: set by a time budget or the data size)
    batch_size: int
    model: dict | None = None        # a `models:` entry (source, backbone_options, pretrained): evaluated, not trained

    @property
    def trained(self) -> bool:
        return self.model is None


@dataclass
class PlannedEvaluation:
    id: str
    protocol: str
    spec: dict                       # as written in the study


@dataclass
class Plan:
    name: str
    path: str | None
    out_dir: str
    budget: dict
    factor_keys: list[str]
    runs: list[PlannedRun] = field(default_factory=list)
    evaluations: list[PlannedEvaluation] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "out_dir": self.out_dir, "budget": self.budget,
                "factor_keys": self.factor_keys,
                "runs": [{"id": r.id, "factors": r.factors, "steps": r.steps, "batch_size": r.batch_size,
                          "config": r.config, "model": r.model} for r in self.runs],
                "evaluations": [{"id": e.id, "protocol": e.protocol, "spec": e.spec} for e in self.evaluations],
                "cost": self.cost()}

    def cost(self) -> dict:
        """What the grid asks for: runs, evaluations, and (for step budgets) optimisation steps and images."""
        trained = [r for r in self.runs if r.trained]
        known = all(r.steps is not None for r in trained)
        return {"runs": len(trained), "models": len(self.runs) - len(trained), "evaluations": len(self.evaluations),
                "evaluation_jobs": len(self.runs) * len(self.evaluations),
                "training_steps": sum(r.steps for r in trained) if known else None,
                "training_images": sum(r.steps * r.batch_size for r in trained) if known else None,
                "training_seconds_budget": (self.budget["seconds"] * len(trained)
                                            if "seconds" in self.budget else None)}


def _load(study) -> tuple[dict, str | None, Path]:
    if isinstance(study, dict):
        return copy.deepcopy(study), None, Path.cwd()
    path = Path(study).expanduser()
    if not path.is_file():
        raise ConfigError(f"no study file at '{study}'")
    data = read_yaml_file(path, "study file")
    if not isinstance(data, dict):
        raise ConfigError(f"study file '{study}' must be a mapping with name, base, budget, factors, evaluations")
    return data, str(path), path.parent


def _relative_to(path, here: Path) -> str:
    """A path as written in a study: `~` expanded, and relative to the study file's folder when relative."""
    p = Path(str(path)).expanduser()
    return str(p if p.is_absolute() else here / p)


def _did_you_mean(key: str, valid) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _nested(dotted: dict) -> dict:
    out: dict = {}
    for key, value in dotted.items():
        node: dict = {}
        cur = node
        parts = str(key).split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = value
        out = deep_merge(out, node)
    return out


def _flat_keys(d: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in d.items():
        full = f"{prefix}{k}"
        keys.add(full)
        if isinstance(v, dict):
            keys |= _flat_keys(v, full + ".")
    return keys


def _points(data: dict) -> tuple[list[dict], list[str]]:
    factors, points = data.get("factors"), data.get("points")
    if factors is not None and points is not None:
        raise ConfigError("a study has either factors (a grid) or points (explicit runs), not both")
    if factors is None and points is None:
        raise ConfigError("a study needs factors (a grid of values) or points (a list of explicit runs)")
    if factors is not None:
        if not isinstance(factors, dict) or not factors:
            raise ConfigError("factors must be a non-empty mapping of config key: [values]")
        for key, values in factors.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"factor '{key}' needs a non-empty list of values, got {values!r}")
        keys = list(factors)
        return [dict(zip(keys, combo)) for combo in itertools.product(*factors.values())], keys
    if not isinstance(points, list) or not points or not all(isinstance(p, dict) for p in points):
        raise ConfigError("points must be a non-empty list of mappings of config key: value")
    keys: list[str] = []
    for p in points:
        keys += [k for k in p if k not in keys]
    return [dict(p) for p in points], keys


def _models(data: dict, here: Path) -> list[PlannedRun]:
    """The study's `models:` entries, checked: each is evaluated as it is (no training)."""
    entries = data.get("models")
    if entries is None:
        return []
    if not isinstance(entries, list) or not entries:
        raise ConfigError("models must be a non-empty list of {name: ..., source: ...} mappings")
    out, names = [], set()
    entries = [e for entry in entries for e in _expand_from_study(entry, here)]
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry.get("source"):
            raise ConfigError(f"model {i + 1} must be a mapping with a name and a source (a run folder, a checkpoint, "
                              f"timm:NAME or a backbone name), got {entry!r}")
        unknown = [k for k in entry if k not in MODEL_KEYS + ("identity",)]
        if unknown:
            raise ConfigError(f"model '{entry['name']}': unknown key '{unknown[0]}'"
                              f"{_did_you_mean(str(unknown[0]), MODEL_KEYS)}; valid: {', '.join(MODEL_KEYS)}")
        if entry["name"] in names:
            raise ConfigError(f"two models are named '{entry['name']}'")
        if not isinstance(entry.get("pretrained", False), bool):
            raise ConfigError(f"model '{entry['name']}': pretrained must be true or false, got {entry['pretrained']!r}")
        names.add(entry["name"])
        options = entry.get("backbone_options") or {}
        if not isinstance(options, dict):
            raise ConfigError(f"model '{entry['name']}': backbone_options must be a mapping")
        source = str(entry["source"])
        written = {"source": entry.get("identity", source), "backbone_options": options,
                   "pretrained": bool(entry.get("pretrained", False))}
        if _looks_like_path(source):
            source = _relative_to(source, here)
            if not Path(source).exists():
                raise ConfigError(f"model '{entry['name']}': no run folder or checkpoint at '{source}'")
        model = {**written, "source": source}
        if any(m.model["source"] == source and m.model["backbone_options"] == options
               and m.model["pretrained"] == written["pretrained"] for m in out):
            raise ConfigError(f"model '{entry['name']}' is the same backbone as another model of the study: "
                              "remove one of the two")
        out.append(PlannedRun(id="m-" + short_hash(written), factors={"model": entry["name"]}, overrides={},
                              config={}, steps=None, batch_size=0, model=model))
    return out


_EXPANDING: set = set()  # study files being expanded (a from_study cycle is an error, not a recursion)


def _finished(run_dir: Path) -> bool:
    """A run a study has finished: its status says done (a checkpoint alone may be a run still training)."""
    try:
        return json.loads((run_dir / "study_status.json").read_text()).get("state") == "done"
    except (OSError, json.JSONDecodeError):
        return False


def _expand_from_study(entry, here: Path) -> list:
    """`{from_study: other.yaml, where: {seed: 0}}`: the finished trained runs of another study as models, named
    by that study's name and their factor values (the ones `where` does not fix)."""
    if not isinstance(entry, dict) or "from_study" not in entry:
        return [entry]
    unknown = [k for k in entry if k not in FROM_STUDY_KEYS]
    if unknown:
        raise ConfigError(f"models: unknown key '{unknown[0]}' beside from_study"
                          f"{_did_you_mean(str(unknown[0]), FROM_STUDY_KEYS)}; valid: {', '.join(FROM_STUDY_KEYS)}")
    where = entry.get("where") or {}
    if not isinstance(where, dict):
        raise ConfigError("models: where must be a mapping of factor: value, e.g. {seed: 0}")
    target = str(Path(_relative_to(entry["from_study"], here)).resolve())
    if target in _EXPANDING:
        raise ConfigError(f"models: from_study '{entry['from_study']}' refers back to a study that includes it")
    _EXPANDING.add(target)
    try:
        other = plan(target, check_build=False)
    finally:
        _EXPANDING.discard(target)
    unknown = [k for k in where if k not in other.factor_keys]
    if unknown:
        raise ConfigError(f"models: study '{other.name}' has no factor '{unknown[0]}'"
                          f"{_did_you_mean(str(unknown[0]), other.factor_keys)}; its factors: "
                          f"{', '.join(other.factor_keys)}")
    chosen = [r for r in other.runs if r.trained and all(r.factors.get(k) == v for k, v in where.items())]
    if not chosen:
        raise ConfigError(f"models: no run of study '{other.name}' has {where}")
    missing = [r.id for r in chosen if not _finished(Path(r.config["out_dir"]))]
    if missing:
        raise ConfigError(f"models: {len(missing)} of the {len(chosen)} runs of study '{other.name}' have not run "
                          f"(e.g. {missing[0]}); run `visrep study run {other.path}` first")
    out = []
    for r in chosen:
        label = "/".join(str(v) for k, v in r.factors.items() if k not in where) or r.id
        out.append({"name": f"{other.name}:{label}", "source": str(Path(r.config["out_dir"]).resolve()),
                    "identity": f"study:{other.name}:{r.id}"})
    return out


def _check_evaluation(spec, i: int) -> PlannedEvaluation:
    if not isinstance(spec, dict) or "protocol" not in spec:
        raise ConfigError(f"evaluation {i + 1} must be a mapping with a protocol, e.g. {{protocol: knn, dataset: "
                          f"digits}}, got {spec!r}")
    protocols = _protocols()
    name = spec["protocol"]
    if name not in protocols:
        raise ConfigError(f"evaluation {i + 1}: unknown protocol {name!r}{_did_you_mean(str(name), protocols)}; "
                          f"valid: {', '.join(protocols)}")
    accepted = set(inspect.signature(protocols[name]).parameters)
    allowed = (accepted - set(EVAL_RESERVED)) | set(EVAL_KEYS)
    for key in spec:
        if key not in allowed:
            raise ConfigError(f"evaluation {i + 1} ({name}): unknown key '{key}'{_did_you_mean(str(key), allowed)}; "
                              f"valid: {', '.join(sorted(allowed))}")
    if "options" in spec and not isinstance(spec["options"], dict):
        raise ConfigError(f"evaluation {i + 1} ({name}): options must be a mapping of dataset options")
    return PlannedEvaluation(id=f"{name}-{short_hash(spec)[:8]}", protocol=name, spec=dict(spec))


def _budget(data: dict) -> dict:
    budget = data.get("budget")
    if not isinstance(budget, dict) or len(budget) != 1 or next(iter(budget)) not in BUDGETS:
        raise ConfigError("a study needs a budget, exactly one of {steps: N}, {epochs: N} or {seconds: S}, the same "
                          f"for every run; got {budget!r}")
    kind, value = next(iter(budget.items()))
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok or (kind != "seconds" and not isinstance(value, int)):
        raise ConfigError(f"budget {kind} must be a positive {'number' if kind == 'seconds' else 'integer'}, "
                          f"got {value!r}")
    return {kind: value}


def _template_check(cfg, run_label: str) -> None:
    """Build the composition once (no data, no weights) and pass two random images through views, template and
    objective, so parts that do not fit together (shapes, views, heads) fail at plan time, not in the grid."""
    import torch

    size = int(cfg.data.image_size or 32)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            model = build_template(cfg, size, 10).train()
            policy = build_views(cfg.views.policy, size, **cfg.views.options)
            objective = build_objective(cfg.objective.name, **cfg.objective.params)
            x = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
            out = model(policy(x, seed=0), policy.n_global, seed=1)
            inputs = tuple(getattr(objective, "inputs", ()))
            if "targets" not in inputs:  # regression targets come from the data; not checked here
                available = {"labels": torch.tensor([0, 1]), **out.extras}
                objective(out.student, out.target, **{k: available[k] for k in inputs})
    except ConfigError as e:
        raise ConfigError(f"{run_label}: {e}") from None
    except (RuntimeError, ValueError, TypeError, AssertionError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{run_label}: these settings do not build ({msg})") from None


def plan(study, *, check_build: bool = True) -> Plan:
    """Resolve and validate a study (a YAML path or a dict): every run of the grid and every evaluation."""
    data, path, here = _load(study)
    unknown = [k for k in data if k not in STUDY_KEYS]
    if unknown:
        raise ConfigError(f"unknown study key '{unknown[0]}'{_did_you_mean(str(unknown[0]), STUDY_KEYS)}; "
                          f"valid: {', '.join(STUDY_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not name or any(ch in name for ch in "/\\") or name.startswith("."):
        raise ConfigError(f"a study needs a name usable as a folder name, got {name!r}")
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"base must be a mapping (a config file under 'config' plus overrides), got {base!r}")
    base = copy.deepcopy(base)
    config_file = base.pop("config", None)
    if config_file is not None:
        config_file = _relative_to(config_file, here)
    base = _nested(base)
    models = _models(data, here)
    if models and data.get("factors") is None and data.get("points") is None:
        # Models alone: nothing is trained, so there is no grid and no budget.
        if data.get("budget") is not None:
            raise ConfigError("a study of models alone trains nothing: remove its budget, or add factors to train")
        return _finish(name, path, data, here, base, config_file, {}, ["model"], [], models)
    budget = _budget(data)
    points, keys = _points(data)
    for key in keys:
        if key in BUDGET_KEYS:
            raise ConfigError(f"factor '{key}' changes the budget; a study gives every run the same budget "
                              f"({budget}): vary it in a second study instead")
        if key == "out_dir":
            raise ConfigError("factor 'out_dir' is the study's to set: every run gets its own folder")
    if any(k in _flat_keys(base) for k in BUDGET_KEYS):
        raise ConfigError(f"set the budget once under 'budget:', not in base ({', '.join(BUDGET_KEYS)})")
    out_dir = _out_dir(data, name)

    budget_over = {"steps": {"train": {"steps": budget.get("steps")}},
                   "epochs": {"train": {"epochs": budget.get("epochs"), "steps": None}},
                   "seconds": {"train": {"time_budget_s": budget.get("seconds")}}}[next(iter(budget))]
    runs, seen = [], {}
    for i, point in enumerate(points):
        label = "run " + ", ".join(f"{k}={v}" for k, v in point.items())
        overrides = deep_merge(deep_merge(base, _nested(point)), budget_over)
        try:
            cfg = resolve_config(config_file, overrides)
        except ConfigError as e:
            raise ConfigError(f"{label}: {e}") from None
        resolved = cfg.to_dict()
        identity = {k: v for k, v in resolved.items() if k != "out_dir"}
        for key in _SECTIONS_ADDED_LATER:  # unset, a section added later leaves the ids of earlier studies as they were
            if identity.get(key) is None:
                identity.pop(key, None)
        if identity.get("projector") is None and "classifier" in identity:  # hashed as it was written before
            identity["projector"] = identity.pop("classifier")
        for section, keys_ in (("train", ("progress", "log_every", "num_threads", "device")),):
            identity[section] = {k: v for k, v in identity[section].items() if k not in keys_}
        run_id = short_hash(identity)
        if run_id in seen:
            raise ConfigError(f"{label} resolves to the same run as run {seen[run_id]}: remove one of the two points")
        seen[run_id] = ", ".join(f"{k}={v}" for k, v in point.items())
        if check_build:
            _template_check(cfg, label)
        resolved["out_dir"] = str(Path(out_dir) / "runs" / run_id)
        # Relative data paths are relative to the study file; the id above hashes them as written, so a moved
        # clone keeps its run ids.
        if resolved["data"].get("root"):
            resolved["data"]["root"] = _relative_to(resolved["data"]["root"], here)
        steps = cfg.train.steps if "steps" in budget else None
        runs.append(PlannedRun(id=run_id, factors=dict(point), overrides=overrides, config=resolved, steps=steps,
                               batch_size=int(cfg.train.batch_size)))
    return _finish(name, path, data, here, base, config_file, budget, keys, runs, models)


def _out_dir(data: dict, name: str) -> str:
    return str(Path(data.get("out_dir") or Path("runs") / "studies" / name).expanduser())


def _finish(name, path, data, here, base, config_file, budget, keys, runs, models) -> Plan:
    """Check the evaluations and put the plan together (trained runs first, then the models)."""
    evaluations = data.get("evaluations") or []
    if not isinstance(evaluations, list):
        raise ConfigError("evaluations must be a list of {protocol: ..., dataset: ...} mappings")
    if not evaluations and models and not runs:
        raise ConfigError("a study of models alone needs at least one evaluation")
    planned_evals = [_check_evaluation(e, i) for i, e in enumerate(evaluations)]
    for e in planned_evals:  # ids hash the spec as written; the path used is relative to the study file
        if e.spec.get("data_dir"):
            e.spec = {**e.spec, "data_dir": _relative_to(e.spec["data_dir"], here)}
    if len({e.id for e in planned_evals}) != len(planned_evals):
        raise ConfigError("two evaluations of the study are the same")
    out_dir = _out_dir(data, name)
    for m in models:
        m.config = {"out_dir": str(Path(out_dir) / "runs" / m.id)}
    return Plan(name=name, path=path, out_dir=out_dir, budget=budget, factor_keys=keys, runs=runs + models,
                evaluations=planned_evals)


def format_plan(p: Plan) -> str:
    """The table `visrep study plan` prints: one row per run with its factor values, then the evaluations and cost."""
    import io

    from rich.console import Console
    from rich.table import Table

    keys = p.factor_keys + (["model"] if "model" not in p.factor_keys and any(not r.trained for r in p.runs) else [])
    n_trained = sum(r.trained for r in p.runs)
    title = f"study {p.name}: {n_trained} runs, budget {p.budget}" if p.budget else f"study {p.name}: models"
    table = Table(title=title)
    table.add_column("run")
    for k in keys:
        table.add_column(k)
    table.add_column("steps", justify="right")
    for r in p.runs:
        steps = "–" if r.steps is None else str(r.steps)
        table.add_row(r.id, *[str(r.factors.get(k, "–")) for k in keys], steps if r.trained else "not trained")
    console = Console(width=200, file=io.StringIO(), record=True)
    console.print(table)
    for e in p.evaluations:
        args = ", ".join(f"{k}={v}" for k, v in e.spec.items() if k != "protocol")
        console.print(f"  evaluation {e.id}: {e.protocol} ({args})", highlight=False, markup=False)
    c = p.cost()
    parts = [f"{c['runs']} runs", f"{c['evaluation_jobs']} evaluation jobs"]
    if c["models"]:
        parts.insert(1, f"{c['models']} model" + ("s" if c["models"] > 1 else ""))
    if c["training_steps"] is not None:
        parts.append(f"{c['training_steps']:,} training steps ({c['training_images']:,} images)")
    if c["training_seconds_budget"] is not None:
        parts.append(f"{c['training_seconds_budget']:,} s of training at most")
    console.print("  cost: " + ", ".join(parts) + f"; runs go to {p.out_dir}/runs/<id>", highlight=False,
                  markup=False)
    return console.export_text()
