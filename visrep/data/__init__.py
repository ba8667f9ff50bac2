"""Data: in-memory image datasets (``load_dataset``) and batched augmentation policies (``build_views``)."""
from visrep.data.sources import SOURCES, ImageDataset, cache_dir, fingerprint, load_dataset, resolve_root
from visrep.data import faces  # noqa: F401  (registers the utkface and mtfl sources)
from visrep.data.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VIEWS,
    ViewPolicy,
    ViewSpec,
    build_views,
    eval_transform,
    resize_center_crop,
)

__all__ = [
    "SOURCES",
    "ImageDataset",
    "load_dataset",
    "resolve_root",
    "cache_dir",
    "fingerprint",
    "VIEWS",
    "ViewPolicy",
    "ViewSpec",
    "build_views",
    "eval_transform",
    "resize_center_crop",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
