"""Load a backbone for evaluation from a visrep checkpoint, a run directory, or a timm model name."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from visrep.errors import ConfigError, VisrepError
from visrep.models.backbones import build_backbone


def load_run(source, *, force: bool = False) -> tuple[dict, dict, "RunConfig"]:
    """(tensors, metadata, RunConfig) of a checkpoint file or run directory written by `visrep pretrain`.

    The file is verified (content hash, metadata schema; `force=True` loads a file that fails its hash), and
    weights holding NaN/Inf are refused: they come from a diverged run and would give meaningless numbers.
    """
    import json

    from visrep.config import config_from_json
    from visrep.train.checkpoint import first_non_finite, load_checkpoint

    tensors, meta = load_checkpoint(source, force=force)
    if "config" not in meta:
        raise VisrepError(f"'{source}' is not a visrep checkpoint (no config in its metadata)")
    bad = first_non_finite({k: v for k, v in tensors.items() if k.startswith("model.")})
    if bad is not None:
        raise VisrepError(f"checkpoint '{source}' holds non-finite weights ('{bad}' has NaN/Inf), so it comes from "
                          "a diverged run; use an earlier checkpoint or retrain with a lower optim.lr")
    return tensors, meta, config_from_json(json.dumps(meta["config"]))


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
    from visrep.train.checkpoint import strip_prefix, weights_fingerprint

    if branch not in ("student", "teacher"):
        raise ConfigError(f"branch must be student or teacher, got {branch!r}")
    if Path(source).exists():
        tensors, meta, cfg = load_run(source, force=force)
        size = meta.get("image_size") or image_size or 32
        if cfg.finetune.mode == "lora":  # a LoRA fine-tuning run: rebuild it, then merge the adapters
            return _merged_lora_backbone(source, tensors, meta, cfg, size, branch)
        opts = dict(cfg.backbone.options)
        opts["image_size"] = size  # ViT/iLLaMA need it; CNNs ignore it
        model = build_backbone(cfg.backbone.name, **opts)
        prefix = "model.backbone." if branch == "student" else "model.teacher_backbone."
        state = strip_prefix(tensors, prefix)
        if not state:
            raise VisrepError(f"checkpoint '{source}' has no {branch} backbone weights")
        model.load_state_dict(state)
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
        import hashlib
        import json

        recipe = json.dumps([name, opts, bool(pretrained)], sort_keys=True, default=str)
        fp = hashlib.sha1((weights_fingerprint(model.state_dict()) + recipe).encode()).hexdigest()[:16]
        info = {"source": source, "kind": "timm" if pretrained else "random-init", "branch": "student",
                "image_size": image_size, "fingerprint": fp, "backbone": name}
    return model.eval(), info


def _merged_lora_backbone(source, tensors, meta, cfg, size, branch) -> tuple[nn.Module, dict]:
    import torch

    from visrep.methods import build_template
    from visrep.models.lora import merge_lora
    from visrep.train.checkpoint import strip_prefix, weights_fingerprint

    if branch != "student":
        raise ConfigError("a LoRA fine-tuning run has no teacher backbone; use branch=student")
    outputs = int(meta.get("num_outputs") or meta.get("num_classes") or 0) or None
    template = build_template(cfg, size, outputs, load_init=False)
    template.load_state_dict(strip_prefix(tensors, "model."))
    with torch.no_grad():
        model = merge_lora(template.backbone)
    state = model.state_dict()
    info = {"source": str(source), "kind": "checkpoint", "branch": branch, "image_size": size,
            "fingerprint": weights_fingerprint(state), "epoch": meta.get("epoch"), "method": cfg.method,
            "backbone": cfg.backbone.name, "lora_merged": True}
    return model.eval(), info
