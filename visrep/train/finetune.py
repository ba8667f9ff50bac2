"""Fine-tuning: the one training loop, started from a pretrained backbone, then exported and evaluated.

    visrep finetune --config configs/finetune_utkface_gender.yaml finetune.init=runs/mae
    visrep finetune ... finetune.mode=lora finetune.lora.r=8           # peft LoRA adapters
    visrep finetune ... finetune.layer_decay=0.75                     # layer-wise lr decay (full)
    visrep finetune ... data.label_fraction=0.01                      # low-label: 1 % of the labels

A fine-tuning run is a `supervised`-style composition (one view, a classifier or regression head, a
cross-entropy or regression objective) whose backbone starts from `finetune.init`. The backbone's
architecture and image size are taken from that checkpoint. After training, the run

1. counts trainable and total parameters (LoRA: adapters + head only),
2. exports the backbone to `out_dir/export/backbone.safetensors` with timm keys (LoRA adapters merged
   into the weights first: W ← W + (α/r)·BA), loadable by `visrep eval ... --model <that file>`,
3. evaluates its own head on the test split (`eval.json`: top-1, or MAE / NME for regression).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from visrep.checkpoint import add_prefix, read_checkpoint_meta, save_checkpoint
from visrep.config import RunConfig, from_dict, upgrade_saved_run
from visrep.errors import ConfigError
from visrep.evaluate.api import evaluate_classifier
from visrep.models.heads import classifier_head_names
from visrep.models.lora import count_parameters, merge_lora
from visrep.runs import load_run, rebuild_run, run_path
from visrep.train.loop import pretrain


def prepare_finetune_config(cfg: RunConfig, *, resume: bool = False, force: bool = False) -> RunConfig:
    """Take the backbone (name, options) and image size from `finetune.init`; check the head and objective.

    resume=True takes them from the run's own checkpoint instead: a resumed run needs its init no more (it may
    have moved with the run, or been deleted). force: load an init that fails its integrity check.
    """
    cfg = copy.deepcopy(cfg)
    kind = cfg.classifier.get("type") if isinstance(cfg.classifier, dict) else None
    if kind not in classifier_head_names():
        raise ConfigError(f"finetune needs a classifier head (classifier.type one of "
                          f"{', '.join(classifier_head_names())}), got {kind!r}")
    if cfg.predictor is not None or cfg.masking is not None or cfg.target.branch != "none":
        raise ConfigError("finetune trains backbone + head with one view: use method=supervised (no predictor, "
                          "masking or target branch)")
    if cfg.objective.name not in ("cross_entropy", "regression"):
        raise ConfigError(f"finetune needs objective cross_entropy or regression, got '{cfg.objective.name}'")
    init = cfg.finetune.init
    own = Path(cfg.out_dir) / "checkpoints" / "last.safetensors"
    if init and resume and own.is_file():
        meta = read_checkpoint_meta(own)
        src = from_dict(RunConfig, upgrade_saved_run(meta["config"])[0])
        cfg.backbone = copy.deepcopy(src.backbone)
        if cfg.data.image_size is None:
            cfg.data.image_size = src.data.image_size
    elif init:
        _, meta, src = load_run(run_path(init, "finetune.init"), force=force)
        cfg.backbone = copy.deepcopy(src.backbone)
        size = meta.get("image_size")
        if cfg.data.image_size is None and size:
            cfg.data.image_size = int(size)
        elif size and int(cfg.data.image_size) != int(size) and cfg.backbone.name.startswith(("vit", "illama")):
            raise ConfigError(f"data.image_size {cfg.data.image_size} differs from the {size} px that "
                              f"'{init}' was trained at; its position grid is fixed, leave data.image_size unset")
    return cfg


def export_backbone(out_dir: Path, run=None) -> Path:
    """Write the trained backbone (LoRA merged) as a checkpoint `load_backbone` reads: timm keys under
    `model.backbone.`, the config with finetune.mode=full and no init. `run`: the run already rebuilt
    (`visrep.runs.rebuild_run`), so its checkpoint is not read again."""
    run = run if run is not None else rebuild_run(out_dir / "checkpoints" / "last.safetensors")
    cfg, meta = run.cfg, run.meta
    with torch.no_grad():
        backbone = merge_lora(copy.deepcopy(run.template.backbone))
    plain = copy.deepcopy(cfg)
    plain.finetune.mode, plain.finetune.init, plain.finetune.layer_decay = "full", None, None
    export_meta = {"config": plain.to_dict(), "image_size": meta["image_size"], "step": meta["step"],
                   "epoch": meta["epoch"], "classes": meta.get("classes"), "exported_from": str(out_dir),
                   "lora_merged": cfg.finetune.mode == "lora"}
    path = out_dir / "export" / "backbone.safetensors"
    save_checkpoint(path, add_prefix({k: v.contiguous() for k, v in backbone.state_dict().items()}, "model.backbone."),
                    export_meta)
    return path


def finetune(cfg: RunConfig, *, resume: bool = False, quiet: bool = False, evaluate: bool = True,
             force: bool = False) -> dict:
    """Train (see the module docstring), export and evaluate; returns the summary (also out_dir/summary.json)."""
    cfg = prepare_finetune_config(cfg, resume=resume, force=force)
    out_dir = Path(cfg.out_dir)
    summary = pretrain(cfg, resume=resume, quiet=quiet, force=force)
    if summary.get("already_finished"):
        exported = (out_dir / "export" / "backbone.safetensors").is_file()
        evaluated = not evaluate or (out_dir / "eval.json").is_file()
        if summary["already_finished"] != "completed" or (exported and evaluated):
            return summary  # nothing was changed
        summary.pop("already_finished")  # trained, but killed before its export or evaluation: finish those
        summary["stop_reason"] = "completed"
    # The trained run, rebuilt once: its parameter counts, its export and its evaluation.

    run = rebuild_run(out_dir, force=force)
    trainable, total = count_parameters(run.template)
    summary.update(mode=cfg.finetune.mode, init=cfg.finetune.init, layer_decay=cfg.finetune.layer_decay,
                   label_fraction=cfg.data.label_fraction, trainable_parameters=trainable, total_parameters=total,
                   trainable_fraction=trainable / total)
    if summary["stop_reason"] == "completed":
        summary["export"] = str(export_backbone(out_dir, run))
        if evaluate:
            d = cfg.data
            res = evaluate_classifier(run, dataset=d.dataset, root=d.root, test_split=d.test_split,
                                      download=d.download, dataset_options=d.options, progress=not quiet,
                                      device=cfg.train.device, out=str(out_dir / "eval.json"))
            summary["eval"] = {k: v for k, v in res.items()
                               if k in ("protocol", "top1", "top5", "mae", "rmse", "nme", "failure_rate")}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
