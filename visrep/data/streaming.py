"""Streaming sources: data larger than RAM, read while it trains (WebDataset tar shards, or a large image folder).

Nothing is decoded ahead: DataLoader workers (`data.workers`) read the encoded images and decode each one straight
to a fixed-size uint8 crop (PIL with JPEG draft mode, so a 500-px JPEG is DCT-scaled before it is resized), then the
usual batched views run on the training device. That is the DALI/FFCV idea with standard parts.

What is streamed is a list of *units*, each a known number of samples in a stored order: the tar shards of
`visrep data pack` (WebDataset layout: `<key>.jpg`, `<key>.cls`, `<key>.json`), or chunks of an image folder's
file list. `index.json` beside the shards names them with their counts and labels.

The order of an epoch is arithmetic of the step, the same for any number of processes and workers (the idea of
MosaicML Streaming's canonical nodes). B = global batch, L = `lanes` streams (default gcd(B, 8)), c = B / L:
  1. the units are permuted by (seed, epoch) and read as one virtual sequence of N samples; S = N // B steps;
  2. stream j holds the contiguous positions [j·S·c, (j+1)·S·c) (the last N - S·B samples are dropped, like
     drop_last), shuffled in blocks of G·c samples, G = max(1, shuffle_block // B) steps (each block permuted by
     (seed, epoch, stream, block)), so a group of G steps holds about shuffle_block samples;
  3. the global batch of step s is c samples of every stream, in stream order; rank r of W reads the streams
     [r·L/W, (r+1)·L/W), so its rows are the same rows of the same global batch whatever W is;
  4. DataLoader worker k of K reads the groups of G steps ≡ k (mod K) and hands over a group at a time.
An image folder read in place is random access, so its epoch sequence is one permutation of all files by (seed,
epoch) and needs no block shuffle.
So every sample is seen once per epoch across ranks, each rank reads only its own streams, and the batch of any step
can be recomputed from the step: a resumed run continues from the exact sample, re-reading at most one block per
stream. Guarantee: for the same seed, batch size, lanes, shuffle_block and shards, a run trains on the same global
batches, uninterrupted or resumed, on any number of processes (that divides L) and workers.

Bad data: a sample that does not decode, or the rest of a truncated shard, is counted and its slot is filled with
another image of the same batch (batches keep their size, so ranks stay in step); one warning line per reader. A
shard named by the data root that does not exist is an error before training starts.
"""
from __future__ import annotations

import bisect
import hashlib
import io
import json
import math
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from visrep.data.tar_reader import TarFormatError, open_tar
from visrep.errors import ConfigError, DataError

INDEX_NAME = "index.json"
INDEX_FORMAT = "visrep-shards/1"
FOLDER_UNIT = 1024          # files per unit of a streamed image folder
CROPS = ("center", "random")


# ----------------------------------------------------------------------------------------------
# units and where samples live
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """A run of samples read in order: a tar shard (`url`), or a chunk of an image folder (`files`, `labels`)."""
    url: str
    count: int
    files: tuple = ()
    labels: tuple = ()


def is_url(name: str) -> bool:
    return "://" in name and not name.startswith("file://")


def expand_pattern(pattern: str) -> list[str]:
    """Brace notation as WebDataset writes it: `shards/train-{000000..000146}.tar` (the `braceexpand` package)."""
    from braceexpand import braceexpand

    return [u if is_url(u) else str(Path(u[len("file://"):] if u.startswith("file://") else u).expanduser())
            for u in braceexpand(pattern)]


def _decode_fixed(data: bytes, size: int, crop: str, rng: random.Random | None) -> np.ndarray | None:
    """Encoded image -> uint8 [size, size, 3] (HWC, as PIL gives it): short side resized to `size` and a center crop,
    or ("random") an Inception-style random crop (area 35-100 %, aspect 3/4-4/3) resized to `size`. None if it
    cannot be decoded."""
    from PIL import Image

    from visrep.data.sources import PIL_FORMATS

    try:
        with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
            if im.format == "JPEG":
                im.draft("RGB", (size, size))  # DCT scaling: stays >= size on both sides, decodes 2-8x faster
            im = im.convert("RGB")
            w, h = im.size
            if crop == "random" and rng is not None:
                box = _random_box(w, h, rng)
            else:
                s = min(w, h)
                left, top = (w - s) // 2, (h - s) // 2
                box = (left, top, left + s, top + s)
            im = im.resize((size, size), Image.BILINEAR, box=box, reducing_gap=None)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception:  # noqa: BLE001 -- any undecodable sample is counted and replaced
        return None
    if arr.shape != (size, size, 3):
        return None
    return arr


def _put(images: torch.Tensor, row: int, arr: np.ndarray) -> None:
    """Writes an HWC image into row `row` of a uint8 [B, 3, H, W] batch with numpy's transposing copy (torch's
    permute(2, 0, 1) copy of uint8 took ~20 ms per 224-px image here; this takes ~40 us)."""
    images.numpy()[row] = arr.transpose(2, 0, 1)


def _batch_tensor(shape: tuple) -> torch.Tensor:
    """An empty uint8 batch; in a DataLoader worker it is allocated in shared memory, as torch's default_collate
    does, so that sending it to the main process does not copy it once more."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    n = math.prod(shape)
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(n)).view(shape)


def _random_box(w: int, h: int, rng: random.Random) -> tuple[int, int, int, int]:
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(0.35, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round((target * ratio) ** 0.5)), int(round((target / ratio) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return x, y, x + cw, y + ch
    s = min(w, h)
    return (w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s


class UnitReader:
    """Reads samples (key, image bytes, label, targets or None) of units, keeping a tar open while reads continue
    where the last one stopped (a remote shard is streamed once, not re-fetched per block)."""

    def __init__(self):
        self._unit, self._pos, self._tar, self._file, self._pending = None, 0, None, None, None
        self.truncated: list[str] = []

    def close(self) -> None:
        for f in (self._tar, self._file):
            try:
                if f is not None:
                    f.close()
            except Exception:  # noqa: BLE001
                pass
        self._unit, self._tar, self._file, self._pending = None, None, None, None

    def read(self, unit: Unit, start: int, n: int) -> list:
        """Samples start..start+n-1 of `unit`; a sample that cannot be read is None (counted by the caller)."""
        if unit.files:
            return [self._read_file(unit, i) for i in range(start, start + n)]
        if self._unit is not unit or self._pos > start:
            self._open(unit)
        out = []
        while self._pos < start + n:
            sample = self._next_sample(keep=self._pos >= start)
            if sample is False:  # the shard ended early: truncated or shorter than its index says
                if unit.url not in self.truncated:
                    self.truncated.append(unit.url)
                    warnings.warn(f"shard {unit.url} ended after {self._pos} of its {unit.count} indexed samples "
                                  "(truncated?); the missing ones are skipped", stacklevel=2)
                out += [None] * (start + n - max(self._pos, start))
                self._pos = start + n
                break
            if self._pos >= start:
                out.append(sample)
            self._pos += 1
        return out

    @staticmethod
    def _read_file(unit: Unit, i: int):
        try:
            data = Path(unit.files[i]).read_bytes()
        except OSError:
            return None
        return (unit.files[i], data, int(unit.labels[i]), None)

    def _open(self, unit: Unit) -> None:
        self.close()
        url = unit.url[len("file://"):] if unit.url.startswith("file://") else unit.url
        try:
            if is_url(url):
                import webdataset as wds

                self._file = wds.gopen(url, "rb")
                self._tar = open_tar(self._file, seekable=False)
            else:
                self._file = open(url, "rb")
                self._tar = open_tar(self._file, seekable=True)  # skipped members are seeked over, not read
        except FileNotFoundError:
            raise DataError(f"shard {url} does not exist") from None
        except (OSError, EOFError, TarFormatError) as e:
            if self._file is not None:
                self._file.close()
                self._file = None
            raise DataError(f"cannot read shard {url}: {e}") from None
        self._unit, self._pos, self._pending = unit, 0, None

    def _members(self):
        """Next tar member, or None at the end (or at a truncation)."""
        try:
            return self._tar.next()
        except (TarFormatError, OSError, EOFError):
            return None

    def _next_sample(self, keep: bool, only: tuple | None = None):
        """The next sample (grouped by key, WebDataset style), or False when the shard ends; data is read only when
        `keep` (a skipped sample costs its headers), and then only the members `only` names (None: all)."""
        key, fields = None, {}
        while True:
            m = self._pending if self._pending is not None else self._members()
            self._pending = None
            if m is None:
                if key is None:
                    return False
                break
            name, _, is_file = m
            if not is_file:
                continue
            base = name.rsplit("/", 1)[-1]
            k, _, ext = base.partition(".")
            k = name[: len(name) - len(base)] + k
            if key is not None and k != key:
                self._pending = m  # the first member of the next sample
                break
            key = k
            if keep and (only is None or ext.lower() in only):
                try:
                    fields[ext.lower()] = self._tar.read()
                except (TarFormatError, OSError, EOFError):
                    return False
        if not keep:
            return None
        return _parse_sample(key, fields, need_image=only is None)


def _parse_sample(key: str, fields: dict, need_image: bool = True):
    image = next((fields[e] for e in ("jpg", "jpeg", "png", "webp", "ppm", "bmp") if e in fields), None)
    if image is None and not need_image:
        image = b""
    if image is None:
        return None
    try:
        label = int(fields["cls"].decode().strip()) if "cls" in fields else -1
        meta = json.loads(fields["json"].decode()) if "json" in fields else {}
    except (ValueError, UnicodeDecodeError):
        return None
    targets = meta.get("targets") if isinstance(meta, dict) else None
    return (key, image, label, targets)


# ----------------------------------------------------------------------------------------------
# the epoch plan (pure arithmetic, tested on its own)
# ----------------------------------------------------------------------------------------------
def unit_order(n_units: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) + 7)
    return torch.randperm(n_units, generator=g).tolist()


def segments(starts: list[int], counts: list[int], order: list[int], a: int, n: int) -> list[tuple[int, int, int]]:
    """(unit, offset, length) pieces of virtual positions [a, a+n) when units are read in `order`
    (`starts[i]`: position of order[i]'s first sample)."""
    out, pos, end = [], a, a + n
    i = bisect.bisect_right(starts, pos) - 1
    while pos < end:
        u = order[i]
        off = pos - starts[i]
        take = min(counts[u] - off, end - pos)
        if take > 0:
            out.append((u, off, take))
            pos += take
        i += 1
    return out


def block_permutation(size: int, seed: int, epoch: int, stream: int, group: int) -> list[int]:
    h = hash_seed(seed, epoch, stream, group)
    g = torch.Generator().manual_seed(h & (2**63 - 1))
    return torch.randperm(size, generator=g).tolist()


def hash_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha1("/".join(map(str, parts)).encode()).digest()[:8], "little")


def default_lanes(batch_size: int) -> int:
    return math.gcd(int(batch_size), 8)


class _Plan:
    """Where each step's samples are (the arithmetic of the module docstring). N samples, global batch B, L streams:
    c = B / L samples of every stream per step, S = N // B steps per epoch, stream j holds the virtual positions
    [j·S·c, (j+1)·S·c) of the epoch, read in groups of G = max(1, shuffle_block // B) steps (one block of G·c
    samples per stream)."""

    def __init__(self, counts: list[int], batch_size: int, seed: int, world: int, lanes: int, block: int):
        if batch_size % lanes:
            raise ConfigError(f"train.batch_size {batch_size} must be a multiple of the {lanes} streams of the data "
                              f"order (data.options.lanes)")
        if lanes % world:
            raise ConfigError(f"the {world} processes must divide the {lanes} streams of the data order (each rank "
                              f"reads whole streams); set data.options.lanes to a multiple of {world} that divides "
                              f"train.batch_size {batch_size}")
        self.counts, self.seed, self.world, self.lanes = counts, int(seed), world, lanes
        self.c = batch_size // lanes
        self.n = sum(counts)
        self.steps = self.n // batch_size
        self.group = max(1, int(block) // batch_size)  # a group holds ~block samples (decoded: block / W per rank)
        self.groups_per_epoch = -(-self.steps // self.group) if self.steps else 0
        self._epoch, self._order, self._starts = None, None, None

    def streams(self, rank: int) -> range:
        per = self.lanes // self.world
        return range(rank * per, (rank + 1) * per)

    def group_of(self, step: int) -> int:
        epoch, i = divmod(step, self.steps)
        return epoch * self.groups_per_epoch + i // self.group

    def group_steps(self, gid: int) -> tuple[int, int, int, int]:
        """(epoch, group in the epoch, its first global step, how many steps it holds)."""
        epoch, g = divmod(gid, self.groups_per_epoch)
        return epoch, g, epoch * self.steps + g * self.group, min(self.group, self.steps - g * self.group)

    def block(self, epoch: int, stream: int, g: int, n_steps: int) -> tuple[int, int]:
        """(first virtual position, length) of stream `stream`'s block for group g of the epoch."""
        return stream * self.steps * self.c + g * self.group * self.c, n_steps * self.c

    def block_segments(self, epoch: int, start: int, n: int):
        if epoch != self._epoch:
            self._order = unit_order(len(self.counts), self.seed, epoch)
            self._starts = np.concatenate([[0], np.cumsum([self.counts[u] for u in self._order])[:-1]]).tolist()
            self._epoch = epoch
        return segments(self._starts, self.counts, self._order, start, n)


class StreamingDataset:
    """A dataset whose images stay on disk (or behind URLs); labels and targets are known up front (from the
    index), images are decoded by the batches' workers. It offers what the loop and the evaluations use of an
    `ImageDataset` (len, classes, labels, targets, image_size, batches, subset) plus `iter_batches` in stored order."""

    streaming = True

    def __init__(self, units: list[Unit], labels, classes: list[str], name: str, image_size: int, *, targets=None,
                 meta: dict | None = None, workers: int | None = None, crop: str = "center", shuffle_block: int = 1024,
                 lanes: int | None = None, random_access: bool = False):
        if lanes is not None and (isinstance(lanes, bool) or not isinstance(lanes, int) or lanes < 1):
            raise ConfigError(f"streaming option 'lanes' must be a positive integer, got {lanes!r}")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            raise ConfigError(f"streaming option 'workers' must be an integer >= 0, got {workers!r}")
        if crop not in CROPS:
            raise ConfigError(f"streaming option 'crop' must be one of {', '.join(CROPS)}, got {crop!r}")
        if isinstance(shuffle_block, bool) or not isinstance(shuffle_block, int) or shuffle_block < 1:
            raise ConfigError(f"streaming option 'shuffle_block' must be a positive integer, got {shuffle_block!r}")
        self.units, self.classes, self.name = list(units), [str(c) for c in classes], name
        self.labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        self.targets = None if targets is None else torch.as_tensor(targets, dtype=torch.float32).reshape(len(self.labels), -1)
        if sum(u.count for u in self.units) != len(self.labels):
            raise DataError(f"{name}: the index counts {sum(u.count for u in self.units)} samples but holds "
                            f"{len(self.labels)} labels")
        self.size = int(image_size)
        self.workers = default_workers() if workers is None else int(workers)
        self.crop, self.shuffle_block, self.lanes, self.random_access = crop, int(shuffle_block), lanes, random_access
        self.starts = np.concatenate([[0], np.cumsum([u.count for u in self.units])[:-1]]).tolist()  # stored order
        self.meta = dict(meta or {})
        self.meta.setdefault("fingerprint", self._fingerprint())
        self.meta["streaming"] = True

    def read_at(self, reader: "UnitReader", position: int):
        """The sample at `position` of the stored order (None if it cannot be read)."""
        u = bisect.bisect_right(self.starts, position) - 1
        return reader.read(self.units[u], position - self.starts[u], 1)[0]

    def _fingerprint(self) -> str:
        h = hashlib.sha1(repr((self.size, self.classes, [(u.url, u.count, u.files[:1]) for u in self.units])).encode())
        h.update(self.labels.numpy().tobytes())
        return h.hexdigest()[:16]

    def __len__(self) -> int:
        return int(len(self.labels))

    def __repr__(self) -> str:
        return (f"StreamingDataset({self.name!r}, n={len(self)}, units={len(self.units)}, size={self.size}x{self.size}, "
                f"classes={len(self.classes)})")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.size, self.size

    @property
    def label_values(self) -> int:
        return int(torch.unique(self.labels).numel())

    def batches(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> "StreamBatches":
        return StreamBatches(self, batch_size, seed, rank, world_size)

    # in stored order (evaluation: features of every sample once)
    def iter_batches(self, batch_size: int):
        """{"images", "labels", "targets"} batches of every sample in stored order (the last one may be short)."""
        it = iter(_loader(_StoredOrder(self, batch_size), self.workers, pin=False))
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except (DataError, OSError, RuntimeError) as e:
                raise worker_error(e, f"{self.name}: reading its images failed") from None
            batch.pop("skipped", None)
            yield batch

    def subset(self, n: int | None, seed: int = 0):
        """`n` seeded random samples read into memory (an `ImageDataset`): a kNN bank, a probe's training subset."""
        from visrep.data.sources import ImageDataset

        if n is None or n >= len(self):
            if n is None:
                raise ConfigError(f"{self.name} streams from disk and is not held in memory; give a subset size")
            n = len(self)
        g = torch.Generator().manual_seed(int(seed))
        chosen = torch.randperm(len(self), generator=g)[:int(n)].sort().values
        images = torch.empty(len(chosen), 3, self.size, self.size, dtype=torch.uint8)
        reader, bad = UnitReader(), 0
        good = None
        try:
            for row, pos in enumerate(chosen.tolist()):
                s = self.read_at(reader, pos)
                img = None if s is None else _decode_fixed(s[1], self.size, "center", None)
                if img is None:
                    bad += 1
                    img = good if good is not None else np.zeros((self.size, self.size, 3), dtype=np.uint8)
                _put(images, row, img)
                good = img
        finally:
            reader.close()
        if bad:
            warnings.warn(f"{self.name}: {bad} of {len(chosen)} sampled images could not be read and were replaced",
                          stacklevel=2)
        meta = {k: v for k, v in self.meta.items() if k not in ("fingerprint", "streaming")}
        meta.update(subset_of=self.meta.get("fingerprint"), subset_n=int(n), subset_seed=int(seed), n_skipped=bad)
        targets = None if self.targets is None else self.targets[chosen]
        return ImageDataset(images, self.labels[chosen], list(self.classes), f"{self.name}[{int(n)}]", meta, targets)

    def holdout(self, fraction, seed=0):
        raise ConfigError(f"data.holdout needs a dataset held in memory, and {self.name} streams; use data.subset "
                          "to read a part of it into memory")

    def fraction(self, fraction, seed=0):
        raise ConfigError(f"data.label_fraction needs a dataset held in memory, and {self.name} streams; use "
                          "data.subset to read a part of it into memory")


def default_workers() -> int:
    """The cores this process may use (its CPU affinity, as in a container or a Slurm allocation) minus one, 1..8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 2
    return max(1, min(8, cores - 1))


# ----------------------------------------------------------------------------------------------
# the readers in DataLoader workers
# ----------------------------------------------------------------------------------------------
class _Collator:
    """Decodes one batch's samples; a sample that cannot be read or decoded takes another image of the batch."""

    def __init__(self, ds: StreamingDataset):
        self.size, self.crop, self.name = ds.size, ds.crop, ds.name
        self.bad, self.first_bad, self.warned = 0, None, False

    def __call__(self, samples: list, seeds: list[int] | None) -> dict:
        b = len(samples)
        images = _batch_tensor((b, 3, self.size, self.size))
        labels = torch.full((b,), -1, dtype=torch.int64)
        targets, ok = [None] * b, []
        for i, s in enumerate(samples):
            img = None
            if s is not None:
                rng = random.Random(seeds[i]) if seeds is not None and self.crop == "random" else None
                img = _decode_fixed(s[1], self.size, self.crop, rng)
            if img is None:
                self.bad += 1
                self.first_bad = self.first_bad or (s[0] if s is not None else "an unreadable sample")
                continue
            _put(images, i, img)
            labels[i], targets[i] = s[2], s[3]
            ok.append(i)
        if len(ok) < b:
            if not ok:
                raise DataError(f"{self.name}: no image of a batch of {b} could be read (first: {self.first_bad})")
            good = set(ok)
            for j, i in enumerate(i for i in range(b) if i not in good):
                src = ok[j % len(ok)]
                images[i], labels[i], targets[i] = images[src], labels[src], targets[src]
            if not self.warned:
                self.warned = True
                warnings.warn(f"{self.name}: skipped a sample that could not be read or decoded ({self.first_bad}); "
                              "its slot took another image of the batch (one warning per reader)", stacklevel=2)
        tgt = None
        if targets[0] is not None:
            tgt = torch.tensor([list(np.ravel(t)) for t in targets], dtype=torch.float32)
        return {"images": images, "labels": labels, "targets": tgt, "skipped": b - len(ok)}


class _TrainStream(torch.utils.data.IterableDataset):
    """Worker k of K yields the groups first_group + k, + K, ...: each item is (first step, [this rank's batches of
    the group's steps]), built from one block of each of the rank's streams."""

    def __init__(self, ds: StreamingDataset, plan: _Plan, rank: int, first_group: int):
        self.ds, self.plan, self.rank, self.first_group = ds, plan, rank, first_group

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        k, workers = (0, 1) if info is None else (info.id, info.num_workers)
        plan, ds = self.plan, self.ds
        collate = _Collator(ds)
        readers = {j: UnitReader() for j in plan.streams(self.rank)}
        gid = self.first_group + k
        try:
            while True:
                epoch, g, first, n = plan.group_steps(gid)
                blocks = {j: self._read_block(readers[j], epoch, j, g, n) for j in readers}
                batches = []
                for t in range(n):
                    samples, seeds = [], []
                    for j, (block, positions) in blocks.items():
                        samples += block[t * plan.c:(t + 1) * plan.c]
                        if ds.crop == "random":  # a crop seeded by the sample's position in the epoch
                            seeds += [hash_seed(plan.seed, epoch, p) for p in positions[t * plan.c:(t + 1) * plan.c]]
                    batches.append(collate(samples, seeds or None))
                yield first, batches
                gid += workers
        finally:
            for reader in readers.values():
                reader.close()

    def _read_block(self, reader, epoch, j, g, n):
        """The block's samples in their shuffled order, and the virtual position of each (seeds its random crop)."""
        plan, ds = self.plan, self.ds
        start, size = plan.block(epoch, j, g, n)
        if ds.random_access:  # a folder: one permutation of every file per epoch, so no block shuffle
            perm = self._epoch_permutation(epoch)
            return [ds.read_at(reader, int(perm[p])) for p in range(start, start + size)], \
                list(range(start, start + size))
        raw = []
        for u, off, length in plan.block_segments(epoch, start, size):
            raw += reader.read(ds.units[u], off, length)
        perm = block_permutation(size, plan.seed, epoch, j, g)
        return [raw[i] for i in perm], [start + i for i in perm]

    def _epoch_permutation(self, epoch):
        if getattr(self, "_perm_epoch", None) != epoch:
            g = torch.Generator().manual_seed(hash_seed(self.plan.seed, "files", epoch) & (2**63 - 1))
            self._perm, self._perm_epoch = torch.randperm(len(self.ds), generator=g), epoch
        return self._perm


class _StoredOrder(torch.utils.data.IterableDataset):
    """Batches of the stored order; worker i of L yields batches i, i + L, ... (the loader interleaves them back)."""

    def __init__(self, ds: StreamingDataset, batch_size: int):
        self.ds, self.b = ds, int(batch_size)
        self.counts = [u.count for u in ds.units]
        self.order = list(range(len(self.counts)))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        i, lanes = (0, 1) if info is None else (info.id, info.num_workers)
        n = len(self.ds)
        collate, reader = _Collator(self.ds), UnitReader()
        try:
            for a in range(i * self.b, n, lanes * self.b):
                samples = []
                for u, off, length in segments(self.ds.starts, self.counts, self.order, a, min(self.b, n - a)):
                    samples += reader.read(self.ds.units[u], off, length)
                yield collate(samples, None)
        finally:
            reader.close()


def worker_error(e: Exception, what: str) -> Exception:
    """A DataError of one sentence from an error of a DataLoader worker (which arrives wrapped in its traceback);
    other errors of the loader (a crashed worker) are RuntimeErrors and are passed on as they are."""
    text = str(e).strip()
    if isinstance(e, DataError) and "Original Traceback" not in text:
        return e
    if isinstance(e, DataError) or "DataError" in text or isinstance(e, OSError):
        last = text.splitlines()[-1] if text else type(e).__name__
        return DataError(f"{what}: {last.split('Error: ', 1)[-1]}")
    return e


def _loader(dataset, workers: int, pin: bool):
    kw = dict(batch_size=None, num_workers=workers, pin_memory=pin)
    if workers > 0:
        kw.update(prefetch_factor=2, persistent_workers=False)  # the platform's start method (fork on Linux)
    return torch.utils.data.DataLoader(dataset, **kw)


class StreamBatches:
    """The loop's `batches(step, device)` for a streaming dataset. Steps are expected in order (a jump, such as the
    first step after a resume, restarts the workers at that step's group)."""

    def __init__(self, ds: StreamingDataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ConfigError(f"train.batch_size {batch_size} must be divisible by the {world_size} processes")
        lanes = ds.lanes if ds.lanes is not None else default_lanes(batch_size)
        if ds.lanes is None and lanes % world_size:
            raise ConfigError(f"streaming across {world_size} processes needs data.options.lanes: a multiple of "
                              f"{world_size} that divides train.batch_size {batch_size}")
        self.ds, self.workers, self.rank = ds, ds.workers, rank
        self.plan = _Plan([u.count for u in ds.units], batch_size, seed, world_size, lanes, ds.shuffle_block)
        self.steps_per_epoch = self.plan.steps
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train.batch_size {batch_size} is larger than the {len(ds)} training images")
        self._it, self._first, self._group, self.skipped = None, None, [], 0

    def __call__(self, step: int, device: torch.device | str = "cpu") -> dict:
        if self._first is None or not self._first <= step < self._first + len(self._group):
            if self._it is None or step != self._first + len(self._group):
                self.close()
                pin = torch.device(device).type == "cuda"
                loader = _loader(_TrainStream(self.ds, self.plan, self.rank, self.plan.group_of(step)), self.workers, pin)
                self._it = iter(loader)
            self._first, self._group = self._next_group()
            for b in self._group:
                self.skipped += int(b.pop("skipped", 0))
        batch = self._group[step - self._first]
        return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def _next_group(self):
        try:
            return next(self._it)
        except (DataError, OSError, RuntimeError) as e:
            self.close()
            raise worker_error(e, f"{self.ds.name}: reading its images failed") from None

    def close(self) -> None:
        it, self._it = self._it, None
        self._first, self._group = None, []
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


# ----------------------------------------------------------------------------------------------
# the sources: `shards`, and `imagefolder` with stream=true
# ----------------------------------------------------------------------------------------------
def _check_size(name: str, image_size: int | None, packed: int | None) -> int:
    size = image_size or packed
    if not size:
        raise ConfigError(f"{name} streams images of many sizes; set data.image_size (such as 224) to decode them to")
    return int(size)


def _read_index(where: str) -> dict | None:
    """index.json at a folder or URL base, or None where there is none."""
    try:
        if is_url(where):
            import webdataset as wds

            with wds.gopen(where.rstrip("/") + "/" + INDEX_NAME, "rb") as f:
                data = f.read()
        else:
            p = Path(where) / INDEX_NAME
            if not p.is_file():
                return None
            data = p.read_bytes()
        index = json.loads(data)
    except (OSError, ValueError, Exception):  # noqa: BLE001 -- a missing or unreadable index is reported by the caller
        return None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        return None
    return index


def _local(url: str) -> Path | None:
    if is_url(url):
        return None
    return Path(url[len("file://"):] if url.startswith("file://") else url).expanduser()


def _scan_shard(url: str) -> tuple[int, list[int], list]:
    """(count, labels, targets) of one local shard without an index: one pass over its headers and label members
    (images are skipped unread)."""
    reader, labels, targets = UnitReader(), [], []
    unit = Unit(url, 1 << 62)
    try:
        reader._open(unit)
        while True:
            s = reader._next_sample(keep=True, only=("cls", "json"))  # labels only: images are skipped unread
            if s is False:
                break
            labels.append(-1 if s is None else s[2])
            targets.append(None if s is None else s[3])
    finally:
        reader.close()
    return len(labels), labels, targets


def load_shards(*, split: str, root, image_size: int | None, workers: int | None = None, crop: str = "center",
                shuffle_block: int = 1024, lanes: int | None = None) -> StreamingDataset:
    if root is None or str(root) == "":
        raise DataError("dataset 'shards' needs data.root: the folder `visrep data pack` wrote, or a brace pattern "
                        "such as shards/train-{000000..000009}.tar")
    root = str(root)
    local = _local(root)
    if local is not None and local.is_dir() or (is_url(root) and not root.endswith((".tar", "}"))):
        index = _read_index(str(local) if local is not None else root)
        if index is None:
            raise DataError(f"{root} holds no {INDEX_NAME} of `visrep data pack`; pass a brace pattern of the shards "
                            "instead (such as shards/train-{000000..000009}.tar)")
        if split not in index["splits"]:
            raise ConfigError(f"unknown split '{split}' for shards at {root}; valid splits: "
                              f"{', '.join(sorted(index['splits']))}")
        base = str(local) if local is not None else root.rstrip("/")
        entry = index["splits"][split]
        urls = [f"{base}/{s}" for s in entry["shards"]]
        counts, (labels, targets) = list(entry["counts"]), _index_labels(index, entry, base)
    else:
        urls = expand_pattern(root)
        base = str(local.parent) if local is not None else root.rsplit("/", 1)[0]
        index = _read_index(base)
        entry = _entry_for(index, urls) if index else None
        if entry is not None:
            counts, (labels, targets) = list(entry["counts"]), _index_labels(index, entry, base)
        elif local is None:
            raise DataError(f"the shards at {root} have no {INDEX_NAME} beside them; streaming needs each shard's "
                            f"sample count (`visrep data pack` writes it)")
        else:
            counts, labels, targets = [], [], []
            for u in urls:
                if not Path(u).is_file():
                    raise DataError(f"shard {u} named by data.root does not exist")
                c, lab, tg = _scan_shard(u)
                counts.append(c), labels.extend(lab), targets.extend(tg)
            targets = None if not targets or any(t is None for t in targets) else targets
            warnings.warn(f"no {INDEX_NAME} beside {root}: counted the samples of its {len(urls)} shards by reading "
                          f"them (`visrep data pack` writes an index)", stacklevel=3)
            index = {"classes": None}
    for u in urls:
        p = _local(u)
        if p is not None and not p.is_file():
            raise DataError(f"shard {u} named by data.root does not exist")
    classes = (index or {}).get("classes") or [str(c) for c in range(max(labels, default=-1) + 1)]
    size = _check_size("dataset 'shards'", image_size, (index or {}).get("image_size"))
    units = [Unit(u, int(c)) for u, c in zip(urls, counts)]
    meta = {"source": root, "split": split, "n_skipped": 0, "shards": len(units), "dataset": "shards",
            "packed_from": (index or {}).get("dataset")}
    return StreamingDataset(units, labels, classes, f"shards/{split}", size, targets=targets, meta=meta,
                            workers=workers, crop=crop, shuffle_block=shuffle_block, lanes=lanes)


def _entry_for(index: dict, urls: list[str]) -> dict | None:
    """The index's split whose shards are exactly these (by file name), or the matching part of one."""
    names = [u.rsplit("/", 1)[-1] for u in urls]
    for entry in index["splits"].values():
        pos = {s: i for i, s in enumerate(entry["shards"])}
        if all(n in pos for n in names):
            idx = [pos[n] for n in names]
            starts = np.concatenate([[0], np.cumsum(entry["counts"])[:-1]]).tolist()
            return {**entry, "counts": [entry["counts"][i] for i in idx], "_pick": [(starts[i], entry["counts"][i])
                                                                                   for i in idx]}
    return None


def _index_labels(index: dict, entry: dict, base: str):
    labels = np.asarray(entry["labels"], dtype=np.int64)
    targets = np.asarray(entry["targets"], dtype=np.float32) if entry.get("targets") is not None else None
    if "_pick" in entry:  # a subset of a split's shards
        idx = np.concatenate([np.arange(a, a + n) for a, n in entry["_pick"]]) if entry["_pick"] else np.zeros(0, int)
        labels = labels[idx]
        targets = targets[idx] if targets is not None else None
    return labels, targets


def stream_imagefolder(src: Path, split: str, image_size: int | None, *, selected: list, classes: list[str],
                       info: dict, workers: int | None, crop: str, shuffle_block: int, lanes: int | None) -> StreamingDataset:
    """A large class-per-folder tree (ImageNet's train/<synset>/*.JPEG, val/<synset>/) read in place. Stored order (the
    order of evaluation): the files in one fixed shuffled order, cut into units of FOLDER_UNIT files; training reads
    them in a new permutation every epoch (random access)."""
    size = _check_size(f"imagefolder {src} with stream=true", image_size, None)
    cidx = {c: i for i, c in enumerate(classes)}
    selected = sorted(selected, key=lambda cp: "/".join(cp[1]))
    order = torch.randperm(len(selected), generator=torch.Generator().manual_seed(0)).tolist()
    files = [str(src.joinpath(*selected[i][1])) for i in order]
    labels = [cidx[selected[i][0]] for i in order]
    units = [Unit(f"{src}#{k}", len(files[k:k + FOLDER_UNIT]), tuple(files[k:k + FOLDER_UNIT]),
                  tuple(labels[k:k + FOLDER_UNIT])) for k in range(0, len(files), FOLDER_UNIT)]
    meta = {"source": str(src.resolve()), "split": split, "n_skipped": 0, **info}
    names = _synset_names(src, classes)
    if names:
        meta["class_names"] = names
    return StreamingDataset(units, labels, classes, f"{src.name}/{split}", size, meta=meta, workers=workers,
                            crop=crop, shuffle_block=shuffle_block, lanes=lanes, random_access=True)


def _synset_names(src: Path, classes: list[str]) -> list[str] | None:
    """ImageNet's readable class names from LOC_synset_mapping.txt ("n01440764 tench, Tinca tinca"), if present; the
    class index itself is the sorted synset folders, as in torchvision's ImageFolder and timm's 1000-class heads."""
    for p in (src / "LOC_synset_mapping.txt", src.parent / "LOC_synset_mapping.txt"):
        if p.is_file():
            m = {}
            for line in p.read_text(errors="replace").splitlines():
                wnid, _, name = line.strip().partition(" ")
                if wnid:
                    m[wnid] = name
            return [m.get(c, c) for c in classes]
    return None
