"""Runs as a whole: load a run written by `visrep pretrain` / `finetune`, rebuild its model, build a run's model.

This is the one place that knows how a run folder or checkpoint becomes modules again, above the parts
(`models`, `objectives`, `data`), the compositions (`methods`) and the config, and below `train`, `evaluate`,
`rank` and `study`, which all load runs through it:

    load_run(source)          (tensors, metadata, RunConfig), verified
    rebuild_run(source)       the run's template with its weights (backbone + heads), for heads and exports
    load_backbone(source)     a backbone for evaluation: a run's, or timm's / a registered one at random init
    build_model(cfg, ...)     a new run's template: `build_template`, then fine-tuning's start (`finetune.init`
                              weights) and LoRA adapters; `build_template` itself stays pure
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from visrep.checkpoint import (first_non_finite, load_checkpoint, read_checkpoint_meta, strip_prefix,
                               weights_fingerprint)
from visrep.config import RunConfig, from_dict, upgrade_saved_run
from visrep.errors import ConfigError, VisrepError
from visrep.methods import build_template
from visrep.methods.template import build_backbone_of
from visrep.models.backbones import build_backbone


def load_run(source, *, force: bool = False) -> tuple[dict, dict, "RunConfig"]:
    """(tensors, metadata, RunConfig) of a checkpoint file or run directory written by `visrep pretrain`.

    The file is verified (content hash, metadata schema; `force=True` loads a file that fails its hash), and
    weights holding NaN/Inf are refused: they come from a diverged run and would give meaningless numbers. A run
    saved under an older config schema is brought to the current one (`visrep.config.upgrade_saved_run`).
    """
    tensors, meta = load_checkpoint(source, force=force)
    if "config" not in meta:
        raise VisrepError(f"'{source}' is not a visrep checkpoint (no config in its metadata)")
    bad = first_non_finite({k: v for k, v in tensors.items() if k.startswith("model.")})
    if bad is not None:
        raise VisrepError(f"checkpoint '{source}' holds non-finite weights ('{bad}' has NaN/Inf), so it comes from "
                          "a diverged run; use an earlier checkpoint or retrain with a lower optim.lr")
    config, tensors = upgrade_saved_run(meta["config"], tensors)
    return tensors, {**meta, "config": config}, from_dict(RunConfig, config)


def load_backbone(source: str, *, image_size: int | None = None, branch: str = "student",
                  pretrained: bool = False, options: dict | None = None,
                  force: bool = False) -> tuple[nn.Module, dict]:
    """Return `(backbone in eval mode, info)`.

    source: a checkpoint file / run directory written by `visrep pretrain`, or `timm:NAME` / a registered
    backbone name (random init; `pretrained=True` asks timm for its weights, which needs internet).
    branch: "student" (online backbone) or "teacher" (EMA teacher, the one DINO evaluates).
    options: backbone options for a random-init/timm source (e.g. {"cifar_stem": True, "width": 16}), so a
    random-init baseline can match a pretrained run's architecture; ignored for checkpoints.
    force: load a checkpoint that fails its integrity check (see `load_run`).
    info: {"source", "kind", "fingerprint", "image_size", "config"} — fingerprint is a content hash.
    """
    if branch not in ("student", "teacher"):
        raise ConfigError(f"branch must be student or teacher, got {branch!r}")
    if Path(source).exists():
        tensors, meta, cfg = load_run(source, force=force)
        size = meta.get("image_size") or image_size or 32
        if cfg.finetune.mode == "lora":  # a LoRA fine-tuning run: rebuild it, then merge the adapters
            return _merged_lora_backbone(RebuiltRun.of(source, tensors, meta, cfg, size), branch)
        opts = dict(cfg.backbone.options)
        opts["image_size"] = size  # ViT/iLLaMA need it; CNNs ignore it
        model = build_backbone(cfg.backbone.name, **opts)
        prefix = "model.backbone." if branch == "student" else "model.teacher_backbone."
        state = strip_prefix(tensors, prefix)
        if not state:
            raise VisrepError(f"checkpoint '{source}' has no {branch} backbone weights")
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            lines = str(e).splitlines()
            raise VisrepError(f"checkpoint '{source}' does not fit the {cfg.backbone.name} its config describes "
                              f"({lines[1].strip() if len(lines) > 1 else lines[0]}); a run written by an older "
                              "visrep may need that version to load") from None
        info = {"source": str(source), "kind": "checkpoint", "branch": branch, "image_size": size,
                "fingerprint": weights_fingerprint(state), "epoch": meta.get("epoch"),
                "method": cfg.method, "backbone": cfg.backbone.name}
    else:
        name = source[5:] if source.startswith("timm:") else source
        opts = dict(options or {})
        if image_size and not pretrained:
            opts.setdefault("image_size", image_size)
        if pretrained:
            import timm

            try:
                model = timm.create_model(name, pretrained=True, num_classes=0, **opts)
            except Exception as e:  # network or hub errors: one sentence for the user
                raise VisrepError(f"could not fetch pretrained weights for '{name}' ({type(e).__name__}); "
                                  "this needs internet access") from None
        else:
            model = build_backbone(source, **opts)
        # Options that add no parameters (timm's global_pool, act_layer) change the features but not the weights,
        # so the fingerprint that keys the feature cache covers the name, the options and `pretrained` too.
        recipe = json.dumps([name, opts, bool(pretrained)], sort_keys=True, default=str)
        fp = hashlib.sha1((weights_fingerprint(model.state_dict()) + recipe).encode()).hexdigest()[:16]
        info = {"source": source, "kind": "timm" if pretrained else "random-init", "branch": "student",
                "image_size": image_size, "fingerprint": fp, "backbone": name}
    return model.eval(), info


def _merged_lora_backbone(run: "RebuiltRun", branch: str) -> tuple[nn.Module, dict]:
    import torch

    from visrep.models.lora import merge_lora

    if branch != "student":
        raise ConfigError("a LoRA fine-tuning run has no teacher backbone; use branch=student")
    with torch.no_grad():
        model = merge_lora(run.template.backbone)
    state = model.state_dict()
    info = {"source": str(run.source), "kind": "checkpoint", "branch": branch, "image_size": run.image_size,
            "fingerprint": weights_fingerprint(state), "epoch": run.meta.get("epoch"), "method": run.cfg.method,
            "backbone": run.cfg.backbone.name, "lora_merged": True}
    return model.eval(), info

def run_path(source, field: str = "") -> str:
    """The expanded path of a run folder or checkpoint file, or the one error for a missing one (`field` names
    the config key it came from, e.g. "finetune.init")."""
    path = Path(str(source)).expanduser()
    if not path.exists():
        raise ConfigError(f"{field + ': ' if field else ''}no checkpoint or run directory at '{source}'")
    return str(path)


@dataclass
class RebuiltRun:
    """A run's template with its trained weights (eval mode), and what it was loaded from."""
    source: str
    template: nn.Module
    cfg: RunConfig
    meta: dict
    tensors: dict
    image_size: int

    @classmethod
    def of(cls, source, tensors: dict, meta: dict, cfg: RunConfig, image_size: int | None = None) -> "RebuiltRun":
        size = int(meta.get("image_size") or image_size or 32)
        outputs = int(meta.get("num_outputs") or meta.get("num_classes") or 0) or None
        template = build_model(cfg, size, outputs, load_init=False, tasks=meta.get("tasks"))
        try:
            template.load_state_dict(strip_prefix(tensors, "model."))
        except RuntimeError as e:
            lines = str(e).splitlines()
            raise VisrepError(f"'{source}' does not hold the model its config describes "
                              f"({lines[1].strip() if len(lines) > 1 else e})") from None
        return cls(str(source), template.eval(), cfg, meta, tensors, size)


def rebuild_run(source, *, image_size: int | None = None, force: bool = False) -> RebuiltRun:
    """Load a run (`load_run`) and rebuild its whole template (backbone, heads; LoRA adapters as trained)."""
    path = run_path(source)
    tensors, meta, cfg = load_run(path, force=force)
    return RebuiltRun.of(path, tensors, meta, cfg, image_size)


def build_model(cfg: RunConfig, image_size: int, num_outputs: int | None = None, *, load_init: bool = True,
                force: bool = False, tasks: dict | None = None) -> nn.Module:
    """The template a run trains: `build_template(cfg, ...)`; with `finetune.init` (and `load_init`) its backbone
    starts from that run's weights; with `finetune.mode: lora` it is wrapped in peft LoRA adapters (also when
    rebuilding a saved LoRA run, so its state dict loads as saved)."""
    backbone = build_backbone_of(cfg, image_size)
    ft = cfg.finetune
    if ft.init and load_init:
        load_init_weights(backbone, ft.init, ft.branch, force=force)
    if ft.mode == "lora":
        from visrep.models.lora import apply_lora

        backbone = apply_lora(backbone, ft.lora)
    template = build_template(cfg, image_size, num_outputs, backbone=backbone, tasks=tasks)
    stage2 = (cfg.task_head or {}).get("stage2")
    if stage2:  # Faceptor stage 2: the stage-1 run's weights, then only the new levels train
        if load_init:
            load_stage1_weights(template, stage2["init"], force=force)
        template.backbone.requires_grad_(False)
        template.task_head.freeze_all_but_new_levels()
    return template


def stage1_tasks(source: str, target: str) -> dict:
    """The {task: (output, queries)} of a stage-1 multi-task run, checked to hold the stage-2 target task. Only the
    checkpoint's header is read here: its weights are read (and verified) once, by `load_stage1_weights`."""
    meta = read_checkpoint_meta(run_path(source, "task_head.stage2.init"))
    tasks, head = meta.get("tasks"), upgrade_saved_run(meta.get("config", {}))[0].get("task_head")
    if not tasks or not head or head.get("type", "faceptor") != "faceptor":
        raise ConfigError(f"task_head.stage2.init: '{source}' is not a Faceptor run (stage 2 extends one)")
    if target not in tasks:
        raise ConfigError(f"task_head.stage2.task: '{source}' has no task '{target}' (its tasks: {', '.join(tasks)})")
    return {n: tuple(v) for n, v in tasks.items()}


def load_stage1_weights(template: nn.Module, source: str, force: bool = False) -> None:
    """Every weight of a stage-1 run (backbone and task head) into a stage-2 template, which differs from it only by
    its new levels."""
    tensors, _, _ = load_run(run_path(source, "task_head.stage2.init"), force=force)
    state = strip_prefix({k: v for k, v in tensors.items() if k.startswith("model.")}, "model.")
    try:
        missing, unexpected = template.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape: another backbone or task_head setting
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise ConfigError(f"task_head.stage2.init: '{source}' does not hold the model this config describes "
                          f"({lines[1] if len(lines) > 1 else lines[0]}); keep its backbone and task_head settings") from None
    new = [k for k in missing if k.startswith(("task_head.memory.new_proj.", "task_head.memory.new_level_embed"))]
    if unexpected or len(new) != len(missing):
        other = sorted(set(missing) - set(new)) + sorted(unexpected)
        raise ConfigError(f"task_head.stage2.init: '{source}' does not hold the model this config describes "
                          f"(e.g. {other[0]}); keep its backbone and task_head settings")


def load_init_weights(backbone: nn.Module, source: str, branch: str = "student", force: bool = False) -> None:
    """Copy the `branch` backbone of a visrep checkpoint, run directory or export into `backbone`
    (fine-tuning; a LoRA run's adapters are merged first)."""
    pretrained, _ = load_backbone(run_path(source, "finetune.init"), branch=branch, force=force)
    try:
        backbone.load_state_dict(pretrained.state_dict())
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise ConfigError(f"finetune.init '{source}' does not fit backbone {type(backbone).__name__} "
                          f"({lines[1].strip() if len(lines) > 1 else e}); use the backbone and image size it "
                          "was trained with") from None
