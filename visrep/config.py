"""Run configuration: YAML + method preset + dotted command-line overrides, validated on load.

Order of precedence (later wins):  DEFAULTS  <  method preset  <  YAML file  <  `key.sub=value` overrides.

Every section is a dataclass below, with each default documented next to its field. An unknown key or
a bad value raises `ConfigError` with one sentence naming the valid choices. Free-form option dicts
(`views.options`, `backbone.options`, `objective.params`, head specs) are validated by the part they
configure when it is built.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from visrep.data.masking import build_mask_generator
from visrep.data.mixing import build_mixing
from visrep.data.sources import SOURCES
from visrep.data.tasks import resolve_tasks
from visrep.data.views import VIEWS, build_views
from visrep.errors import ConfigError
from visrep.methods import METHODS
from visrep.methods.template import check_masking
from visrep.models.decoders import check_decoder_spec
from visrep.models.faceptor import check_task_head_spec
from visrep.models.heads import check_head_spec, classifier_head_names
from visrep.models.lora import check_lora_spec
from visrep.objectives import OBJECTIVES, objective_inputs, objective_params


@dataclass
class DataConfig:
    dataset: str = "digits"            # a name from `visrep list datasets`
    root: Optional[str] = None         # dataset root/archive; falls back to $VISREP_DATA
    split: str = "train"               # split used for pretraining
    test_split: str = "test"           # split used by the kNN monitor and evaluation
    image_size: Optional[int] = None   # resize on load (None: the dataset's native size)
    subset: Optional[int] = None       # use a seeded subset of N training images (None: all)
    label_fraction: Optional[float] = None  # low-label training: a seeded class-balanced fraction (0.01, 0.1)
    holdout: Optional[float] = None    # keep this seeded fraction of every class (stratified) out of training
                                       # (model selection, e.g. rank --truth finetune's lr grid); None: train on all
    download: bool = True              # fetch cifar10/cifar100 when not found (needs internet)
    workers: Optional[int] = None      # streaming sources (shards, imagefolder stream=true): DataLoader workers that
                                       # decode while training (None: cores - 1, at most 8; 0: in the training process)
    options: dict = field(default_factory=dict)  # extra source options (e.g. synthetic n, num_classes)


@dataclass
class ViewsConfig:
    policy: str = "simclr"             # a name from `visrep list views`
    options: dict = field(default_factory=dict)


@dataclass
class BackboneConfig:
    name: str = "resnet18"             # `visrep list backbones`, or any timm model name
    options: dict = field(default_factory=dict)  # e.g. {cifar_stem: true, width: 16} or {patch_size: 4}


@dataclass
class TargetConfig:
    branch: str = "none"               # none | stopgrad | ema  (where the objective's targets come from)
    momentum: float = 0.99             # EMA teacher momentum at step 0 (BYOL: 0.996 for ImageNet, 0.99 CIFAR)
    momentum_end: float = 1.0          # cosine-increased to this value at the last step (BYOL)
    momentum_schedule: str = "cosine"  # cosine (BYOL) | linear (per epoch, to momentum_end at momentum_epochs; HPM)
    momentum_epochs: Optional[float] = None  # linear: epochs to reach momentum_end (None: the whole run)


@dataclass
class ScheduleSpec:
    start: float = 0.0
    end: float = 0.0
    warmup_epochs: float = 0.0         # linear from `start` to `end` over these epochs, then constant


@dataclass
class ObjectiveConfig:
    name: str = "ntxent"               # `visrep list objectives`
    params: dict = field(default_factory=dict)
    # Attributes of the objective set every step from a schedule, e.g. DINO's teacher_temp.
    schedules: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: str = "lars"                 # sgd | lars | adamw
    lr: float = 0.3                    # base learning rate, scaled by batch_size/256 when lr_scaling=linear
    lr_scaling: str = "linear"         # linear | none   (Goyal et al. 2017 linear scaling rule)
    min_lr: float = 0.0                # end of the cosine
    warmup_epochs: float = 10.0        # linear warm-up from 0 (Goyal et al. 2017)
    weight_decay: float = 1e-6
    weight_decay_end: Optional[float] = None  # cosine weight-decay schedule end (DINO); None = constant
    momentum: float = 0.9              # SGD / LARS momentum
    betas: tuple = (0.9, 0.999)        # AdamW
    lars_eta: float = 0.02             # LARS trust coefficient (You et al. 2017; 0.02 as solo-learn CIFAR)
    lars_clip_lr: bool = True          # cap LARS's local rate at the global lr (solo-learn's CIFAR recipes)
    exclude_bias_norm: bool = True     # no weight decay / LARS adaptation for biases and norm layers
    clip_grad: Optional[float] = None  # max global grad norm (None: no clipping)
    # Riemannian SGD for parameters on a manifold (the GCR head's class subspaces); it follows the same
    # warm-up + cosine shape as the main lr, from `manifold_lr` (None: the main optimiser's lr), batch-scaled
    # like the main lr (GCR's official code: the bases' group lr = the scaled lr x its lr factor).
    manifold_lr: Optional[float] = None
    manifold_momentum: float = 0.9
    manifold_qr_every: int = 5         # re-orthonormalise the bases with QR every N steps, from the first (GCR)


@dataclass
class TrainConfig:
    epochs: int = 100
    steps: Optional[int] = None        # schedule horizon in steps; overrides epochs (e.g. with a time budget)
    batch_size: int = 256              # global batch (split across processes under torchrun)
    precision: str = "fp32"            # fp32 | bf16 (autocast, CPU+GPU) | fp16 (autocast + GradScaler, GPU only)
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    deterministic: bool = False        # torch.use_deterministic_algorithms (bit-exact resume on CPU)
    num_threads: Optional[int] = None  # torch CPU threads (None: torch's default)
    log_every: int = 10                # steps between metric lines in metrics.jsonl / TensorBoard
    checkpoint_every: int = 1          # epochs between checkpoints (the last epoch is always saved)
    max_steps: Optional[int] = None    # stop early after this many steps in total (smoke tests, budgets)
    time_budget_s: Optional[float] = None  # stop at the end of the step that exceeds this wall time
    progress: bool = True              # show a progress bar
    sync_bn: bool = True               # convert BatchNorm to SyncBatchNorm when more than one process runs
    channels_last: Optional[bool] = None  # NHWC memory layout for convolutional backbones (None: on CUDA only)
    compile: bool = False              # torch.compile the backbone; if compiling fails, one warning and eager mode


@dataclass
class MonitorConfig:
    online_probe: bool = True          # linear classifier on detached features during pretraining (solo-learn)
    probe_lr: float = 0.1
    knn_every: int = 1                 # epochs between kNN monitor evaluations (0: never)
    knn_k: int = 20                    # Wu et al. 2018 / DINO use k=20, T=0.07
    knn_temperature: float = 0.07
    rankme_every: int = 1              # epochs between RankMe evaluations on the bank's features (0: never)
    bank_size: Optional[int] = 5000    # training images used as the kNN bank and for RankMe (None: all)
    test_size: Optional[int] = 2000    # test images scored by the monitor (None: all)


@dataclass
class FinetuneConfig:
    init: Optional[str] = None         # checkpoint / run directory whose backbone starts training (None: scratch)
    branch: str = "student"            # student | teacher: which backbone of `init` (DINO/BYOL: teacher is common)
    mode: str = "full"                 # full (every weight) | lora (HF peft adapters; the backbone stays frozen)
    layer_decay: Optional[float] = None  # layer-wise lr decay for `full` (BEiT/MAE: 0.65-0.75); None: off
    # LoRA (Hu et al. 2022) via peft: r, alpha, dropout, target_modules (default: the attention and MLP
    # linears of ViT and iLLaMA blocks, see visrep/models/lora.py).
    lora: dict = field(default_factory=lambda: {"r": 8, "alpha": 16, "dropout": 0.0})


@dataclass
class RunConfig:
    method: str = "simclr"             # a name from `visrep list methods`; fills the sections below
    seed: int = 0
    out_dir: str = "runs/default"      # checkpoints, metrics.jsonl, TensorBoard events, plots
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(options={"cifar_stem": True}))
    projector: Optional[dict] = field(default_factory=lambda: {"type": "mlp"})  # embedding head (self-supervised)
    predictor: Optional[dict] = None
    # The classifier head of supervised training and fine-tuning (linear, cosine or gcr); it takes the
    # projector's place, so a run has one or the other. Its out_dim defaults to the data's classes.
    classifier: Optional[dict] = None
    # Multi-task face perception (Faceptor): the tasks (`visrep list tasks`, or declared here) and the head that
    # answers them all from the backbone's layers, e.g. {type: faceptor, dim: 256, depth: 9, levels: [-1]}.
    tasks: Optional[list] = None
    task_head: Optional[dict] = None
    # Masked image modelling (`visrep list masks`, `visrep list decoders`); all None for other methods.
    masking: Optional[dict] = None     # e.g. {name: random, ratio: 0.75, mode: drop}
    decoder: Optional[dict] = None     # e.g. {type: mae, dim: 512, depth: 8, heads: 16}
    loss_predictor: Optional[dict] = None  # HPM's loss-prediction branch, e.g. {type: mae, dim: 512, depth: 8}
    # Mixup / CutMix on the batch and its labels (timm's Mixup), e.g. {mixup_alpha: 0.8, cutmix_alpha: 1.0}
    mixing: Optional[dict] = None
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "target.branch": ("none", "stopgrad", "ema"),
    "optim.name": ("sgd", "lars", "adamw"),
    "optim.lr_scaling": ("linear", "none"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "finetune.mode": ("full", "lora"),
    "finetune.branch": ("student", "teacher"),
}


# --------------------------------------------------------------------------- merging & parsing
class _Loader(yaml.SafeLoader):
    """PyYAML's SafeLoader, but `1e-4` is a float (YAML 1.1 needs a dot: `1.0e-4`); users write 1e-4."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)$|^[-+]?(?:\d+\.\d*|\.\d+)$"),
    list("-+0123456789."),
)


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def read_yaml_file(path, what: str):
    """A user's YAML file (a study, a pool), read with visrep's loader; a file that is not UTF-8 or not YAML is one
    sentence naming `what` and, for YAML, the line and column."""
    try:
        return yaml_load(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{what} '{path}' is not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} '{path}' is not valid YAML at {yaml_error_where(e)}") from None


def yaml_error_where(e: yaml.YAMLError) -> str:
    """'line 3, column 7: mapping values are not allowed here' from a PyYAML error (1-based, as editors count)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    if mark is None:
        return str(problem)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"

def deep_merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; dict values merge, anything else replaces."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_overrides(items: list[str]) -> dict:
    """`["optim.lr=0.5", "train.epochs=2"]` -> nested dict; values are parsed as YAML scalars."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override")
        node[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {e.start} cannot be decoded)") from None
    except OSError as e:
        raise ConfigError(f"config file '{path}' cannot be read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML at {yaml_error_where(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return data


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(value, args[0], where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return value
    if tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(value)
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        import difflib

        prefix = f"{where}." if where else ""
        close = difflib.get_close_matches(str(unknown[0]), list(fields), n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'{hint}; valid keys: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value or {}, key)
        else:
            value = _check_type(value, tp, key)
            if key in CHOICES and value not in CHOICES[key]:
                raise ConfigError(f"{key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
            kwargs[name] = value
    return cls(**kwargs)


def resolve_config(yaml_path: str | None = None, overrides: list[str] | dict | None = None,
                   base: dict | None = None) -> RunConfig:
    """DEFAULTS < preset(method) < YAML < overrides  ->  validated RunConfig."""

    user = load_yaml(yaml_path) if yaml_path else {}
    if base:
        user = deep_merge(base, user)
    if overrides:
        user = deep_merge(user, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    method = user.get("method", RunConfig.method)
    if not isinstance(method, str):
        raise ConfigError(f"method must be a name, got {method!r}")
    preset = METHODS.get(method)
    # A preset that changes a section's kind (e.g. MAE's vit_tiny) drops the default's options too.
    defaults = RunConfig().to_dict()
    with_preset = deep_merge(_swappable(defaults, preset.config), preset.config)
    merged = deep_merge(_swappable(with_preset, user), user)
    cfg = from_dict(RunConfig, merged)
    validate(cfg)
    return cfg


# A section whose kind the user changes is taken whole from the user, not merged into the preset's: the
# preset's options belong to the old kind (e.g. `method=simclr objective.name=vicreg` drops `temperature`).
_KIND_KEYS = {"objective": "name", "projector": "type", "predictor": "type", "classifier": "type", "task_head": "type",
              "views": "policy",
              "backbone": "name",
              "masking": "name", "decoder": "type", "loss_predictor": "type"}


def _swappable(preset: dict, user: dict) -> dict:
    out = dict(preset)
    for section, key in _KIND_KEYS.items():
        mine = user.get(section)
        theirs = preset.get(section)
        if isinstance(mine, dict) and isinstance(theirs, dict) and key in mine and mine[key] != theirs.get(key):
            out.pop(section)
    return out


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that need the registries."""
    SOURCES.get(cfg.data.dataset)
    VIEWS.get(cfg.views.policy)
    OBJECTIVES.get(cfg.objective.name)
    if cfg.train.epochs < 1:
        raise ConfigError(f"train.epochs must be at least 1, got {cfg.train.epochs}")
    for key in ("log_every", "checkpoint_every"):
        if getattr(cfg.train, key) < 1:
            raise ConfigError(f"train.{key} must be at least 1, got {getattr(cfg.train, key)}")
    if cfg.train.steps is not None and cfg.train.steps < 1:
        raise ConfigError(f"train.steps must be at least 1, got {cfg.train.steps}")
    if cfg.train.batch_size < 2:
        raise ConfigError(f"train.batch_size must be at least 2, got {cfg.train.batch_size}")
    _check_ranges(cfg)
    # Cheap parts are built here so a bad option fails before any data is decoded (and in --print-config).
    policy = build_views(cfg.views.policy, cfg.data.image_size or 32, **cfg.views.options)
    check_heads(cfg)
    check_tasks(cfg, policy)

    masking = build_mask_generator(cfg.masking)
    check_decoder_spec(cfg.decoder, "decoder")
    check_decoder_spec(cfg.loss_predictor, "loss_predictor")
    if (cfg.decoder or {}).get("share_input"):
        raise ConfigError("decoder.share_input is for a loss_predictor (it reads the decoder's input layers)")
    dec, lp = cfg.decoder or {}, cfg.loss_predictor or {}
    check_masking(masking, decoder_type=dec.get("type"), loss_predictor=cfg.loss_predictor is not None,
                  target=cfg.target.branch, n_views=policy.n_views, views=cfg.views.policy,
                  share_input=bool(lp.get("share_input")), decoder_dim=dec.get("dim", 512),
                  loss_predictor_dim=lp.get("dim", 512))

    build_mixing(cfg.mixing, num_classes=2)
    if cfg.mixing is not None and policy.n_views != 1:
        raise ConfigError(f"mixing needs a one-view policy (e.g. views.policy=crop), '{cfg.views.policy}' makes "
                          f"{policy.n_views} views")
    ft = cfg.finetune
    check_lora_spec(ft.lora)
    if ft.layer_decay is not None and not 0 < ft.layer_decay <= 1:
        raise ConfigError(f"finetune.layer_decay must be in (0, 1], got {ft.layer_decay}")
    if ft.layer_decay is not None and ft.mode == "lora":
        raise ConfigError("finetune.layer_decay applies to mode 'full' only (LoRA trains adapters, not layers)")
    if ft.mode == "lora" and not ft.init:
        raise ConfigError("finetune.mode=lora needs finetune.init (a pretrained checkpoint to adapt)")
    if cfg.data.holdout is not None and cfg.data.label_fraction is not None:
        raise ConfigError("data.holdout and data.label_fraction cannot be combined: the labelled subset would then "
                          "differ from the one eval --label-fraction draws; use one of them")
    if cfg.data.label_fraction is not None and not 0 < cfg.data.label_fraction <= 1:
        raise ConfigError(f"data.label_fraction must be in (0, 1], got {cfg.data.label_fraction}")
    w = cfg.data.workers
    if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
        raise ConfigError(f"data.workers must be an integer >= 0 (0: decode in the training process), got {w!r}")
    if cfg.target.momentum_schedule not in ("cosine", "linear"):
        raise ConfigError(f"target.momentum_schedule must be cosine or linear, got {cfg.target.momentum_schedule!r}")
    if cfg.target.momentum_epochs is not None and not cfg.target.momentum_epochs > 0:
        raise ConfigError(f"target.momentum_epochs must be > 0, got {cfg.target.momentum_epochs}")
    if cfg.optim.manifold_qr_every < 1:
        raise ConfigError(f"optim.manifold_qr_every must be at least 1, got {cfg.optim.manifold_qr_every}")
    valid = objective_params(cfg.objective.name)
    bad = [k for k in cfg.objective.params if k not in valid]
    if bad:
        raise ConfigError(f"objective '{cfg.objective.name}': unknown param(s) {', '.join(bad)}; valid params: "
                          f"{', '.join(valid)}")
    for name, spec in cfg.objective.schedules.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"objective.schedules.{name} must be a mapping with start, end, warmup_epochs")
        from_dict(ScheduleSpec, spec, f"objective.schedules.{name}")


# (key, lowest, highest, lowest allowed?, highest allowed?); None: unbounded. Checked when the value is set.
_RANGES = (
    ("optim.lr", 0, None, True, True), ("optim.min_lr", 0, None, True, True),
    ("optim.weight_decay", 0, None, True, True), ("optim.weight_decay_end", 0, None, True, True),
    ("optim.warmup_epochs", 0, None, True, True), ("optim.momentum", 0, 1, True, False),
    ("optim.lars_eta", 0, None, True, True), ("optim.clip_grad", 0, None, False, True),
    ("optim.manifold_lr", 0, None, True, True), ("optim.manifold_momentum", 0, 1, True, False),
    ("data.holdout", 0, 1, False, False), ("train.max_steps", 1, None, True, True), ("train.time_budget_s", 0, None, True, True),
    ("target.momentum", 0, 1, True, True), ("target.momentum_end", 0, 1, True, True),
    ("monitor.probe_lr", 0, None, False, True), ("monitor.knn_every", 0, None, True, True), ("monitor.rankme_every", 0, None, True, True),
    ("monitor.knn_k", 1, None, True, True), ("monitor.knn_temperature", 0, None, False, True),
)


def _check_ranges(cfg: RunConfig) -> None:
    """Values that type-check but make no sense (a negative lr, momentum 1, max_steps 0): one sentence each."""
    for key, lo, hi, lo_ok, hi_ok in _RANGES:
        section, name = key.split(".")
        v = getattr(getattr(cfg, section), name)
        if v is None:
            continue
        if not math.isfinite(v):
            raise ConfigError(f"{key} must be a finite number, got {v}")
        bad = (lo is not None and (v < lo or (v == lo and not lo_ok))) or \
              (hi is not None and (v > hi or (v == hi and not hi_ok)))
        if bad:
            lo_s = "-inf" if lo is None else lo
            hi_s = "inf" if hi is None else hi
            interval = f"{'[' if lo_ok else '('}{lo_s}, {hi_s}{']' if hi_ok and hi is not None else ')'}"
            raise ConfigError(f"{key} must be in {interval}, got {v}")
    betas = cfg.optim.betas
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(betas)}")


def check_heads(cfg: RunConfig) -> None:
    """The head sections' rules, written once: each spec is valid, classifier heads go under `classifier`, and a
    run has a projector or a classifier after its backbone, not both."""
    for where in ("projector", "predictor", "classifier"):
        check_head_spec(getattr(cfg, where), where)
    names = classifier_head_names()
    kind = lambda spec: spec.get("type", "mlp") if isinstance(spec, dict) else None  # noqa: E731
    if kind(cfg.predictor) in names:
        raise ConfigError(f"predictor.type={kind(cfg.predictor)} is a classifier head; a predictor maps embeddings "
                          "to embeddings (predictor.type=mlp; num_layers=1 is one linear layer)")
    if kind(cfg.projector) in names:
        raise ConfigError(f"projector.type={kind(cfg.projector)} is a classifier head (its width is the number of "
                          f"classes): a supervised run sets classifier.type={kind(cfg.projector)} and projector=null; "
                          "a linear projection is projector.type=mlp with num_layers=1")
    if cfg.classifier is not None and kind(cfg.classifier) not in (*names, "none"):
        raise ConfigError(f"classifier.type must be one of {', '.join(names)}, got {kind(cfg.classifier)!r} "
                          "(embedding heads go under projector)")
    if kind(cfg.classifier) in names and kind(cfg.projector) not in (None, "none"):
        raise ConfigError("a run has one head after its backbone: a classifier (supervised, fine-tuning) or a "
                          "projector (self-supervised); set projector=null or classifier=null")


def check_tasks(cfg: RunConfig, policy) -> None:
    """The multi-task sections' rules, written once: the tasks resolve, a task head answers them, the objective
    reads per-task outputs, and nothing else sits on the backbone."""
    spec = check_task_head_spec(cfg.task_head)
    if cfg.tasks is None:
        if spec is not None:
            raise ConfigError("task_head needs a tasks: list (e.g. tasks: [utkface_age, mtfl_landmarks])")
        return
    tasks = resolve_tasks(cfg.tasks)
    if spec is None:
        raise ConfigError("tasks need a task_head (e.g. task_head.type=faceptor, or method=faceptor)")
    if "task_outputs" not in objective_inputs(cfg.objective.name):
        raise ConfigError(f"tasks need an objective that reads every task's outputs (objective.name=faceptor), "
                          f"not '{cfg.objective.name}'")
    for part in ("projector", "predictor", "classifier", "masking", "mixing"):
        if getattr(cfg, part) is not None:
            raise ConfigError(f"a multi-task run has its task_head on the backbone, so {part} must be null")
    if cfg.target.branch != "none":
        raise ConfigError("a multi-task run has no target branch: set target.branch=none")
    if policy.n_views != 1:
        raise ConfigError(f"a multi-task run reads one view; views.policy '{cfg.views.policy}' makes {policy.n_views}")
    if any(t.output == "landmarks" for t in tasks) and cfg.views.policy != "none":
        raise ConfigError("landmark tasks need views.policy=none: crops and flips would move the faces but not "
                          "their points")
    if cfg.monitor.knn_every or cfg.monitor.rankme_every or cfg.monitor.online_probe:
        raise ConfigError("the kNN, RankMe and probe monitors read one labelled dataset; with tasks set "
                          "monitor.knn_every=0 monitor.rankme_every=0 monitor.online_probe=false "
                          "(`visrep eval faceptor` scores every task)")


def upgrade_saved_run(config: dict, tensors: dict | None = None) -> tuple[dict, dict | None]:
    """Bring a saved run's config (and its tensors) to the current schema, in this one place.

    Runs saved before the `classifier` section kept their classifier head under `projector` (tensors
    `model.projector.*`): the head moves to `classifier` and its tensors to `model.classifier.*`. The weights and
    what the config means are unchanged.
    """
    spec = config.get("projector")
    if "classifier" in config or not (isinstance(spec, dict) and spec.get("type") in classifier_head_names()):
        return config, tensors
    config = {**config, "classifier": spec, "projector": None}
    if tensors is not None:
        old, new = "model.projector.", "model.classifier."
        tensors = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in tensors.items()}
    return config, tensors


def config_from_json(text: str) -> RunConfig:
    """Rebuild a RunConfig saved in a checkpoint or a study plan (no preset merge: it was resolved already)."""
    return from_dict(RunConfig, upgrade_saved_run(json.loads(text))[0])
