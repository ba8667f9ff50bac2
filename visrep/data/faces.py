"""Face transfer targets: UTKFace (age, age group, gender, race) and MTFL (gender, smile, glasses, pose,
five landmarks), read from their archives (or extracted folders) in place.

    load_dataset("utkface", "train", "../shared/data/faces", task="age")       # targets: age in years
    load_dataset("mtfl", "test", "../shared/data/faces", task="landmarks", image_size=64)

Regression tasks (`utkface` age, `mtfl` landmarks) put float targets in `ImageDataset.targets` and a
grouping in `labels` (age groups; head pose), so class-balanced subsets and the monitors still work.
Malformed records (a file name without all labels, a short annotation line, an image that does not
decode) are skipped, counted in `meta["n_malformed"]`, listed in `meta["malformed"]` and reported
once as a warning: one bad record never stops a run.

Neither dataset has a stable download URL, so `download` cannot fetch them: the error says where they
come from (see each function's docstring).
"""
from __future__ import annotations

import hashlib
import json
import re
import tarfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from visrep.data.sources import (SOURCES, ImageDataset, _cached, _check_split, _decode_items, _member_parts,
                                 _resize_uint8)
from visrep.errors import ConfigError, DataError

# Age groups commonly used with UTKFace (children, then decades); the label of task `age_group`.
AGE_GROUPS = ((0, 2), (3, 9), (10, 19), (20, 29), (30, 39), (40, 49), (50, 59), (60, 69), (70, 200))
AGE_GROUP_NAMES = [f"{lo}-{hi}" if hi < 200 else f"{lo}+" for lo, hi in AGE_GROUPS]
UTK_RACES = ["white", "black", "asian", "indian", "other"]
_UTK_NAME = re.compile(r"^(\d{1,3})_([01])_([0-4])_(\d+)\.jpg\.chip\.jpg$")
_FORMAT = "faces-v1"


def age_group(age: torch.Tensor) -> torch.Tensor:
    """Index into AGE_GROUPS of each age (years)."""
    edges = torch.tensor([hi for _, hi in AGE_GROUPS[:-1]], dtype=torch.float32)
    return torch.bucketize(age.float(), edges, right=False)  # lo <= age <= hi


def _find(root: Path | None, archive: str, folder: str, dataset: str, origin: str) -> Path:
    """The archive or extracted folder of a face dataset under `root` (or `root` itself)."""
    if root is None:
        raise DataError(f"{dataset} needs its data: pass --data-dir (or data.root, or $VISREP_DATA) pointing at "
                        f"the folder holding {archive}; {origin}")
    candidates = [root, root / archive, root / "faces" / archive, root / folder, root / archive.split(".")[0] / folder]
    for c in candidates:
        if c.is_file() and c.name.endswith((".tar.gz", ".tgz", ".tar")):
            return c
        if c.is_dir() and (c.name == folder or (c / folder).is_dir()):
            return c if c.name == folder else c / folder
    raise DataError(f"{dataset}: found neither {archive} nor a {folder}/ folder under {root}; {origin}")


def _members(src: Path, want) -> dict[str, bytes]:
    """{relative path: bytes} of the files `want(path)` accepts, from an archive or a folder."""
    out = {}
    if src.is_file():
        try:
            with tarfile.open(src, "r:*") as tf:
                for m in tf:
                    if m.isfile():
                        parts = _member_parts(m.name)
                        # paths relative to the dataset folder (drop e.g. "utkface-96/UTKFace/")
                        rel = "/".join(parts)
                        if want(rel):
                            f = tf.extractfile(m)
                            out[rel] = f.read() if f is not None else b""
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"cannot read archive {src} ({type(e).__name__}: {e})") from None
    else:
        for p in sorted(src.rglob("*")):
            rel = f"{src.name}/{p.relative_to(src).as_posix()}"
            if p.is_file() and want(rel):
                out[rel] = p.read_bytes()
    return out


def _key(src: Path, *parts) -> str:
    st = src.stat()
    return hashlib.sha1(json.dumps([_FORMAT, str(src.resolve()), st.st_size, st.st_mtime_ns, *parts]).encode()
                        ).hexdigest()


def _square(img: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Zero-pad uint8 [3, H, W] to a centred square; returns (square, pad_left, pad_top)."""
    _, h, w = img.shape
    s = max(h, w)
    left, top = (s - w) // 2, (s - h) // 2
    if s == h == w:
        return img, 0, 0
    return F.pad(img, (left, s - w - left, top, s - h - top)), left, top


def _decode_square(items: list[bytes], image_size: int, workers: int):
    """Decode JPEG bytes, pad to a square and resize: (list of uint8 [3,S,S] or None, per-item (side, left, top))."""
    from visrep.data.sources import _decode

    def work(chunk):
        out = []
        for b in chunk:
            img = _decode(b, None)
            if img is None:
                out.append((None, None))
                continue
            sq, left, top = _square(img)
            side = int(sq.shape[-1])
            out.append((_resize_uint8(sq.unsqueeze(0), image_size)[0].contiguous(), (side, left, top)))
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _decode_items(items, work, workers)


def _report(dataset: str, malformed: list[str]) -> None:
    if malformed:
        warnings.warn(f"{dataset}: skipped {len(malformed)} malformed record(s) (first: {malformed[0]})",
                      stacklevel=4)


def _check_common(dataset, task, tasks, workers):
    if task not in tasks:
        raise ConfigError(f"unknown task '{task}' for dataset '{dataset}'; valid tasks: {', '.join(tasks)}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"{dataset} option 'workers' must be an integer >= 1, got {workers!r}")


# --------------------------------------------------------------------------------------------- UTKFace
@SOURCES.register("utkface")
def utkface(*, split: str, root: Path | None, image_size: int | None, download: bool, task: str = "gender",
            test_fraction: float = 0.2, split_seed: int = 0, cache: bool = True, workers: int = 2) -> ImageDataset:
    """UTKFace (Zhang, Song & Qi, CVPR 2017) from `utkface-96.tar.gz` (or an extracted UTKFace/ folder).

    Labels come from `age_gender_race_datetime.jpg.chip.jpg`. task: gender (0 male, 1 female) | race
    (white, black, asian, indian, other) | age_group (AGE_GROUPS) | age (regression target in years;
    labels = age group). There is no official split: a permutation seeded by `split_seed` puts
    `test_fraction` of the (sorted) files in `test`, the rest in `train`; both are recorded in meta.
    """
    _check_split("utkface", split)
    _check_common("utkface", task, ("gender", "race", "age_group", "age"), workers)
    if not 0 < float(test_fraction) < 1:
        raise ConfigError(f"utkface option 'test_fraction' must be in (0, 1), got {test_fraction!r}")
    origin = ("UTKFace has no stable download URL: get it from https://susanqq.github.io/UTKFace/ "
              "(aligned & cropped faces)")
    src = _find(root, "utkface-96.tar.gz", "UTKFace", "utkface", origin)
    size = int(image_size or 96)
    key = _key(src, "utkface", size)

    def build() -> dict:
        blobs = _members(src, lambda rel: rel.lower().endswith(".jpg"))
        if not blobs:
            raise DataError(f"utkface: no .jpg files in {src}")
        names = sorted(blobs)
        malformed, good = [], []
        for rel in names:
            m = _UTK_NAME.match(rel.rsplit("/", 1)[-1])
            if m is None or not 1 <= int(m.group(1)) <= 116:
                malformed.append(f"{rel}: file name is not age_gender_race_datetime.jpg.chip.jpg")
            else:
                good.append((rel, int(m.group(1)), int(m.group(2)), int(m.group(3))))
        decoded = _decode_square([blobs[g[0]] for g in good], size, workers)
        del blobs
        keep = []
        for g, (img, _) in zip(good, decoded):
            if img is None:
                malformed.append(f"{g[0]}: image does not decode")
            else:
                keep.append((g, img))
        if not keep:
            raise DataError(f"utkface: none of the images in {src} could be read")
        return {
            "images": torch.stack([img for _, img in keep]).numpy(),
            "age": np.array([g[1] for g, _ in keep], dtype=np.int64),
            "gender": np.array([g[2] for g, _ in keep], dtype=np.int64),
            "race": np.array([g[3] for g, _ in keep], dtype=np.int64),
            "names": np.array([g[0] for g, _ in keep], dtype=np.str_),
            "malformed": np.array(malformed, dtype=np.str_) if malformed else np.zeros((0,), dtype="<U1"),
        }

    arrays, status = _cached(key, build, cache)
    malformed = [str(s) for s in arrays["malformed"].tolist()]
    _report("utkface", malformed)
    n = len(arrays["age"])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(split_seed)))
    n_test = int(n * float(test_fraction))
    index = (perm[:n_test] if split == "test" else perm[n_test:]).sort().values
    age = torch.from_numpy(arrays["age"])[index]
    targets = None
    if task == "gender":
        labels, classes = torch.from_numpy(arrays["gender"])[index], ["male", "female"]
    elif task == "race":
        labels, classes = torch.from_numpy(arrays["race"])[index], list(UTK_RACES)
    else:
        labels, classes = age_group(age), list(AGE_GROUP_NAMES)
        if task == "age":
            targets = age.float().unsqueeze(1)
    images = torch.from_numpy(np.ascontiguousarray(arrays["images"]))[index]
    meta = {"source": str(src.resolve()), "task": task, "task_type": "regression" if task == "age" else "classification",
            "target_names": ["age"] if task == "age" else None, "split_seed": int(split_seed),
            "test_fraction": float(test_fraction), "n_total": n, "n_malformed": len(malformed),
            "malformed": malformed[:20],
            "split_hash": hashlib.sha1(index.numpy().tobytes()).hexdigest()[:16],
            "cache_hit": status == "hit", "cache": status}
    return ImageDataset(images, labels, classes, f"utkface-{task}/{split}", meta, targets)


# ------------------------------------------------------------------------------------------------ MTFL
MTFL_LANDMARKS = ["left_eye", "right_eye", "nose", "mouth_left", "mouth_right"]
MTFL_POSES = ["left_profile", "left", "frontal", "right", "right_profile"]
_MTFL_CLASSES = {"gender": ["male", "female"], "smile": ["smiling", "not_smiling"],
                 "glasses": ["glasses", "no_glasses"], "pose": MTFL_POSES}


@SOURCES.register("mtfl")
def mtfl(*, split: str, root: Path | None, image_size: int | None, download: bool, task: str = "gender",
         cache: bool = True, workers: int = 2) -> ImageDataset:
    """MTFL (Zhang, Luo, Loy & Tang, ECCV 2014) from `mtfl-128.tar.gz` (or an extracted MTFL/ folder).

    train = training.txt (10,000 faces), test = testing.txt (2,995). Each line:
    `path x1..x5 y1..y5 gender smile glasses pose` (Windows line ends, leading spaces and backslash paths
    are accepted). task: gender | smile | glasses | pose (classification, the file's 1-based codes made
    0-based) | landmarks (regression target: the five points as x1..x5, y1..y5 in [0, 1] of the square
    image; labels = head pose). Non-square images are zero-padded to a centred square first, so the
    coordinates keep their aspect ratio; the inter-ocular distance for NME is |p1 - p2|.
    """
    _check_split("mtfl", split)
    _check_common("mtfl", task, ("gender", "smile", "glasses", "pose", "landmarks"), workers)
    origin = "MTFL: http://mmlab.ie.cuhk.edu.hk/projects/TCDCN.html"
    src = _find(root, "mtfl-128.tar.gz", "MTFL", "mtfl", origin)
    size = int(image_size or 128)
    key = _key(src, "mtfl", split, size)

    def build() -> dict:
        list_name = "training.txt" if split == "train" else "testing.txt"
        blobs = _members(src, lambda rel: rel.lower().endswith((".jpg", f"/{list_name}")))
        lists = [k for k in blobs if k.endswith(f"/{list_name}")]
        if not lists:
            raise DataError(f"mtfl: {list_name} is missing from {src}")
        text = blobs[lists[0]].decode("utf-8", errors="replace")
        base = lists[0].rsplit("/", 1)[0]
        malformed, records = [], []
        for no, line in enumerate(text.splitlines(), 1):
            fields = line.strip().split()
            if not fields:
                continue
            where = f"{list_name}:{no}"
            if len(fields) != 15:
                malformed.append(f"{where}: {len(fields)} fields, expected 15")
                continue
            try:
                pts = [float(v) for v in fields[1:11]]
                attrs = [int(v) for v in fields[11:15]]
            except ValueError:
                malformed.append(f"{where}: a non-numeric field")
                continue
            if not all(a in (1, 2) for a in attrs[:3]) or not 1 <= attrs[3] <= 5:
                malformed.append(f"{where}: attribute codes out of range {attrs}")
                continue
            rel = f"{base}/{fields[0].replace(chr(92), '/')}"
            if rel not in blobs:
                malformed.append(f"{where}: image {fields[0]} is missing")
                continue
            records.append((rel, pts, [a - 1 for a in attrs]))
        decoded = _decode_square([blobs[r[0]] for r in records], size, workers)
        del blobs
        imgs, pts, attrs, names = [], [], [], []
        for (rel, p, a), (img, frame) in zip(records, decoded):
            if img is None:
                malformed.append(f"{rel}: image does not decode")
                continue
            side, left, top = frame
            xy = np.array(p, dtype=np.float32)
            xy[:5] = (xy[:5] + left) / side
            xy[5:] = (xy[5:] + top) / side
            imgs.append(img), pts.append(xy), attrs.append(a), names.append(rel)
        if not imgs:
            raise DataError(f"mtfl: none of the {split} images in {src} could be read")
        return {"images": torch.stack(imgs).numpy(), "landmarks": np.stack(pts),
                "attrs": np.array(attrs, dtype=np.int64), "names": np.array(names, dtype=np.str_),
                "malformed": np.array(malformed, dtype=np.str_) if malformed else np.zeros((0,), dtype="<U1")}

    arrays, status = _cached(key, build, cache)
    malformed = [str(s) for s in arrays["malformed"].tolist()]
    _report("mtfl", malformed)
    attrs = torch.from_numpy(arrays["attrs"])
    column = {"gender": 0, "smile": 1, "glasses": 2, "pose": 3, "landmarks": 3}[task]
    targets = torch.from_numpy(arrays["landmarks"]) if task == "landmarks" else None
    meta = {"source": str(src.resolve()), "task": task,
            "task_type": "landmarks" if task == "landmarks" else "classification",
            "target_names": ([f"x_{n}" for n in MTFL_LANDMARKS] + [f"y_{n}" for n in MTFL_LANDMARKS])
            if task == "landmarks" else None,
            "n_malformed": len(malformed), "malformed": malformed[:20],
            "cache_hit": status == "hit", "cache": status}
    classes = MTFL_POSES if task == "landmarks" else _MTFL_CLASSES[task]
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(arrays["images"])), attrs[:, column], list(classes),
                        f"mtfl-{task}/{split}", meta, targets)
