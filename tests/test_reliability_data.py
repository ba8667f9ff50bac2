"""Data reliability: no code runs from a user's files, tree walks cannot loop or relabel, no train/test
leak from a class-folder tree, ignored data dirs are reported, shared caches are built once."""
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fake_utk_archive
from visrep.data import load_dataset
from visrep.errors import ConfigError, DataError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    monkeypatch.delenv("VISREP_DATA", raising=False)
    monkeypatch.setenv("VISREP_CACHE", str(tmp_path / "cache"))


def _one_sentence(msg: str) -> bool:
    return "\n" not in msg and ". " not in msg.rstrip(".")


# ------------------------------------------------------------------------------ A: CIFAR without pickle.load
class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (BINSTRING), the way the official CIFAR batches were written."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _dump(obj, path: Path, py2: bool = False) -> None:
    buf = io.BytesIO()
    (_Py2Pickler(buf, protocol=2) if py2 else pickle.Pickler(buf, protocol=2)).dump(obj)
    data = buf.getvalue()
    if py2:  # numpy 1.x names the array rebuilder numpy.core.multiarray, as in the official files
        data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    path.write_bytes(data)


def _fake_cifar10(root: Path, per_batch: int = 3) -> dict:
    """cifar-10-batches-py/ as Python 3 writes it at protocol 2: bytes keys, uint8 [N, 3072] data."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        _dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
               b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]}, d / name)
        batches[name] = (data, labels)
    _dump({b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_cases_per_batch": per_batch,
           b"num_vis": 3072}, d / "batches.meta")
    return batches


def test_cifar_real_format_batches_load_with_exact_pixels_and_labels(tmp_path):
    batches = _fake_cifar10(tmp_path / "data")
    tr = load_dataset("cifar10", "train", tmp_path / "data", download=False)
    te = load_dataset("cifar10", "test", tmp_path / "data", download=False)
    train_data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert tr.images.dtype == torch.uint8 and tr.images.shape == (15, 3, 32, 32)
    assert torch.equal(tr.images, torch.from_numpy(train_data.reshape(-1, 3, 32, 32)))
    assert tr.labels.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert torch.equal(te.images, torch.from_numpy(batches["test_batch"][0].reshape(-1, 3, 32, 32)))
    assert te.labels.tolist() == batches["test_batch"][1]
    assert tr.classes == te.classes == CIFAR10_NAMES and tr.name == "cifar10/train"
    with pytest.raises(DataError, match="official md5"):  # verify: these are not the official files
        load_dataset("cifar10", "test", tmp_path / "data", download=False, verify=True)
    # CIFAR-100 as the official files are: Python 2 strings, numpy 1.x global names, fine_labels
    d = tmp_path / "c100" / "cifar-100-python"
    d.mkdir(parents=True)
    data = np.random.default_rng(1).integers(0, 256, (4, 3072), dtype=np.uint8)
    _dump({b"filenames": [b"a.png"] * 4, b"batch_label": b"testing batch 1 of 1", b"fine_labels": [3, 99, 0, 7],
           b"coarse_labels": [0, 1, 2, 3], b"data": data}, d / "test", py2=True)
    _dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)], b"coarse_label_names": [b"x"] * 20},
          d / "meta", py2=True)
    _dump({b"data": data, b"fine_labels": [0] * 4}, d / "train", py2=True)
    c100 = load_dataset("cifar100", "test", tmp_path / "c100", download=False)
    assert torch.equal(c100.images, torch.from_numpy(data.reshape(-1, 3, 32, 32)))
    assert c100.labels.tolist() == [3, 99, 0, 7] and c100.classes[99] == "c99" and len(c100.classes) == 100


class _Exec:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


class _System:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("payload", [_Exec, _System], ids=["builtins.exec", "os.system"])
def test_crafted_cifar_batch_runs_nothing(tmp_path, payload):
    _fake_cifar10(tmp_path / "data")
    marker = tmp_path / "pwned"
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1"
    with open(batch, "wb") as f:
        pickle.dump({b"data": payload(marker), b"labels": [0]}, f, protocol=2)
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", "train", tmp_path / "data", download=False)
    assert not marker.exists()
    msg = str(err.value)
    assert "data_batch_1" in msg and (".exec'" in msg or ".system'" in msg) and _one_sentence(msg)


def _failing_download(monkeypatch, calls):
    """torchvision's download, offline: it creates the folder and a partial archive, then fails."""
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.utils as tv_utils

    def offline(url, download_root, extract_root=None, filename=None, md5=None, remove_finished=False):
        calls.append(url)
        os.makedirs(download_root, exist_ok=True)
        Path(download_root, filename or os.path.basename(url)).write_bytes(b"partial")
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline, raising=False)


def test_cifar_missing_dir_and_failed_download_leave_nothing_behind(tmp_path, monkeypatch):
    target = tmp_path / "new" / "data"
    with pytest.raises(DataError, match="enable download"):
        load_dataset("cifar10", "train", target, download=False)
    assert not (tmp_path / "new").exists()
    calls = []
    _failing_download(monkeypatch, calls)
    with pytest.raises(DataError, match="download failed") as err:
        load_dataset("cifar10", "train", target, download=True)
    assert calls and not (tmp_path / "new").exists() and _one_sentence(str(err.value))
    existing = tmp_path / "existing"
    (existing / "notes").mkdir(parents=True)
    with pytest.raises(DataError, match="download failed"):
        load_dataset("cifar100", "test", existing, download=True)
    assert sorted(p.name for p in existing.iterdir()) == ["notes"]  # the user's folder, as it was


def test_images_are_never_decoded_by_external_programs(tmp_path, monkeypatch):
    """PIL picks its decoder from the content: an EPS file named .png must not reach Ghostscript."""
    from PIL import EpsImagePlugin

    calls = []

    def ghostscript(*args, **kwargs):
        calls.append(args)
        raise OSError("Ghostscript would run here")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    tree = _tree(tmp_path / "t", {"cat": 2})
    (tree / "cat" / "evil.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        ds = load_dataset("imagefolder", "train", tree, cache=False)
    assert len(ds) == 2 and not calls


# ------------------------------------------------------------------------------ B: walking with links
def _colour_png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _tree(root: Path, counts: dict, start: int = 0) -> Path:
    """<class>/<i>.png with a distinct solid grey value per image, so each pixel names its file."""
    v = start
    for c, n in counts.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / c / f"{i:02d}.png").write_bytes(_colour_png(v))
            v += 1
    return root


def _by_class(ds) -> dict:
    """{class: sorted grey values of its images}."""
    out: dict = {}
    for img, lab in zip(ds.images, ds.labels.tolist()):
        out.setdefault(ds.classes[lab], []).append(int(img[0, 0, 0]))
    return {c: sorted(v) for c, v in out.items()}


def test_symlink_loop_gives_each_real_image_once_with_its_label(tmp_path):
    root = tmp_path / "data"
    _tree(root / "train", {"cat": 3, "dog": 2})
    _tree(root / "test", {"cat": 1, "dog": 1}, start=100)
    os.symlink("..", root / "train" / "cat" / "up")  # train/cat/up/dog/... would be "cat" images
    os.symlink("../../train/dog", root / "test" / "dog" / "leak")  # a link into the tree: never a 2nd copy
    with pytest.warns(UserWarning, match=r"skipped 2 directory links in .*\(first: test/dog/leak -> \.\./\.\./train/dog\)"):
        ds = load_dataset("imagefolder", "train", root)
    assert len(ds) == 5 and _by_class(ds) == {"cat": [0, 1, 2], "dog": [3, 4]}
    assert ds.meta["n_skipped_links"] == 2 and "train/cat/up -> .." in ds.meta["skipped_links"]
    with pytest.warns(UserWarning, match="directory links"):
        test = load_dataset("imagefolder", "test", root)
    assert _by_class(test) == {"cat": [100], "dog": [101]}


def test_symlinked_class_folder_outside_the_tree_is_read_once(tmp_path):
    root = _tree(tmp_path / "data" / "train", {"cat": 2}).parent
    birds = _tree(tmp_path / "elsewhere", {"birds": 3}, start=50) / "birds"
    os.symlink(birds, root / "train" / "bird")
    os.symlink(birds, root / "train" / "bird_again")  # the same folder through a second link
    with pytest.warns(UserWarning, match=r"skipped 1 directory links .*\(first: train/bird_again -> "):
        ds = load_dataset("imagefolder", "train", root)
    assert ds.classes == ["bird", "cat"] and _by_class(ds) == {"bird": [50, 51, 52], "cat": [0, 1]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a single link to an outside folder is legitimate: no warning
        os.unlink(root / "train" / "bird_again")
        assert _by_class(load_dataset("imagefolder", "train", root)) == {"bird": [50, 51, 52], "cat": [0, 1]}


# ------------------------------------------------------------------------------ C: no train/test leak
def test_class_folder_tree_has_no_test_split_without_test_fraction(tmp_path):
    tree = _tree(tmp_path / "flat", {"cat": 2, "dog": 2})
    assert len(load_dataset("imagefolder", "train", tree)) == 4  # pretraining reads the whole tree
    with pytest.raises(DataError, match="no split folders.*test_fraction") as err:
        load_dataset("imagefolder", "test", tree)
    assert _one_sentence(str(err.value))


def test_test_fraction_makes_a_seeded_stratified_disjoint_split(tmp_path):
    tree = _tree(tmp_path / "flat", {"a": 10, "b": 5, "c": 1})
    tr = load_dataset("imagefolder", "train", tree, test_fraction=0.2)
    te = load_dataset("imagefolder", "test", tree, test_fraction=0.2)
    train, test = _by_class(tr), _by_class(te)
    assert tr.classes == te.classes == ["a", "b", "c"]  # shared label space
    assert {c: len(v) for c, v in test.items()} == {"a": 2, "b": 1}  # per class; a lone image stays in train
    everything = sorted(sum(train.values(), []) + sum(test.values(), []))
    assert everything == list(range(16))  # disjoint and complete
    assert te.meta["test_fraction"] == 0.2 and te.meta["split_seed"] == 0
    again = load_dataset("imagefolder", "test", tree, test_fraction=0.2, cache=False)
    assert torch.equal(again.images, te.images)
    seeds = {tuple(sum(_by_class(load_dataset("imagefolder", "test", tree, test_fraction=0.2, split_seed=s)).values(), []))
             for s in range(4)}
    assert len(seeds) > 1  # the seed picks the split
    # the options are part of the cache key: another fraction is another entry, not a stale hit
    assert len(load_dataset("imagefolder", "test", tree, test_fraction=0.5)) == 8
    with pytest.raises(ConfigError, match="valid splits: train, test"):
        load_dataset("imagefolder", "val", tree, test_fraction=0.2)
    with pytest.raises(ConfigError, match="test_fraction"):
        load_dataset("imagefolder", "test", tree, test_fraction=1.5)
    split_tree = _tree(tmp_path / "split" / "train", {"a": 1}).parent
    _tree(split_tree / "test", {"a": 1})
    with pytest.raises(ConfigError, match="already has split folders"):
        load_dataset("imagefolder", "test", split_tree, test_fraction=0.2)


# ------------------------------------------------------------------------------ D: ignored data dirs
def test_bundled_and_generated_datasets_warn_about_an_explicit_data_dir(tmp_path, monkeypatch):
    for name, opts in (("digits", {}), ("synthetic", {"n": 8})):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            load_dataset(name, "train", tmp_path, **opts)
        msgs = [str(w.message) for w in rec]
        assert len(msgs) == 1 and "ignored" in msgs[0] and str(tmp_path) in msgs[0] and "\n" not in msgs[0]
    monkeypatch.setenv("VISREP_DATA", str(tmp_path))  # a general default, not a request for this dataset
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset("digits", "test")


# ------------------------------------------------------------------------------ E: shared caches
def test_failed_cache_writes_leave_no_temporary_files(tmp_path, monkeypatch):
    import safetensors.torch

    from visrep.evaluate.features import extract_features_with_info

    tree = _tree(tmp_path / "flat", {"a": 2})

    def half_written(file, **arrays):
        file.write(b"PK half")
        raise RuntimeError("disk went away")

    monkeypatch.setattr(np, "savez", half_written)
    with pytest.raises(RuntimeError):
        load_dataset("imagefolder", "train", tree)
    monkeypatch.undo()
    monkeypatch.setenv("VISREP_CACHE", str(tmp_path / "cache"))
    ds = load_dataset("imagefolder", "train", tree)

    def half_saved(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise RuntimeError("disk went away")

    monkeypatch.setattr(safetensors.torch, "save_file", half_saved)
    with pytest.raises(RuntimeError):
        extract_features_with_info(torch.nn.Flatten(), ds, image_size=4, model_fingerprint="flat",
                                   cache_dir=tmp_path / "cache" / "features", progress=False)
    left = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file() and not p.name.endswith(".lock"))
    assert left == [f"{ds.meta['cache_key']}.npz"]
    assert ds.meta["cache"] == "build" and load_dataset("imagefolder", "train", tree).meta["cache"] == "hit"


_RACE_PRELUDE = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    import numpy as np, torch
    torch.set_num_threads(1)
    from visrep.data import load_dataset

    out, me, data = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

    def barrier(name):  # both processes reach the same point before racing
        (out / f"{name}.{me}").touch()
        deadline = time.time() + 120
        while len(list(out.glob(name + ".*"))) < 2:
            if time.time() > deadline:
                sys.exit("barrier timeout")
            time.sleep(0.005)

    def slowed(fn):  # a build that takes long enough for the other process to find the entry missing
        def run(*a, **k):
            time.sleep(0.5)
            return fn(*a, **k)
        return run
""")

_RACER = _RACE_PRELUDE + textwrap.dedent("""
    import visrep.data.sources as sources
    import visrep.evaluate.features as features

    sources._decode_all = slowed(sources._decode_all)
    features._compute = slowed(features._compute)
    torch.manual_seed(0)  # the same tiny conv net in both processes (timm's resnet costs seconds to import)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten())
    barrier("data")
    ds = load_dataset("imagefolder", "train", data)
    barrier("features")
    feats, labels, info = features.extract_features_with_info(
        model, ds, image_size=16, batch_size=32, model_fingerprint="conv8-seed0", progress=False)
    np.savez(out / f"result-{me}.npz", images=ds.images.numpy(), labels=ds.labels.numpy(), feats=feats.numpy())
    (out / f"result-{me}.json").write_text(json.dumps({"dataset_hit": ds.meta["cache_hit"], "features": info["cache"]}))
    os._exit(0)  # skip torch's slow interpreter teardown
""")


def _race(tmp_path, script, data):
    """Runs `script` in two processes at once on one shared cache (argv: out folder, process number, `data`);
    returns each one's result-{i}.json and result-{i}.npz."""
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "VISREP_CACHE": str(tmp_path / "shared-cache"), "OMP_NUM_THREADS": "1"}
    env.pop("VISREP_DATA", None)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(out), str(i), str(data)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
    return ([json.loads((out / f"result-{i}.json").read_text()) for i in range(2)],
            [np.load(out / f"result-{i}.npz") for i in range(2)])


def test_two_processes_build_each_cache_entry_once(tmp_path):
    rng = np.random.default_rng(0)
    tree = tmp_path / "tree"
    for c in ("cat", "dog"):
        (tree / c).mkdir(parents=True)
        for i in range(10):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG" if i % 2 else "JPEG")
            (tree / c / f"{i}.{'png' if i % 2 else 'jpg'}").write_bytes(buf.getvalue())
    res, (a, b) = _race(tmp_path, _RACER, tree)
    assert sorted(r["dataset_hit"] for r in res) == [False, True]  # one built it, the other waited and read it
    assert sorted(r["features"] for r in res) == ["hit", "miss"]
    for k in ("images", "labels", "feats"):
        assert np.array_equal(a[k], b[k])
    assert a["images"].shape == (20, 3, 16, 16)


_UTK_RACER = _RACE_PRELUDE + textwrap.dedent("""
    import warnings
    import visrep.data.faces as faces

    faces._decode_square = slowed(faces._decode_square)
    barrier("data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fake archive's malformed records
        ds = load_dataset("utkface", "train", data, task="gender", test_fraction=0.25)
    np.savez(out / f"result-{me}.npz", images=ds.images.numpy(), labels=ds.labels.numpy())
    (out / f"result-{me}.json").write_text(json.dumps({"cache": ds.meta["cache"], "hit": ds.meta["cache_hit"]}))
    os._exit(0)
""")


def test_two_processes_build_a_utkface_cache_entry_once(tmp_path):
    (tmp_path / "faces").mkdir()
    fake_utk_archive(tmp_path / "faces" / "utkface-96.tar.gz")
    res, (a, b) = _race(tmp_path, _UTK_RACER, tmp_path / "faces")
    assert sorted((r["cache"], r["hit"]) for r in res) == [("build", False), ("hit", True)]
    for k in ("images", "labels"):
        assert np.array_equal(a[k], b[k])
    assert a["images"].shape == (6, 3, 96, 96)
