"""The prepared GPU check (issue 14): one command, under 8 minutes on one GPU, JSON to $OUT (or benchmarks/results/).

Measures, each in the real training loop (`visrep.pretrain`, images/s from its own per-interval log):
  simclr_resnet18   SimCLR ResNet-18 at batch 512, 32 px: fp32 | bf16 | bf16 + channels_last + torch.compile
  mae_vit_base      MAE ViT-B/16 at 224 px in bf16 (batch 128)
  illama_attention  iLLaMA-Base at 224 px: the fused causal kernel (r = 0) against the soft mask (r = 0.5), train step
  streaming         the shard loader's decode rate at 224 px (data.workers) against the step rate it must feed
  byol_cpu_vs_gpu   2 epochs of BYOL (ResNet-18, batch 128) on the same data on the GPU and on the CPU: the loss
                    curves must agree within `--tolerance` (relative, per logged step)

Without CUDA it stops with an error (exit 2), never skipping silently; `--cpu` runs everything at a tiny size on
the CPU instead (the test suite does, to keep the script working).

    bash benchmarks/gpu_check.sh                 # on a GPU machine, from a fresh clone
    python benchmarks/gpu_check.py --cpu --out /tmp/gpu_check.json   # the CPU mode
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

CIFAR = common.REPO_ROOT.parent / "shared" / "data" / "cifar10" / "cifar10-jpeg.tar.gz"


def _run(cfg: dict, work: Path, name: str) -> dict:
    """Train a config; return its logged losses and the images/s of its last logged interval (after warm-up)."""
    import visrep

    cfg = {**cfg, "out_dir": str(work / name)}
    cfg.setdefault("monitor", {"knn_every": 0, "rankme_every": 0, "online_probe": False})
    t0 = time.perf_counter()
    summary = visrep.pretrain(visrep.resolve(cfg), quiet=True)
    rows = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    return {"images_per_s": rows[-1].get("images_per_s") if rows else None, "steps": summary["steps"],
            "losses": [r["loss"] for r in rows], "seconds": round(time.perf_counter() - t0, 2)}


def simclr(args, work: Path, dev: str) -> dict:
    size = args.sizes
    out = {}
    fast = {"precision": "bf16", "channels_last": True, "compile": not args.cpu}  # compile: tests/test_gpu_paths.py
    for name, train in (("fp32", {}), ("bf16", {"precision": "bf16"}), ("bf16_channels_last_compile", fast)):
        cfg = {"method": "simclr", "data": {"dataset": "synthetic", "image_size": 32,
                                            "options": {"n": size["simclr_batch"] * 4}},
               "backbone": {"name": "resnet18", "options": {"cifar_stem": True, "width": size["width"]}},
               "train": {"batch_size": size["simclr_batch"], "steps": size["steps"], "epochs": 1000, "device": dev,
                         "log_every": max(1, size["steps"] // 2), "progress": False, **train}}
        out[name] = _run(cfg, work, f"simclr_{name}")
    base = out["fp32"]["images_per_s"]
    for k in out:
        out[k]["speedup_over_fp32"] = (out[k]["images_per_s"] / base) if base and out[k]["images_per_s"] else None
    return out


def mae(args, work: Path, dev: str) -> dict:
    size = args.sizes
    cfg = {"method": "mae", "data": {"dataset": "synthetic", "image_size": size["vit_px"],
                                     "options": {"n": size["mae_batch"] * 2}},
           "backbone": {"name": size["vit"], "options": {"patch_size": 16}},
           "train": {"batch_size": size["mae_batch"], "steps": size["steps"], "epochs": 1000, "device": dev,
                     "precision": "bf16", "log_every": max(1, size["steps"] // 2), "progress": False}}
    return _run(cfg, work, "mae_vit")


def illama(args, dev: str) -> dict:
    import torch

    from visrep.models import build_backbone

    size = args.sizes
    model = build_backbone(size["illama"], image_size=size["vit_px"], patch_size=16,
                           soft_mask_form="renormalised").to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(size["illama_batch"], 3, size["vit_px"], size["vit_px"], device=dev)
    out = {}
    for path, r in (("fused_causal", 0.0), ("soft_mask", 0.5), ("fused_causal_again", 0.0)):
        model.soft_mask_current.fill_(r)
        times = []
        for i in range(size["steps"] + 2):
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast(device_type="cuda" if dev == "cuda" else "cpu", dtype=torch.bfloat16,
                                enabled=dev == "cuda"):
                loss = model(x).float().square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if dev == "cuda":
                torch.cuda.synchronize()
            if i >= 2:  # warm-up steps left out
                times.append(time.perf_counter() - t0)
        out[path] = {"median_step_s": sorted(times)[len(times) // 2]}
    out["soft_over_fused"] = out["soft_mask"]["median_step_s"] / out["fused_causal"]["median_step_s"]
    return out


def streaming(args, work: Path, step_rate_images_per_s: float | None) -> dict:
    """Pack JPEGs upsized to 256 px, then read them through the training loader at 224-px crops."""
    from visrep.data.pack import pack
    from visrep.data.sources import load_dataset

    size = args.sizes
    shards = work / "shards"
    if not (shards / "index.json").exists():
        pack("synthetic", shards, options={"n": size["stream_n"]}, splits=["train"], resize=256,
             max_count=256, progress=False)
    b = size["stream_batch"]
    ds = load_dataset("shards", "train", str(shards), image_size=size["stream_px"], workers=size["workers"],
                      crop="random", shuffle_block=2 * b)  # groups of 2 steps: the timing spans many of them
    batches = ds.batches(b, seed=0)
    n_steps = min(batches.steps_per_epoch, size["stream_steps"])
    batches(0)  # the workers start and fill their first groups (left out of the timing)
    batches(1)
    t0 = time.perf_counter()
    for s in range(2, n_steps):
        batches(s)
    dt = time.perf_counter() - t0
    batches.close()
    rate = (n_steps - 2) * b / dt if n_steps > 2 else None
    return {"workers": size["workers"], "image_px": size["stream_px"], "decode_images_per_s": rate,
            "training_images_per_s_to_feed": step_rate_images_per_s,
            "loader_keeps_up": (rate >= step_rate_images_per_s) if rate and step_rate_images_per_s else None}


def byol_curves(args, work: Path, dev: str) -> dict:
    size = args.sizes
    if args.cpu or not CIFAR.exists():
        data = {"dataset": "synthetic", "image_size": 32, "options": {"n": size["byol_n"]}}
    else:
        data = {"dataset": "imagefolder", "root": str(CIFAR), "subset": size["byol_n"]}
    base = {"method": "byol", "seed": 0, "data": data,
            "backbone": {"name": "resnet18", "options": {"cifar_stem": True, "width": size["width"]}},
            "train": {"batch_size": 128 if not args.cpu else 16, "epochs": 2, "log_every": 1, "progress": False,
                      "deterministic": True}}
    # on the GPU: GPU against CPU; in --cpu mode: two CPU runs, so the comparison still checks determinism
    pair = (dev, "cpu") if dev != "cpu" else ("cpu", "cpu_again")
    runs = {name: _run({**base, "train": {**base["train"], "device": "cuda" if name == "cuda" else "cpu"}}, work,
                       f"byol_{name}") for name in pair}
    a, b = (runs[name]["losses"] for name in pair)
    worst = max((abs(x - y) / max(abs(y), 1e-8) for x, y in zip(a, b)), default=0.0)
    return {"data": data, "curves": {d: r["losses"] for d, r in runs.items()}, "max_relative_difference": worst,
            "tolerance": args.tolerance, "agree": worst <= args.tolerance and len(a) == len(b) > 0}


SIZES = {
    "gpu": {"simclr_batch": 512, "width": 64, "steps": 30, "vit": "vit_base", "vit_px": 224, "mae_batch": 128,
            "illama": "illama_base", "illama_batch": 64, "stream_n": 8192, "stream_px": 224, "stream_batch": 256,
            "stream_steps": 24, "workers": 8, "byol_n": 10000},
    "cpu": {"simclr_batch": 16, "width": 8, "steps": 4, "vit": "vit_tiny", "vit_px": 32, "mae_batch": 8,
            "illama": "illama_tiny", "illama_batch": 4, "stream_n": 96, "stream_px": 64, "stream_batch": 16,
            "stream_steps": 6, "workers": 1, "byol_n": 64},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (the test suite's mode)")
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_check.json or benchmarks/results/)")
    ap.add_argument("--tolerance", type=float, default=0.02, help="relative loss difference allowed, GPU vs CPU")
    args = ap.parse_args(argv)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: error: CUDA is not available on this machine (torch.cuda.is_available() is False); "
              "run it on a GPU, or pass --cpu for the tiny CPU mode", file=sys.stderr)
        return 2
    dev = "cpu" if args.cpu else "cuda"
    args.sizes = SIZES["cpu" if args.cpu else "gpu"]
    out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                                          else common.result_path("gpu_check"))
    result = {"benchmark": "gpu_check", "mode": dev, "device": torch.cuda.get_device_name(0) if dev == "cuda" else
              "cpu", "sizes": args.sizes, "machine": common.machine_info(), "started_utc": common.now_iso()}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, fn in (("simclr_resnet18", lambda: simclr(args, work, dev)), ("mae_vit_base", lambda: mae(args, work, dev)),
                         ("illama_attention", lambda: illama(args, dev))):
            result[name] = fn()
            print(f"gpu_check: {name} done ({time.perf_counter() - t0:.0f} s)", flush=True)
            common.write_json(out, result)  # what finished is kept if a later part fails
        feed = result["simclr_resnet18"]["bf16_channels_last_compile"]["images_per_s"]
        result["streaming"] = streaming(args, work, feed)
        print(f"gpu_check: streaming done ({time.perf_counter() - t0:.0f} s)", flush=True)
        common.write_json(out, result)
        result["byol_cpu_vs_gpu"] = byol_curves(args, work, dev)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    common.write_json(out, result)
    print(f"gpu_check: wrote {out} in {result['seconds']} s; BYOL curves agree: {result['byol_cpu_vs_gpu']['agree']}")
    return 0 if result["byol_cpu_vs_gpu"]["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
