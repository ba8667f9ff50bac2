"""visrep: pretrain, adapt and rank vision backbones with one template for every method.

The names below load on first use (PEP 562), so `import visrep.models` or `import visrep.objectives` loads only
those parts and what they need, not the whole package."""
import importlib

from visrep.errors import ConfigError, DataError, TrainingError, VisrepError
from visrep.version import __version__

_API = ("pretrain", "finetune", "resolve", "resume_config", "evaluate_knn", "evaluate_classifier", "evaluate_linear",
        "evaluate_fewshot", "evaluate_calibration", "evaluate_faceptor", "predict", "list_parts", "format_listing")
_STAGES = ("rank", "study")  # visrep.rank(models, dataset=...) ranks; visrep.study.plan / run_study / status / report

__all__ = [*_API, *_STAGES, "VisrepError", "ConfigError", "DataError", "TrainingError", "__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module("visrep.api"), name)
    if name in _STAGES:
        return importlib.import_module(f"visrep.{name}")
    raise AttributeError(f"module 'visrep' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
