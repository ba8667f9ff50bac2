"""CIFAR-10 / CIFAR-100 python batches, read by visrep's own reader.

    images, labels, classes = read_split(CIFAR["cifar10"], Path("data/cifar-10-batches-py"), "train")

The official `cifar-10-python.tar.gz` / `cifar-100-python.tar.gz` hold pickled dicts. They are read
with `safe_pickle.load_arrays_pickle`, which can only rebuild numpy arrays and plain values, so a
crafted batch cannot run code: it is a DataError naming the file and what it asked for. Downloading
(`download`) goes through torchvision's `download_and_extract_archive` with torchvision's URL and md5,
and removes whatever a failed attempt created.
"""
from __future__ import annotations

import contextlib
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from visrep.data.safe_pickle import ForbiddenGlobal, load_arrays_pickle
from visrep.errors import DataError

__all__ = ["CIFAR", "CifarFormat", "download", "missing_files", "read_split", "verify_files"]


@dataclass(frozen=True)
class CifarFormat:
    """The layout of one extracted CIFAR archive (file names and dict keys of the python batches)."""

    kind: str
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    names_key: str
    labels_key: str
    num_classes: int

    def files(self, split: str) -> tuple[str, ...]:
        return (self.train if split == "train" else self.test) + (self.meta,)

    def torchvision_class(self):
        """torchvision's dataset class: the source of the download URL and the md5 sums."""
        import torchvision.datasets as tvd

        return tvd.CIFAR10 if self.kind == "cifar10" else tvd.CIFAR100


CIFAR = {
    "cifar10": CifarFormat("cifar10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                           ("test_batch",), "batches.meta", "label_names", "labels", 10),
    "cifar100": CifarFormat("cifar100", "cifar-100-python", ("train",), ("test",), "meta",
                            "fine_label_names", "fine_labels", 100),
}
_REREAD = "delete that folder and download again, or point --data-dir / VISREP_DATA at a good copy"


# ----------------------------------------------------------------------------------------- reading
def _unpickle(fmt: CifarFormat, path: Path) -> dict:
    try:
        obj = load_arrays_pickle(path)
    except ForbiddenGlobal as e:
        raise DataError(f"{fmt.kind}: refusing to read {path}: it asks pickle to call '{e.name}', which a CIFAR "
                        f"batch never needs, so nothing in it was run; replace it with an original copy") from None
    except Exception as e:  # noqa: BLE001 -- truncated, not a pickle, unreadable: all user-fixable
        reason = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        raise DataError(f"{fmt.kind} file {path} could not be read ({reason}); {_REREAD}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{fmt.kind} file {path} could not be read (a {type(obj).__name__}, not a dict); {_REREAD}")
    # Python 2 pickles read as latin-1 give str keys; Python 3 ones written with bytes keys keep them
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _entry(fmt: CifarFormat, batch: dict, key: str, path: Path):
    if key not in batch:
        raise DataError(f"{fmt.kind} file {path} could not be read (no '{key}' entry); {_REREAD}")
    return batch[key]


def _read_batch(fmt: CifarFormat, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, 3, 32, 32], int64 [N]) of one batch file, checked against the CIFAR format."""
    batch = _unpickle(fmt, path)
    data, labels = _entry(fmt, batch, "data", path), _entry(fmt, batch, fmt.labels_key, path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.size % 3072:
        raise DataError(f"{fmt.kind} file {path} could not be read ('data' is not uint8 rows of 3072 pixels); "
                        f"{_REREAD}")
    images = data.reshape(-1, 3, 32, 32)
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        labels = None
    in_range = labels is not None and (not len(labels) or 0 <= labels.min() <= labels.max() < fmt.num_classes)
    if not in_range or len(labels) != len(images):
        raise DataError(f"{fmt.kind} file {path} could not be read ('{fmt.labels_key}' is not {len(images)} labels "
                        f"in 0..{fmt.num_classes - 1}); {_REREAD}")
    return images, labels


def _read_names(fmt: CifarFormat, path: Path) -> list[str]:
    names = _entry(fmt, _unpickle(fmt, path), fmt.names_key, path)
    names = names if isinstance(names, (list, tuple)) else []
    names = [n.decode("latin1") if isinstance(n, bytes) else n for n in names]
    if len(names) != fmt.num_classes or not all(isinstance(n, str) for n in names):
        raise DataError(f"{fmt.kind} file {path} could not be read ('{fmt.names_key}' is not "
                        f"{fmt.num_classes} class names); {_REREAD}")
    return names


def read_split(fmt: CifarFormat, where: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(uint8 images [N, 3, 32, 32], int64 labels [N], class names) of `split` from the folder `where`."""
    batches = [_read_batch(fmt, where / name) for name in (fmt.train if split == "train" else fmt.test)]
    classes = _read_names(fmt, where / fmt.meta)
    images = np.ascontiguousarray(np.concatenate([b[0] for b in batches]))
    labels = np.concatenate([b[1] for b in batches])
    return torch.from_numpy(images), torch.from_numpy(labels), classes


def missing_files(fmt: CifarFormat, where: Path) -> list[str]:
    """The files of the full dataset (both splits and the meta file) that are not in `where`."""
    return [f for f in fmt.train + fmt.test + (fmt.meta,) if not (where / f).is_file()]


def verify_files(fmt: CifarFormat, where: Path, split: str) -> None:
    """Check the md5 of `split`'s files (and the meta file) against torchvision's list."""
    from torchvision.datasets.utils import check_integrity

    tv = fmt.torchvision_class()
    md5 = {name: digest for name, digest in tv.train_list + tv.test_list}
    md5[tv.meta["filename"]] = tv.meta["md5"]
    bad = [f for f in fmt.files(split) if not check_integrity(str(where / f), md5[f])]
    if bad:
        raise DataError(f"{fmt.kind} file {where / bad[0]} does not match the official md5 sum; {_REREAD}")


# ----------------------------------------------------------------------------------------- download
def _topmost_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (what a download would create), or None."""
    top, p = None, path.absolute()
    while not p.exists():
        top = p
        if p.parent == p:
            break
        p = p.parent
    return top


def _remove_new(paths_before: dict[Path, bool], created: Path | None) -> None:
    """Remove what a failed download left: the folder it created, else the files/folders that are new."""
    with contextlib.suppress(OSError):
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
            return
        for p, existed in paths_before.items():
            if existed or not (p.exists() or p.is_symlink()):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink()


def download(fmt: CifarFormat, root: Path, fix: str) -> None:
    """Download and extract the official archive into `root` (md5-checked by torchvision); on failure
    remove whatever the attempt created and raise a DataError (`fix` says how to provide the files)."""
    from torchvision.datasets import utils as tvu

    tv = fmt.torchvision_class()
    created = _topmost_missing(root)
    before = {p: p.exists() for p in (root / tv.filename, root / fmt.folder)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tvu.download_and_extract_archive(tv.url, str(root), filename=tv.filename, md5=tv.tgz_md5)
    except Exception as exc:  # noqa: BLE001 -- network, disk, md5: all user-fixable
        _remove_new(before, created)
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        raise DataError(f"{fmt.kind} not found in {root / fmt.folder}/ and the download failed ({reason}); "
                        f"{fix}, or retry with network access") from None
    except BaseException:  # interrupted: leave nothing half-downloaded behind either
        _remove_new(before, created)
        raise
