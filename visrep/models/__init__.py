"""Backbones (timm-based registry) and heads (projectors, predictors, classifiers, DINO/SwAV heads, decoders).

Loading a trained run's backbone is `visrep.runs.load_backbone` (runs sit above the parts)."""
from visrep.models.backbones import BACKBONES, build_backbone, feature_dim
from visrep.models.heads import HEADS, build_head

__all__ = ["BACKBONES", "HEADS", "build_backbone", "build_head", "feature_dim"]
