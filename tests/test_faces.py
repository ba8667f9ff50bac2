"""UTKFace and MTFL loaders: labels from file names / annotation lines, quirks, malformed records, real data."""
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fake_utk_archive
from visrep.data import load_dataset
from visrep.errors import ConfigError, DataError

FACES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "faces")


@pytest.fixture()
def utk_archive(tmp_path):
    return fake_utk_archive(tmp_path / "utkface-96.tar.gz")


def test_utkface_tasks_split_and_malformed_records(utk_archive, tmp_path):
    with pytest.warns(UserWarning, match="skipped 3 malformed"):
        tr = load_dataset("utkface", "train", tmp_path, task="gender", test_fraction=0.25)
    te = load_dataset("utkface", "test", tmp_path, task="gender", test_fraction=0.25)
    assert len(tr) == 6 and len(te) == 2 and tr.classes == ["male", "female"]
    assert tr.meta["n_malformed"] == 3 and any("no race" in m or "age_gender_race" in m for m in tr.meta["malformed"])
    assert any("does not decode" in m for m in tr.meta["malformed"])
    age = load_dataset("utkface", "train", tmp_path, task="age", test_fraction=0.25)
    assert age.targets.shape == (6, 1) and age.meta["task_type"] == "regression"
    # labels of the age task are the age groups of the targets
    from visrep.data.faces import age_group

    assert torch.equal(age.labels, age_group(age.targets[:, 0]))
    assert age_group(torch.tensor([1.0, 2, 3, 9, 10, 29, 69, 70, 116])).tolist() == [0, 0, 1, 1, 2, 3, 7, 8, 8]
    race = load_dataset("utkface", "test", tmp_path, task="race", test_fraction=0.25)
    assert race.classes == ["white", "black", "asian", "indian", "other"]
    # the split is a seeded permutation: disjoint, complete, reproducible
    a = load_dataset("utkface", "train", tmp_path, task="gender", test_fraction=0.25, split_seed=1)
    assert a.meta["split_hash"] != tr.meta["split_hash"]
    assert load_dataset("utkface", "train", tmp_path, task="gender", test_fraction=0.25).meta["split_hash"] == \
        tr.meta["split_hash"]


def test_face_loader_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="UTKFace has no stable download URL"):
        load_dataset("utkface", "train", tmp_path)
    monkeypatch.delenv("VISREP_DATA", raising=False)
    with pytest.raises(DataError, match="needs its data"):
        load_dataset("mtfl", "train", None)
    with pytest.raises(ConfigError, match="unknown task 'smile' for dataset 'utkface'"):
        load_dataset("utkface", "train", tmp_path, task="smile")


@pytest.fixture()
def mtfl_folder(tmp_path):
    root = tmp_path / "MTFL"
    (root / "lfw_5590").mkdir(parents=True)
    (root / "net_7876").mkdir()
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(root / "lfw_5590" / "a.jpg")
    Image.fromarray(np.zeros((100, 50, 3), np.uint8)).save(root / "net_7876" / "b.jpg")   # 50 wide, 100 high
    lines = [
        r"lfw_5590\a.jpg 30 70 50 35 65 40 40 60 80 80 1 2 2 3",
        r" net_7876\b.jpg 10 40 25 12 38 30 30 50 70 70 2 1 1 1",   # leading space, non-square image
        r"lfw_5590\a.jpg 30 70 50 35 65 40 40 60 80",                  # too short
        r"lfw_5590\missing.jpg 30 70 50 35 65 40 40 60 80 80 1 2 2 3",
        r"lfw_5590\a.jpg 30 70 50 35 65 40 40 60 80 80 1 2 2 9",       # pose out of range
    ]
    (root / "training.txt").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    (root / "testing.txt").write_bytes((lines[0] + "\r\n").encode())
    return tmp_path


def test_mtfl_quirks_tasks_and_landmark_coordinates(mtfl_folder):
    with pytest.warns(UserWarning, match="skipped 3 malformed"):
        ds = load_dataset("mtfl", "train", mtfl_folder, task="landmarks", image_size=20)
    assert len(ds) == 2 and ds.images.shape[-2:] == (20, 20) and ds.meta["n_malformed"] == 3
    # image a (100x100): x / 100, y / 100
    torch.testing.assert_close(ds.targets[0], torch.tensor([30, 70, 50, 35, 65, 40, 40, 60, 80, 80]) / 100.0)
    # image b (50 wide, 100 high) is padded by 25 px left and right to 100x100: x -> (x + 25) / 100
    expect_b = torch.tensor([35, 65, 50, 37, 63, 30, 30, 50, 70, 70]) / 100.0
    torch.testing.assert_close(ds.targets[1], expect_b)
    assert ds.labels.tolist() == [2, 0]  # pose 3 (frontal) and 1 (left profile), 0-based
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = load_dataset("mtfl", "train", mtfl_folder, task="gender", image_size=20)
        s = load_dataset("mtfl", "train", mtfl_folder, task="smile", image_size=20)
    assert g.labels.tolist() == [0, 1] and g.classes == ["male", "female"] and g.targets is None
    assert s.labels.tolist() == [1, 0] and s.classes == ["smiling", "not_smiling"]
    assert len(load_dataset("mtfl", "test", mtfl_folder, task="glasses", image_size=20)) == 1


@pytest.mark.skipif(not os.path.isdir(FACES), reason="shared face data not present")
def test_real_face_data_sizes_and_malformed_names():
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        tr = load_dataset("utkface", "train", FACES, task="age", image_size=32)
        te = load_dataset("utkface", "test", FACES, task="age", image_size=32)
        assert (len(tr), len(te), tr.meta["n_malformed"]) == (18962, 4740, 5)
        assert 1 <= float(tr.targets.min()) and float(tr.targets.max()) <= 116
        m = load_dataset("mtfl", "test", FACES, task="landmarks", image_size=32)
        assert len(m) == 2995 and m.meta["n_malformed"] == 0
        assert 0 <= float(m.targets.min()) and float(m.targets.max()) <= 1
        assert len(load_dataset("mtfl", "train", FACES, task="pose", image_size=32)) == 10000
