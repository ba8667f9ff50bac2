"""Backbones (timm-based registry), heads (projectors, predictors, DINO/SwAV heads), loading for evaluation."""
from visrep.models.backbones import BACKBONES, build_backbone, feature_dim
from visrep.models.heads import HEADS, build_head
from visrep.models.loading import load_backbone

__all__ = ["BACKBONES", "HEADS", "build_backbone", "build_head", "feature_dim", "load_backbone"]
