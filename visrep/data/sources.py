"""Dataset sources: every dataset is loaded once into memory as a uint8 tensor.

``load_dataset(name, split, root, image_size=..., **options)`` returns an ``ImageDataset``
(uint8 [N,3,H,W] images, int64 labels, class names, provenance ``meta``). Sources are
registered in ``SOURCES`` (``visrep list datasets``).

Image folders and archives are decoded once and kept in an on-disk cache of decoded arrays
(``$VISREP_CACHE/datasets/<key>.npz``, default ``~/.cache/visrep/datasets``), plain numpy
arrays, no pickle; the key changes when the source file(s), split, image_size or split options
change. Entries are written atomically and built under a per-entry file lock, so concurrent
processes build each entry once (``meta["cache"]``: "hit", "build" or "off").

Nothing in a user's files is executed: CIFAR batches go through a pickle reader that only rebuilds
numpy arrays (``visrep.data.safe_pickle``), images are decoded by libjpeg-turbo or by PIL limited to
the formats in IMAGE_EXTENSIONS, archives are read in place (never extracted), caches without pickle.
"""
from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from visrep.cache import atomic_write, entry_lock
from visrep.data.batches import EpochBatches
from visrep.data.cifar import CIFAR, download as _download_cifar, missing_files, read_split, verify_files
from visrep.data.walk import list_tree
from visrep.errors import ConfigError, DataError
from visrep.registry import Registry

__all__ = [
    "ImageDataset",
    "SOURCES",
    "load_dataset",
    "resolve_root",
    "cache_dir",
    "fingerprint",
]

SOURCES = Registry("dataset")

TRAIN_TEST = ("train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
# PIL's decoders for those extensions (JPEG also opens cameras' multi-picture files). PIL picks the
# decoder from the content, so without this list a file renamed .png holding EPS would run Ghostscript.
PIL_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# folder names that mark a "split" level in an image-folder tree
SPLIT_NAMES = frozenset({"train", "training", "test", "testing", "val", "valid", "validation", "eval", "dev", "holdout"})
_CACHE_FORMAT = 3  # 2: no whole-tree "test" split without split folders; 3: classes from every split folder


# ----------------------------------------------------------------------------------------------
# the dataset
# ----------------------------------------------------------------------------------------------
def fingerprint(images: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> str:
    """Cheap content hash (16 hex chars): shape, dtype, labels, class names and a strided sample
    of at most ~4M image bytes (plus the first and last image in full)."""
    h = hashlib.sha1()
    h.update(repr((tuple(images.shape), str(images.dtype), list(classes))).encode())
    h.update(labels.contiguous().numpy().tobytes())
    flat = images.reshape(-1)
    step = max(1, flat.numel() // (1 << 22))
    h.update(flat[::step].contiguous().numpy().tobytes())
    if len(images):
        h.update(images[0].contiguous().numpy().tobytes())
        h.update(images[-1].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(repr=False)
class ImageDataset:
    """An in-memory image classification dataset.

    images: uint8 [N, 3, H, W] contiguous; labels: int64 [N]; classes: names, index = label;
    name: e.g. "cifar10/train"; meta: provenance (source, split, n_skipped, fingerprint...).
    targets: optional float [N, T] regression targets (UTKFace age, MTFL landmarks); `labels` then hold a
    grouping of the samples (e.g. age groups) used for class-balanced subsets and monitors.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str
    meta: dict = field(default_factory=dict)
    targets: torch.Tensor | None = None

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        self.images = self.images.contiguous()
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64).reshape(-1)
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.classes = [str(c) for c in self.classes]
        if self.targets is not None:
            self.targets = torch.as_tensor(self.targets, dtype=torch.float32)
            self.targets = self.targets.reshape(len(self.targets), -1)
            if len(self.targets) != len(self.images):
                raise ValueError(f"{len(self.images)} images but {len(self.targets)} targets")
        self.meta = dict(self.meta)
        if "fingerprint" not in self.meta:
            self.meta["fingerprint"] = fingerprint(self.images, self.labels, self.classes)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def label_values(self) -> int:
        """How many distinct labels the samples carry (a classifier and the monitors need two or more)."""
        return int(torch.unique(self.labels).numel())

    def batches(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> EpochBatches:
        """The training batches of this dataset, addressed by step (`visrep.data.batches.EpochBatches`)."""
        return EpochBatches(self, batch_size, seed, rank, world_size)

    def __repr__(self) -> str:
        n, _, h, w = self.images.shape
        return f"ImageDataset({self.name!r}, n={n}, size={h}x{w}, classes={len(self.classes)}, fingerprint={self.meta.get('fingerprint')})"

    def subset(self, n: int | None, seed: int = 0) -> "ImageDataset":
        """A seeded random subset of ``n`` samples, as class-balanced as the data allows (classes
        take turns in a random order), kept in the original order. ``n=None`` or ``n >= len``:
        ``self``."""
        if n is None:
            return self
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ConfigError(f"subset size must be a positive integer or None, got {n!r}")
        if n >= len(self):
            return self
        chosen = self._balanced_index(int(n), seed)
        meta = {k: v for k, v in self.meta.items() if k != "fingerprint"}
        meta.update(subset_of=self.meta.get("fingerprint"), subset_n=int(n), subset_seed=int(seed))
        return self.select(chosen, f"{self.name}[{int(n)}]", meta)

    def _balanced_index(self, n: int, seed: int) -> torch.Tensor:
        """Sorted indices of a seeded, class-balanced choice of n samples (classes take turns in a random order)."""
        total = len(self)
        g = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(total, generator=g)
        lab = self.labels[perm]
        rank = torch.empty(total, dtype=torch.int64)
        for c in torch.unique(lab).tolist():
            pos = (lab == c).nonzero().squeeze(1)
            rank[pos] = torch.arange(len(pos))
        # round-robin over classes; ties inside a round broken by the random permutation
        key = rank * total + torch.arange(total)
        return perm[torch.argsort(key)[:n]].sort().values

    def holdout(self, fraction: float, seed: int = 0) -> tuple["ImageDataset", "ImageDataset"]:
        """(rest, held): a seeded, stratified `fraction` of each class held out for model selection (e.g. the
        learning-rate grid of `visrep rank --truth finetune`), and the disjoint rest to train on.

        Each class c of n_c samples gives round(fraction · n_c) of them, but always keeps at least one for
        training, so class proportions are the same in both parts and no class drops out of training.
        """
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ConfigError(f"holdout fraction must be in (0, 1), got {fraction!r}")
        fit, held = stratified_split(self.labels, float(fraction), seed)
        if len(held) == 0:
            raise DataError(f"{self.name}: {len(self)} samples are too few to hold out {fraction:.0%} of any class "
                            "and still train on every class")
        base = {k: v for k, v in self.meta.items() if k != "fingerprint"}
        tag = dict(holdout_of=self.meta.get("fingerprint"), holdout_fraction=float(fraction), holdout_seed=int(seed))
        rest = self.select(fit, f"{self.name}[fit]", {**base, **tag, "holdout_part": "fit"})
        return rest, self.select(held, f"{self.name}[holdout]", {**base, **tag, "holdout_part": "holdout"})

    def select(self, index: torch.Tensor, name: str, meta: dict | None = None) -> "ImageDataset":
        """The samples at `index` (images, labels and targets), as a new dataset called `name`."""
        if meta is None:
            meta = {k: v for k, v in self.meta.items() if k != "fingerprint"}
        targets = None if self.targets is None else self.targets[index]
        return ImageDataset(self.images[index], self.labels[index], list(self.classes), name, meta, targets)

    def fraction(self, fraction: float, seed: int = 0) -> "ImageDataset":
        """A seeded, class-balanced subset holding `fraction` of the samples (low-label protocols: 0.01, 0.1),
        at least one per class."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ConfigError(f"label fraction must be in (0, 1], got {fraction!r}")
        if fraction == 1:
            return self
        n = max(int(round(len(self) * float(fraction))), len(torch.unique(self.labels)))
        out = self.subset(n, seed)
        out.meta["label_fraction"] = float(fraction)
        return out


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, held) sorted indices: a seeded round(fraction · n_c) of each class c held out, every class keeping at
    least one sample to fit. Shared by `ImageDataset.holdout` and the L-BFGS probe's choice of its penalty."""
    gen = torch.Generator().manual_seed(int(seed))
    fit, held = [], []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = min(int(round(len(idx) * fraction)), len(idx) - 1)
        held.append(idx[:k])
        fit.append(idx[k:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def resolve_root(root: str | os.PathLike | None) -> Path | None:
    """The data root: ``root`` if given, else ``$VISREP_DATA``, else None."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get("VISREP_DATA")
    return Path(env).expanduser() if env else None


def cache_dir() -> Path:
    """visrep's cache base: ``$VISREP_CACHE`` or ``~/.cache/visrep`` (datasets go in ``datasets/``)."""
    env = os.environ.get("VISREP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "visrep"


def _check_split(dataset: str, split: str, valid=TRAIN_TEST) -> None:
    if split not in valid:
        raise ConfigError(f"unknown split '{split}' for dataset '{dataset}'; valid splits: {', '.join(valid)}")


def _resize_uint8(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """uint8 [N,3,H,W] -> uint8 [N,3,size,size] (shorter side + center crop, bilinear antialias)."""
    from visrep.data.views import resize_center_crop

    if images.shape[-2:] == (size, size):
        return images
    out = []
    for i in range(0, len(images), chunk):
        x = resize_center_crop(images[i : i + chunk].float(), size)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out).contiguous() if out else images.new_zeros((0, 3, size, size))


# ----------------------------------------------------------------------------------------------
# load_dataset
# ----------------------------------------------------------------------------------------------
def _option_names(fn) -> list[str]:
    """A source's own options: its keyword-only parameters other than the standard four."""
    standard = {"split", "root", "image_size", "download"}
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in standard]


def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None, *,
                 image_size: int | None = None, download: bool = True, **options) -> ImageDataset:
    """Load dataset ``name`` (see ``SOURCES.names()``) split ``split`` into memory.

    root: data directory (or, for imagefolder, the folder/archive itself); default $VISREP_DATA. Sources
        that need no files (digits, synthetic) warn when it is passed explicitly, and ignore it.
    image_size: resize to this square size (default: the source's own size; digits/synthetic 32).
    download: let torchvision download CIFAR when it is not under root.
    options: source-specific, see each source's signature; unknown ones raise ConfigError.
    """
    source = SOURCES.get(name)
    valid = _option_names(source)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(repr(u) for u in unknown)} for dataset "
            f"'{name}'; valid options: {', '.join(valid) if valid else '(none)'}"
        )
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1):
        raise ConfigError(f"image_size must be a positive integer or None, got {image_size!r}")
    if not isinstance(split, str) or not split:
        raise ConfigError(f"split must be a non-empty string, got {split!r}")
    _warn_ignored_root(name, source, root)
    # a source of URLs or brace patterns takes the root as written (a Path would fold "//" and expand nothing)
    where = (str(root) if root else os.environ.get("VISREP_DATA")) if getattr(source, "raw_root", False) else resolve_root(root)
    ds = source(split=split, root=where, image_size=None if image_size is None else int(image_size),
                download=bool(download), **options)
    ds.meta.setdefault("dataset", name)
    ds.meta.setdefault("split", split)
    return ds


def _without_files(origin: str):
    """Mark a source whose images are `origin` (bundled, generated): it reads no data directory."""
    def mark(fn):
        fn.origin = origin
        return fn
    return mark


def _warn_ignored_root(name: str, source, root) -> None:
    """An explicit root for a source that reads no files is likely a mistake (the user expected their
    data); $VISREP_DATA is a general default, so it is ignored silently."""
    origin = getattr(source, "origin", None)
    if origin and root is not None and str(root) != "":
        warnings.warn(f"dataset '{name}' is {origin}, so the data directory {root} is ignored", stacklevel=3)


# ----------------------------------------------------------------------------------------------
# digits (scikit-learn, bundled)
# ----------------------------------------------------------------------------------------------
@SOURCES.register("digits")
@_without_files("bundled with scikit-learn")
def digits(*, split: str, root: Path | None, image_size: int | None, download: bool) -> ImageDataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), offline; 80/20 split."""
    _check_split("digits", split)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    size = image_size or 32
    d = load_digits()
    y = np.asarray(d.target, dtype=np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    idx = np.sort(idx_train if split == "train" else idx_test)
    x = torch.from_numpy(np.asarray(d.images[idx], dtype=np.float32)).unsqueeze(1) * (255.0 / 16.0)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = x.round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    meta = {"source": "sklearn.datasets.load_digits", "split": split, "n_skipped": 0, "split_seed": 0, "test_fraction": 0.2}
    return ImageDataset(x, torch.from_numpy(y[idx]), [str(i) for i in range(10)], f"digits/{split}", meta)


# ----------------------------------------------------------------------------------------------
# synthetic (tests)
# ----------------------------------------------------------------------------------------------
@SOURCES.register("synthetic")
@_without_files("generated")
def synthetic(*, split: str, root: Path | None, image_size: int | None, download: bool, n: int = 512,
              num_classes: int = 4, seed: int = 0, noise: float = 0.15) -> ImageDataset:
    """Seeded class-structured random images (a colour + oriented grating per class, plus noise), for tests."""
    _check_split("synthetic", split)
    for label, v, lo in (("n", n, 1), ("num_classes", num_classes, 2)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ConfigError(f"synthetic option '{label}' must be an integer >= {lo}, got {v!r}")
    size = image_size or 32
    # class definitions depend on seed only, so train and test share them
    gc = torch.Generator().manual_seed(int(seed))
    colours = torch.rand(num_classes, 3, generator=gc) * 0.7 + 0.15
    angles = torch.arange(num_classes, dtype=torch.float32) * (torch.pi / num_classes) + torch.rand(1, generator=gc)
    freqs = 1.0 + (torch.arange(num_classes) % 3).float()
    # samples depend on (seed, split)
    gs = torch.Generator().manual_seed(int(seed) * 2 + (0 if split == "train" else 1) + 12345)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=gs)]
    coords = torch.linspace(0.0, 1.0, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    ang = angles[labels].view(-1, 1, 1)
    phase = (torch.rand(n, generator=gs) - 0.5).view(-1, 1, 1)
    wave = torch.sin(2 * torch.pi * freqs[labels].view(-1, 1, 1) * (xx * torch.cos(ang) + yy * torch.sin(ang)) + phase)
    bright = 1.0 + 0.2 * (torch.rand(n, 1, 1, 1, generator=gs) - 0.5)
    img = colours[labels].view(-1, 3, 1, 1) * (0.75 + 0.25 * wave.unsqueeze(1)) * bright
    img = img + float(noise) * torch.randn(n, 3, size, size, generator=gs)
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
    meta = {"source": "synthetic", "split": split, "n_skipped": 0, "seed": int(seed), "noise": float(noise)}
    return ImageDataset(images, labels.to(torch.int64), [f"class{c}" for c in range(num_classes)], f"synthetic/{split}", meta)


# ----------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (torchvision layout)
# ----------------------------------------------------------------------------------------------
def _cifar(kind: str, split: str, root: Path | None, image_size: int | None, download: bool, verify: bool) -> ImageDataset:
    """Read the extracted python batches under `root` with visrep's own reader (never torchvision's
    unpickling); download them first when they are missing and `download` is on."""
    _check_split(kind, split)
    fmt = CIFAR[kind]
    if root is None:
        raise DataError(
            f"{kind} needs a data directory: pass --data-dir DIR or set VISREP_DATA to the folder that holds "
            f"(or should receive) {fmt.folder}/"
        )
    if root.name == fmt.folder:  # pointed at the batches folder itself
        root = root.parent
    where = root / fmt.folder
    fix = f"put the extracted python batches there and point --data-dir / VISREP_DATA at {root}"
    if missing_files(fmt, where):
        if not download:
            raise DataError(f"{kind} not found: looked for {where}/; {fix}, or enable download")
        _download_cifar(fmt, root, fix)
    if verify:
        verify_files(fmt, where, split)
    images, labels, classes = read_split(fmt, where, split)
    if image_size is not None:
        images = _resize_uint8(images, image_size)
    meta = {"source": str(where.resolve()), "split": split, "n_skipped": 0}
    return ImageDataset(images, labels, classes, f"{kind}/{split}", meta)


@SOURCES.register("cifar10")
def cifar10(*, split: str, root: Path | None, image_size: int | None, download: bool, verify: bool = False) -> ImageDataset:
    """CIFAR-10 (60k 32x32, 10 classes) from the python batches (cifar-10-batches-py/) under the data dir; downloads if allowed.

    verify: also check each file's md5 against torchvision's list (reading never runs code either way)."""
    return _cifar("cifar10", split, root, image_size, download, verify)


@SOURCES.register("cifar100")
def cifar100(*, split: str, root: Path | None, image_size: int | None, download: bool, verify: bool = False) -> ImageDataset:
    """CIFAR-100 (60k 32x32, 100 fine classes) from the python batches (cifar-100-python/) under the data dir; downloads if allowed.

    verify: also check each file's md5 against torchvision's list (reading never runs code either way)."""
    return _cifar("cifar100", split, root, image_size, download, verify)


# ----------------------------------------------------------------------------------------------
# shards (WebDataset tar shards, streamed; visrep.data.streaming)
# ----------------------------------------------------------------------------------------------
@SOURCES.register("shards")
def shards(*, split: str, root, image_size: int | None, download: bool, workers: int | None = None,
           crop: str = "center", shuffle_block: int = 1024, lanes: int | None = None):
    """WebDataset tar shards streamed while training (`visrep data pack` writes them): root is the pack's folder (its
    index.json names each split's shards) or a brace pattern such as shards/train-{000000..000146}.tar, local or URL.

    workers: DataLoader workers that decode (default: cores - 1, at most 8; `data.workers` sets it too); crop: center
    or random (a random-resized crop per sample, seeded); shuffle_block: samples shuffled together within a lane;
    lanes: the streams the data order is cut into (default gcd(batch, 8); ranks own whole streams, so the order is the
    same on any number of processes dividing it, and with any workers)."""
    from visrep.data.streaming import load_shards

    return load_shards(split=split, root=root, image_size=image_size, workers=workers, crop=crop,
                       shuffle_block=shuffle_block, lanes=lanes)


shards.raw_root = True


# ----------------------------------------------------------------------------------------------
# imagefolder (directory or tar archive)
# ----------------------------------------------------------------------------------------------
def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _hidden(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _is_archive(path: Path) -> bool:
    return path.is_file() and (path.name.lower().endswith(ARCHIVE_SUFFIXES) or tarfile.is_tarfile(path))


def _layout(paths: list[tuple[str, ...]], split: str, where: str):
    """Decide which files make up ``split``. Returns (selected [(class, parts)], classes, info dict).

    Wrapper folders (one top-level directory holding everything, not itself a split name) are
    stripped. If the top level then holds split folders (train/, test/, val/..., or a folder
    named ``split``) whose files sit at <split>/<class>/..., ``split`` must be one of them;
    otherwise the tree is <class>/... and every file is a candidate (``_select_split`` decides).
    ``classes`` are the class folders of every split, so a class missing from one split cannot shift the
    label indices of the others."""
    prefix: tuple[str, ...] = ()
    rel = [p for p in paths]
    while rel and all(len(p) >= 3 for p in rel) and len({p[0] for p in rel}) == 1 and rel[0][0] not in SPLIT_NAMES and rel[0][0] != split:
        prefix = prefix + (rel[0][0],)
        rel = [p[1:] for p in rel]
    top_deep = {p[0] for p in rel if len(p) >= 3}
    splits = sorted(d for d in top_deep if d in SPLIT_NAMES or d == split)
    if splits:
        if split not in splits:
            raise ConfigError(f"unknown split '{split}' for {where}; valid splits: {', '.join(splits)}")
        selected = [(p[1], prefix + p) for p in rel if len(p) >= 3 and p[0] == split]
        classes = sorted({p[1] for p in rel if len(p) >= 3 and p[0] in splits})
        info = {"layout": "split-folders", "split_dir": "/".join(prefix + (split,)), "available_splits": splits}
    else:
        selected = [(p[0], prefix + p) for p in rel if len(p) >= 2]
        # before a test_fraction split, so both splits share the labels
        classes = sorted({c for c, _ in selected})
        info = {"layout": "class-folders", "split_dir": "/".join(prefix) or ".", "available_splits": []}
    return selected, classes, info


def _decode(data: bytes, image_size: int | None) -> torch.Tensor | None:
    """Bytes -> uint8 [3,H,W], or None if unreadable. JPEGs go through torchvision's libjpeg-turbo
    decoder (same pixels as PIL, ~3x faster on small images), everything else and any JPEG it
    rejects through PIL."""
    img = None
    if data[:3] == b"\xff\xd8\xff":
        try:
            from torchvision.io import ImageReadMode, decode_jpeg

            img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except Exception:  # noqa: BLE001 -- fall back to PIL
            img = None
    if img is None:
        try:
            from PIL import Image

            with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
                arr = np.asarray(im.convert("RGB"))
            img = torch.from_numpy(arr.transpose(2, 0, 1).copy())  # numpy's copy: torch's is slow
        except Exception:  # noqa: BLE001 -- any unreadable file is skipped and counted
            return None
    if img.ndim != 3 or img.shape[0] != 3 or img.shape[1] < 1 or img.shape[2] < 1:
        return None
    if image_size is not None and tuple(img.shape[1:]) != (image_size, image_size):
        img = _resize_uint8(img.unsqueeze(0), image_size)[0]
    return img.contiguous()


def _list_directory(root: Path) -> tuple[list[tuple[str, ...]], list[str]]:
    """(image paths as parts relative to `root`, skipped directory links): every real folder once,
    labelled by the path the user laid out (see visrep.data.walk)."""
    return list_tree(root, keep_file=lambda n: _is_image(n) and not n.startswith("."),
                     keep_dir=lambda n: not _hidden((n,)))


def _key_options(split: str, image_size: int | None, split_options: dict) -> list:
    return [_CACHE_FORMAT, split, image_size, sorted(split_options.items())]


def _directory_key(root: Path, paths: list[tuple[str, ...]], split: str, image_size: int | None,
                   split_options: dict) -> str:
    h = hashlib.sha1(json.dumps(["dir", str(root.resolve()), *_key_options(split, image_size, split_options)]).encode())
    for p in paths:
        st = (root.joinpath(*p)).stat()
        h.update(f"{'/'.join(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _archive_key(path: Path, split: str, image_size: int | None, split_options: dict) -> str:
    st = path.stat()
    desc = ["tar", str(path.resolve()), st.st_size, st.st_mtime_ns, *_key_options(split, image_size, split_options)]
    return hashlib.sha1(json.dumps(desc).encode()).hexdigest()


def _member_parts(name: str) -> tuple[str, ...]:
    return tuple(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))


def _read_archive(path: Path, split: str) -> tuple[list[tuple[str, ...]], dict]:
    """One pass over the archive: every image path, and the bytes of those that can belong to
    ``split`` (files inside another split's folder are skipped to save memory)."""
    paths, blobs = [], {}
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                parts = _member_parts(m.name)
                if not parts or _hidden(parts) or not _is_image(parts[-1]):
                    continue
                paths.append(parts)
                other = (parts[0] in SPLIT_NAMES and parts[0] != split) or (
                    len(parts) >= 4 and parts[1] in SPLIT_NAMES and parts[1] != split)
                if not other:
                    f = tf.extractfile(m)
                    blobs[parts] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"imagefolder: cannot read archive {path} ({type(exc).__name__}: {exc})") from exc
    return paths, blobs


def _fetch_from_archive(path: Path, wanted: set) -> dict:
    out = {}
    with tarfile.open(path, "r:*") as tf:
        for m in tf:
            if m.isfile():
                parts = _member_parts(m.name)
                if parts in wanted:
                    f = tf.extractfile(m)
                    out[parts] = f.read() if f is not None else b""
    return out


def _cache_file(key: str) -> Path:
    return cache_dir() / "datasets" / f"{key}.npz"


def _cache_load(key: str):
    path = _cache_file(key)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 -- a broken cache entry is rebuilt
        warnings.warn(f"ignoring unreadable dataset cache {path} ({type(exc).__name__}); rebuilding it", stacklevel=3)
        return None


def _cache_save(key: str, arrays: dict) -> Path | None:
    path = _cache_file(key)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)

    try:
        atomic_write(path, write)
        return path
    except OSError as exc:
        warnings.warn(f"could not write dataset cache {path} ({exc}); continuing without it", stacklevel=3)
        return None


def _cached(key: str, build: Callable[[], dict], cache: bool) -> tuple[dict, str]:
    """(arrays, "hit" | "build" | "off") of cache entry `key`; a missing entry is built once under its
    lock, so a concurrent process building the same entry is waited for, then read."""
    if not cache:
        return build(), "off"
    arrays = _cache_load(key)  # entries are replaced atomically, so reading without the lock is safe
    if arrays is not None:
        return arrays, "hit"
    with entry_lock(_cache_file(key)):
        arrays = _cache_load(key)  # built by another process while this one waited
        if arrays is not None:
            return arrays, "hit"
        arrays = build()
        _cache_save(key, arrays)
        return arrays, "build"


def _decode_all(items: list[tuple[str, tuple[str, ...], bytes]], image_size: int | None, workers: int):
    """Decode (class, parts, bytes) items, in order: a list of uint8 [3,H,W] tensors, None where unreadable."""
    def work(chunk):
        return [_decode(b, image_size) for _, _, b in chunk]

    with warnings.catch_warnings():
        # per-image decoder chatter (torchvision's decode deprecation notice, PIL palette notes)
        warnings.simplefilter("ignore")
        return _decode_items(items, work, workers)


def _decode_items(items, work, workers):
    if workers > 1 and len(items) > 2048:
        from concurrent.futures import ThreadPoolExecutor

        size = max(512, len(items) // (workers * 4))
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        with ThreadPoolExecutor(workers) as ex:
            decoded = [img for part in ex.map(work, chunks) for img in part]
    else:
        decoded = work(items)
    return decoded


def _split_options(test_fraction, split_seed) -> dict:
    """The effective split options of a class-folder tree ({} without test_fraction), validated."""
    if test_fraction is not None and (isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float))
                                      or not 0 < test_fraction < 1):
        raise ConfigError(f"imagefolder option 'test_fraction' must be a number in (0, 1) such as 0.2, got {test_fraction!r}")
    if isinstance(split_seed, bool) or not isinstance(split_seed, (int, np.integer)):
        raise ConfigError(f"imagefolder option 'split_seed' must be an integer, got {split_seed!r}")
    return {} if test_fraction is None else {"test_fraction": float(test_fraction), "split_seed": int(split_seed)}


def _stratified_split(selected: list, split: str, test_fraction: float, split_seed: int) -> list:
    """Split `split` of a class-folder tree: per class (files in sorted order, one permutation seeded by
    `split_seed`), round(n * test_fraction) files go to test and the rest to train; at least one stays in train."""
    by_class: dict[str, list] = {}
    for c, p in sorted(selected, key=lambda cp: (cp[0], "/".join(cp[1]))):
        by_class.setdefault(c, []).append((c, p))
    g = torch.Generator().manual_seed(split_seed)
    out = []
    for c in sorted(by_class):
        files = by_class[c]
        order = torch.randperm(len(files), generator=g).tolist()
        n_test = min(len(files) - 1, int(len(files) * test_fraction + 0.5))
        out += [files[i] for i in (order[:n_test] if split == "test" else order[n_test:])]
    return out


def _select_split(selected: list, info: dict, split: str, where: str, split_options: dict) -> list:
    """The files of `split`: a split folder as laid out; a class-folder tree whole as "train" (pretraining
    uses it), else split by `test_fraction`. Never the training images as another split."""
    if info["layout"] == "split-folders":
        if split_options:
            raise ConfigError(f"imagefolder option 'test_fraction' splits a tree of class folders, but {where} already has "
                              f"split folders ({', '.join(info['available_splits'])}); remove the option")
        return selected
    if split_options:
        _check_split("imagefolder", split)
        return _stratified_split(selected, split, **split_options)
    if split == "train":
        return selected
    raise DataError(f"imagefolder: {where} has no split folders, so split '{split}' would be the training images; "
                    f"lay it out as <split>/<class>/ folders (train/, test/) or set the dataset option test_fraction "
                    f"(such as 0.2, with split_seed) for a seeded per-class split")


def _read_items(src: Path, archive: bool, selected: list, blobs: dict | None) -> list:
    """(class, parts, bytes) of each selected file; b"" where it cannot be read (then skipped as unreadable)."""
    if archive:
        missing = {p for _, p in selected if p not in blobs}
        if missing:
            blobs.update(_fetch_from_archive(src, missing))
        return [(c, p, blobs.get(p, b"")) for c, p in selected]
    items = []
    for c, p in selected:
        try:
            data = src.joinpath(*p).read_bytes()
        except OSError:
            data = b""
        items.append((c, p, data))
    return items


def _build_imagefolder(src: Path, archive: bool, paths: list | None, split: str, image_size: int | None,
                       workers: int, split_options: dict) -> dict:
    """Select and decode `split`'s images: the arrays of one dataset cache entry."""
    where = str(src)
    blobs = None
    if archive:
        paths, blobs = _read_archive(src, split)
    if not paths:
        raise DataError(f"imagefolder: no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {where}")
    selected, classes, info = _layout(paths, split, where)
    empty = f"imagefolder: no images found for split '{split}' in {where} (expected <class>/<image> under {info['split_dir']})"
    if not selected:
        raise DataError(empty)
    selected = _select_split(selected, info, split, where, split_options)
    if not selected:
        raise DataError(empty)
    info.update(split_options)
    selected.sort(key=lambda cp: (cp[0], "/".join(cp[1])))
    cidx = {c: i for i, c in enumerate(classes)}
    items = _read_items(src, archive, selected, blobs)
    blobs = None  # the bytes live on in `items` only
    decoded = _decode_all(items, image_size, workers)
    keep = [i for i, img in enumerate(decoded) if img is not None]
    skipped = ["/".join(items[i][1]) for i, img in enumerate(decoded) if img is None]
    if not keep:
        raise DataError(f"imagefolder: none of the {len(items)} image files for split '{split}' in {where} could be decoded")
    sizes = {tuple(decoded[i].shape[1:]) for i in keep}
    if len(sizes) > 1:
        ex = sorted(sizes)[:2]
        raise DataError(
            f"imagefolder: images in {where} have different sizes (e.g. {ex[0][1]}x{ex[0][0]} and {ex[1][1]}x{ex[1][0]}); "
            f"set image_size to resize them to one size"
        )
    images = torch.stack([decoded[i] for i in keep]).contiguous()
    # classes whose images were all unreadable keep their index (labels stay stable)
    labels = torch.tensor([cidx[items[i][0]] for i in keep], dtype=torch.int64)
    del decoded, items  # the stacked copy is all that is needed now
    return {
        "images": images.numpy(),
        "labels": labels.numpy(),
        "classes": np.array(classes, dtype=np.str_),
        "skipped": np.array(skipped, dtype=np.str_) if skipped else np.zeros((0,), dtype="<U1"),
        "info": np.array(json.dumps(info), dtype=np.str_),
    }


def _stream_folder(src: Path, archive: bool, split: str, image_size: int | None, split_options: dict, workers: int,
                   crop: str, shuffle_block: int, lanes: int):
    from visrep.data.streaming import stream_imagefolder

    if archive:
        raise ConfigError(f"imagefolder: stream=true reads a folder in place; an archive streams once it is packed "
                          f"into shards (visrep data pack --dataset imagefolder --data-dir {src} --out shards/)")
    paths, _ = _list_directory(src)
    if not paths:
        raise DataError(f"imagefolder: no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {src}")
    selected, classes, info = _layout(paths, split, str(src))
    selected = _select_split(selected, info, split, str(src), split_options) if selected else selected
    if not selected:
        raise DataError(f"imagefolder: no images found for split '{split}' in {src} (expected <class>/<image> under "
                        f"{info['split_dir']})")
    return stream_imagefolder(src, split, image_size, selected=selected, classes=classes, info=info,
                              workers=workers, crop=crop, shuffle_block=shuffle_block, lanes=lanes)


def _archive_stem(src: Path) -> str:
    stem = src.name
    for suf in (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar"):
        if stem.lower().endswith(suf):
            return stem[: -len(suf)]
    return stem


@SOURCES.register("imagefolder")
def imagefolder(*, split: str, root: Path | None, image_size: int | None, download: bool, path: str | None = None,
                cache: bool = True, workers: int | None = None, test_fraction: float | None = None,
                split_seed: int = 0, stream: bool = False, crop: str = "center",
                shuffle_block: int = 1024, lanes: int | None = None) -> ImageDataset:
    """Class-per-folder images from a directory or a .tar/.tar.gz/.tgz archive (read in place), optional <split>/ level.

    A tree with split folders (train/, test/, val/...) serves those splits. A tree of class folders only
    is split "train" as a whole, unless `test_fraction` (e.g. 0.2) makes a seeded (`split_seed`, default 0)
    per-class train/test split of it; its other splits are an error rather than the training images.
    Directory links are followed, each real folder once (cycles and repeats are skipped and reported).

    stream: read a folder too large for memory (ImageNet) in place while training, decoded by `workers` DataLoader
    workers to `image_size` crops (`crop`: center or random), nothing cached (`visrep.data.streaming`).
    """
    src = Path(path).expanduser() if path else root
    if src is None:
        raise DataError("imagefolder needs a folder or .tar/.tar.gz archive: pass --data-dir PATH, set VISREP_DATA, or give the 'path' option")
    if not src.exists():
        raise DataError(f"imagefolder: {src} does not exist; pass --data-dir (or VISREP_DATA, or the 'path' option) pointing at an image folder or .tar/.tar.gz archive")
    where = str(src)
    archive = _is_archive(src)
    if not archive and not src.is_dir():
        raise DataError(f"imagefolder: {src} is neither a folder nor a .tar/.tar.gz/.tgz archive")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < (0 if stream else 1)):
        raise ConfigError(f"imagefolder option 'workers' must be an integer >= {0 if stream else 1}, got {workers!r}")
    split_options = _split_options(test_fraction, split_seed)
    if stream:  # workers: DataLoader workers that decode while training (None: cores - 1, at most 8)
        return _stream_folder(src, archive, split, image_size, split_options, workers, crop, shuffle_block, lanes)
    workers = workers or 1  # threads that decode once into the cache

    paths, skipped_links = None, []
    if archive:  # tar members are read in place; link members are not files and are never followed
        key = _archive_key(src, split, image_size, split_options)
    else:
        paths, skipped_links = _list_directory(src)
        key = _directory_key(src, paths, split, image_size, split_options)
    arrays, status = _cached(
        key, lambda: _build_imagefolder(src, archive, paths, split, image_size, workers, split_options), cache)

    images = torch.from_numpy(np.ascontiguousarray(arrays["images"]))
    labels = torch.from_numpy(np.asarray(arrays["labels"], dtype=np.int64))
    classes = [str(c) for c in arrays["classes"].tolist()]
    skipped = [str(s) for s in arrays["skipped"].tolist()]
    info = json.loads(str(arrays["info"]))
    if skipped_links:
        warnings.warn(f"skipped {len(skipped_links)} directory links in {where} that loop or repeat a listed folder "
                      f"(first: {skipped_links[0]})", stacklevel=3)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable images in {where} (first: {skipped[0]})", stacklevel=3)
    meta = {
        "source": str(src.resolve()),
        "split": split,
        "n_skipped": len(skipped),
        "skipped": skipped[:20],
        "n_skipped_links": len(skipped_links),
        "skipped_links": skipped_links[:20],
        "archive": archive,
        "cache_key": key,
        "cache_hit": status == "hit",
        "cache": status,
        **info,
    }
    return ImageDataset(images, labels, classes, f"{_archive_stem(src)}/{split}", meta)
