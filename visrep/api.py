"""The Python API; the CLI is a thin layer over these functions.

    import visrep
    cfg = visrep.resolve(overrides=["method=byol", "data.dataset=digits", "train.epochs=2"])
    summary = visrep.pretrain(cfg)
    result = visrep.evaluate_knn(summary["out_dir"], dataset="digits")
"""
from __future__ import annotations

from visrep.config import RunConfig, resolve_config
from visrep.errors import ConfigError


def resolve(config: str | dict | None = None, overrides: list[str] | dict | None = None,
            base: dict | None = None) -> RunConfig:
    """A validated RunConfig from a YAML path or a dict, plus dotted overrides."""
    if isinstance(config, dict):
        return resolve_config(None, overrides, base=config if base is None else {**base, **config})
    return resolve_config(config, overrides, base=base)


def resume_config(run_dir: str, overrides: list[str] | dict | None = None, *, config: str | None = None) -> RunConfig:
    """The config to resume the run in `run_dir` with: the run's own (from its checkpoint), or `config` if given,
    plus `overrides` (e.g. a larger train.max_steps); out_dir is `run_dir` however it is spelled or wherever
    the run was moved."""
    from pathlib import Path

    from visrep.config import deep_merge, from_dict, parse_overrides, upgrade_saved_run, validate
    from visrep.checkpoint import read_checkpoint_meta

    path = Path(run_dir).expanduser()
    ckpt = path / "checkpoints" / "last.safetensors"
    if not ckpt.is_file():
        raise ConfigError(f"nothing to resume: '{run_dir}' is not a run directory (no checkpoints/last.safetensors)")
    over = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides or []))
    over = deep_merge(over, {"out_dir": str(path)})
    if config is not None:
        return resolve(config, over)
    # Only the header is needed here; pretrain verifies the whole file (hash, step) before it loads it.
    saved = read_checkpoint_meta(ckpt).get("config")
    if saved is None:
        raise ConfigError(f"the checkpoint in '{run_dir}' records no config; resume with --config instead")
    cfg = from_dict(RunConfig, deep_merge(upgrade_saved_run(saved)[0], over))  # saved under an older schema too
    validate(cfg)
    return cfg


def pretrain(config: RunConfig | str | dict | None = None, *, overrides=None, resume: bool = False,
             quiet: bool = False, force: bool = False) -> dict:
    """Pretrain with a method preset; see `visrep.train.loop.pretrain`."""
    from visrep.train.loop import pretrain as _pretrain

    cfg = config if isinstance(config, RunConfig) else resolve(config, overrides)
    return _pretrain(cfg, resume=resume, quiet=quiet, force=force)


def finetune(config: RunConfig | str | dict | None = None, *, overrides=None, resume: bool = False,
             quiet: bool = False, force: bool = False) -> dict:
    """Fine-tune (full or LoRA) from `finetune.init`, export and evaluate; see `visrep.train.finetune`."""
    from visrep.train.finetune import finetune as _finetune

    cfg = config if isinstance(config, RunConfig) else resolve(config, overrides)
    return _finetune(cfg, resume=resume, quiet=quiet, force=force)


def evaluate_fewshot(source: str, **kwargs) -> dict:
    from visrep.evaluate.api import evaluate_fewshot as _fewshot

    return _fewshot(source, **kwargs)


def evaluate_calibration(source: str, **kwargs) -> dict:
    from visrep.evaluate.api import evaluate_calibration as _calibration

    return _calibration(source, **kwargs)


def evaluate_knn(source: str, **kwargs) -> dict:
    from visrep.evaluate.api import evaluate_knn as _knn

    return _knn(source, **kwargs)


def evaluate_classifier(source: str, **kwargs) -> dict:
    from visrep.evaluate.api import evaluate_classifier as _classifier

    return _classifier(source, **kwargs)


def evaluate_faceptor(source: str, **kwargs) -> dict:
    """Every task of a multi-task face run on its test split; see `visrep.evaluate.faces.evaluate_faceptor`."""
    from visrep.evaluate.faces import evaluate_faceptor as _faceptor

    return _faceptor(source, **kwargs)


def predict(source: str, images: list[str], **kwargs) -> list[dict]:
    """Every task's prediction of a multi-task face run for image files; see `visrep.evaluate.faces.predict_images`."""
    from visrep.evaluate.faces import predict_images

    return predict_images(source, images, **kwargs)


def evaluate_linear(source: str, **kwargs) -> dict:
    from visrep.evaluate.api import evaluate_linear as _linear

    return _linear(source, **kwargs)


def registries() -> dict:
    from visrep.data.sources import SOURCES
    from visrep.data.views import VIEWS
    from visrep.methods import METHODS
    from visrep.models import BACKBONES, HEADS
    from visrep.data.masking import MASKS
    from visrep.models.decoders import DECODERS
    from visrep.objectives import OBJECTIVES
    from visrep.rank import SCORES
    from visrep.data.tasks import TASKS

    return {"methods": METHODS, "views": VIEWS, "masks": MASKS, "backbones": BACKBONES, "datasets": SOURCES,
            "objectives": OBJECTIVES, "heads": HEADS, "decoders": DECODERS, "scores": SCORES, "tasks": TASKS}


def list_parts(kind: str) -> list[tuple[str, str]]:
    regs = registries()
    if kind not in regs:
        raise ConfigError(f"cannot list '{kind}'; valid choices: {', '.join(regs)}, all")
    return regs[kind].describe()


def format_listing(kind: str = "all") -> str:
    kinds = list(registries()) if kind == "all" else [kind]
    lines = []
    for k in kinds:
        rows = list_parts(k)
        lines.append(f"{k}:")
        width = max(len(n) for n, _ in rows) if rows else 0
        lines += [f"  {n.ljust(width)}  {d}" for n, d in rows]
        if k == "backbones":
            lines.append(f"  {'<timm name>'.ljust(width)}  any timm model, e.g. timm:convnext_atto (random init)")
    return "\n".join(lines)
