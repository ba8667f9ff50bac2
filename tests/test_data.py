"""Dataset sources: digits, synthetic, imagefolder (folder / tar.gz, cache, corrupt files), cifar layout."""
import io
import os
import pickle
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visrep.data import SOURCES, ImageDataset, load_dataset, resolve_root
from visrep.errors import ConfigError, DataError

REAL_ARCHIVE = Path("/work/shared/data/cifar10/cifar10-jpeg.tar.gz")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    monkeypatch.delenv("VISREP_DATA", raising=False)
    monkeypatch.setenv("VISREP_CACHE", str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------- registry / errors
def test_sources_registered_with_descriptions():
    names = dict(SOURCES.describe())
    for name in ("digits", "synthetic", "cifar10", "cifar100", "imagefolder"):
        assert name in names and names[name]


def test_unknown_dataset_lists_choices():
    with pytest.raises(ConfigError, match="digits.*imagefolder"):
        load_dataset("cifar11")


def test_bad_split_and_option():
    with pytest.raises(ConfigError, match="valid splits: train, test"):
        load_dataset("digits", "validation")
    with pytest.raises(ConfigError, match="valid options: n, num_classes"):
        load_dataset("synthetic", n_images=3)
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("digits", image_size=0)


def test_missing_root_is_data_error(tmp_path):
    with pytest.raises(DataError, match="VISREP_DATA"):
        load_dataset("imagefolder")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("imagefolder", root=tmp_path / "nope")
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("cifar10", download=False)


def test_resolve_root(monkeypatch, tmp_path):
    assert resolve_root(None) is None
    monkeypatch.setenv("VISREP_DATA", str(tmp_path))
    assert resolve_root(None) == tmp_path
    assert resolve_root("/x/y") == Path("/x/y")


# ---------------------------------------------------------------------------------- digits / synthetic
def test_digits_splits_and_determinism():
    tr = load_dataset("digits", "train")
    te = load_dataset("digits", "test")
    assert tr.images.shape == (1437, 3, 32, 32) and tr.images.dtype == torch.uint8
    assert te.images.shape == (360, 3, 32, 32)
    assert tr.labels.dtype == torch.int64 and len(tr.classes) == 10 and tr.classes[0] == "0"
    assert set(tr.labels.tolist()) == set(range(10))
    assert tr.name == "digits/train" and tr.meta["split"] == "train"
    assert int(tr.images.max()) == 255 and int(tr.images.min()) == 0
    assert torch.equal(tr.images[:, 0], tr.images[:, 2])  # grey replicated
    again = load_dataset("digits", "train")
    assert torch.equal(again.images, tr.images) and torch.equal(again.labels, tr.labels)
    assert again.meta["fingerprint"] == tr.meta["fingerprint"] != te.meta["fingerprint"]
    assert load_dataset("digits", image_size=16).images.shape[-2:] == (16, 16)


def test_synthetic_is_deterministic_and_learnable():
    tr = load_dataset("synthetic", "train", n=96, num_classes=4)
    te = load_dataset("synthetic", "test", n=48, num_classes=4)
    assert tr.images.shape == (96, 3, 32, 32) and len(tr.classes) == 4
    assert torch.bincount(tr.labels).tolist() == [24] * 4
    assert torch.equal(tr.images, load_dataset("synthetic", "train", n=96).images)
    assert not torch.equal(tr.images[:48], te.images)
    # 1-NN on raw pixels is far above chance (0.25)
    a = tr.images.flatten(1).float()
    b = te.images.flatten(1).float()
    pred = tr.labels[torch.cdist(b, a).argmin(1)]
    assert (pred == te.labels).float().mean() > 0.8


def test_subset_balanced_and_seeded():
    ds = load_dataset("synthetic", n=100, num_classes=4)
    sub = ds.subset(20, seed=1)
    assert len(sub) == 20 and torch.bincount(sub.labels, minlength=4).tolist() == [5] * 4
    assert torch.equal(sub.images, ds.subset(20, seed=1).images)
    assert not torch.equal(sub.images, ds.subset(20, seed=2).images)
    assert ds.subset(None, 0) is ds and ds.subset(1000, 0) is ds
    assert sub.meta["fingerprint"] != ds.meta["fingerprint"]
    with pytest.raises(ConfigError):
        ds.subset(0, 0)


# ---------------------------------------------------------------------------------- imagefolder
def _png(rng, size=(8, 8)):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(rng, size=(8, 8)):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _make_tree(root: Path, splits=("train", "test"), classes=("cat", "dog", "eel"), per_class=3, seed=0):
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                if i % 2:
                    (d / f"{i:03d}.jpg").write_bytes(_jpeg(rng))
                else:
                    (d / f"{i:03d}.png").write_bytes(_png(rng))
    return root


def _tar(src: Path, out: Path, arcname: str = "") -> Path:
    with tarfile.open(out, "w:gz") as tf:
        for p in sorted(src.rglob("*")):
            tf.add(p, arcname=str(Path(arcname) / p.relative_to(src)) if arcname else str(p.relative_to(src)), recursive=False)
    return out


def test_holdout_is_a_disjoint_class_balanced_seeded_split():
    base = load_dataset("digits", "train")
    images = base.images.clone()
    ids = torch.arange(len(base))
    images[:, 0, 0, 0], images[:, 0, 0, 1] = (ids // 256).to(torch.uint8), (ids % 256).to(torch.uint8)  # a tag
    ds = ImageDataset(images, base.labels, base.classes, "tagged")
    fit, held = ds.holdout(0.2, seed=3)
    assert len(held) == round(0.2 * len(ds)) and len(fit) + len(held) == len(ds)

    def tags(d):
        return {int(d.images[i, 0, 0, 0]) * 256 + int(d.images[i, 0, 0, 1]) for i in range(len(d))}
    assert not tags(fit) & tags(held) and tags(fit) | tags(held) == set(range(len(ds)))
    total = torch.bincount(ds.labels, minlength=10)
    assert torch.equal(torch.bincount(held.labels, minlength=10), (0.2 * total.double()).round().long())  # stratified
    again = ds.holdout(0.2, seed=3)[1]
    assert torch.equal(again.images, held.images) and not torch.equal(ds.holdout(0.2, seed=4)[1].labels, held.labels)
    with pytest.raises(ConfigError, match=r"holdout fraction must be in \(0, 1\)"):
        ds.holdout(1.0)
    # imbalanced: the minority class keeps its share in training (equal turns would have held all of it out)
    skewed = ImageDataset(ds.images[:1000], torch.tensor([0] * 900 + [1] * 100), ["a", "b"], "skewed")
    fit, held = skewed.holdout(0.2)
    assert torch.bincount(fit.labels).tolist() == [720, 80] and torch.bincount(held.labels).tolist() == [180, 20]
    one_each = ImageDataset(ds.images[:3], torch.tensor([0, 1, 2]), ["a", "b", "c"], "tiny")
    with pytest.raises(DataError, match="too few to hold out"):
        one_each.holdout(0.5)
    fit, held = ImageDataset(ds.images[:4], torch.tensor([0, 1, 1, 1]), ["a", "b"], "t").holdout(0.3)
    assert sorted(fit.labels.tolist()) == [0, 1, 1] and held.labels.tolist() == [1]  # a class of one stays to train


def test_training_never_sees_the_held_out_part(tmp_path):
    import visrep

    from conftest import tiny_overrides

    cfg = visrep.resolve(tiny_overrides(tmp_path, data={"holdout": 0.25}, monitor={"knn_every": 0}))
    assert visrep.pretrain(cfg, quiet=True)["train_size"] == 48
    with pytest.raises(ConfigError, match=r"data.holdout must be in \(0, 1\)"):
        visrep.resolve(tiny_overrides(tmp_path, data={"holdout": 1.5}))
    with pytest.raises(ConfigError, match="cannot be combined"):
        visrep.resolve(tiny_overrides(tmp_path, data={"holdout": 0.2, "label_fraction": 0.1}))


def test_imagefolder_directory_and_archives_match(tmp_path):
    tree = _make_tree(tmp_path / "tree")
    d = load_dataset("imagefolder", "train", tree)
    assert d.images.shape == (9, 3, 8, 8) and d.classes == ["cat", "dog", "eel"]
    assert d.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert d.meta["n_skipped"] == 0 and d.meta["layout"] == "split-folders"
    # the PNGs are lossless: pixels come back exactly
    first = np.array(Image.open(tree / "train" / "cat" / "000.png").convert("RGB"))
    assert torch.equal(d.images[0], torch.from_numpy(first).permute(2, 0, 1))
    plain = load_dataset("imagefolder", "train", _tar(tree, tmp_path / "plain.tar.gz"))
    wrapped = load_dataset("imagefolder", "train", path=str(_tar(tree, tmp_path / "wrapped.tgz", "mydata")))
    for other in (plain, wrapped):
        assert torch.equal(other.images, d.images) and torch.equal(other.labels, d.labels)
        assert other.classes == d.classes and other.meta["fingerprint"] == d.meta["fingerprint"]
    assert plain.name == "plain/train" and plain.meta["archive"]
    test = load_dataset("imagefolder", "test", tmp_path / "plain.tar.gz")
    assert len(test) == 9 and not torch.equal(test.images, d.images)
    with pytest.raises(ConfigError, match="valid splits: test, train"):
        load_dataset("imagefolder", "val", tree)


def test_imagefolder_without_split_folders(tmp_path):
    tree = _make_tree(tmp_path / "t", splits=("x",))
    flat = tree / "x"  # x/<class>/... -> pointing at x: class folders, whole tree is the split
    ds = load_dataset("imagefolder", "train", flat)
    assert len(ds) == 9 and ds.meta["layout"] == "class-folders"
    with pytest.raises(DataError, match="no split folders.*test_fraction"):  # never the training images
        load_dataset("imagefolder", "test", flat)


def test_imagefolder_corrupt_files_skipped_with_one_warning(tmp_path):
    tree = _make_tree(tmp_path / "tree", splits=("train",))
    (tree / "train" / "dog" / "bad.jpg").write_bytes(b"this is not an image" * 10)
    good = (tree / "train" / "cat" / "001.jpg").read_bytes()
    (tree / "train" / "eel" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tree / "train" / "eel" / "empty.png").write_bytes(b"")
    for src in (tree, _tar(tree, tmp_path / "c.tar.gz")):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            ds = load_dataset("imagefolder", "train", src, cache=False)
        msgs = [str(w.message) for w in rec if "unreadable" in str(w.message)]
        assert len(msgs) == 1 and msgs[0].startswith("skipped 3 unreadable images in ")
        assert "(first: train/dog/bad.jpg)" in msgs[0]
        assert len(ds) == 9 and ds.meta["n_skipped"] == 3


def test_imagefolder_sizes_and_cache(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    tree = tmp_path / "sizes"
    for c, size in (("a", (8, 8)), ("b", (12, 10))):
        (tree / c).mkdir(parents=True)
        (tree / c / "0.png").write_bytes(_png(rng, size))
    with pytest.raises(DataError, match="image_size"):
        load_dataset("imagefolder", root=tree)
    ds = load_dataset("imagefolder", root=tree, image_size=6)
    assert ds.images.shape == (2, 3, 6, 6) and not ds.meta["cache_hit"]
    cache = tmp_path / "cache" / "datasets"
    files = list(cache.glob("*.npz"))
    assert len(files) == 1
    # a second load reads the cache (np.load without pickle) and gives identical tensors
    again = load_dataset("imagefolder", root=tree, image_size=6)
    assert again.meta["cache_hit"] and torch.equal(again.images, ds.images) and again.classes == ds.classes
    with np.load(files[0], allow_pickle=False) as z:
        assert z["images"].shape == (2, 3, 6, 6)
    # another image_size is another cache entry; touching a file invalidates
    load_dataset("imagefolder", root=tree, image_size=4)
    assert len(list(cache.glob("*.npz"))) == 2
    os.utime(tree / "a" / "0.png", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert not load_dataset("imagefolder", root=tree, image_size=6).meta["cache_hit"]


def test_imagefolder_empty_is_data_error(tmp_path):
    (tmp_path / "none" / "a").mkdir(parents=True)
    (tmp_path / "none" / "a" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no image files"):
        load_dataset("imagefolder", root=tmp_path / "none")
    (tmp_path / "junk" / "a").mkdir(parents=True)
    (tmp_path / "junk" / "a" / "x.jpg").write_bytes(b"junk")
    with pytest.raises(DataError, match="could be decoded"):
        load_dataset("imagefolder", root=tmp_path / "junk")


# ---------------------------------------------------------------------------------- cifar layout
def test_cifar10_torchvision_layout(tmp_path):
    from test_reliability_data import _fake_cifar10  # the files as CIFAR ships them (bytes keys, protocol 2)

    batches = _fake_cifar10(tmp_path / "data", per_batch=4)
    tr = load_dataset("cifar10", "train", tmp_path / "data", download=False)
    te = load_dataset("cifar10", "test", tmp_path / "data" / "cifar-10-batches-py", download=False)
    assert tr.images.shape == (20, 3, 32, 32) and te.images.shape == (4, 3, 32, 32)
    assert tr.classes[0] == "airplane" and len(tr.classes) == 10
    data, labels = batches["test_batch"]
    assert torch.equal(te.images, torch.from_numpy(data.reshape(-1, 3, 32, 32)))
    assert te.labels.tolist() == labels and tr.name == "cifar10/train"
    assert load_dataset("cifar10", "test", tmp_path / "data", download=False, image_size=16).images.shape[-1] == 16


def test_cifar100_layout_and_corrupt_file(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 6), ("test", 3)):
        with open(d / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "fine_labels": list(range(n)), "coarse_labels": [0] * n}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": ["x"] * 20}, f)
    ds = load_dataset("cifar100", "test", tmp_path, download=False)
    assert ds.images.shape == (3, 3, 32, 32) and ds.labels.tolist() == [0, 1, 2] and len(ds.classes) == 100
    (d / "train").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="could not be read"):
        load_dataset("cifar100", "train", tmp_path, download=False)


def test_cifar_missing_is_data_error(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="cifar-10-batches-py.*VISREP_DATA.*download"):
        load_dataset("cifar10", "train", tmp_path, download=False)
    monkeypatch.setenv("VISREP_DATA", str(tmp_path))
    with pytest.raises(DataError, match="cifar-100-python"):
        load_dataset("cifar100", "test", download=False)


# ---------------------------------------------------------------------------------- the real archive
@pytest.mark.skipif(not REAL_ARCHIVE.is_file(), reason="offline CIFAR-10 JPEG archive not present")
def test_real_cifar10_archive_test_split():
    t = time.perf_counter()
    ds = load_dataset("imagefolder", "test", REAL_ARCHIVE)
    first = time.perf_counter() - t
    assert ds.images.shape == (10000, 3, 32, 32)
    assert ds.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert torch.bincount(ds.labels).tolist() == [1000] * 10 and ds.meta["n_skipped"] == 0
    t = time.perf_counter()
    again = load_dataset("imagefolder", "test", REAL_ARCHIVE)
    assert again.meta["cache_hit"] and torch.equal(again.images, ds.images)
    assert time.perf_counter() - t < max(2.0, first / 3)
