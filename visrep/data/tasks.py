"""Face tasks as data: a task is a dataset (and its options), an output type, a number of queries, a loss and a
weight. Built-in tasks are registered in `TASKS` (`visrep list tasks`); a config adds its own by declaring them,
with no code, e.g. a class-per-folder dataset as a classification task:

    tasks:
      - utkface_age                                   # a built-in task, as it is
      - {task: mtfl_smile, weight: 0.5}               # a built-in task with some fields changed
      - {name: expression, dataset: imagefolder, data_dir: ~/data/expressions, output: classification}

Output types and what their data must hold:
    classification     class labels (one query per class; cross-entropy)
    multilabel         labels [N, A] in {0, 1, −1 unknown} as regression targets (one query per attribute; BCE)
    regression         regression targets [N, T] (one query per target; L1 or MSE on the targets as given)
    age_distribution   an age in years as the one regression target (one query per bin 0..K−1; DLDL-v2)
    landmarks          points as targets [N, 2P]: x1..xP then y1..yP in [0, 1] of the image (one query per point)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from visrep.data.faces import AGE_GROUPS, MTFL_POSES, UTK_RACES
from visrep.data.sources import ImageDataset, load_dataset
from visrep.errors import ConfigError, DataError
from visrep.registry import Registry

__all__ = ["OUTPUTS", "LOSSES", "TaskSpec", "TASKS", "resolve_tasks", "trained_tasks", "load_task_data", "num_queries"]

# output type -> the losses it accepts (the first is the default)
OUTPUTS = {
    "classification": ("cross_entropy",),
    "multilabel": ("bce",),
    "regression": ("l1", "mse"),
    "age_distribution": ("dldl",),
    "landmarks": ("landmarks",),
}
LOSSES = sorted({loss for losses in OUTPUTS.values() for loss in losses})


@dataclass(frozen=True)
class TaskSpec:
    name: str
    dataset: str                      # a visrep source: utkface, mtfl, imagefolder, ...
    output: str                       # one of OUTPUTS
    options: dict = field(default_factory=dict)  # the source's options, e.g. {task: age}
    data_dir: str | None = None       # the dataset's root (default: the run's data.root / $VISREP_DATA)
    queries: int | None = None        # default: from the data (classes, attributes, targets, points; 101 age bins)
    loss: str | None = None           # default: the output type's first loss
    weight: float = 1.0               # λ_t, normalised within its output type (Faceptor)
    label_fraction: float | None = None  # train on a seeded class-balanced fraction of its labels (low-label)
    split: str = "train"
    test_split: str = "test"
    description: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _TaskRegistry(Registry):
    def describe(self, dim: int = 256) -> list[tuple[str, str]]:
        """`visrep list tasks`: each task's data, output, queries and what it costs a Faceptor head of width `dim`
        (its two query tables, 2·Q·d parameters; the decoder and the output heads are shared)."""
        rows = []
        for name, t in self.items():
            opts = ", ".join(f"{k}={v}" for k, v in t.options.items())
            rows.append((name, f"{t.dataset}({opts}) → {t.output}, {t.queries} queries, loss {t.loss or OUTPUTS[t.output][0]}"
                               f", +{2 * t.queries * dim:,} parameters at width {dim}: {t.description}"))
        return rows


TASKS = _TaskRegistry("task")
_FIELDS = [f.name for f in dataclasses.fields(TaskSpec)]


def _builtin(spec: TaskSpec) -> None:
    TASKS.add(spec.name, spec)


_builtin(TaskSpec("utkface_age", "utkface", "age_distribution", {"task": "age"}, queries=101,
                  description="UTKFace age in years: DLDL-v2 over 101 bins (0..100), reported as MAE"))
_builtin(TaskSpec("utkface_gender", "utkface", "classification", {"task": "gender"}, queries=2,
                  description="UTKFace gender"))
_builtin(TaskSpec("utkface_race", "utkface", "classification", {"task": "race"}, queries=len(UTK_RACES),
                  description="UTKFace race"))
_builtin(TaskSpec("utkface_age_group", "utkface", "classification", {"task": "age_group"}, queries=len(AGE_GROUPS),
                  description="UTKFace age group (children, then decades)"))
_builtin(TaskSpec("mtfl_landmarks", "mtfl", "landmarks", {"task": "landmarks"}, queries=5,
                  description="MTFL 5 landmarks, reported as NME by inter-ocular distance"))
for _attr in ("smile", "glasses", "gender"):
    _builtin(TaskSpec(f"mtfl_{_attr}", "mtfl", "classification", {"task": _attr}, queries=2,
                      description=f"MTFL {_attr}"))
_builtin(TaskSpec("mtfl_pose", "mtfl", "classification", {"task": "pose"}, queries=len(MTFL_POSES),
                  description="MTFL head pose"))


def resolve_tasks(entries) -> list[TaskSpec]:
    """The config's `tasks:` list → TaskSpecs: a built-in name, {task: NAME, ...changes}, or a whole new task
    {name, dataset, output, ...}. Every mistake is one sentence naming the task."""
    if not isinstance(entries, (list, tuple)) or not entries:
        raise ConfigError("tasks must be a non-empty list of task names or mappings (see `visrep list tasks`)")
    out: list[TaskSpec] = []
    for i, entry in enumerate(entries):
        where = f"tasks[{i}]"
        if isinstance(entry, str):
            entry = {"task": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a task name or a mapping, got {entry!r}")
        entry = dict(entry)
        base = entry.pop("task", None)
        if base is not None:
            if base not in TASKS.names():
                raise ConfigError(f"{where}: unknown task '{base}'; built-in tasks: {', '.join(TASKS.names())}")
            values = {**TASKS.get(base).to_dict(), **entry}
        else:
            missing = [k for k in ("name", "dataset", "output") if k not in entry]
            if missing:
                raise ConfigError(f"{where}: a new task needs {', '.join(missing)} (or `task: NAME` for a built-in one)")
            values = entry
        unknown = sorted(set(values) - set(_FIELDS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: task, {', '.join(_FIELDS)}")
        spec = TaskSpec(**values)
        where = f"task '{spec.name}'"
        if spec.output not in OUTPUTS:
            raise ConfigError(f"{where}: output must be one of {', '.join(OUTPUTS)}, got {spec.output!r}")
        if spec.loss is not None and spec.loss not in OUTPUTS[spec.output]:
            raise ConfigError(f"{where}: loss '{spec.loss}' does not fit output '{spec.output}' "
                              f"(use {', '.join(OUTPUTS[spec.output])})")
        if spec.queries is not None and (not isinstance(spec.queries, int) or spec.queries < 1):
            raise ConfigError(f"{where}: queries must be a positive integer, got {spec.queries!r}")
        if not isinstance(spec.weight, (int, float)) or spec.weight < 0:
            raise ConfigError(f"{where}: weight must be a number >= 0, got {spec.weight!r}")
        if spec.label_fraction is not None and not (isinstance(spec.label_fraction, (int, float))
                                                    and 0 < spec.label_fraction <= 1):
            raise ConfigError(f"{where}: label_fraction must be in (0, 1], got {spec.label_fraction!r}")
        if not isinstance(spec.options, dict):
            raise ConfigError(f"{where}: options must be a mapping, got {spec.options!r}")
        if any(t.name == spec.name for t in out):
            raise ConfigError(f"task name '{spec.name}' is used twice; give one of them another name")
        out.append(dataclasses.replace(spec, loss=spec.loss or OUTPUTS[spec.output][0]))
    if not any(t.weight > 0 for t in out):
        raise ConfigError("every task has weight 0: give at least one task a positive weight")
    return out


def trained_tasks(tasks, task_head: dict | None) -> list[TaskSpec]:
    """The tasks a run trains on and answers for: all of `tasks`, or a Faceptor stage-2 run's one target task
    (its new encoder levels serve that task alone)."""
    specs = resolve_tasks(tasks)
    stage2 = (task_head or {}).get("stage2")
    if not stage2:
        return specs
    kept = [s for s in specs if s.name == stage2["task"]]
    if not kept:
        raise ConfigError(f"task_head.stage2.task '{stage2['task']}' is not in the tasks: list")
    return kept


def load_task_data(spec: TaskSpec, split: str, *, root=None, image_size: int | None = None,
                   download: bool = False) -> ImageDataset:
    """The task's split, checked to hold the labels its output type needs (one sentence if not)."""
    ds = load_dataset(spec.dataset, split, spec.data_dir or root, image_size=image_size, download=download,
                      **spec.options)
    where = f"task '{spec.name}' ({spec.dataset} {split})"
    t = ds.targets
    if spec.output == "classification":
        if len(ds.classes) < 2:
            raise DataError(f"{where}: classification needs at least two classes, the data has {len(ds.classes)}")
    elif spec.output == "age_distribution":
        if t is None or t.shape[1] != 1:
            raise DataError(f"{where}: age_distribution needs one regression target (an age in years); "
                            f"the data has {'none' if t is None else t.shape[1]} (e.g. utkface task=age)")
        if float(t.min()) < 0:
            raise DataError(f"{where}: ages must be >= 0, the data holds {float(t.min())}")
    elif spec.output == "landmarks":
        if t is None or t.shape[1] % 2:
            raise DataError(f"{where}: landmarks need targets x1..xP, y1..yP (e.g. mtfl task=landmarks)")
        if float(t.min()) < 0 or float(t.max()) > 1:
            raise DataError(f"{where}: landmarks outside the image (coordinates must lie in [0, 1]; found "
                            f"{float(t.min()):.3f}..{float(t.max()):.3f})")
    elif spec.output in ("regression", "multilabel"):
        if t is None:
            raise DataError(f"{where}: {spec.output} needs targets in the data, which has none")
        if spec.output == "multilabel" and not torch.isin(t, torch.tensor([-1.0, 0.0, 1.0])).all():
            raise DataError(f"{where}: multilabel targets must be 0, 1 or -1 (unknown)")
    return ds


def num_queries(spec: TaskSpec, ds: ImageDataset) -> int:
    """The task's query count: `queries`, else from its data (classes, attributes, targets, points; 101 age bins).
    A count that does not match the data (one query per class, target or point) is an error."""
    if spec.output == "age_distribution":
        return int(spec.queries or 101)  # the bins 0..K-1; older ages count as K-1
    if spec.output == "classification":
        found = len(ds.classes)
    elif spec.output == "landmarks":
        found = ds.targets.shape[1] // 2
    else:
        found = ds.targets.shape[1]
    if spec.queries is not None and int(spec.queries) != found:
        what = {"classification": "classes", "landmarks": "points"}.get(spec.output, "targets")
        raise ConfigError(f"task '{spec.name}': {spec.queries} queries, but its data has {found} {what} "
                          "(one query each)")
    return found
