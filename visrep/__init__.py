"""visrep: pretrain, adapt and rank vision backbones with one template for every method."""
__version__ = "0.1.0"

from visrep.api import evaluate_classifier, evaluate_knn, evaluate_linear, format_listing, list_parts, pretrain, resolve
from visrep.errors import ConfigError, DataError, TrainingError, VisrepError

__all__ = ["pretrain", "resolve", "evaluate_knn", "evaluate_classifier", "evaluate_linear", "list_parts", "format_listing",
           "VisrepError", "ConfigError", "DataError", "TrainingError", "__version__"]
