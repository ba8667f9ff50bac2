"""Frozen-feature extraction with an on-disk cache.

    feats, labels = extract_features(model, dataset, image_size=32, model_fingerprint=info["fingerprint"])

Images go through the evaluation transform (resize to `image_size`, scale to [0, 1], normalise with
`mean`/`std`; ImageNet's by default), then through the model in eval mode under `torch.inference_mode()`,
in batches. The result is cached as a safetensors file (no pickle) whose name is the sha1 of everything
that determines the features: the model's weight fingerprint, a BLAKE2b hash of every image byte and the count
(not the labels: the tasks of one image set share an entry, and labels always come from the dataset), the
image size, the normalisation and the transform version. Without a model fingerprint nothing
is cached. The cache directory is, in order: the `cache_dir` argument, `$VISREP_CACHE/features`,
`~/.cache/visrep/features`. Entries are written atomically and computed under a per-entry file lock
(`<entry>.lock`), so processes sharing the cache compute each entry once; the others wait and read it.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import weakref
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from visrep.cache import atomic_write, entry_lock
from visrep.errors import VisrepError

# timm.data.constants.IMAGENET_DEFAULT_MEAN / _STD, copied so importing this module does not import timm
# (tests check that the two agree).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Bump when the evaluation transform changes, so old cache entries stop matching.
TRANSFORM_VERSION = "eval-resize-normalize-v1"
CACHE_FORMAT = "visrep-features-v2"  # v2: keyed by the images alone; labels come from the dataset


def default_cache_dir() -> Path:
    """`$VISREP_CACHE/features` when VISREP_CACHE is set, else `~/.cache/visrep/features`."""
    env = os.environ.get("VISREP_CACHE")
    if env:
        return Path(env).expanduser() / "features"
    return Path("~/.cache/visrep/features").expanduser()


# id(tensor) -> (weak reference, hash); tensors compare elementwise, so a WeakKeyDictionary cannot hold them.
_IMAGE_HASHES: dict[int, tuple[weakref.ref, str]] = {}


def images_fingerprint(dataset) -> str:
    """BLAKE2b of every byte of the images (and their shape), not of their labels: features do not depend on
    labels, so the tasks of one image set (UTKFace gender / race / age, MTFL smile / glasses / pose) share cache
    entries. Remembered per image tensor for the tensor's lifetime (never in `meta`: subsets copy their parent's
    meta; datasets are not changed in place); about 1 s per GB. A streamed dataset is named by its index instead
    (its shards, counts and labels), the size and the crop it decodes to."""
    if getattr(dataset, "streaming", False):
        return f"stream-{dataset.meta['fingerprint']}-{dataset.size}-{dataset.crop}"
    images = dataset.images
    known = _IMAGE_HASHES.get(id(images))
    if known is not None and known[0]() is images:
        return known[1]
    data = images.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(data.shape), str(data.dtype))).encode())
    h.update(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
    key = id(images)
    _IMAGE_HASHES[key] = (weakref.ref(images, lambda _, k=key: _IMAGE_HASHES.pop(k, None)), h.hexdigest())
    return _IMAGE_HASHES[key][1]


def feature_cache_key(model_fingerprint: str, dataset, image_size: int, mean: Sequence[float],
                      std: Sequence[float]) -> str:
    """sha1 (hex) of everything that determines the extracted features: the weights, the images (not their
    labels), the image size, the normalisation and the transform."""
    desc = {
        "format": CACHE_FORMAT,
        "model": str(model_fingerprint),
        "images_fingerprint": images_fingerprint(dataset),
        "n": int(len(dataset.labels)),
        "image_size": int(image_size),
        "mean": [round(float(m), 8) for m in mean],
        "std": [round(float(s), 8) for s in std],
        "transform": TRANSFORM_VERSION,
    }
    return hashlib.sha1(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def _transform(images: torch.Tensor, image_size: int, mean, std) -> torch.Tensor:
    from visrep.data.views import eval_transform

    return eval_transform(images, image_size, mean, std)


def _load_cache(path: Path, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))
        feats, labels = t["features"], t["labels"]
    except Exception:  # unreadable / truncated / foreign file: recompute and overwrite
        return None
    if feats.ndim != 2 or feats.shape[0] != n or labels.shape != (n,):
        return None
    return feats.float(), labels.long()


def _save_cache(path: Path, feats: torch.Tensor, labels: torch.Tensor, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {"features": feats.contiguous(), "labels": labels.contiguous()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"visrep": json.dumps(meta)}))


def _uses_channels_last(model: nn.Module) -> bool:
    """Convolutional networks (more than a patch-embedding conv) run faster in channels-last memory layout
    (B10: 1.55x images/s for a ResNet-18 on CPU); transformers gain nothing from it."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def _compute(model: nn.Module, dataset, image_size: int, batch_size: int, device, mean, std,
             progress: bool, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    from tqdm.auto import tqdm

    labels, n = dataset.labels, len(dataset.labels)
    if getattr(dataset, "streaming", False):  # decoded by the dataset's workers, in stored order
        chunks_in = (b["images"] for b in dataset.iter_batches(batch_size))
    else:
        chunks_in = (dataset.images[start:start + batch_size] for start in range(0, n, batch_size))
    was_training = model.training
    model.eval()
    model.to(device)
    layout = torch.channels_last if channels_last and _uses_channels_last(model) else None
    if layout is not None:
        model.to(memory_format=layout)
    chunks: list[torch.Tensor] = []
    show = progress and sys.stderr.isatty()
    try:
        with tqdm(total=n, desc=f"features {getattr(dataset, 'name', '')}".strip(), unit="img",
                  disable=not show, leave=False) as bar:
            for chunk in chunks_in:
                with torch.inference_mode():
                    x = _transform(chunk, image_size, mean, std)
                    x = x.to(device, non_blocking=True)
                    out = model(x if layout is None else x.contiguous(memory_format=layout))
                if isinstance(out, (tuple, list)):
                    out = out[0]
                if out.ndim != 2:
                    raise VisrepError(f"the model returned features of shape {tuple(out.shape)}, "
                                      "expected pooled features [batch, dim]")
                chunks.append(out.float().cpu())
                bar.update(x.shape[0])
    finally:
        model.train(was_training)
        if layout is not None:  # the caller's model comes back as it was given
            model.to(memory_format=torch.contiguous_format)
    # Concatenated outside inference mode, so the result is an ordinary tensor (usable with autograd).
    feats = torch.cat(chunks) if chunks else torch.empty(0, 0)
    return feats.contiguous(), labels.detach().to("cpu", torch.long).clone()


def extract_features_with_info(model: nn.Module, dataset, *, image_size: int, batch_size: int = 256,
                               device: str | torch.device = "cpu", cache_dir: str | Path | None | bool = None,
                               model_fingerprint: str | None = None,
                               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                               progress: bool = True, channels_last: bool = False
                               ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Like `extract_features`, plus an info dict: {"cache": "hit"|"miss"|"off", "cache_path", "key"}
    ("miss": this call computed the features, and cached them)."""
    if batch_size < 1:
        raise VisrepError(f"batch_size must be >= 1, got {batch_size}")
    if image_size is None or int(image_size) < 1:
        raise VisrepError(f"image_size must be a positive integer, got {image_size!r}")
    image_size = int(image_size)
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    n = int(len(dataset.labels))
    if model_fingerprint is None or cache_dir is False:
        feats, labels = _compute(model, dataset, image_size, batch_size, device, mean, std, progress, channels_last)
        return feats, labels, {"cache": "off", "cache_path": None, "key": None}
    root = Path(cache_dir).expanduser() if cache_dir not in (None, True) else default_cache_dir()
    key = feature_cache_key(model_fingerprint, dataset, image_size, mean, std)
    path = root / f"{key}.safetensors"
    info = {"cache": "hit", "cache_path": str(path), "key": key}
    labels = dataset.labels.detach().to("cpu", torch.long).clone()  # the caller's labels, whatever task cached it
    hit = _load_cache(path, n)  # entries are replaced atomically, so reading without the lock is safe
    if hit is not None:
        return hit[0], labels, info
    with entry_lock(path):
        hit = _load_cache(path, n)  # computed by another process while this one waited
        if hit is not None:
            return hit[0], labels, info
        feats, labels = _compute(model, dataset, image_size, batch_size, device, mean, std, progress, channels_last)
        meta = {"format": CACHE_FORMAT, "model": str(model_fingerprint), "dataset": str(getattr(dataset, "name", "")),
                "images_fingerprint": images_fingerprint(dataset), "n": n, "image_size": image_size,
                "mean": list(mean), "std": list(std), "transform": TRANSFORM_VERSION}
        try:
            _save_cache(path, feats, labels, meta)
        except OSError as e:  # a read-only or full cache directory must not fail the evaluation
            print(f"visrep: could not write feature cache {path} ({e})", file=sys.stderr)
    return feats, labels, {**info, "cache": "miss"}


def extract_features(model: nn.Module, dataset, *, image_size: int, batch_size: int = 256,
                     device: str | torch.device = "cpu", cache_dir: str | Path | None | bool = None,
                     model_fingerprint: str | None = None,
                     mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                     progress: bool = True, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of every image of `dataset`: (float32 [N, D] on the CPU, int64 labels [N]).

    model: returns [B, D] features; it is put in eval mode (its train/eval mode is restored afterwards)
        and moved to `device`.
    dataset: an `ImageDataset` (uint8 images [N, 3, H, W], int64 labels, name, meta["fingerprint"]).
    image_size: images are resized to this size, then normalised with `mean`/`std` (ImageNet's by default).
    model_fingerprint: content hash of the weights (`load_backbone`'s info["fingerprint"]); None: no cache.
    cache_dir: where cache files go; None: `$VISREP_CACHE/features` or `~/.cache/visrep/features`;
        False: no cache.
    progress: tqdm bar on stderr when it is a terminal.
    channels_last: run convolutional networks in channels-last layout (faster; the model is converted for the
        call and converted back, so do not use it on a model wrapped by DistributedDataParallel).
    """
    feats, labels, _ = extract_features_with_info(
        model, dataset, image_size=image_size, batch_size=batch_size, device=device, cache_dir=cache_dir,
        model_fingerprint=model_fingerprint, mean=mean, std=std, progress=progress, channels_last=channels_last)
    return feats, labels
