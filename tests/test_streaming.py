"""Streaming sources: `visrep data pack` shards and image folders read in place (visrep.data.streaming).

What must hold: the decoded pixels are the packed ones; every sample is seen once per epoch across ranks; the order
is the same for a seed and differs between epochs; a run restarted at step s sees exactly the batches of an
uninterrupted one (workers, random crops and shuffle blocks included); bad data is counted and skipped with one
warning line; a missing shard is one sentence; training and evaluation run from the CLI.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest
import torch

from visrep.data.pack import pack, parse_size
from visrep.data.sources import load_dataset
from visrep.data.streaming import _Plan, segments
from visrep.errors import ConfigError, DataError

N = 96


def _h(img: torch.Tensor) -> str:
    return hashlib.sha1(img.contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "syn"
    index = pack("synthetic", out, options={"n": N, "num_classes": 4}, max_count=10, image_format="png",
                 progress=False)
    return out, index


def _stream(root, **kw):
    kw.setdefault("workers", 0)
    return load_dataset("shards", kw.pop("split", "train"), str(root), **kw)


def test_parse_size():
    assert parse_size("1GB") == 1 << 30 and parse_size("256MB") == 256 << 20 and parse_size("64K") == 65536
    with pytest.raises(ConfigError, match="not a size"):
        parse_size("lots")


def test_pack_index(packed):
    out, index = packed
    train = index["splits"]["train"]
    assert train["n"] == N and sum(train["counts"]) == N and max(train["counts"]) == 10
    assert len(train["shards"]) == 10 and all((out / s).is_file() for s in train["shards"])
    assert json.loads((out / "index.json").read_text())["classes"] == ["class0", "class1", "class2", "class3"]
    # WebDataset layout: <key>.cls, <key>.json, <key>.png per sample
    with tarfile.open(out / train["shards"][0]) as tf:
        members = tf.getmembers()
    assert [m.name for m in members[:3]] == ["train000000000.cls", "train000000000.json", "train000000000.png"]
    # plain ustar headers: no PAX header per member (a float mtime would add one, doubling the header parsing)
    assert all(not m.pax_headers for m in members)
    assert (out / train["shards"][0]).read_bytes()[156:157] == b"0"
    with pytest.raises(ConfigError, match="already holds packed shards"):
        pack("synthetic", out, options={"n": N}, progress=False)


def test_lossless_pixels_and_labels(packed):
    """PNG shards decoded at their own size give back exactly the source's images, with their labels."""
    out, _ = packed
    ref = load_dataset("synthetic", "train", n=N, num_classes=4)
    want = sorted((_h(img), int(lab)) for img, lab in zip(ref.images, ref.labels))
    ds = _stream(out)
    got = []
    for b in ds.iter_batches(17):
        got += [(_h(img), int(lab)) for img, lab in zip(b["images"], b["labels"])]
    assert sorted(got) == want
    assert [lab for _, lab in got] == ds.labels.tolist()  # iteration is the stored order the index describes


def test_plan_arithmetic():
    # units of 4, 2, 5 samples read in order [2, 0, 1]: positions 3..8 are unit 2 [3:5], unit 0 [0:4]
    assert segments([0, 5, 9], [4, 2, 5], [2, 0, 1], 3, 6) == [(2, 3, 2), (0, 0, 4)]
    # N = 100, B = 8, L = 4 streams: c = 2 per stream per step, S = 12 steps, stream j holds [24j, 24j + 24)
    plan = _Plan([10] * 10, batch_size=8, seed=0, world=2, lanes=4, block=16)
    assert (plan.c, plan.steps, plan.group, plan.groups_per_epoch) == (2, 12, 2, 6)  # G = 16 // 8 steps per group
    assert list(plan.streams(1)) == [2, 3]
    # step 17 = epoch 1, step 5 of it: group 2 of epoch 1 (global group 8), which holds steps 16 and 17
    assert plan.group_of(17) == 8 and plan.group_steps(8) == (1, 2, 16, 2)
    assert plan.block(1, 3, 2, 2) == (3 * 24 + 2 * 2 * 2, 4)  # stream 3's block of group 2: 4 samples
    assert _Plan([10] * 10, 8, 0, 1, 4, 5).steps == 12  # the same order whatever the world size
    with pytest.raises(ConfigError, match="must divide the 4 streams"):
        _Plan([10] * 10, 24, 0, 3, 4, 5)


def _epoch_hashes(ds, batch, seed, world, epoch=0):
    seen = []
    for r in range(world):
        b = ds.batches(batch, seed, rank=r, world_size=world)
        for s in range(epoch * b.steps_per_epoch, (epoch + 1) * b.steps_per_epoch):
            seen += [_h(x) for x in b(s)["images"]]
        b.close()
    return seen


@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_once_per_epoch_across_ranks(packed, workers):
    out, _ = packed
    ds = _stream(out, workers=workers)
    all_images = sorted(_h(b) for batch in ds.iter_batches(32) for b in batch["images"])
    e0 = _epoch_hashes(ds, 16, seed=3, world=2)          # 96 = 6 steps x 16: nothing dropped
    assert sorted(e0) == all_images
    e1 = _epoch_hashes(ds, 16, seed=3, world=2, epoch=1)
    assert sorted(e1) == all_images and e1 != e0          # each epoch a new order
    assert _epoch_hashes(ds, 16, seed=3, world=2) == e0   # and the same one for the same seed


@pytest.mark.parametrize("workers", [0, 2])
def test_global_batches_do_not_depend_on_the_world_size(packed, workers):
    """Rank r of W holds rows [r·B/W, (r+1)·B/W) of the one-process batch of the same step, for W = 1, 2, 4."""
    out, _ = packed
    ds = _stream(out, workers=workers, shuffle_block=32)  # groups of 2 steps
    one = ds.batches(16, seed=5)
    ref = [one(s)["images"] for s in range(8)]  # across the epoch boundary (6 steps per epoch)
    one.close()
    for world in (2, 4):
        parts = [ds.batches(16, seed=5, rank=r, world_size=world) for r in range(world)]
        for s in range(8):
            assert torch.equal(torch.cat([p(s)["images"] for p in parts]), ref[s]), (world, s)
        for p in parts:
            p.close()


def test_resume_is_exact(packed):
    """Steps 5.. read by a fresh reader started at step 5 equal those of an uninterrupted run: 2 workers, random
    crops, a shuffle block smaller than a lane, across an epoch boundary."""
    out, _ = packed
    ds = _stream(out, workers=2, crop="random", shuffle_block=24, image_size=24, lanes=4)  # groups of 3 steps
    full = ds.batches(8, seed=1)
    whole = [full(s) for s in range(16)]  # 12 steps per epoch
    full.close()
    ds.workers = 1  # the order is the lanes', not the workers': a resume may use other workers
    again = ds.batches(8, seed=1)
    for s in range(5, 16):
        b = again(s)
        assert torch.equal(b["images"], whole[s]["images"]) and torch.equal(b["labels"], whole[s]["labels"])
    again.close()
    other = ds.batches(8, seed=2)
    assert not torch.equal(other(0)["images"], whole[0]["images"])
    other.close()


def test_brace_pattern_and_missing_shard(packed, tmp_path):
    out, index = packed
    ds = _stream(f"{out}/train-{{000000..000004}}.tar")
    assert len(ds) == 50 and ds.labels.tolist() == index["splits"]["train"]["labels"][:50]
    ds = _stream(f"{out}/train-{{000005..000007}}.tar", workers=2)  # a middle part of a split, with its labels
    assert ds.labels.tolist() == index["splits"]["train"]["labels"][50:80]
    assert [int(x) for b in ds.iter_batches(7) for x in b["labels"]] == ds.labels.tolist()
    with pytest.raises(DataError, match="shard .*train-000010.tar named by data.root does not exist"):
        _stream(f"{out}/train-{{000008..000012}}.tar")
    with pytest.raises(ConfigError, match="unknown split 'val'.*valid splits: test, train"):
        _stream(out, split="val")
    with pytest.raises(DataError, match="holds no index.json"):
        _stream(tmp_path)


def test_corrupt_sample_and_truncated_shard(packed, tmp_path):
    """A sample that does not decode, and the tail of a cut shard, are skipped with one warning; batches keep
    their size."""
    out, index = packed
    bad = tmp_path / "bad"
    bad.mkdir()
    names = index["splits"]["train"]["shards"][:3]
    for name in names:
        (bad / name).write_bytes((out / name).read_bytes())
    # corrupt the first image of shard 0: rewrite its .png member with garbage
    with tarfile.open(out / names[0]) as src, tarfile.open(bad / names[0], "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name.endswith(".png") and m.name.startswith("train000000000"):
                data = b"not an image"
                m.size = len(data)
            dst.addfile(m, __import__("io").BytesIO(data))
    raw = (bad / names[2]).read_bytes()
    (bad / names[2]).write_bytes(raw[: len(raw) // 2])  # truncated mid-shard
    idx = dict(index)
    e = index["splits"]["train"]
    idx["splits"] = {"train": {**e, "shards": names, "counts": e["counts"][:3], "labels": e["labels"][:30],
                               "n": 30, "targets": None}}
    (bad / "index.json").write_text(json.dumps(idx))
    ds = _stream(bad)
    b = ds.batches(10, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = [b(s) for s in range(3)]
        b.close()
    assert all(x["images"].shape == (10, 3, 32, 32) for x in batches)
    assert b.skipped >= 1 + 1  # the corrupt image and at least one sample of the cut shard
    text = " ".join(str(w.message) for w in caught)
    assert "could not be read or decoded" in text and "ended after" in text and "indexed samples" in text


def test_shard_cut_inside_its_first_header_is_skipped_and_a_non_tar_is_an_error(packed, tmp_path):
    """A shard cut anywhere, even before its first header ends, is a truncation (counted, skipped, one warning);
    a file that is not a tar archive at all is one clear error naming it."""
    out, index = packed
    bad = tmp_path / "bad"
    bad.mkdir()
    names = index["splits"]["train"]["shards"][:2]
    (bad / names[0]).write_bytes((out / names[0]).read_bytes())
    (bad / names[1]).write_bytes((out / names[1]).read_bytes()[:300])
    e = index["splits"]["train"]
    idx = {**index, "splits": {"train": {**e, "shards": names, "counts": e["counts"][:2], "labels": e["labels"][:20],
                                         "n": 20, "targets": None}}}
    (bad / "index.json").write_text(json.dumps(idx))
    b = _stream(bad).batches(10, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = [b(s) for s in range(2)]
        b.close()
    assert all(x["images"].shape == (10, 3, 32, 32) for x in batches)
    assert b.skipped == 10
    assert "ended after 0 of its 10 indexed samples" in " ".join(str(w.message) for w in caught)

    (bad / names[1]).write_bytes(b"this is not a tar archive" * 40)
    b = _stream(bad).batches(10, seed=0)
    with pytest.raises(DataError, match=f"cannot read shard .*{names[1]}: not a tar archive"):
        for s in range(2):
            b(s)
    b.close()


def _jpeg_tree(root: Path, n_per_class: int = 6) -> None:
    from PIL import Image

    ref = load_dataset("synthetic", "train", n=4 * n_per_class * 2, num_classes=4, image_size=40)
    for split in ("train", "val"):
        for i, (img, lab) in enumerate(zip(ref.images, ref.labels)):
            if (i % 2 == 0) != (split == "train"):
                continue
            d = root / split / f"n0{int(lab)}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i}.JPEG", quality=95)
    (root / "LOC_synset_mapping.txt").write_text("n00 tench, Tinca tinca\nn01 goldfish\nn02 shark\nn03 ray\n")


def test_streamed_image_folder(tmp_path):
    """ImageNet's layout read in place: classes are the sorted synset folders, names from LOC_synset_mapping.txt."""
    _jpeg_tree(tmp_path)
    ds = load_dataset("imagefolder", "train", str(tmp_path), image_size=32, stream=True, workers=0)
    assert ds.classes == ["n00", "n01", "n02", "n03"] and ds.meta["class_names"][0] == "tench, Tinca tinca"
    per_class = [len(list((tmp_path / "train" / c).iterdir())) for c in ds.classes]
    assert len(ds) == 24 and torch.bincount(ds.labels, minlength=4).tolist() == per_class
    b = ds.batches(8, seed=0)
    x = b(0)
    assert x["images"].shape == (8, 3, 32, 32) and x["images"].dtype == torch.uint8
    with pytest.raises(ConfigError, match="set data.image_size"):
        load_dataset("imagefolder", "train", str(tmp_path), stream=True)


def test_streaming_refuses_in_memory_only_options(packed):
    out, _ = packed
    ds = _stream(out)
    with pytest.raises(ConfigError, match="data.label_fraction needs a dataset held in memory"):
        ds.fraction(0.1)
    sub = ds.subset(20, seed=0)  # read into memory
    assert sub.images.shape == (20, 3, 32, 32) and len(set(_h(i) for i in sub.images)) == 20


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "visrep.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@pytest.mark.slow
def test_cli_pack_train_resume_eval(tmp_path):
    """`visrep data pack`, then pretrain from the shards, stop, resume to the end, and kNN-evaluate on the test shards."""
    r = _cli("data", "pack", "--dataset", "synthetic", "--dataset-options", "{n: 64}", "--out", "sh",
             "--shard-size", "8K", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "train: 64 samples in" in r.stdout and "data.dataset=shards data.root=sh" in r.stdout
    common = ["method=simclr", "data.dataset=shards", "data.root=sh", "data.workers=1", "backbone.name=resnet18",
              "backbone.options={cifar_stem: true, width: 8}", "train.batch_size=16", "train.epochs=2",
              "train.device=cpu", "monitor.knn_every=0", "monitor.rankme_every=0", "monitor.online_probe=false",
              "out_dir=run", "train.progress=false"]
    r = _cli("pretrain", *common, "train.max_steps=3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _cli("pretrain", *common, "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["stop_reason"] == "completed"
    r = _cli("eval", "knn", "--model", "run", "--dataset", "shards", "--data-dir", "sh", "--out", "knn.json",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert 0 <= json.loads((tmp_path / "knn.json").read_text())["top1"] <= 1
    r = _cli("pretrain", *[c for c in common if not c.startswith("data.root")], "data.root=sh/train-{000000..000099}.tar",
             "out_dir=run2", cwd=tmp_path)
    assert r.returncode == 2 and "named by data.root does not exist" in r.stderr and "Traceback" not in r.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_over_c10d_rendezvous_stream_shards(tmp_path):
    """Two torchrun launchers, one process each, meet over c10d rendezvous on 127.0.0.1 as two "nodes" and train
    SimCLR from streamed shards with decoding workers. Recorded per step and rank (tests/helpers/record_steps.py):
    every sample is seen once per epoch across the ranks, the two ranks' rows are the one-process batch, and the
    mean of the ranks' losses equals the one-process loss at every step (same views, gathered NT-Xent, DDP).
    The composition has no BatchNorm: SyncBatchNorm is CUDA-only, and on the CPU each rank normalises its rows."""
    import os

    r = _cli("data", "pack", "--dataset", "synthetic", "--dataset-options", "{n: 64}", "--out", "sh",
             "--shard-size", "8K", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    recorder = str(Path(__file__).parent / "helpers" / "record_steps.py")
    args = ["pretrain", "method=simclr", "data.dataset=shards", "data.root=sh", "data.workers=1",
            "backbone.name=vit_tiny", "backbone.options={patch_size: 8}",
            "projector={type: mlp, hidden_dim: 64, out_dim: 32, bn: false, last_bn: false}", "train.batch_size=16",
            "train.epochs=2", "train.device=cpu", "monitor.rankme_every=0", "monitor.online_probe=false",
            "train.progress=false"]
    port = _free_port()
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
              "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "visrep-test",
              recorder, *args, "monitor.knn_every=2", "out_dir=run"]
    env = dict(os.environ, OMP_NUM_THREADS="1", VISREP_RECORD=str(tmp_path / "two"))
    nodes = [subprocess.Popen(launch, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), "\n".join(e[-1500:] for _, e in outs)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["stop_reason"] == "completed" and summary["data_skipped"] == 0
    assert 0 <= summary["history"][-1]["knn_top1"] <= 1
    assert sum(o.count("done: 8/8 steps") for o, _ in outs) == 1  # one rank 0 over both nodes

    one = subprocess.run([sys.executable, recorder, *args, "monitor.knn_every=0", "out_dir=one"], cwd=tmp_path,
                         env=dict(env, VISREP_RECORD=str(tmp_path / "one")), capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-1500:]

    def steps(prefix):
        return [json.loads(line) for line in (tmp_path / f"{prefix}.jsonl").read_text().splitlines()]

    single, ranks = steps("one.rank0"), [steps("two.rank0"), steps("two.rank1")]
    assert [s["step"] for s in single] == list(range(8)) and all(len(r) == 8 for r in ranks)
    for epoch in range(2):  # 64 samples, 4 steps of 16 per epoch
        seen = [h for r in ranks for s in r[4 * epoch:4 * epoch + 4] for h in s["rows"]]
        assert len(seen) == 64 and len(set(seen)) == 64, epoch
    for step, s in enumerate(single):
        assert ranks[0][step]["rows"] + ranks[1][step]["rows"] == s["rows"], step
        mean = (ranks[0][step]["loss"] + ranks[1][step]["loss"]) / 2
        assert mean == pytest.approx(s["loss"], rel=1e-4, abs=1e-5), (step, mean, s["loss"])
