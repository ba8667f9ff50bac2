"""The training state and how it is built: everything one step reads or changes, and everything a checkpoint holds.

`build_state(cfg, train, ...)` turns a RunConfig and its training set into a `TrainState`: the views, the template
(backbone, heads, target branch), the objective, the batch transforms, the optimisers with their per-step
schedules, the online probe and the other per-step schedules. Nothing in it depends on which method runs: a
method is only the choice of those parts (see `visrep.methods.presets`).

A checkpoint is `TrainState.stateful()`, a {prefix: module or optimizer} mapping, plus the RNG state and the
metadata; `checkpoint_contents` / `load_state` write and read it generically (`visrep.checkpoint.state_to_tensors`).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from visrep.checkpoint import state_from_tensors, state_to_tensors
from visrep.config import RunConfig
from visrep.data.mixing import build_batch_transforms
from visrep.data.sources import load_dataset
from visrep.data.views import IMAGENET_MEAN, IMAGENET_STD, build_views
from visrep.errors import ConfigError
from visrep.objectives import build_objective
from visrep.runs import build_model
from visrep.train.distributed import DistInfo
from visrep.train.multitask import load_task_training_data
from visrep.train.monitor import OnlineProbe
from visrep.train.optim import ScheduledOptimizer, build_optimizers
from visrep.train.schedules import linear_warmup_constant, momentum_schedule, warmup_cosine
from visrep.version import DEFAULTS_VERSION


def total_steps_of(cfg: RunConfig, steps_per_epoch: int) -> int:
    """The schedules' horizon: train.steps when set (e.g. for a time budget), else epochs x steps per epoch."""
    return cfg.train.steps if cfg.train.steps else cfg.train.epochs * steps_per_epoch


class Schedules:
    """Every per-step hyper-parameter as an array: lr, weight decay, EMA momentum, objective attributes."""

    def __init__(self, cfg: RunConfig, steps_per_epoch: int):
        total = total_steps_of(cfg, steps_per_epoch)
        o = cfg.optim
        scale = cfg.train.batch_size / 256 if o.lr_scaling == "linear" else 1.0
        warmup = round(o.warmup_epochs * steps_per_epoch)
        self.lr = warmup_cosine(o.lr * scale, o.min_lr * scale, total, warmup)
        # Riemannian SGD (manifold parameters): the same shape and batch scaling, from its own base lr.
        m_lr = (o.lr if o.manifold_lr is None else o.manifold_lr) * scale
        self.manifold_lr = warmup_cosine(m_lr, m_lr * (o.min_lr / o.lr if o.lr else 0.0), total, warmup)
        wd_end = o.weight_decay if o.weight_decay_end is None else o.weight_decay_end
        self.wd = warmup_cosine(o.weight_decay, wd_end, total, 0)
        t = cfg.target
        self.momentum = momentum_schedule(t.momentum, t.momentum_end, total, t.momentum_schedule, steps_per_epoch,
                                          t.momentum_epochs)
        self.objective = {
            name: linear_warmup_constant(s.get("start", 0.0), s.get("end", 0.0), total,
                                         round(s.get("warmup_epochs", 0.0) * steps_per_epoch))
            for name, s in cfg.objective.schedules.items()
        }


@dataclass
class TrainState:
    """What a training step uses (`train_step` in `visrep.train.loop`) and what a checkpoint restores."""
    cfg: RunConfig
    device: torch.device
    dist: DistInfo
    views: nn.Module                     # uint8 batch -> list of float views (global first)
    model: nn.Module                     # the Template (backbone, heads, target branch)
    forward: nn.Module                   # the model, or its DDP wrapper under torchrun
    objective: nn.Module
    inputs: tuple                        # extra inputs the objective names (labels, targets, mask, ...)
    batch_transforms: list               # (views, labels, seed) -> (views, labels), e.g. Mixup/CutMix
    optimizers: list[ScheduledOptimizer]
    probe: object                        # OnlineProbe
    probe_on: bool
    scaler: torch.amp.GradScaler
    schedules: Schedules
    progress_hooks: list                 # parts with set_progress(step, total_steps, steps_per_epoch)
    steps_per_epoch: int
    total_steps: int
    info: dict                           # image_size, classes, num_classes, num_outputs (saved with the run)
    monitors_on: bool = True             # the training set has at least two classes (probe, kNN)
    channels_last: bool = False          # views go in NHWC (train.channels_last)
    step: int = 0
    history: list = field(default_factory=list)
    # The first step whose loss was not finite (-1: none) and that loss, kept on the device so that a step
    # needs no host sync; the loop reads them on logging steps and before every checkpoint.
    bad_step: torch.Tensor | None = None
    bad_loss: torch.Tensor | None = None

    def stateful(self) -> dict:
        """{prefix: module or optimizer}: everything a checkpoint holds besides the RNG state."""
        out = {"model.": self.model, "objective.": self.objective, "probe.": self.probe.linear}
        out.update({o.prefix: o.optimizer for o in self.optimizers})
        out["probe_"] = self.probe.optimizer
        return out

    def autocast(self):
        precision = self.cfg.train.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def load_training_data(cfg: RunConfig, saved: dict | None = None):
    """The training set the config names: subset, held-out part removed, label fraction applied; with `tasks`, one
    such set per task (`MultiTaskData`). saved: a resumed run's checkpoint metadata (what it was built with)."""
    d = cfg.data
    if cfg.tasks is not None:
        return load_task_training_data(cfg, saved)
    train = load_dataset(d.dataset, d.split, d.root, image_size=d.image_size, download=d.download, **d.options)
    if getattr(train, "streaming", False) and d.workers is not None:
        train.workers = int(d.workers)
    return training_split(train, d, cfg.seed, d.label_fraction)


def training_split(ds, d, seed: int, label_fraction: float | None):
    """What of a dataset a run trains on: `data.subset`, minus the `data.holdout` part, at `label_fraction`."""
    if d.subset is not None or not getattr(ds, "streaming", False):
        ds = ds.subset(d.subset, seed)  # a streamed set's subset is read into memory
    if d.holdout is not None:  # the held-out part is for model selection; never trained on
        ds = ds.holdout(d.holdout, seed)[0]
    if label_fraction is not None:  # low-label protocols (1 %, 10 % of the labels)
        ds = ds.fraction(label_fraction, seed)
    return ds


def use_channels_last(setting: bool | None, backbone: nn.Module, device: torch.device) -> bool:
    """NHWC helps convolutions (cuDNN, oneDNN) and nothing else: a backbone with more convolutions than a patch
    embedding, on CUDA unless the setting says otherwise."""
    convolutional = sum(isinstance(m, nn.Conv2d) for m in backbone.modules()) > 1
    if setting is None:
        return convolutional and device.type == "cuda"
    return bool(setting) and convolutional


def compile_with_fallback(module: nn.Module, name: str) -> None:
    """`module.compile()` in place (its state-dict keys stay as they are). Compilation happens at the first call; if
    it fails there (no compiler, an unsupported op), one warning says so and the module runs eagerly from then on."""
    module.compile()
    _guard_compiled(module, module._compiled_call_impl, name)


def _guard_compiled(module: nn.Module, compiled, name: str) -> None:
    def call(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 -- any failure of the compiler: run as written instead
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            warnings.warn(f"train.compile: torch.compile failed for the {name} ({type(e).__name__}: {first}); "
                          "training continues without compiling", stacklevel=2)
            module._compiled_call_impl = None
            return module._call_impl(*args, **kwargs)

    module._compiled_call_impl = call


def build_state(cfg: RunConfig, train, steps_per_epoch: int, device: torch.device, dist: DistInfo, *,
                load_init: bool = True, force: bool = False) -> TrainState:
    """Every part of a run, from its config and training set, ready for step 0 (or for `load`)."""
    image_size = int(train.image_size[1])
    num_classes = len(train.classes)
    views = build_views(cfg.views.policy, image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                        **cfg.views.options).to(device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    objective = build_objective(cfg.objective.name, **cfg.objective.params)
    inputs = tuple(getattr(objective, "inputs", ()))
    n_label_values = train.label_values
    if "labels" in inputs and n_label_values < 2:
        raise ConfigError(f"objective '{cfg.objective.name}' classifies, but the training set of '{cfg.data.dataset}' "
                          f"holds {n_label_values} class; a classifier needs at least two")
    if "targets" in inputs and train.targets is None:
        raise ConfigError(f"objective '{cfg.objective.name}' needs regression targets, and dataset "
                          f"'{cfg.data.dataset}' has none with these options (e.g. utkface task=age, mtfl task=landmarks)")
    # A classifier head's out_dim follows the data: its classes, or the number of regression targets.
    num_outputs = int(train.targets.shape[1]) if "targets" in inputs else num_classes
    if hasattr(objective, "fit"):  # the data-fitting hook (e.g. regression target statistics)
        objective.fit(train)
    for name in cfg.objective.schedules:
        if not hasattr(objective, name):
            raise ConfigError(f"objective.schedules.{name}: objective '{cfg.objective.name}' has no attribute "
                              f"'{name}' to schedule")
    # A resumed run's weights come from its checkpoint, so finetune.init is not read again (it may have moved).
    tasks = getattr(train, "queries", None)  # a multi-task run's {task: (output, queries)}, for its task head
    model = build_model(cfg, image_size, num_outputs, load_init=load_init, force=force, tasks=tasks).to(device)
    objective = objective.to(device)
    batch_transforms = build_batch_transforms(cfg.mixing, num_classes)
    # Parts whose behaviour follows training progress (iLLaMA's soft mask, HPM's α_t) expose
    # `set_progress(step, total_steps, steps_per_epoch)`; the step calls it first.
    progress_hooks = [m for m in (*model.modules(), *objective.modules()) if hasattr(m, "set_progress")]

    probe_on = n_label_values >= 2  # with one class, probe and kNN accuracy are a meaningless 1.000
    if not probe_on and (cfg.monitor.online_probe or cfg.monitor.knn_every):
        warnings.warn(f"the training set of '{cfg.data.dataset}' holds one class, so the online probe and kNN "
                      "monitor are off", stacklevel=3)
    channels_last = use_channels_last(cfg.train.channels_last, model.backbone, device)
    if channels_last:
        model.backbone.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        compile_with_fallback(model.backbone, f"backbone '{cfg.backbone.name}'")
    forward, wrap = model, None
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if cfg.train.sync_bn and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [device.index] if device.type == "cuda" else None
        forward = DDP(model, device_ids=ids)
        wrap = lambda m: DDP(m, device_ids=ids)  # noqa: E731
    # (a multi-task run has no single label space: its probe stays off, built with one output)
    probe = OnlineProbe(int(getattr(model.backbone, "num_features")), max(num_classes, 1), cfg.monitor.probe_lr, device,
                        wrap=wrap)
    schedules = Schedules(cfg, steps_per_epoch)
    return TrainState(
        cfg=cfg, device=device, dist=dist, views=views, model=model, forward=forward, objective=objective,
        inputs=inputs, batch_transforms=batch_transforms, optimizers=build_optimizers(model, cfg, schedules),
        probe=probe, probe_on=bool(cfg.monitor.online_probe) and probe_on,
        scaler=torch.amp.GradScaler("cuda", enabled=cfg.train.precision == "fp16"), schedules=schedules,
        progress_hooks=progress_hooks, steps_per_epoch=steps_per_epoch, channels_last=channels_last,
        total_steps=total_steps_of(cfg, steps_per_epoch),
        info={"image_size": image_size, "num_classes": num_classes, "num_outputs": num_outputs,
              "classes": train.classes, **({"tasks": tasks, "task_classes": train.task_classes} if tasks else {})},
        monitors_on=probe_on,
        bad_step=torch.tensor(-1, device=device), bad_loss=torch.tensor(0.0, device=device))


def parameter_counts(model: nn.Module) -> dict:
    """{part: {"total", "trainable"}} over the template's parts, and the whole; a part that has a
    `parameter_breakdown()` (e.g. a task head: its shared part and each task's queries) adds it."""
    out = {}
    for name, part in model.named_children():
        params = list(part.parameters())
        if not params:
            continue
        out[name] = {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params
                                                                               if p.requires_grad)}
        if hasattr(part, "parameter_breakdown"):
            out[name]["breakdown"] = part.parameter_breakdown()
    out["all"] = {"total": sum(p.numel() for p in model.parameters()),
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    return out


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def checkpoint_contents(state: TrainState, reason: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of a checkpoint of `state` at `state.step`."""
    tensors, meta = state_to_tensors(state.stateful())
    tensors.update(_rng_tensors())
    spe = state.steps_per_epoch

    meta = {"config": state.cfg.to_dict(), "defaults_version": DEFAULTS_VERSION, "step": state.step, "epoch": state.step / spe, "steps_per_epoch": spe,
            "total_steps": state.total_steps, **state.info, **meta, "history": state.history, "reason": reason}
    if state.scaler.is_enabled():
        meta["scaler"] = state.scaler.state_dict()
    return tensors, meta


def load_state(state: TrainState, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore a checkpoint written by `checkpoint_contents` into a freshly built state (strict)."""
    state_from_tensors(state.stateful(), tensors, meta)
    if "scaler" in meta:
        state.scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and state.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], state.device)
    state.step = int(meta["step"])
    state.history = meta.get("history", [])
