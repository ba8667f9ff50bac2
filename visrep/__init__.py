"""visrep: pretrain, adapt and rank vision backbones with one template for every method."""
__version__ = "0.1.0"

from visrep.api import (evaluate_calibration, evaluate_classifier, evaluate_fewshot, evaluate_knn, evaluate_linear,
                        finetune, format_listing, list_parts, pretrain, resolve, resume_config)
from visrep.errors import ConfigError, DataError, TrainingError, VisrepError
from visrep import rank  # noqa: E402 - the rank stage, callable: visrep.rank(models, dataset=...)
from visrep import study  # noqa: E402 - visrep.study.plan / run_study / status / report

__all__ = ["pretrain", "finetune", "resolve", "resume_config", "evaluate_knn", "evaluate_classifier", "evaluate_linear",
           "evaluate_fewshot", "evaluate_calibration", "rank", "study", "list_parts", "format_listing",
           "VisrepError", "ConfigError", "DataError", "TrainingError", "__version__"]
