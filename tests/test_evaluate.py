"""visrep.evaluate: weighted kNN (checked by hand), feature cache, linear probe, end-to-end evaluation."""
from __future__ import annotations

import importlib.util
import json
import math
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from visrep.errors import ConfigError, VisrepError
from visrep.evaluate import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    extract_features,
    extract_features_with_info,
    knn_classify,
    knn_scores,
    linear_probe,
)

HAS_SOURCES = importlib.util.find_spec("visrep.data.sources") is not None
needs_sources = pytest.mark.skipif(not HAS_SOURCES, reason="visrep/data/sources.py is not there yet")
# A small random-init timm model without BatchNorm (1 s to build): 320-d features at 32x32.
SOURCE = "timm:convnext_atto"


def test_normalisation_is_timms_imagenet():
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    assert tuple(IMAGENET_MEAN) == tuple(IMAGENET_DEFAULT_MEAN)
    assert tuple(IMAGENET_STD) == tuple(IMAGENET_DEFAULT_STD)


# ----------------------------------------------------------------------------------------------- kNN
def _unit(cos: float, sign: float = 1.0) -> list[float]:
    return [cos, sign * math.sqrt(1.0 - cos * cos)]


def _hand_case():
    """Query (1, 0). One class-0 point at cosine 0.99, two class-1 points at cosine 0.5 (with norm 10, which
    normalisation must undo), one class-2 point at cosine -0.9 (outside the 3 nearest)."""
    train = torch.tensor([_unit(0.99), [10 * v for v in _unit(0.5)], [10 * v for v in _unit(0.5, -1)],
                          _unit(-0.9)])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[3.0, 0.0]])
    return train, labels, query


def test_knn_scores_are_sums_of_exp_similarity_over_temperature():
    train, labels, query = _hand_case()
    T = 0.07
    s = knn_scores(train, labels, query, k=3, temperature=T, num_classes=3)
    by_hand = [math.exp(0.99 / T), 2 * math.exp(0.5 / T), 0.0]  # class 2 is not among the 3 nearest
    assert s.shape == (1, 3)
    for got, want in zip(s[0].tolist(), by_hand):
        assert got == pytest.approx(want, rel=1e-4)
    s4 = knn_scores(train, labels, query, k=4, temperature=T, num_classes=3)
    assert s4[0, 2].item() == pytest.approx(math.exp(-0.9 / T), rel=1e-4)


def test_weighted_vote_disagrees_with_majority_vote():
    train, labels, query = _hand_case()
    k = 3
    sims = torch.nn.functional.normalize(train, dim=1) @ torch.nn.functional.normalize(query, dim=1)[0]
    nearest = sims.topk(k).indices
    majority = Counter(labels[nearest].tolist()).most_common(1)[0][0]
    assert majority == 1  # two class-1 neighbours against one class-0 neighbour
    # T = 0.07: exp(0.99/0.07) ~ 1.4e6 beats 2 exp(0.5/0.07) ~ 2.5e3 -> class 0.
    res = knn_classify(train, labels, query, torch.tensor([0]), k=k, temperature=0.07)
    assert res["top1"] == 1.0
    assert res["k"] == 3 and res["temperature"] == 0.07 and res["num_classes"] == 3
    # T = 1: exp(0.99) = 2.69 < 2 exp(0.5) = 3.30 -> class 1, like the majority vote.
    assert math.exp(0.99) < 2 * math.exp(0.5)
    assert knn_classify(train, labels, query, torch.tensor([1]), k=k, temperature=1.0)["top1"] == 1.0
    assert knn_classify(train, labels, query, torch.tensor([0]), k=k, temperature=1.0)["top1"] == 0.0


def test_knn_top5_semantics():
    # Seven classes, one training point each on the unit circle, cosine to the query 1 - 0.1 c: class c
    # ranks (c+1)-th for the query (1, 0).
    train = torch.tensor([_unit(1.0 - 0.1 * c) for c in range(7)])
    labels = torch.arange(7)
    queries = torch.tensor([[1.0, 0.0]] * 3)
    res = knn_classify(train, labels, queries, torch.tensor([0, 4, 5]), k=7, temperature=0.07)
    assert res["top5_k"] == 5
    assert res["top1"] == pytest.approx(1 / 3)   # only label 0 is the top class
    assert res["top5"] == pytest.approx(2 / 3)   # label 4 ranks 5th (in), label 5 ranks 6th (out)
    assert res["metric"] == "fraction"
    # Fewer than 5 classes: top-5 is top-C, so every prediction counts.
    small = knn_classify(train[:3], labels[:3], queries, torch.tensor([0, 1, 2]), k=3)
    assert small["top5_k"] == 3 and small["top5"] == 1.0 and small["top1"] == pytest.approx(1 / 3)


def test_knn_chunking_large_k_and_tiny_temperature():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(200, 8, generator=g), torch.randn(37, 8, generator=g)
    ltr, lte = torch.randint(0, 6, (200,), generator=g), torch.randint(0, 6, (37,), generator=g)
    a = knn_classify(train, ltr, test, lte, k=20, chunk_size=1024)
    b = knn_classify(train, ltr, test, lte, k=20, chunk_size=5)
    assert a == b
    assert knn_classify(train, ltr, test, lte, k=10_000)["k_used"] == 200  # k > N uses every point
    # T far below 1/88 would overflow exp(s/T) in float32; the result must equal 1-nearest-neighbour.
    tiny = knn_classify(train, ltr, test, lte, k=20, temperature=1e-3)
    nn1 = ltr[(nn.functional.normalize(test, dim=1) @ nn.functional.normalize(train, dim=1).t()).argmax(1)]
    assert tiny["top1"] == pytest.approx(float((nn1 == lte).float().mean()))
    with pytest.raises(ConfigError):
        knn_classify(train, ltr, test, lte, k=0)
    with pytest.raises(ConfigError):
        knn_classify(train, ltr, test, lte, temperature=0.0)


# ------------------------------------------------------------------------------------- feature cache
@dataclass
class TinyDataset:
    """Stand-in with the ImageDataset fields extract_features uses."""
    images: torch.Tensor
    labels: torch.Tensor
    classes: list = field(default_factory=lambda: ["a", "b", "c"])
    name: str = "tiny"
    meta: dict = field(default_factory=lambda: {"fingerprint": "tiny-0001"})


def _tiny_dataset(n=24, size=8, seed=0) -> TinyDataset:
    g = torch.Generator().manual_seed(seed)
    return TinyDataset(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                       torch.arange(n) % 3)


class CountingNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x).mean(dim=(2, 3))


def test_feature_cache_hit_and_miss(tmp_path):
    ds, model = _tiny_dataset(), CountingNet()
    model.train()
    kw = dict(image_size=8, batch_size=10, cache_dir=tmp_path, progress=False)
    f1, l1, i1 = extract_features_with_info(model, ds, model_fingerprint="weights-A", **kw)
    assert i1["cache"] == "miss" and model.calls == 3  # 24 images in batches of 10
    assert model.training  # the caller's mode is restored
    assert f1.dtype == torch.float32 and f1.shape == (24, 6) and not f1.is_inference()
    assert torch.equal(l1, ds.labels)
    files = [p for p in tmp_path.iterdir() if p.suffix != ".lock"]  # each entry has a lock file beside it
    assert len(files) == 1 and files[0].suffix == ".safetensors"  # no temporary file left behind

    f2, l2, i2 = extract_features_with_info(model, ds, model_fingerprint="weights-A", **kw)
    assert i2["cache"] == "hit" and model.calls == 3
    assert torch.equal(f1, f2) and torch.equal(l1, l2)

    # the same images under other labels (another task): the same entry, returned with the caller's labels
    other = TinyDataset(ds.images.clone(), (ds.labels + 1) % 3)
    f_o, l_o, i_o = extract_features_with_info(model, other, model_fingerprint="weights-A", **kw)
    assert i_o["cache"] == "hit" and model.calls == 3 and torch.equal(f_o, f1) and torch.equal(l_o, other.labels)
    changed = other.images.clone()
    changed[5] = 255 - changed[5]
    _, _, i_c = extract_features_with_info(model, TinyDataset(changed, other.labels),
                                           model_fingerprint="weights-A", **kw)
    assert i_c["cache"] == "miss" and model.calls == 6  # other images: another entry
    model.calls = 3

    _, _, i3 = extract_features_with_info(model, ds, model_fingerprint="weights-B", **kw)
    assert i3["cache"] == "miss" and model.calls == 6
    _, _, i4 = extract_features_with_info(model, ds, model_fingerprint="weights-A", **{**kw, "image_size": 16})
    assert i4["cache"] == "miss"
    _, _, i5 = extract_features_with_info(model, ds, model_fingerprint="weights-A", mean=(0.5,) * 3, **kw)
    assert i5["cache"] == "miss"
    assert len(list(tmp_path.glob("*.safetensors"))) == 5  # A, the changed images, B, 16 px, other mean

    # No fingerprint: nothing cached.
    calls = model.calls
    f6, _ = extract_features(model, ds, image_size=8, batch_size=10, cache_dir=tmp_path / "none", progress=False)
    assert model.calls == calls + 3 and not (tmp_path / "none").exists()
    assert torch.allclose(f6, f1)

    # A corrupt cache file is recomputed, not trusted.
    path = i1["cache_path"]
    with open(path, "wb") as fh:
        fh.write(b"garbage")
    f7, _, i7 = extract_features_with_info(model, ds, model_fingerprint="weights-A", **kw)
    assert i7["cache"] == "miss" and torch.allclose(f7, f1)


def test_feature_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("VISREP_CACHE", str(tmp_path))
    _, _, info = extract_features_with_info(CountingNet(), _tiny_dataset(n=4), image_size=8,
                                            model_fingerprint="w", progress=False)
    assert info["cache"] == "miss" and info["cache_path"].startswith(str(tmp_path / "features"))


# -------------------------------------------------------------------------------------- linear probe
def _separable(n_per=60, d=16, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 6.0 * torch.randn(c, d, generator=g)
    def draw(n):
        y = torch.arange(c).repeat_interleave(n)
        return 3.0 + 5.0 * (centers[y] + torch.randn(len(y), d, generator=g)), y  # offset/scale: standardise
    return (*draw(n_per), *draw(n_per // 2))


def test_linear_probe_separable_and_deterministic():
    xtr, ytr, xte, yte = _separable()
    a = linear_probe(xtr, ytr, xte, yte, epochs=20, seed=3)
    b = linear_probe(xtr, ytr, xte, yte, epochs=20, seed=3)
    assert a["top1"] >= 0.99 and a["train_top1"] >= 0.99 and a["top5"] == 1.0
    assert a == b
    for key in ("epochs", "lr", "weight_decay", "batch_size", "momentum", "optimizer", "schedule",
                "standardize", "seed", "steps"):
        assert key in a
    assert a["top5_k"] == 4 and a["steps"] == 20 * 1  # 240 rows fit in one batch of 256
    with pytest.raises(ConfigError):
        linear_probe(xtr, ytr, xte, yte, epochs=0)


# ------------------------------------------------------------------------------------- end to end
@needs_sources
def test_evaluate_knn_and_linear_end_to_end(tmp_path):
    from visrep.evaluate import evaluate_knn, evaluate_linear

    kw = dict(dataset="digits", image_size=32, train_subset=120, test_subset=40, cache_dir=tmp_path / "cache",
              progress=False, batch_size=64)
    out = tmp_path / "res" / "knn.json"
    r = evaluate_knn(SOURCE, k=10, out=str(out), **kw)
    on_disk = json.loads(out.read_text())
    for key in ("protocol", "top1", "top5", "source", "model", "dataset", "image_size", "normalization", "k",
                "temperature", "feature_dim", "cache", "visrep_version", "timestamp", "seconds"):
        assert key in on_disk, key
    assert on_disk["protocol"] == "knn" and on_disk["k"] == 10 and on_disk["temperature"] == 0.07
    assert 0.0 <= on_disk["top1"] <= on_disk["top5"] <= 1.0
    assert on_disk["model"]["fingerprint"] and on_disk["model"]["kind"] == "random-init"
    assert on_disk["dataset"]["train_size"] == 120 and on_disk["dataset"]["test_size"] == 40
    assert on_disk["image_size"] == 32 and on_disk["feature_dim"] == 320
    assert on_disk["normalization"]["mean"] == list(IMAGENET_MEAN)
    assert on_disk["cache"] == {"train": "miss", "test": "miss"}
    assert r["top1"] == on_disk["top1"]

    # Same seed -> same random-init weights -> same fingerprint -> cached features.
    lin = evaluate_linear(SOURCE, epochs=3, **kw)
    assert lin["protocol"] == "linear" and lin["cache"] == {"train": "hit", "test": "hit"}
    assert lin["model"]["fingerprint"] == on_disk["model"]["fingerprint"]
    assert lin["epochs"] == 3 and lin["lr"] == 0.1 and 0.0 <= lin["top1"] <= 1.0


@needs_sources
def test_evaluate_errors_are_visrep_errors(tmp_path):
    from visrep.evaluate import evaluate_knn

    kw = dict(train_subset=20, test_subset=10, cache_dir=tmp_path, progress=False)
    with pytest.raises(VisrepError, match="no checkpoint"):
        evaluate_knn(str(tmp_path / "missing-run"), **kw)
    with pytest.raises(ConfigError):
        evaluate_knn("definitely_not_a_backbone", **kw)
    with pytest.raises(VisrepError):
        evaluate_knn(SOURCE, dataset="definitely_not_a_dataset", **kw)


@needs_sources
def test_evaluate_knn_from_checkpoint_uses_its_image_size(tmp_path):
    from visrep.config import RunConfig
    from visrep.evaluate import evaluate_knn
    from visrep.models import build_backbone
    from visrep.checkpoint import add_prefix, save_checkpoint

    cfg = RunConfig()
    cfg.method = "simclr"
    cfg.backbone.name, cfg.backbone.options = SOURCE, {}
    torch.manual_seed(0)
    state = build_backbone(SOURCE).state_dict()
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors", add_prefix(state, "model.backbone."),
                           {"config": cfg.to_dict(), "epoch": 7, "image_size": 32})
    r = evaluate_knn(str(tmp_path / "run"), train_subset=50, test_subset=20, cache_dir=tmp_path / "cache",
                     progress=False)
    assert ckpt.is_file()
    assert r["image_size"] == 32 and r["model"]["kind"] == "checkpoint"
    assert r["model"]["epoch"] == 7 and r["model"]["method"] == "simclr"


def test_subsets_of_one_size_never_share_a_feature_cache_entry(tmp_path):
    from visrep.data import ImageDataset

    g = torch.Generator().manual_seed(1)
    full = ImageDataset(torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(40) % 4,
                        list("abcd"), "full")
    model = CountingNet()
    kw = dict(image_size=8, batch_size=64, cache_dir=tmp_path, progress=False, model_fingerprint="w")
    extract_features_with_info(model, full, **kw)  # the parent first: nothing it leaves behind may leak to subsets
    a, b = full.subset(20, seed=0), full.subset(20, seed=1)
    fa, _, ia = extract_features_with_info(model, a, **kw)
    fb, _, ib = extract_features_with_info(model, b, **kw)
    assert ia["cache"] == ib["cache"] == "miss" and not torch.equal(fa, fb)


def test_one_changed_pixel_in_a_middle_image_is_another_cache_entry(tmp_path):
    from visrep.data import ImageDataset

    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 255, (64, 3, 8, 8), dtype=torch.uint8, generator=g)
    a = ImageDataset(images, torch.arange(64) % 4, list("abcd"), "a")
    edited = images.clone()
    edited[31, 1, 4, 4] += 1  # one byte of one image in the middle
    b = ImageDataset(edited, torch.arange(64) % 4, list("abcd"), "b")
    kw = dict(image_size=8, batch_size=64, cache_dir=tmp_path, progress=False, model_fingerprint="w")
    model = CountingNet()
    assert extract_features_with_info(model, a, **kw)[2]["cache"] == "miss"
    assert extract_features_with_info(model, b, **kw)[2]["cache"] == "miss"


def test_random_init_options_that_add_no_weights_still_change_the_fingerprint():
    from visrep.runs import load_backbone

    _, avg = load_backbone("timm:resnet18", image_size=32)
    _, mx = load_backbone("timm:resnet18", image_size=32, options={"global_pool": "max"})
    assert avg["fingerprint"] != mx["fingerprint"]
