"""B2: representation quality under the same wall-clock budget, visrep vs lightly, SimCLR and BYOL, CIFAR-10.

Each run pretrains for the same wall-clock budget (`--budget-s`, default 600 s) on the same CPU threads,
then its backbone is scored by weighted kNN on the 10,000 test images with the 50,000 training images as
the bank, by one piece of code (visrep.evaluate: extract_features + knn_classify) and one eval transform
for every run. Runs:

  visrep_simclr, visrep_byol    `visrep.pretrain` with the `simclr` / `byol` presets; overrides: backbone
                                (resnet18 CIFAR stem, width 16), batch, time budget, lr schedule, monitors off.
  lightly_simclr, lightly_byol  the same recipe written with lightly 1.6 parts (transforms, heads, losses,
                                LARS, update_momentum / cosine_schedule), same backbone built the same way.
  random_init                   the untrained backbone (same seed, same builder).

The runs take the budget each, so they run one after another (start/end times are recorded).
`--only a,b` runs a subset and MERGES it into the existing JSON, so parts can be run separately.

    python benchmarks/b2_quality.py                                  # all five runs, 600 s each
    python benchmarks/b2_quality.py --only visrep_byol,lightly_byol  # two runs, merged into the JSON
    python benchmarks/b2_quality.py --budget-s 20 --train-subset 2000 --test-subset 500 \
        --out /tmp/b2_smoke.json                                     # end-to-end sanity check
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

RUNS = ("visrep_simclr", "visrep_byol", "lightly_simclr", "lightly_byol", "random_init",
        # the A/B arms: each loop with the other side's views (SimCLR only)
        "visrep_simclr_lightlyviews", "lightly_simclr_visrepviews",
        # visrep's SimCLR with the official projection head, batch-normalised output (the preset since B2 found it)
        "visrep_simclr_bnhead")


def parse_run(name: str) -> tuple[str, str, str]:
    """'visrep_simclr_lightlyviews' -> ('visrep', 'simclr', 'lightly'): loop, method, views."""
    name = name.removesuffix("_bnhead")
    impl, rest = name.split("_", 1)
    method, _, views = rest.partition("_")
    return impl, method, (views[: -len("views")] if views else impl)


# ---------------------------------------------------------------------------------------------- schedule
def steps_per_epoch(n_train: int, batch: int) -> int:
    return n_train // batch  # drop_last, as visrep's loop and the DataLoader below


def schedule_plan(args, n_train: int) -> dict:
    """The lr / EMA-momentum schedule, identical for visrep and lightly.

    constant (default): linear warm-up from 0 over --warmup-steps, then the preset's peak lr until the
        budget ends; BYOL's EMA momentum constant at the preset's base (0.99). Needs no guess of how many
        steps fit in the budget, so the faster implementation simply gets more steps at the same lr.
    cosine: linear warm-up, then half-cosine to 0 over --cosine-epochs whole epochs (visrep's schedule
        horizon is epochs x steps_per_epoch); EMA momentum cosine 0.99 -> 1 over the same horizon. A run
        that finishes the horizon before the budget stops there (recorded as stop_reason=completed).
    """
    spe = steps_per_epoch(n_train, args.batch_size)
    if args.schedule == "constant":
        epochs = max(1, math.ceil(args.horizon_steps / spe))  # only a stop condition far beyond the budget
    else:
        epochs = int(args.cosine_epochs)
    return {"kind": args.schedule, "steps_per_epoch": spe, "epochs": epochs, "total_steps": epochs * spe,
            "warmup_steps": min(int(args.warmup_steps), epochs * spe)}


def lr_at(step: int, base: float, final: float, total: int, warmup: int) -> float:
    """Linear warm-up 0 -> base over `warmup` steps, then half-cosine base -> final over the rest
    (the formula visrep's loop uses; with final == base it is warm-up + constant)."""
    if step < warmup:
        return base * step / warmup
    n = max(total - warmup, 1)
    t = step - warmup
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * t / n))


# ---------------------------------------------------------------------------------------------- visrep
def preset(method: str):
    import visrep

    return visrep.resolve({"method": method, "data": {"dataset": "synthetic"}})


class LightlyViewPolicy(nn.Module):
    """lightly's per-image SimCLRTransform behind visrep's view-policy interface (``policy(uint8 batch, seed)``
    -> list of normalised views), so visrep's loop can train on lightly's views (the A/B arm). It runs on
    PIL images one by one in the main process, as lightly's own loop does with num_workers=0."""

    n_global, n_local, n_views, local_size = 2, 0, 2, None

    def __init__(self, image_size: int):
        super().__init__()
        self.image_size = image_size
        self.transform = lightly_transform("simclr")

    @torch.no_grad()
    def forward(self, images: torch.Tensor, seed: int) -> list[torch.Tensor]:
        import random

        import numpy as np
        from PIL import Image

        np_state, py_state = np.random.get_state(), random.getstate()
        try:  # torchvision draws from torch's RNG; lightly's blur and solarize from numpy's
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                np.random.seed(seed % 2**32)
                random.seed(seed)
                pairs = [self.transform(Image.fromarray(a)) for a in images.permute(0, 2, 3, 1).cpu().numpy()]
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        return [torch.stack([p[i] for p in pairs]) for i in range(2)]


def register_lightly_views() -> None:
    from visrep.data.views import VIEWS

    if "lightly_simclr" not in VIEWS.names():
        VIEWS.register("lightly_simclr")(lambda image_size, mean=None, std=None: LightlyViewPolicy(image_size))


def visrep_config(args, method: str, out_dir: str, plan: dict, views: str = "visrep"):
    import visrep

    p = preset(method)
    peak = p.optim.lr * (args.batch_size / 256 if p.optim.lr_scaling == "linear" else 1.0)
    spe = plan["steps_per_epoch"]
    # min_lr is scaled by batch/256 like lr, so the constant schedule passes the preset's unscaled lr.
    # lars_clip_lr off: lightly's LARS has no clipping, and the recipes must be the same on both sides.
    optim = {"warmup_epochs": plan["warmup_steps"] / spe, "lars_clip_lr": False,
             "min_lr": p.optim.lr if plan["kind"] == "constant" else 0.0}
    cfg = {
        "method": method,
        "seed": args.seed,
        "out_dir": out_dir,
        "data": {"dataset": "imagefolder", "root": args.data, "split": "train", "test_split": "test",
                 "subset": args.train_subset},
        "backbone": {"name": "resnet18", "options": {"cifar_stem": True, "width": args.width}},
        "optim": optim,
        "train": {"epochs": plan["epochs"], "batch_size": args.batch_size, "time_budget_s": float(args.budget_s),
                  "num_threads": args.threads, "device": "cpu", "progress": False, "log_every": 1},
        "monitor": {"online_probe": False, "knn_every": 0, "rankme_every": 0},
    }
    if views == "lightly":
        register_lightly_views()
        cfg["views"] = {"policy": "lightly_simclr", "options": {}}
    if plan["kind"] == "constant" and p.target.branch == "ema":
        cfg["target"] = {"momentum_end": p.target.momentum}  # constant EMA momentum
    return visrep.resolve(cfg)


def run_visrep(args, method: str, plan: dict, work: Path, views: str = "visrep", bn_head: bool = False) -> dict:
    import visrep
    from visrep.runs import load_backbone

    out_dir = work / f"visrep_{method}_{views}views{'_bnhead' if bn_head else ''}_seed{args.seed}"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    cfg = visrep_config(args, method, str(out_dir), plan, views)
    if bn_head:  # google-research/simclr's projection head: the output batch-normalised, scale only
        d = cfg.to_dict()
        d["projector"] = {**d["projector"], "last_bn": True, "last_bn_center": False}
        cfg = visrep.resolve(d)
    started = common.now_iso()
    t0 = time.perf_counter()
    summary = visrep.pretrain(cfg, quiet=True)  # the budget clock is visrep's own (train.time_budget_s)
    wall = time.perf_counter() - t0
    ended = common.now_iso()
    mpath = out_dir / "metrics.jsonl"  # absent when the run logged nothing (fewer than log_every steps)
    lines = [json.loads(x) for x in mpath.read_text().splitlines() if x.strip()] if mpath.is_file() else []
    logged = [r for r in lines if "images_per_s" in r and "step" in r]
    curve = [[r["step"], r["loss"]] for r in logged if r["step"] % 10 == 0 or r["step"] == summary["steps"]]
    ips = [r["images_per_s"] for r in logged]
    # log_every=1: the logged intervals cover every step (not the log writes), so the rest of the budget
    # clock is setup (dataset read, model build, TensorBoard writer) plus epoch-end checkpoints.
    loop_s = sum(args.batch_size / x for x in ips if x > 0)
    backbone, info = load_backbone(str(out_dir), branch="student")
    d = cfg.to_dict()
    return {
        "backbone_module": backbone,
        "record": {
            "implementation": "visrep", "method": method, "views": views, "started_utc": started, "ended_utc": ended,
            "budget_s": args.budget_s, "seconds_in_budget_clock": summary["seconds"], "call_wall_s": wall,
            "setup_s_in_budget_est": summary["seconds"] - loop_s,
            "steps": summary["steps"], "epochs": summary["epochs_done"], "stop_reason": summary["stop_reason"],
            "images_per_s_overall": summary["steps"] * args.batch_size / max(summary["seconds"], 1e-9),
            "images_per_s_median_logged": common.median(ips),
            "final_loss": summary["final_loss"], "loss_curve_every_10": curve,
            "budget_clock": "visrep's train.time_budget_s: the training loop only (from its first step; not "
                            "reading the data or building the model), checked after every step; includes the "
                            "checkpoint written at each epoch end",
            "recipe": {k: d[k] for k in ("method", "seed", "data", "views", "backbone", "projector", "predictor",
                                         "target", "objective", "optim", "train", "monitor")},
            "recipe_notes": [
                "the visrep preset with only these overrides: backbone, train.batch_size/epochs/time_budget_s/"
                "num_threads/device/progress/log_every=1 (per-step timing), optim.warmup_epochs/min_lr (the "
                "schedule), monitor off (online probe and kNN monitor, which lightly does not run)"
                + (", target.momentum_end (constant schedule)" if plan["kind"] == "constant" and method == "byol"
                   else ""),
                "lr: linear warm-up over %d steps then %s" % (plan["warmup_steps"], "constant" if plan["kind"] ==
                                                               "constant" else "cosine to 0"),
            ] + (["views: lightly's SimCLRTransform per image (PIL) behind visrep's view-policy interface "
                  "(LightlyViewPolicy, registered as views.policy=lightly_simclr from this file)"]
                 if views == "lightly" else []),
            "weights_fingerprint": info.get("fingerprint"),
        },
    }


# ---------------------------------------------------------------------------------------------- lightly
def lightly_transform(method: str):
    """lightly transforms with visrep's view-policy parameters (simclr: jitter (0.8,0.8,0.8,0.2) p=.8,
    gray .2, blur .5; byol: jitter (0.4,0.4,0.2,0.1) p=.8, gray .2, blur (1, .1), solarize (0, .2);
    crop scale (0.08, 1), flip .5, blur sigma (0.1, 2), ImageNet normalisation)."""
    norm = {"mean": list(common.IMAGENET_MEAN), "std": list(common.IMAGENET_STD)}
    if method == "simclr":
        from lightly.transforms import SimCLRTransform

        return SimCLRTransform(input_size=32, cj_prob=0.8, cj_strength=1.0, cj_bright=0.8, cj_contrast=0.8,
                               cj_sat=0.8, cj_hue=0.2, min_scale=0.08, random_gray_scale=0.2, gaussian_blur=0.5,
                               sigmas=(0.1, 2.0), hf_prob=0.5, normalize=norm)
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform

    common_kw = dict(input_size=32, cj_prob=0.8, cj_strength=1.0, cj_bright=0.4, cj_contrast=0.4, cj_sat=0.2,
                     cj_hue=0.1, min_scale=0.08, random_gray_scale=0.2, sigmas=(0.1, 2.0), hf_prob=0.5,
                     normalize=norm)
    return BYOLTransform(view_1_transform=BYOLView1Transform(gaussian_blur=1.0, solarization_prob=0.0, **common_kw),
                         view_2_transform=BYOLView2Transform(gaussian_blur=0.1, solarization_prob=0.2, **common_kw))


def run_lightly(args, method: str, plan: dict, views: str = "lightly") -> dict:
    """The same recipe written the lightly way. The budget clock covers the training loop only, like
    visrep's train.time_budget_s (not reading the data or building model/optimizer/DataLoader)."""
    from lightly.loss import NegativeCosineSimilarity, NTXentLoss
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, SimCLRProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.lars import LARS
    from lightly.utils.scheduler import cosine_schedule

    started = common.now_iso()
    t_start = time.time()
    p = preset(method)
    train = common.load_cifar10("train", args.data).subset(args.train_subset, args.seed)
    torch.manual_seed(args.seed)
    backbone = common.timm_cifar_resnet("resnet18", args.width)
    dim = backbone.num_features
    proj_spec, pred_spec = p.projector, p.predictor
    if method == "simclr":
        projector = SimCLRProjectionHead(input_dim=dim, hidden_dim=proj_spec["hidden_dim"],
                                         output_dim=proj_spec["out_dim"])
        predictor = None
        ntxent = NTXentLoss(temperature=p.objective.params["temperature"])
    else:
        projector = BYOLProjectionHead(input_dim=dim, hidden_dim=proj_spec["hidden_dim"],
                                       output_dim=proj_spec["out_dim"])
        predictor = BYOLPredictionHead(input_dim=proj_spec["out_dim"], hidden_dim=pred_spec["hidden_dim"],
                                       output_dim=pred_spec["out_dim"])
        backbone_m, projector_m = copy.deepcopy(backbone), copy.deepcopy(projector)
        deactivate_requires_grad(backbone_m)
        deactivate_requires_grad(projector_m)
        neg_cos = NegativeCosineSimilarity()
    student = [m for m in (backbone, projector, predictor) if m is not None]
    peak = p.optim.lr * (args.batch_size / 256 if p.optim.lr_scaling == "linear" else 1.0)
    final_lr = peak if plan["kind"] == "constant" else 0.0
    opt = LARS(common.bias_norm_groups(student, p.optim.weight_decay), lr=peak, momentum=p.optim.momentum,
               weight_decay=p.optim.weight_decay, trust_coefficient=p.optim.lars_eta)
    m_start = p.target.momentum
    m_end = m_start if plan["kind"] == "constant" else p.target.momentum_end
    g = torch.Generator().manual_seed(args.seed)
    if views == "lightly":
        dataset = common.UInt8ImageDataset(train.images, train.labels, lightly_transform(method))
    else:  # the A/B arm: uint8 batches, then visrep's batched views (the policy the preset names)
        from visrep.data.views import build_views

        dataset = torch.utils.data.TensorDataset(train.images, train.labels)
        policy = build_views(p.views.policy, 32, **p.views.options)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.num_workers, generator=g,
                                         persistent_workers=args.num_workers > 0)
    for m in student:
        m.train()
    if predictor is not None:
        backbone_m.train()
        projector_m.train()
    total, warm = plan["total_steps"], plan["warmup_steps"]
    step, losses, curve, stop = 0, [], [], "completed"
    t_loop = time.time()
    while step < total and stop == "completed":
        for x, _ in loader:
            x0, x1 = x if views == "lightly" else policy(x, seed=args.seed * 1_000_003 + step)
            lr = lr_at(step, peak, final_lr, total, warm)
            for grp in opt.param_groups:
                grp["lr"] = lr
            if method == "simclr":
                loss = ntxent(projector(backbone(x0)), projector(backbone(x1)))
            else:
                mom = cosine_schedule(step, total, m_start, m_end)
                update_momentum(backbone, backbone_m, m=mom)
                update_momentum(projector, projector_m, m=mom)
                p0, p1 = predictor(projector(backbone(x0))), predictor(projector(backbone(x1)))
                with torch.no_grad():
                    z0, z1 = projector_m(backbone_m(x0)), projector_m(backbone_m(x1))
                # BYOL's loss in the paper's scale (the sum over both directions of 2 - 2cos, what visrep's
                # `byol` objective computes): 4 + 2 * (NegCos(p0, z1) + NegCos(p1, z0)); same value and
                # gradient as visrep's. (lightly's examples use 0.5 * (...), a 4x smaller gradient.)
                loss = 4.0 + 2.0 * (neg_cos(p0, z1.detach()) + neg_cos(p1, z0.detach()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            losses.append(loss.item())
            if step % 10 == 0:
                curve.append([step, losses[-1]])
            if step >= total:
                break
            if time.time() - t_loop >= args.budget_s:
                stop = "time_budget"
                break
    seconds = time.time() - t_start
    loop_s = time.time() - t_loop
    if losses and (not curve or curve[-1][0] != step):
        curve.append([step, losses[-1]])
    ended = common.now_iso()
    backbone.eval()
    spe = plan["steps_per_epoch"]
    record = {
        "implementation": "lightly", "method": method, "views": views, "started_utc": started, "ended_utc": ended,
        "budget_s": args.budget_s, "seconds_in_budget_clock": seconds, "setup_s_in_budget": seconds - loop_s,
        "steps": step, "epochs": step / spe, "stop_reason": stop,
        "images_per_s_overall": step * args.batch_size / max(seconds, 1e-9),
        "final_loss": losses[-1] if losses else None, "loss_curve_every_10": curve,
        "budget_clock": "time.time() from the start of the training loop (after reading the data and building "
                        "model/optimizer/DataLoader, as visrep's train.time_budget_s); checked after every step",
        "recipe": lightly_recipe(args, method, p, plan, peak, final_lr, m_start, m_end),
    }
    if views == "visrep":
        record["recipe"]["transform"] = (f"visrep's batched '{p.views.policy}' view policy on each uint8 batch "
                                         "(torch.utils.data.TensorDataset + the same DataLoader), seed per step")
        record["recipe"]["data"] = record["recipe"]["data"].replace("numpy HWC uint8 -> PIL per item",
                                                                    "uint8 NCHW tensors")
    return {"backbone_module": backbone, "record": record}


def lightly_recipe(args, method, p, plan, peak, final_lr, m_start, m_end) -> dict:
    heads = (f"SimCLRProjectionHead(input_dim=d, hidden_dim={p.projector['hidden_dim']}, "
             f"output_dim={p.projector['out_dim']})" if method == "simclr" else
             f"BYOLProjectionHead(d, {p.projector['hidden_dim']}, {p.projector['out_dim']}) + "
             f"BYOLPredictionHead({p.projector['out_dim']}, {p.predictor['hidden_dim']}, {p.predictor['out_dim']}); "
             "momentum copies of backbone+projector (deepcopy + deactivate_requires_grad)")
    loss = (f"lightly.loss.NTXentLoss(temperature={p.objective.params['temperature']})" if method == "simclr" else
            "4 + 2 * (NegativeCosineSimilarity(p0, z1_t) + NegativeCosineSimilarity(p1, z0_t)) == visrep's byol "
            "loss (sum over directions of 2 - 2cos), value and gradient")
    return {
        "transform": ("lightly.transforms.SimCLRTransform(input_size=32, cj 0.8/0.8/0.8/0.2 p=0.8, min_scale=0.08, "
                      "gray 0.2, blur 0.5 sigmas (0.1, 2), hf 0.5, ImageNet normalize)" if method == "simclr" else
                      "lightly.transforms.BYOLTransform(View1(blur 1.0, solarize 0.0), View2(blur 0.1, solarize 0.2); "
                      "both input_size=32, cj 0.4/0.4/0.2/0.1 p=0.8, min_scale=0.08, gray 0.2, sigmas (0.1, 2), "
                      "hf 0.5, ImageNet normalize)"),
        "data": f"torch Dataset (numpy HWC uint8 -> PIL per item) + DataLoader(batch={args.batch_size}, shuffle, "
                f"drop_last, num_workers={args.num_workers})",
        "backbone": f"timm resnet18 num_classes=0, channels ({args.width},{2*args.width},{4*args.width},"
                    f"{8*args.width}), stem_width {args.width}, CIFAR stem (3x3 s1 conv1, no max-pool) -- the "
                    "same architecture as visrep's build_backbone (checked), built with timm directly",
        "heads": heads,
        "loss": loss,
        "optimizer": f"lightly.utils.lars.LARS(lr set per step, momentum={p.optim.momentum}, "
                     f"weight_decay={p.optim.weight_decay}, trust_coefficient={p.optim.lars_eta}); biases/norm "
                     "params in a weight_decay=0 group (lightly's LARS then skips their adaptation)",
        "lr_schedule": {"peak": peak, "final": final_lr, "warmup_steps": plan["warmup_steps"],
                        "horizon_steps": plan["total_steps"], "kind": plan["kind"]},
        "ema_momentum": None if method == "simclr" else
        {"start": m_start, "end": m_end, "schedule": "lightly.utils.scheduler.cosine_schedule(step, horizon, "
         "start, end); lightly.models.utils.update_momentum before each forward (params only)"},
        "known_differences_vs_visrep": [
            "augmentation runs per image on PIL (torchvision) vs batched tensors in visrep (see B1 for the op-"
            "level differences: antialiased PIL resize, per-image jitter order, PIL blur without a fixed kernel)",
            "LARS: lightly's trust ratio is eta*|w|/(|g| + wd*|w|) applied to (g + wd*w), momentum buffer "
            "v = mu*v + d then w -= lr*v; visrep's is eta*|w|/|g + wd*w| and v = mu*v + lr*d, w -= v "
            "(identical at constant lr, up to the tiny wd term)",
            "EMA: lightly's update_momentum averages parameters only; visrep also copies BN buffers to the "
            "teacher (the teacher runs in train mode with batch statistics in both, so the forward is the same)",
            "lightly's cosine_schedule uses (max_steps - 1) as the period, visrep's T: a 1-step difference",
        ],
    }


# ---------------------------------------------------------------------------------------------- eval
def knn_eval(backbone: nn.Module, bank, test, args) -> dict:
    from visrep.evaluate import extract_features, knn_classify

    t0 = time.perf_counter()
    kw = dict(image_size=32, batch_size=512, device="cpu", cache_dir=False, mean=common.IMAGENET_MEAN,
              std=common.IMAGENET_STD, progress=False)
    fb, lb = extract_features(backbone, bank, **kw)
    ft, lt = extract_features(backbone, test, **kw)
    out = {}
    for k, t in ((args.knn_k, args.knn_t), (20, 0.07)):
        res = knn_classify(fb, lb, ft, lt, k=k, temperature=t, num_classes=len(bank.classes))
        out[f"k{k}_T{t}"] = {"top1": res["top1"], "top5": res["top5"]}
    primary = out[f"k{args.knn_k}_T{args.knn_t}"]
    return {"knn_top1": primary["top1"], "knn_top5": primary["top5"], "all_protocols": out,
            "n_bank": len(lb), "n_test": len(lt), "feature_dim": int(fb.shape[1]),
            "eval_seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-s", type=float, default=600.0, help="wall-clock training budget per run (600)")
    ap.add_argument("--only", default=",".join(RUNS[:5]), help=f"comma list from {','.join(RUNS)} "
                    "(default: the first five)")
    ap.add_argument("--width", type=int, default=16, help="ResNet-18 base width (16: channels 16/32/64/128)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu-core", type=int, default=None,
                    help="pin this process to one CPU core (with --threads 1, two runs can go side by side)")
    ap.add_argument("--num-workers", type=int, default=0, help="lightly DataLoader workers (0)")
    ap.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                    help="lr schedule after warm-up, the same for visrep and lightly (constant)")
    ap.add_argument("--warmup-steps", type=int, default=20,
                    help="linear lr warm-up steps (20: a 600 s budget on 2 cores fits only ~60-150 steps)")
    ap.add_argument("--cosine-epochs", type=int, default=3, help="cosine horizon in whole epochs (--schedule cosine)")
    ap.add_argument("--horizon-steps", type=int, default=100_000,
                    help="constant schedule: stop condition far beyond what fits the budget")
    ap.add_argument("--knn-k", type=int, default=200, help="kNN neighbours (200, as lightly's benchmarks)")
    ap.add_argument("--knn-t", type=float, default=0.1, help="kNN temperature (0.1, as lightly's benchmarks)")
    ap.add_argument("--train-subset", type=int, default=None, help="seeded subset of training images (all)")
    ap.add_argument("--test-subset", type=int, default=None, help="seeded subset of test images (all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default=None, help="comma list of seeds, each run once per seed (default: --seed)")
    ap.add_argument("--runs-dir", default=None,
                    help="write one JSON per finished (run, seed) here and skip those already there (resumable); "
                         "--out then holds the summary over every JSON in the folder")
    ap.add_argument("--data", default=common.DEFAULT_DATA)
    ap.add_argument("--work-dir", default=None, help="where visrep run directories go (default: a temp dir, removed)")
    ap.add_argument("--out", default=str(common.result_path("b2_quality")))
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in RUNS]
    if bad:
        ap.error(f"unknown run(s) {bad}; choose from {RUNS}")
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    if len(seeds) > 1 and not args.runs_dir:
        ap.error("several --seeds need --runs-dir (one JSON per run and seed)")
    if args.cpu_core is not None:
        os.sched_setaffinity(0, {args.cpu_core})

    load_at_start = common.load_check("b2_quality")
    common.set_threads(args.threads)
    runs_dir = Path(args.runs_dir) if args.runs_dir else None
    path = Path(args.out)
    data = {} if runs_dir else (common.read_json(path) or {})
    data.setdefault("benchmark", "B2 kNN quality after the same wall-clock pretraining budget, CIFAR-10, CPU")
    data.setdefault("runs", {})
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="b2_quality_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        for seed in seeds:
            args.seed = seed
            todo = [n for n in only if not (runs_dir and (runs_dir / f"{n}_seed{seed}.json").is_file())]
            if not todo:
                continue
            # Decode (first time) or read the cached tensors before any clock starts: JPEG decoding is not timed.
            train = common.load_cifar10("train", args.data).subset(args.train_subset, seed)
            test = common.load_cifar10("test", args.data).subset(args.test_subset, seed)
            plan = schedule_plan(args, len(train))
            settings = run_settings(args, plan, train, test)
            for name in todo:
                rec = one_run(args, name, plan, work, train, test)
                rec["settings"] = settings
                rec["machine"] = {**common.machine_info(), "load_at_start_of_invocation": load_at_start,
                                  "cpu_affinity": sorted(os.sched_getaffinity(0))}
                print(f"   {name} seed {seed}: steps {rec.get('steps')} epochs {rec.get('epochs')} loss "
                      f"{rec.get('final_loss')} kNN top1 {rec['knn_top1']:.4f} (eval {rec['eval_seconds']:.0f} s)",
                      flush=True)
                if runs_dir:  # one file per finished run: a kill loses only the run in progress
                    common.write_json(runs_dir / f"{name}_seed{seed}.json", rec)
                else:
                    data["runs"][name] = rec
                    write_summary(data)
                    common.write_json(path, data)  # after every run, so a crash keeps the finished ones
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    if runs_dir:
        data = summarise_seeds(runs_dir, data["benchmark"])
        common.write_json(path, data)
    print(json.dumps(data["summary"], indent=2))
    print(f"wrote {path}")
    return data


def run_settings(args, plan: dict, train, test) -> dict:
    return {
        "budget_s": args.budget_s, "width": args.width, "backbone": f"resnet18 CIFAR stem, width {args.width}",
        "batch_size": args.batch_size, "threads": args.threads, "cpu_core": args.cpu_core,
        "lightly_num_workers": args.num_workers, "schedule": plan, "seed": args.seed,
        "train_subset": args.train_subset, "test_subset": args.test_subset,
        "n_train": len(train), "n_test": len(test), "data": args.data,
        "knn": {"primary": {"k": args.knn_k, "temperature": args.knn_t}, "also": {"k": 20, "temperature": 0.07},
                "code": "visrep.evaluate.extract_features + knn_classify (cosine similarity, weights exp(s/T))",
                "eval_transform": "visrep eval transform: uint8 -> [0,1] -> ImageNet mean/std at 32 px, no crop",
                "bank": "the training images used for pretraining", "test": "the test split"},
    }


def one_run(args, name: str, plan: dict, work: Path, train, test) -> dict:
    from visrep.models import build_backbone

    print(f"== {name} seed {args.seed} (budget {args.budget_s:.0f} s) started {common.now_iso()}", flush=True)
    if name == "random_init":
        torch.manual_seed(args.seed)
        res = {"backbone_module": build_backbone("resnet18", cifar_stem=True, width=args.width),
               "record": {"implementation": "none", "method": "random init", "started_utc": common.now_iso(),
                          "recipe": "visrep.models.build_backbone('resnet18', cifar_stem=True, "
                                    f"width={args.width}) after torch.manual_seed({args.seed}): the "
                                    "initial backbone of every run"}}
    else:
        assert common.same_architecture(common.timm_cifar_resnet("resnet18", args.width),
                                        build_backbone("resnet18", cifar_stem=True, width=args.width))
        impl, method, views = parse_run(name)
        if impl == "visrep":
            res = run_visrep(args, method, plan, work, views, bn_head=name.endswith("_bnhead"))
        else:
            res = run_lightly(args, method, plan, views)
    rec = res["record"]
    rec.update(knn_eval(res["backbone_module"], train, test, args))
    rec["seed"] = args.seed
    return rec


def write_summary(data: dict) -> None:
    runs = data["runs"]
    table = {n: {"knn_top1": r.get("knn_top1"), "steps": r.get("steps"), "epochs": r.get("epochs"),
                 "final_loss": r.get("final_loss"), "stop_reason": r.get("stop_reason")} for n, r in runs.items()}
    keys = lambda r: json.dumps({k: v for k, v in r.get("settings", {}).items()}, sort_keys=True)  # noqa: E731
    consistent = len({keys(r) for r in runs.values()}) <= 1
    cmp = {}
    for m in ("simclr", "byol"):
        a, b = runs.get(f"visrep_{m}"), runs.get(f"lightly_{m}")
        if a and b:
            cmp[f"{m}_visrep_minus_lightly_top1"] = a["knn_top1"] - b["knn_top1"]
            cmp[f"{m}_steps_ratio_visrep_over_lightly"] = (a["steps"] / b["steps"]) if b.get("steps") else None
    data["summary"] = {"table": table, "comparisons": cmp, "all_runs_same_settings": consistent,
                       "updated_utc": common.now_iso()}


def mean_ci(xs: list[float]) -> dict:
    """Mean, sample sd and a two-sided 95 % Student-t interval of the mean (None below 2 values)."""
    from scipy import stats

    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "ci95": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half]}


def summarise_seeds(runs_dir: Path, benchmark: str) -> dict:
    """Per run: kNN top-1 over seeds; paired (same seed) differences between the arms; the 2x2 of loop x views."""
    recs: dict[str, dict[int, dict]] = {}
    for f in sorted(runs_dir.glob("*_seed*.json")):
        name, _, seed = f.stem.rpartition("_seed")
        recs.setdefault(name, {})[int(seed)] = common.read_json(f)
    per_run = {}
    for name, by_seed in recs.items():
        seeds = sorted(by_seed)
        per_run[name] = {
            "seeds": seeds,
            "knn_top1": mean_ci([by_seed[s]["knn_top1"] for s in seeds]),
            "knn_top1_per_seed": [by_seed[s]["knn_top1"] for s in seeds],
            "steps_per_seed": [by_seed[s].get("steps") for s in seeds],
            "final_loss_per_seed": [by_seed[s].get("final_loss") for s in seeds],
        }

    def paired(a: str, b: str) -> dict | None:
        common_seeds = sorted(set(recs.get(a, {})) & set(recs.get(b, {})))
        if not common_seeds:
            return None
        d = [recs[a][s]["knn_top1"] - recs[b][s]["knn_top1"] for s in common_seeds]
        steps = [recs[a][s].get("steps") / recs[b][s]["steps"] for s in common_seeds
                 if recs[a][s].get("steps") and recs[b][s].get("steps")]
        return {"seeds": common_seeds, "difference": mean_ci(d), "per_seed": d,
                "steps_ratio_per_seed": steps or None}

    pairs = {
        "visrep_minus_lightly (the gap)": ("visrep_simclr", "lightly_simclr"),
        "visrep with the official head minus lightly": ("visrep_simclr_bnhead", "lightly_simclr"),
        "the official head minus the old head (visrep)": ("visrep_simclr_bnhead", "visrep_simclr"),
        "views, in visrep's loop: lightly views minus visrep views": ("visrep_simclr_lightlyviews", "visrep_simclr"),
        "views, in lightly's loop: lightly views minus visrep views": ("lightly_simclr", "lightly_simclr_visrepviews"),
        "loop, with visrep views: visrep loop minus lightly loop": ("visrep_simclr", "lightly_simclr_visrepviews"),
        "loop, with lightly views: visrep loop minus lightly loop": ("visrep_simclr_lightlyviews", "lightly_simclr"),
        "byol visrep_minus_lightly": ("visrep_byol", "lightly_byol"),
        "visrep_simclr minus random_init": ("visrep_simclr", "random_init"),
        "lightly_simclr minus random_init": ("lightly_simclr", "random_init"),
    }
    comparisons = {k: v for k, (a, b) in pairs.items() if (v := paired(a, b)) is not None}
    settings = {json.dumps({k: (os.path.realpath(v) if k == "data" else v)  # one file, spelt from two checkouts
                            for k, v in r.get("settings", {}).items() if k not in ("seed", "cpu_core")}, sort_keys=True)
                for by_seed in recs.values() for r in by_seed.values()}
    return {"benchmark": benchmark, "runs_dir": str(runs_dir),
            "summary": {"per_run": per_run, "paired_comparisons": comparisons,
                        "all_runs_same_settings": len(settings) <= 1, "updated_utc": common.now_iso()}}


if __name__ == "__main__":
    main()
