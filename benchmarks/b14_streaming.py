"""B14 (issue 14's "B12, streaming vs in-memory"; b12_aug_vs_alg.py is the older B12): the streaming data path on
the CPU against the in-memory cache and against torchvision's loader, and its memory on two shard-set sizes.

Parts (each one JSON in `--out-dir`, skipped when it exists; `--force` reruns):

  cifar_steps   SimCLR ResNet-18 (CIFAR stem) on CIFAR-10 train, batch 256, 32 px, in the real loop
                (`visrep.pretrain`): from the RAM cache (`imagefolder` on the JPEG archive) vs from shards packed
                from the same archive (`data.workers`=1), runs interleaved A B A B; images/s from the loop's own
                per-interval log after the first interval. Goal: shards within 10 % of RAM.
  decode_224    decode + random-resized crop to 224-px uint8 from ImageNet-style JPEGs (CIFAR-10 test upsized with
                `data pack --resize 256`): visrep's shard loader vs torchvision `ImageFolder` + `DataLoader`
                (RandomResizedCrop(224, scale=(0.35, 1)) + PILToTensor, the same JPEGs written out as a class-per-
                folder tree), the same number of workers, 7 rounds interleaved A B, B A (their median). Goal: at
                least torchvision's rate.
  memory        peak memory of reading a whole epoch through the training loader (2 decode workers, 224-px
                random crops, batch 256; the model step is left out) on a small and a large shard set; the large
                one decodes to more than this machine's RAM. Memory is the PSS (shared pages split between
                processes) of the reader and its workers, summed, sampled every 0.5 s. Deleted afterwards.

    python benchmarks/b14_streaming.py                      # all parts (about 40 min on 2 cores)
    python benchmarks/b14_streaming.py --only decode_224 --decode-steps 8   # one part, shorter
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

PARTS = ("cifar_steps", "decode_224", "memory")


# ------------------------------------------------------------------------------------------ cifar_steps
def _loop_rate(cfg: dict, out: Path) -> dict:
    import visrep

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    visrep.pretrain(visrep.resolve({**cfg, "out_dir": str(out)}), quiet=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r][1:]  # the first interval holds the warm-up
    shutil.rmtree(out, ignore_errors=True)
    return {"images_per_s": sum(rates) / len(rates), "intervals": rates, "seconds": time.perf_counter() - t0}


def cifar_steps(args, work: Path) -> dict:
    from visrep.data.pack import pack

    shards = work / "cifar_shards"
    if not (shards / "index.json").is_file():
        pack("imagefolder", shards, root=args.data, splits=["train"], progress=False)  # the JPEGs' own bytes
    base = {"method": "simclr", "seed": 0,
            "backbone": {"name": "resnet18", "options": {"cifar_stem": True, "width": args.width}},
            "train": {"batch_size": 256, "steps": args.steps, "epochs": 1000, "device": "cpu", "progress": False,
                      "log_every": args.log_every, "num_threads": args.threads},
            "monitor": {"knn_every": 0, "rankme_every": 0, "online_probe": False}}
    sources = {"ram": {"dataset": "imagefolder", "root": args.data},
               "shards": {"dataset": "shards", "root": str(shards), "workers": 1}}
    rounds = {k: [] for k in sources}
    for r in range(args.rounds):
        for name, data in sources.items():
            res = _loop_rate({**base, "data": data}, work / f"run_{name}")
            rounds[name].append(res)
            print(f"cifar_steps round {r} {name}: {res['images_per_s']:.1f} img/s", flush=True)
    mean = {k: sum(x["images_per_s"] for x in v) / len(v) for k, v in rounds.items()}
    return {"recipe": {**base, "sources": sources, "rounds": args.rounds, "order": "ram, shards per round"},
            "images_per_s": mean, "shards_over_ram": mean["shards"] / mean["ram"],
            "goal": "shards within 10 % of ram (ratio >= 0.9)", "met": mean["shards"] / mean["ram"] >= 0.9,
            "rounds": rounds}


# ------------------------------------------------------------------------------------------ decode_224
def _upsized_shards(args, work: Path, split: str, name: str) -> Path:
    """CIFAR-10's `split` re-encoded at short side 256 (JPEG q95): ImageNet-sized files."""
    from visrep.data.pack import pack

    out = work / name
    if not (out / "index.json").is_file():
        pack("imagefolder", out, root=args.data, splits=[split], resize=256, shard_size="64MB", progress=False)
    return out


def _as_folder(shards: Path, out: Path) -> Path:
    """The same JPEG bytes as a class-per-folder tree, for torchvision's ImageFolder."""
    if (out / ".done").is_file():
        return out
    index = json.loads((shards / "index.json").read_text())
    classes = index.get("classes") or []
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as tf:
            members = {m.name: m for m in tf.getmembers() if m.isfile()}
            for name, m in members.items():
                key, ext = name.rsplit(".", 1)
                if ext != "jpg":
                    continue
                label = int(tf.extractfile(members[f"{key}.cls"]).read().decode().strip())
                folder = out / (classes[label] if label < len(classes) else str(label))
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{Path(key).name}.jpg").write_bytes(tf.extractfile(m).read())
    (out / ".done").write_text("")
    return out


def _visrep_rate(shards: Path, workers: int, batch: int, steps: int) -> float:
    from visrep.data.sources import load_dataset

    ds = load_dataset("shards", "test", str(shards), image_size=224, workers=workers, crop="random",
                      shuffle_block=2 * batch)
    batches = ds.batches(batch, seed=0)
    warm = 2 * (workers + 1)  # groups of 2 steps: every worker's first group, decoded while the workers start
    steps = min(warm + steps, batches.steps_per_epoch)
    for s in range(warm):
        batches(s)
    t0 = time.perf_counter()
    for s in range(warm, steps):
        batches(s)
    dt = time.perf_counter() - t0
    batches.close()
    return (steps - warm) * batch / dt


def _torchvision_rate(folder: Path, workers: int, batch: int, steps: int) -> float:
    import torch
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(224, scale=(0.35, 1.0)), transforms.PILToTensor()])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(folder), transform=tf), batch_size=batch,
                                         shuffle=True, num_workers=workers, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    for _ in range(2 * (workers + 1)):  # the same warm-up as visrep's: prefetched batches are not timed
        next(it)
    n, t0 = 0, time.perf_counter()
    for i, (x, _) in enumerate(it):
        n += x.shape[0]
        if i + 1 >= steps:
            break
    dt = time.perf_counter() - t0
    del it
    return n / dt


def decode_224(args, work: Path) -> dict:
    shards = _upsized_shards(args, work, "test", "jpeg256_shards")  # the 10,000 test images
    folder = _as_folder(shards, work / "jpeg256_folder")
    sizes = [p.stat().st_size for p in folder.rglob("*.jpg")]
    out = {"recipe": {"images": len(sizes), "mean_jpeg_bytes": sum(sizes) / len(sizes), "batch": args.decode_batch,
                      "steps": args.decode_steps, "rounds": args.decode_rounds,
                      "order": "visrep, torchvision in even rounds; torchvision, visrep in odd ones",
                      "statistic": "median images/s of the rounds",
                      "visrep": "load_dataset('shards', image_size=224, crop='random', workers=W)",
                      "torchvision": "ImageFolder + RandomResizedCrop(224, scale=(0.35, 1)) + PILToTensor, "
                                     "DataLoader(shuffle=True, num_workers=W)"}, "workers": {}}
    for w in args.decode_workers:
        rates = {"visrep": [], "torchvision": []}
        measure = {"visrep": lambda: _visrep_rate(shards, w, args.decode_batch, args.decode_steps),
                   "torchvision": lambda: _torchvision_rate(folder, w, args.decode_batch, args.decode_steps)}
        for r in range(args.decode_rounds):
            for name in (("visrep", "torchvision") if r % 2 == 0 else ("torchvision", "visrep")):  # A B, B A, ...
                rates[name].append(measure[name]())
            print(f"decode_224 workers {w} round {r}: visrep {rates['visrep'][-1]:.0f} img/s, torchvision "
                  f"{rates['torchvision'][-1]:.0f} img/s", flush=True)
        # a round is ~5 s of a shared machine, so single rounds swing by ±20 %: the median of the rounds decides
        median = {k: statistics.median(v) for k, v in rates.items()}
        mean = {k: statistics.fmean(v) for k, v in rates.items()}
        out["workers"][str(w)] = {"images_per_s": median, "mean_images_per_s": mean,
                                  "per_worker_images_per_s": {k: v / w for k, v in median.items()},
                                  "visrep_over_torchvision": median["visrep"] / median["torchvision"],
                                  "visrep_over_torchvision_of_means": mean["visrep"] / mean["torchvision"],
                                  "rounds": rates}
    ratios = [v["visrep_over_torchvision"] for v in out["workers"].values()]
    out["goal"] = "visrep at least torchvision's rate (ratio >= 1)"
    out["met"] = all(r >= 1.0 for r in ratios)
    return out


# ------------------------------------------------------------------------------------------ memory
def _epoch_child(root: str, batch: int, workers: int) -> None:
    """Read one whole epoch through the training loader; print the count as JSON (run in a child process)."""
    sys.path.insert(0, str(common.REPO_ROOT))
    from visrep.data.sources import load_dataset

    ds = load_dataset("shards", "train", root, image_size=224, workers=workers, crop="random")
    batches = ds.batches(batch, seed=0)
    n = 0
    for s in range(batches.steps_per_epoch):
        n += batches(s)["images"].shape[0]
    batches.close()
    print(json.dumps({"images": n, "steps": batches.steps_per_epoch}), flush=True)


def _pss_tree(proc) -> tuple[int, int]:
    """(PSS, RSS) in bytes of a process and its children (PSS splits shared pages, so forked workers count once)."""
    import psutil

    pss = rss = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            pss, rss = pss + info.pss, rss + info.rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pss, rss


def _measure_epoch(root: str, batch: int, workers: int) -> dict:
    import psutil

    cmd = [sys.executable, __file__, "--epoch-child", root, "--decode-batch", str(batch), "--workers", str(workers)]
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc, peak_pss, peak_rss, samples = psutil.Process(child.pid), 0, 0, []
    while child.poll() is None:
        pss, rss = _pss_tree(proc)
        peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        samples.append([round(time.perf_counter() - t0, 1), pss])
        time.sleep(0.5)
    out, err = child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"the epoch reader failed: {err[-2000:]}")
    res = json.loads(out.strip().splitlines()[-1])
    gib = 2**30
    return {**res, "seconds": time.perf_counter() - t0, "peak_pss_gib": peak_pss / gib, "peak_rss_gib": peak_rss / gib,
            "decoded_gib": res["images"] * 224 * 224 * 3 / gib,
            "pss_gib_every_5s": [[t, round(b / gib, 3)] for t, b in samples[::10]]}


def memory(args, work: Path) -> dict:
    base = _upsized_shards(args, work, "train", "mem_base")  # the 50,000 train images at 256 px
    n_base = json.loads((base / "index.json").read_text())["splits"]["train"]["n"]
    small = work / "mem_small"
    large = work / "mem_large"
    per_image = 224 * 224 * 3
    large_images = args.large_images or int(1.15 * _ram_gib() * 2**30 / per_image)  # decodes to 1.15 × the RAM
    copies = max(1, -(-large_images // n_base))
    tars = sorted(base.glob("train-*.tar"))
    small.mkdir(exist_ok=True)
    large.mkdir(exist_ok=True)
    k = 0
    for c in range(copies):  # real copies (not links): the reader's page cache sees as many bytes as a real set
        for t in tars:
            dst = large / f"train-{k:06d}.tar"
            if not dst.exists():
                shutil.copyfile(t, dst)
            k += 1
    n_small_tars = max(1, len(tars) // 5)
    for i, t in enumerate(tars[:n_small_tars]):
        dst = small / f"train-{i:06d}.tar"
        if not dst.exists():
            shutil.copyfile(t, dst)
    out = {"recipe": {"batch": args.decode_batch, "workers": 2, "image_px": 224, "crop": "random",
                      "what": "one epoch through the training loader, no model step; PSS of reader + workers",
                      "machine_ram_gib": _ram_gib()}, "sets": {}}
    index = json.loads((base / "index.json").read_text())
    _copy_index(index, small, tars[:n_small_tars])
    _copy_index(index, large, tars * copies)
    ok = False
    try:
        for name, folder, n_tars in (("small", small, n_small_tars), ("large", large, k)):
            disk = sum(p.stat().st_size for p in folder.glob("*.tar"))
            res = _measure_epoch(str(folder), args.decode_batch, 2)
            out["sets"][name] = {**res, "shards": n_tars, "shard_gib": disk / 2**30}
            print(f"memory {name}: {res['images']} images ({res['decoded_gib']:.1f} GiB decoded), peak PSS "
                  f"{res['peak_pss_gib']:.2f} GiB, {res['seconds']:.0f} s", flush=True)
        ok = True
    finally:
        if not args.keep:  # the copies always go; the packed base only after a complete measurement
            for folder in (small, large, *([base] if ok else [])):
                shutil.rmtree(folder, ignore_errors=True)
    s, lg = out["sets"]["small"], out["sets"]["large"]
    out["large_over_small_images"] = lg["images"] / s["images"]
    out["large_over_small_peak_pss"] = lg["peak_pss_gib"] / s["peak_pss_gib"]
    out["goal"] = "peak memory does not grow with the data (large decodes to more than the machine's RAM)"
    out["met"] = lg["decoded_gib"] > out["recipe"]["machine_ram_gib"] and out["large_over_small_peak_pss"] < 1.1
    return out


def _copy_index(index: dict, folder: Path, tars: list[Path]) -> None:
    """The index of a set made of copies of the base's shards (so the reader need not scan them)."""
    split = index["splits"]["train"]
    count = dict(zip(split["shards"], split["counts"]))
    starts, pos = {}, 0
    for name, n in count.items():
        starts[name], pos = pos, pos + n
    labels, counts = [], []
    for t in tars:
        n = count[t.name]
        counts.append(n)
        labels += split["labels"][starts[t.name]:starts[t.name] + n]
    names = [f"train-{i:06d}.tar" for i in range(len(tars))]
    out = {**index, "splits": {"train": {**split, "shards": names, "counts": counts, "n": len(labels),
                                         "labels": labels, "targets": None}}}
    (folder / "index.json").write_text(json.dumps(out))


def _ram_gib() -> float:
    import psutil

    return psutil.virtual_memory().total / 2**30


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma list of parts ({', '.join(PARTS)})")
    ap.add_argument("--data", default=common.DEFAULT_DATA, help="the CIFAR-10 JPEG archive")
    ap.add_argument("--work-dir", default=str(common.REPO_ROOT / "runs" / "b14_streaming"))
    ap.add_argument("--out-dir", default=str(common.RESULTS_DIR / "b14_streaming"))
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the memory part's shard sets")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--width", type=int, default=64, help="ResNet-18 width (64 = the real one)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--decode-batch", type=int, default=256)
    ap.add_argument("--decode-steps", type=int, default=24, help="timed steps, after the warm-up")
    ap.add_argument("--decode-rounds", type=int, default=7)
    ap.add_argument("--decode-workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--large-images", type=int, default=None,
                    help="the large set: at least this many images (default: 1.15 × this machine's RAM at 224 px)")
    ap.add_argument("--epoch-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.epoch_child:
        _epoch_child(args.epoch_child, args.decode_batch, args.workers)
        return 0
    parts = [p for p in args.only.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}; the parts are {', '.join(PARTS)}")
    if not Path(args.data).exists():
        ap.error(f"no CIFAR-10 archive at {args.data} (give --data)")
    work, out_dir = Path(args.work_dir), Path(args.out_dir)
    work.mkdir(parents=True, exist_ok=True)
    for part in parts:
        path = out_dir / f"{part}.json"
        if path.is_file() and not args.force:
            print(f"{part}: done already ({path})")
            continue
        t0 = time.perf_counter()
        result = {"benchmark": f"b14_streaming/{part}", "machine": common.machine_info(),
                  **globals()[part](args, work), "wall_seconds": None}
        result["wall_seconds"] = time.perf_counter() - t0
        common.write_json(path, result)
        print(f"{part}: written {path} ({result['wall_seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
