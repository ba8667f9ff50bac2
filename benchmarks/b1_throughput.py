"""B1: training throughput (images/s) of one SimCLR step on CIFAR-10, visrep vs plain PyTorch vs lightly.

Four implementations of the same SimCLR step, measured in ONE process, interleaved round-robin
(visrep, plain, lightly, visrep_bf16, visrep, plain, ...) so that machine noise hits all of them alike:

  visrep       the real `visrep.pretrain` loop (simclr preset, fp32, online probe and kNN monitor off),
               per-step times read from `metrics.jsonl` (log_every=1).
  plain        a hand-written PyTorch loop: timm ResNet-18 CIFAR stem, 512-2048-256 BN projector, NT-Xent
               inline, visrep's LARS with the preset's settings, visrep's view policy (the augmentation is a
               shared component), random batches from the same uint8 tensor.
  lightly      lightly 1.6's usual recipe: a torchvision-style dataset of PIL images + SimCLRTransform in a
               DataLoader, SimCLRProjectionHead, NTXentLoss, lightly.utils.lars.LARS; same timm backbone.
  visrep_bf16  the visrep loop with train.precision=bf16 (CPU autocast).

Every implementation runs W warm-up steps then N timed steps per round (a fresh model each round). A step's
time is the wall time between the end of the previous step and the end of this one, so it covers getting
the batch (indexing / DataLoader), the augmentation, forward, loss, backward and the optimizer step.

    python benchmarks/b1_throughput.py                      # defaults: threads 2, batch 256, W=2, N=5, 2 rounds
    python benchmarks/b1_throughput.py --warmup 1 --steps 2 --repeats 1 --batch-size 32 --width 16 \
        --out /tmp/b1_smoke.json                            # smoke test
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` next to this file

import common  # noqa: E402  (also puts the repo root on sys.path)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

IMPLS = ("visrep", "plain", "lightly", "visrep_bf16")

# The simclr preset, at batch 256 (visrep/methods/presets.py): LARS lr 0.4 (x batch/256), wd 1e-5,
# eta 0.02, momentum 0.9, biases/norm excluded; projector 512-2048-256 with BN; NT-Xent T=0.2.
LR, WD, ETA, MOMENTUM, TEMPERATURE = 0.4, 1e-5, 0.02, 0.9, 0.2
HIDDEN, OUT = 2048, 256


# ---------------------------------------------------------------------------------------------- visrep
def visrep_config(args, out_dir: str, precision: str, warmup: int, steps: int):
    import visrep

    return visrep.resolve({
        "method": "simclr",
        "seed": 0,
        "out_dir": out_dir,
        "data": {"dataset": "imagefolder", "root": args.data, "split": "train", "test_split": "test"},
        "backbone": {"name": "resnet18", "options": {"cifar_stem": True, "width": args.width}},
        "train": {"batch_size": args.batch_size, "precision": precision, "device": "cpu",
                  "num_threads": args.threads, "max_steps": warmup + steps, "log_every": 1,
                  "progress": False},
        "monitor": {"online_probe": False, "knn_every": 0, "rankme_every": 0},
    })


def run_visrep(args, precision: str = "fp32", warmup: int = 2, steps: int = 5) -> dict:
    """Step times of the real `visrep.pretrain` loop, from its metrics.jsonl (images_per_s, log_every=1).

    The loop measures `seen / (now - t_last_log)` with t_last_log taken right AFTER the previous step's
    metrics line was written, and `now` taken before this step's line is written: the interval holds the
    whole step (batch indexing, schedule assignment, views, forward, loss + isfinite check, backward,
    LARS step, teacher update (no-op for SimCLR), loss.item()) but not the metrics/TensorBoard writes.
    """
    import visrep

    tmp = tempfile.mkdtemp(prefix="b1_visrep_")
    try:
        cfg = visrep_config(args, str(Path(tmp) / "run"), precision, warmup, steps)
        t0 = time.perf_counter()
        summary = visrep.pretrain(cfg, quiet=True)
        wall = time.perf_counter() - t0
        lines = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
        logged = [r for r in lines if "images_per_s" in r]
        timed = [r for r in logged if r["step"] > warmup]
        per_step = [args.batch_size / r["images_per_s"] for r in timed]
        return {"step_seconds": per_step, "losses": [r["loss"] for r in timed], "steps_run": summary["steps"],
                "stop_reason": summary["stop_reason"], "call_wall_s": wall}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def visrep_recipe(args, precision: str) -> dict:
    w, n = (args.warmup, args.steps) if precision == "fp32" else (args.bf16_warmup, args.bf16_steps)
    cfg = visrep_config(args, "/tmp/unused", precision, w, n)
    d = cfg.to_dict()
    return {
        "what": "visrep.pretrain(cfg) -- the library's single training loop",
        "config": {k: d[k] for k in ("method", "views", "backbone", "projector", "predictor", "target", "objective",
                                      "optim", "train", "monitor")},
        "notes": ["online probe and kNN monitor OFF (monitor.online_probe=false, monitor.knn_every=0, monitor.rankme_every=0)",
                  f"precision={precision}", "lr at the timed steps is inside the 10-epoch linear warm-up "
                  "(the value does not change the cost of a step)",
                  "data order: per-epoch seeded permutation; views seeded per step"],
        "timing_source": "metrics.jsonl images_per_s with log_every=1; warm-up steps skipped",
    }


# ---------------------------------------------------------------------------------------------- plain
def nt_xent(z0: torch.Tensor, z1: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent over the 2B projections: the positive of row i is its other view, every other row
    is a negative, the loss is the mean cross entropy over the 2B rows."""
    b = z0.shape[0]
    z = F.normalize(torch.cat([z0, z1]).float(), dim=1)
    logits = z @ z.t() / temperature
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, target)


def run_plain(args, images: torch.Tensor, round_idx: int) -> dict:
    from visrep.data.views import build_views
    from visrep.train.optim import LARS

    torch.manual_seed(round_idx)
    backbone = common.timm_cifar_resnet("resnet18", args.width)
    dim = backbone.num_features
    projector = nn.Sequential(nn.Linear(dim, HIDDEN, bias=False), nn.BatchNorm1d(HIDDEN), nn.ReLU(inplace=True),
                              nn.Linear(HIDDEN, OUT))
    policy = build_views("simclr", 32, mean=common.IMAGENET_MEAN, std=common.IMAGENET_STD)
    decay, no_decay = common.bias_norm_groups([backbone, projector], WD)
    opt = LARS([{**decay, "lars_exclude": False}, {**no_decay, "lars_exclude": True}],
               lr=LR * args.batch_size / 256, momentum=MOMENTUM, eta=ETA)
    backbone.train()
    projector.train()
    b = args.batch_size
    g = torch.Generator().manual_seed(1000 + round_idx)
    perm = torch.randperm(len(images), generator=g)
    times, losses = [], []
    t_prev = time.perf_counter()
    for step in range(args.warmup + args.steps):
        idx = perm[step * b:(step + 1) * b]
        x = images[idx]
        v0, v1 = policy(x, seed=round_idx * 1_000_003 + step)
        z0, z1 = projector(backbone(v0)), projector(backbone(v1))
        loss = nt_xent(z0, z1, TEMPERATURE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        t = time.perf_counter()
        times.append(t - t_prev)
        t_prev = t
    return {"step_seconds": times[args.warmup:], "losses": losses[args.warmup:]}


def plain_recipe(args) -> dict:
    return {
        "what": "hand-written PyTorch loop in this script",
        "backbone": f"timm.create_model('resnet18', num_classes=0{', channels/stem_width for width ' + str(args.width) if args.width != 64 else ''}) "
                    "+ CIFAR stem (3x3 s1 conv1, no max-pool), built with timm directly (same state-dict "
                    "shapes as visrep's build_backbone: checked)",
        "projector": f"Linear(d,{HIDDEN},bias=False)-BN-ReLU-Linear({HIDDEN},{OUT}) (visrep simclr preset's mlp(2048, 256))",
        "loss": f"NT-Xent written inline (nt_xent in this script), T={TEMPERATURE}",
        "optimizer": f"visrep.train.optim.LARS lr={LR}*batch/256 (constant), momentum={MOMENTUM}, eta={ETA}, "
                     f"wd={WD}; biases/norm params in a group without decay and without LARS adaptation",
        "views": "visrep.data.views.build_views('simclr', 32, ImageNet mean/std) -- the shared augmentation "
                 "component (batched torch/kornia on the uint8 batch), seeded per step",
        "data": "random batches (seeded permutation) indexed from the same decoded uint8 [50000,3,32,32] tensor",
        "forward": "one backbone+projector forward per view (as visrep and lightly do)",
    }


# ---------------------------------------------------------------------------------------------- lightly
def lightly_simclr_transform():
    """lightly's SimCLRTransform at 32 px with visrep's simclr policy parameters (which are also lightly's
    defaults): crop scale (0.08, 1), flip 0.5, jitter (0.8, 0.8, 0.8, 0.2) p=0.8, grayscale 0.2, blur
    p=0.5 sigma (0.1, 2), ImageNet normalisation."""
    from lightly.transforms import SimCLRTransform

    return SimCLRTransform(input_size=32, cj_prob=0.8, cj_strength=1.0, cj_bright=0.8, cj_contrast=0.8, cj_sat=0.8,
                           cj_hue=0.2, min_scale=0.08, random_gray_scale=0.2, gaussian_blur=0.5, sigmas=(0.1, 2.0),
                           vf_prob=0.0, hf_prob=0.5, rr_prob=0.0,
                           normalize={"mean": list(common.IMAGENET_MEAN), "std": list(common.IMAGENET_STD)})


AUGMENTATION_DIFFERENCES = [
    "lightly/torchvision run per image on PIL images in the DataLoader; visrep runs batched on the uint8 tensor",
    "RandomResizedCrop: torchvision crops then resizes with PIL bilinear (antialiased when downscaling); visrep "
    "samples the same boxes (torchvision's 10-try rule + fallback) but resamples with one bilinear grid_sample "
    "(no antialias) with the flip folded in",
    "ColorJitter: torchvision draws a random op order per image; visrep one order per batch (as kornia)",
    "GaussianBlur: lightly uses PIL's GaussianBlur(radius=sigma) (no fixed kernel size); visrep a 3x3 kernel "
    "at 32 px (~10% of the side, as SimCLR's 23 px at 224) via kornia, same sigma range (0.1, 2)",
    "solarize (BYOL view 2): PIL solarize threshold 128 on uint8 vs visrep x >= 0.5 on [0,1] floats (same pixels)",
]


def run_lightly(args, images: torch.Tensor, labels: torch.Tensor, round_idx: int) -> dict:
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.utils.lars import LARS as LightlyLARS

    torch.manual_seed(round_idx)
    backbone = common.timm_cifar_resnet("resnet18", args.width)
    head = SimCLRProjectionHead(input_dim=backbone.num_features, hidden_dim=HIDDEN, output_dim=OUT)
    criterion = NTXentLoss(temperature=TEMPERATURE)
    ds = common.UInt8ImageDataset(images, labels, lightly_simclr_transform())
    g = torch.Generator().manual_seed(2000 + round_idx)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.num_workers, generator=g,
                                         persistent_workers=args.num_workers > 0)
    opt = LightlyLARS(common.bias_norm_groups([backbone, head], WD), lr=LR * args.batch_size / 256,
                      momentum=MOMENTUM, weight_decay=WD, trust_coefficient=ETA)
    backbone.train()
    head.train()
    times, losses = [], []
    it = iter(loader)
    t_prev = time.perf_counter()
    for _ in range(args.warmup + args.steps):
        (x0, x1), _y = next(it)
        z0, z1 = head(backbone(x0)), head(backbone(x1))
        loss = criterion(z0, z1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        t = time.perf_counter()
        times.append(t - t_prev)
        t_prev = t
    del it, loader
    return {"step_seconds": times[args.warmup:], "losses": losses[args.warmup:]}


def lightly_recipe(args) -> dict:
    return {
        "what": "lightly 1.6 usual recipe, written in this script",
        "data": "torch Dataset over the decoded images (numpy HWC uint8 -> PIL per item, like "
                f"torchvision.datasets.CIFAR10) + torch DataLoader(batch={args.batch_size}, shuffle, drop_last, "
                f"num_workers={args.num_workers})",
        "transform": "lightly.transforms.SimCLRTransform(input_size=32, cj_prob=0.8, cj_strength=1.0, "
                     "cj_bright=0.8, cj_contrast=0.8, cj_sat=0.8, cj_hue=0.2, min_scale=0.08, random_gray_scale=0.2, "
                     "gaussian_blur=0.5, sigmas=(0.1, 2), hf_prob=0.5, ImageNet normalize)",
        "backbone": "same timm ResNet-18 CIFAR stem as 'plain'",
        "projector": f"lightly.models.modules.SimCLRProjectionHead(input_dim=d, hidden_dim={HIDDEN}, output_dim={OUT})",
        "loss": f"lightly.loss.NTXentLoss(temperature={TEMPERATURE})",
        "optimizer": f"lightly.utils.lars.LARS(lr={LR}*batch/256, momentum={MOMENTUM}, weight_decay={WD}, "
                     f"trust_coefficient={ETA}); biases/norm params in a group with weight_decay=0 (lightly's "
                     "LARS then skips the adaptation for them)",
        "augmentation_differences_vs_visrep": AUGMENTATION_DIFFERENCES,
    }


# ---------------------------------------------------------------------------------------------- main
def summarize(step_seconds: list[float], batch: int) -> dict:
    ips = [batch / s for s in step_seconds]
    return {"median_images_per_s": common.median(ips), "median_step_s": common.median(step_seconds),
            "min_step_s": min(step_seconds) if step_seconds else None,
            "max_step_s": max(step_seconds) if step_seconds else None, "n_timed_steps": len(step_seconds)}


def ratio(a, b):
    return a / b if (a and b) else None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads for every implementation (2)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per round, not timed (2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round (5)")
    p.add_argument("--repeats", type=int, default=2, help="round-robin rounds (2)")
    p.add_argument("--bf16-warmup", type=int, default=1, help="visrep_bf16 warm-up steps (1; bf16 autocast is "
                   "~10x slower than fp32 on CPUs without native bf16, e.g. AVX2-only)")
    p.add_argument("--bf16-steps", type=int, default=2, help="visrep_bf16 timed steps (2)")
    p.add_argument("--bf16-rounds", type=int, default=1, help="rounds that include visrep_bf16 (1: the first only)")
    p.add_argument("--num-workers", type=int, default=0,
                   help="lightly DataLoader workers (0: augmentation on the same threads as everyone else)")
    p.add_argument("--width", type=int, default=64, help="ResNet-18 base width (64 = the standard ResNet-18)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list from {','.join(IMPLS)}")
    p.add_argument("--data", default=common.DEFAULT_DATA, help="CIFAR-10 image-folder archive")
    p.add_argument("--out", default=str(common.result_path("b1_throughput")))
    args = p.parse_args(argv)
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    bad = [s for s in impls if s not in IMPLS]
    if bad:
        p.error(f"unknown implementation(s) {bad}; choose from {IMPLS}")

    load_at_start = common.load_check("b1_throughput")
    common.set_threads(args.threads)
    t_load = time.perf_counter()
    train = common.load_cifar10("train", args.data)  # decoded once and cached (not timed)
    load_s = time.perf_counter() - t_load
    images, labels = train.images, train.labels
    if "plain" in impls or "lightly" in impls:
        from visrep.models import build_backbone

        assert common.same_architecture(common.timm_cifar_resnet("resnet18", args.width),
                                        build_backbone("resnet18", cifar_stem=True, width=args.width))

    started = common.now_iso()
    per_impl: dict[str, list[float]] = {k: [] for k in impls}
    rounds = []
    for r in range(args.repeats):
        rnd = {"round": r}
        for name in impls:
            t0 = time.perf_counter()
            if name == "visrep":
                res = run_visrep(args, "fp32", args.warmup, args.steps)
            elif name == "visrep_bf16":
                if r >= args.bf16_rounds:
                    continue
                res = run_visrep(args, "bf16", args.bf16_warmup, args.bf16_steps)
            elif name == "plain":
                res = run_plain(args, images, r)
            else:
                res = run_lightly(args, images, labels, r)
            res["round_wall_s"] = time.perf_counter() - t0
            res.update(summarize(res["step_seconds"], args.batch_size))
            per_impl[name] += res["step_seconds"]
            rnd[name] = res
            print(f"round {r} {name:12s} median {res['median_images_per_s']:.1f} img/s "
                  f"(steps {', '.join(f'{s:.2f}' for s in res['step_seconds'])} s)", flush=True)
        rounds.append(rnd)

    results = {k: summarize(v, args.batch_size) for k, v in per_impl.items()}
    med = {k: v["median_images_per_s"] for k, v in results.items()}
    ratios, per_round = {}, {}
    for key, (a, b) in {"visrep_over_plain": ("visrep", "plain"), "visrep_over_lightly": ("visrep", "lightly"),
                        "visrep_bf16_over_visrep_fp32": ("visrep_bf16", "visrep"),
                        "plain_over_lightly": ("plain", "lightly")}.items():
        if a in med and b in med:
            ratios[key] = ratio(med[a], med[b])
            per_round[key] = [ratio(rd[a]["median_images_per_s"], rd[b]["median_images_per_s"])
                              for rd in rounds if a in rd and b in rd]
    targets = {}
    if "visrep_over_plain" in ratios:
        targets["visrep_ge_0.97x_plain"] = {"target": 0.97, "measured": ratios["visrep_over_plain"],
                                            "met": ratios["visrep_over_plain"] >= 0.97}
    if "visrep_over_lightly" in ratios:
        targets["visrep_ge_1.0x_lightly"] = {"target": 1.0, "measured": ratios["visrep_over_lightly"],
                                             "met": ratios["visrep_over_lightly"] >= 1.0}

    recipes = {}
    for name in impls:
        recipes[name] = (visrep_recipe(args, "fp32") if name == "visrep" else
                         visrep_recipe(args, "bf16") if name == "visrep_bf16" else
                         plain_recipe(args) if name == "plain" else lightly_recipe(args))
    out = {
        "benchmark": "B1 SimCLR training-step throughput, CIFAR-10 train split, CPU",
        "machine": {**common.machine_info(), "load_at_start": load_at_start},
        "started_utc": started,
        "finished_utc": common.now_iso(),
        "settings": {"threads": args.threads, "batch_size": args.batch_size, "warmup_steps": args.warmup,
                     "timed_steps": args.steps, "repeats": args.repeats, "order": impls,
                     "visrep_bf16": {"warmup_steps": args.bf16_warmup, "timed_steps": args.bf16_steps,
                                     "rounds": min(args.bf16_rounds, args.repeats)},
                     "interleaving": "round-robin: every round runs each implementation once, in this order",
                     "lightly_num_workers": args.num_workers, "backbone": f"resnet18 CIFAR stem, width {args.width}",
                     "image_size": 32, "views": 2, "data": args.data, "n_train": len(train),
                     "dataset_load_s_not_timed": round(load_s, 2)},
        "timed_span": ("wall time from the end of one step to the end of the next: get the batch (tensor "
                       "indexing, or DataLoader next() incl. PIL transforms and collate for lightly), "
                       "augmentation, forward of both views, loss, backward, optimizer step, loss.item(). "
                       "Excluded everywhere: JPEG decoding (done once, cached), model/optimizer construction, "
                       "warm-up steps; for visrep also the metrics.jsonl/TensorBoard writes"),
        "results": results,
        "median_images_per_s": med,
        "ratios_of_medians": ratios,
        "per_round_ratios": per_round,
        "targets": targets,
        "recipes": recipes,
        "rounds": rounds,
    }
    path = common.write_json(args.out, out)
    print(json.dumps({"median_images_per_s": med, "ratios": ratios, "targets": targets}, indent=2))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
