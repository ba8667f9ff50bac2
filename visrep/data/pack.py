"""`visrep data pack`: write any visrep source as WebDataset tar shards that `data.dataset=shards` streams.

Each sample is `<key>.jpg` (or `.png`), `<key>.cls` (the class index as text) and `<key>.json` (targets, origin),
the WebDataset convention, so the shards also load in `webdataset.WebDataset(...)`. Samples are written in a seeded
random order, so every shard mixes classes (the epoch order then only permutes shards and shuffles within blocks).
Shards are written under a temporary name and renamed when complete; `index.json`, written last, names every
split's shards with their sample counts, labels and targets, the classes and the image size.

Image folders (directories) are packed from their encoded files as they are: no decode, unless `resize` is set;
other sources (CIFAR, the face sets, archives) are loaded through `load_dataset` and each image is encoded once
(JPEG at `quality`, or PNG).

Example:
    >>> from visrep.data.pack import pack                                     # doctest: +SKIP
    >>> pack("imagefolder", "shards/", root="data/imagenet", splits=["train", "val"], resize=256)   # doctest: +SKIP
"""
from __future__ import annotations

import io
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from visrep.data.streaming import INDEX_FORMAT, INDEX_NAME
from visrep.errors import ConfigError, DataError

UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30}


def parse_size(text: str | int) -> int:
    """"1GB", "500MB", "64K" or a number of bytes -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        t = str(text).strip().upper().replace("IB", "B")
        num = t.rstrip("KMGB")
        unit = t[len(num):]
        try:
            value = int(float(num) * UNITS[unit])
        except (ValueError, KeyError):
            raise ConfigError(f"shard size {text!r} is not a size such as 1GB, 500MB or 64K") from None
    if value < 1024:
        raise ConfigError(f"shard size must be at least 1K, got {text!r}")
    return value


def _encode(img: np.ndarray, fmt: str, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    im = Image.fromarray(img)
    if fmt == "png":
        im.save(buf, format="PNG")
    else:
        im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _resize_bytes(data: bytes, size: int | None, quality: int) -> bytes | None:
    """Short side to `size` (aspect kept; None: as it is), re-encoded as JPEG; None if it cannot be decoded."""
    from PIL import Image

    from visrep.data.sources import PIL_FORMATS

    try:
        with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
            if im.format == "JPEG" and size is not None:
                im.draft("RGB", (size, size))
            im = im.convert("RGB")
            if size is not None:
                w, h = im.size
                s = size / min(w, h)
                im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=quality)
            return buf.getvalue()
    except Exception:  # noqa: BLE001 -- counted and skipped by the caller
        return None


class _ShardSink:
    """Rolls tar shards of about `max_bytes` (or `max_count` samples), each written to a temporary file first."""

    def __init__(self, out: Path, prefix: str, max_bytes: int, max_count: int | None):
        self.out, self.prefix, self.max_bytes, self.max_count = out, prefix, max_bytes, max_count
        self.names, self.counts, self.bytes = [], [], 0
        self._writer, self._file, self._tmp, self._size = None, None, None, 0

    def write(self, sample: dict) -> None:
        import webdataset as wds

        if self._writer is None:
            name = f"{self.prefix}-{len(self.names):06d}.tar"
            self._tmp = self.out / f".{name}.tmp-{os.getpid()}"
            self._file = open(self._tmp, "wb")
            # an integer mtime: a float one costs every member a PAX header, which doubles the reader's header parsing
            self._writer = wds.TarWriter(self._file, mtime=0, user="visrep", group="visrep")
            self.names.append(name)
            self.counts.append(0)
            self._size = 0
        self._size += self._writer.write(sample) + 1536  # + the members' headers
        self.counts[-1] += 1
        if self._size >= self.max_bytes or (self.max_count and self.counts[-1] >= self.max_count):
            self.close()

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()
        os.replace(self._tmp, self.out / self.names[-1])
        self.bytes += (self.out / self.names[-1]).stat().st_size
        self._writer, self._file = None, None

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
                self._file.close()
            finally:
                self._tmp.unlink(missing_ok=True)
            self._writer = None


def _folder_splits(src: Path, splits: list[str] | None, options: dict) -> tuple[list, list[str]]:
    """(the folder's file list, the splits to pack): every asked split checked before anything is written (default:
    the folder's split folders, or train for a tree of class folders)."""
    from visrep.data import sources as S

    paths, _ = S._list_directory(src)
    if not paths:
        raise DataError(f"imagefolder: no image files found in {src}")
    if splits is None:
        try:
            _, _, info = S._layout(paths, "train", str(src))
        except ConfigError as e:
            raise ConfigError(f"{e}; name the splits to pack with --splits") from None
        splits = info["available_splits"] or (["train", "test"] if options.get("test_fraction") else ["train"])
    for split in splits:
        S._layout(paths, split, str(src))  # an unknown split is an error now, not after hours of packing
    return paths, splits


def _folder_samples(src: Path, paths: list, split: str, options: dict, resize: int | None, quality: int, seed: int,
                    stats: dict):
    """(classes, sample iterator) of an image-folder split, from the files' own bytes, in a seeded order."""
    from visrep.data import sources as S

    selected, classes, info = S._layout(paths, split, str(src))
    split_options = S._split_options(options.get("test_fraction"), options.get("split_seed", 0))
    selected = S._select_split(selected, info, split, str(src), split_options) if selected else selected
    if not selected:
        raise DataError(f"imagefolder: no images found for split '{split}' in {src}")
    selected.sort(key=lambda cp: "/".join(cp[1]))
    order = torch.randperm(len(selected), generator=torch.Generator().manual_seed(seed)).tolist()
    cidx = {c: i for i, c in enumerate(classes)}

    def gen():
        for i in order:
            c, parts = selected[i]
            rel = "/".join(parts)
            try:
                data = src.joinpath(*parts).read_bytes()
            except OSError:
                stats["skipped"].append(rel)
                continue
            ext = Path(rel).suffix.lower().lstrip(".")
            if resize is not None:
                data, ext = _resize_bytes(data, resize, quality), "jpg"
            elif S._decode(data, 1) is None:  # a corrupt file is left out now, not met while training
                data = None
            if data is None:
                stats["skipped"].append(rel)
                continue
            ext = "jpg" if ext in ("jpeg", "jpg") else ext
            if ext not in ("jpg", "png", "webp", "bmp", "ppm"):  # stored as read; re-encoded only when unreadable
                data, ext = _resize_bytes(data, None, quality), "jpg"
                if data is None:
                    stats["skipped"].append(rel)
                    continue
            yield {"image": data, "ext": ext, "label": cidx[c], "targets": None, "origin": rel}

    return classes, len(selected), gen()


def _memory_samples(ds, resize: int | None, fmt: str, quality: int, seed: int):
    from visrep.data.sources import _resize_uint8

    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()

    def gen():
        for i in order:
            img = ds.images[i]
            if resize is not None and tuple(img.shape[1:]) != (resize, resize):
                img = _resize_uint8(img.unsqueeze(0), resize)[0]  # per sample: the resized set may not fit in RAM
            t = None if ds.targets is None else [float(x) for x in ds.targets[i].tolist()]
            yield {"image": _encode(img.permute(1, 2, 0).contiguous().numpy(), fmt, quality),
                   "ext": "png" if fmt == "png" else "jpg", "label": int(ds.labels[i]), "targets": t,
                   "origin": f"{ds.name}#{i}"}

    return gen()


def pack(dataset: str, out: str | os.PathLike, *, root: str | None = None, splits=None, options: dict | None = None,
         shard_size: str | int = "1GB", max_count: int | None = None, resize: int | None = None,
         image_format: str = "jpg", quality: int = 95, seed: int = 0, progress: bool = True) -> dict:
    """Write `dataset`'s splits as shards in `out` and return the index (also written to out/index.json)."""
    from tqdm.auto import tqdm

    from visrep.data.sources import SOURCES, load_dataset, resolve_root

    SOURCES.get(dataset)
    if dataset == "shards":
        raise ConfigError("dataset 'shards' is packed already; pack the dataset it was made from")
    options = dict(options or {})
    max_bytes = parse_size(shard_size)
    if image_format not in ("jpg", "png"):
        raise ConfigError(f"image format must be jpg or png, got {image_format!r}")
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ConfigError(f"JPEG quality must be an integer in 1..100, got {quality!r}")
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < 8):
        raise ConfigError(f"--resize must be an integer >= 8 (the short side in pixels), got {resize!r}")
    if max_count is not None and max_count < 1:
        raise ConfigError(f"--max-count must be at least 1, got {max_count!r}")
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if (out / INDEX_NAME).exists() and any(out.glob("*.tar")):
        raise ConfigError(f"{out} already holds packed shards; choose another --out or delete them first")
    t0 = time.time()
    folder, paths = None, None
    if dataset == "imagefolder":
        options.pop("stream", None)  # packing reads the files either way
        src = Path(options.pop("path", "") or (resolve_root(root) or "")).expanduser()
        if src.is_dir():
            folder = src
            paths, splits = _folder_splits(src, list(splits) if splits else None, options)
        elif not src.exists():
            raise DataError(f"imagefolder: {src} does not exist; pass --data-dir pointing at an image folder or archive")
        else:
            options["path"] = str(src)
    splits = list(splits or ["train", "test"])
    index = {"format": INDEX_FORMAT, "dataset": dataset, "options": options, "resize": resize,
             "image_size": None, "classes": None, "splits": {}, "seed": seed}
    for split in splits:
        stats = {"skipped": []}
        if folder is not None:
            classes, total, samples = _folder_samples(folder, paths, split, options, resize, quality, seed, stats)
        else:
            ds = load_dataset(dataset, split, root, image_size=None, download=False, **options)
            classes, total = list(ds.classes), len(ds)
            samples = _memory_samples(ds, resize, image_format, quality, seed)
            index["image_size"] = resize or (ds.image_size[0] if ds.image_size[0] == ds.image_size[1] else None)
        if index["classes"] is not None and index["classes"] != classes:
            raise DataError(f"{dataset}: split '{split}' has other classes than the splits before it")
        index["classes"] = classes
        sink = _ShardSink(out, split, max_bytes, max_count)
        labels, targets = [], []
        try:
            for k, s in enumerate(tqdm(samples, total=total, desc=f"pack {split}", unit="img", disable=not progress)):
                meta = {"origin": s["origin"]}
                if s["targets"] is not None:
                    meta["targets"] = s["targets"]
                sink.write({"__key__": f"{split}{k:09d}", s["ext"]: s["image"], "cls": str(s["label"]),
                            "json": json.dumps(meta).encode()})
                labels.append(s["label"])
                targets.append(s["targets"])
            sink.close()
        except BaseException:
            sink.abort()
            raise
        if not labels:
            raise DataError(f"{dataset}: split '{split}' has no readable images to pack")
        if stats["skipped"]:
            warnings.warn(f"{dataset}/{split}: skipped {len(stats['skipped'])} unreadable images "
                          f"(first: {stats['skipped'][0]})", stacklevel=2)
        index["splits"][split] = {"shards": sink.names, "counts": sink.counts, "n": len(labels), "bytes": sink.bytes,
                                  "labels": labels, "skipped": stats["skipped"][:20],
                                  "targets": None if any(t is None for t in targets) else targets}
        if folder is not None:
            index["image_size"] = None  # files keep their sizes: data.image_size says what to decode to
            index["source"] = str(folder.resolve())
        index["seconds"] = round(time.time() - t0, 2)
        _write_index(out, index)  # after every split: a split already packed is never lost
    return index


def _write_index(out: Path, index: dict) -> None:
    tmp = out / f".{INDEX_NAME}.tmp"
    tmp.write_text(json.dumps(index))
    os.replace(tmp, out / INDEX_NAME)
