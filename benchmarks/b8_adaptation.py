"""B8: adapting one pretrained backbone to a face task: linear probe vs LoRA vs full fine-tuning, with all
labels and in the low-label protocols (1 % and 10 % of the labels).

1. Pretrain: ViT-Tiny (patch 4, 32 px) with the `supervised` preset on CIFAR-10 for --pretrain-steps steps
   (batch --batch-size, AdamW). This is the one backbone every adaptation starts from.
2. Target: UTKFace gender (seeded 80/20 split, 18,962 train / 4,740 test images) at 32 px.
   - linear probe: `visrep.evaluate_linear` on frozen features (standardised, 100 epochs SGD, wd 1e-4);
   - LoRA: `visrep.finetune` mode lora (peft; r 8, α 16 on every block's qkv, proj, fc1, fc2), a new linear
     head, AdamW lr --lora-lr, --steps steps;
   - full: `visrep.finetune` mode full with layer-wise lr decay 0.75, AdamW lr --full-lr, --steps steps.
   Both fine-tunings use the preset's crop+flip view and label smoothing 0.1, warm-up 10 % of the steps.
   Then all three again for each of --label-fractions (the same seeded class-balanced subset for the probe
   and the fine-tunings), with --low-label-steps fine-tuning steps.
3. Report: test top-1 on the whole test split, trainable parameters, seconds (probe: feature extraction +
   probe; fine-tunings: training loop), and the expected calibration error of each (15 bins).

    python benchmarks/b8_adaptation.py                         # ~65 min on 2 cores
    python benchmarks/b8_adaptation.py --pretrain-steps 3 --steps 3 --low-label-steps 2 --subset 1024 \
        --test-subset 300 --out /tmp/b8.json                   # smoke run (~4 min, mostly reading UTKFace)
    python benchmarks/b8_adaptation.py --cost-only   # per-step cost of each adaptation, interleaved; merged into the JSON

--cost-only times, round-robin in one process on the same uint8 batch, one LoRA training step, one full
fine-tuning step (views, backbone, head, loss, backward, AdamW) and one no-grad forward (what the linear
probe pays per image to extract its features), over --cost-rounds rounds of 3 steps each (the order
rotating each round), and reports medians and ratios to the full step: the side-by-side comparison that
the runs' own loop times, taken one after the other on a shared machine, cannot give.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

FACES = str(Path(common.DEFAULT_DATA).parent.parent / "faces")
TASK = {"task": "gender"}


def pretrain_config(args, out_dir: str) -> dict:
    spe = 50000 // args.batch_size
    return {
        "method": "supervised", "seed": args.seed, "out_dir": out_dir,
        "data": {"dataset": "imagefolder", "root": args.data},
        "backbone": {"name": "vit_tiny", "options": {"patch_size": 4}},
        "optim": {"warmup_epochs": 0.05 * args.pretrain_steps / spe},
        "train": {"batch_size": args.batch_size, "steps": args.pretrain_steps,
                  "epochs": max(1, -(-args.pretrain_steps // spe)), "num_threads": args.threads, "device": "cpu",
                  "progress": False, "log_every": 10},
        "monitor": {"online_probe": False, "knn_every": 0, "rankme_every": 0},
    }


def finetune_config(args, init: str, out_dir: str, mode: str, fraction: float | None = None,
                    steps: int | None = None) -> dict:
    steps = steps or args.steps
    n = args.subset or 18962
    if fraction is not None:
        n = max(2, round(n * fraction))
    batch = min(args.batch_size, n)  # only smoke runs' 1 % subsets are smaller than a batch
    spe = max(1, n // batch)
    optim = {"lr": args.lora_lr if mode == "lora" else args.full_lr, "lr_scaling": "none",
             "warmup_epochs": 0.1 * steps / spe}
    return {
        "method": "supervised", "seed": args.seed, "out_dir": out_dir,
        "data": {"dataset": "utkface", "root": args.faces, "options": TASK, "subset": args.subset,
                 "label_fraction": fraction},
        "finetune": {"init": init, "mode": mode, "layer_decay": 0.75 if mode == "full" else None,
                     "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "optim": optim,
        "train": {"batch_size": batch, "steps": steps, "epochs": max(1, -(-steps // spe)),
                  "num_threads": args.threads, "device": "cpu", "progress": False, "log_every": 10},
        "monitor": {"online_probe": False, "knn_every": 0, "rankme_every": 0},
    }


def step_cost(args) -> dict:
    """Median seconds per step of LoRA, full fine-tuning and a frozen-feature forward, measured round-robin."""
    from functools import partial

    import visrep
    from visrep.data.views import build_views
    from visrep.methods import build_template
    from visrep.models.lora import count_parameters
    from visrep.objectives import build_objective
    from visrep.train.finetune import prepare_finetune_config
    from visrep.train.optim import build_optimizer, build_param_groups

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (args.batch_size, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 2, (args.batch_size,), generator=g)
    work = Path(tempfile.mkdtemp(prefix="visrep_b8_cost_"))
    # A one-step "pretrained" ViT-Tiny: the cost of a step does not depend on how trained the weights are.
    synthetic = {"dataset": "synthetic", "options": {"n": args.batch_size, "num_classes": 2}}
    pre = pretrain_config(args, str(work / "pretrained"))
    pre["data"], pre["train"]["steps"], pre["train"]["epochs"] = synthetic, 1, 1
    visrep.pretrain(visrep.resolve(pre), quiet=True)
    setups, params = {}, {}
    for mode in ("lora", "full"):
        cfg = finetune_config(args, str(work / "pretrained"), str(work / mode), mode)
        cfg["data"] = synthetic
        rc = prepare_finetune_config(visrep.resolve(cfg))
        model = build_template(rc, 32, 2)
        groups, _ = build_param_groups(model, rc)
        setups[mode] = (model, build_optimizer(rc.optim, groups), build_views(rc.views.policy, 32, **rc.views.options),
                        build_objective(rc.objective.name, **rc.objective.params))
        params[mode] = count_parameters(model)[0]
    frozen = setups["full"][0].backbone

    def frozen_forward(i):  # what the probe pays per batch to extract its features
        with torch.no_grad():
            frozen(x.float() / 255.0)

    paths = {mode: partial(common.train_step, model, [opt], views, objective, x, y)
             for mode, (model, opt, views, objective) in setups.items()}
    cost = common.interleaved_step_cost({**paths, "frozen_forward": frozen_forward}, args.cost_rounds, "full")
    shutil.rmtree(work, ignore_errors=True)
    return {**cost, "batch_size": args.batch_size, "trainable_parameters": params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=common.DEFAULT_DATA)
    ap.add_argument("--faces", default=FACES)
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--full-lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subset", type=int, default=None, help="UTKFace train subset (smoke runs)")
    ap.add_argument("--label-fractions", type=float, nargs="*", default=[0.01, 0.1],
                    help="low-label protocols run after the full-label ones (none: skip)")
    ap.add_argument("--low-label-steps", type=int, default=100, help="fine-tuning steps of each low-label run")
    ap.add_argument("--test-subset", type=int, default=None)
    ap.add_argument("--cost-only", action="store_true", help="only the interleaved per-step cost, merged into --out")
    ap.add_argument("--cost-rounds", type=int, default=5)
    ap.add_argument("--out", default=str(common.result_path("b8_adaptation")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import visrep

    load = common.load_check("b8")
    if args.cost_only:
        cost = step_cost(args)
        common.merge_step_cost(args.out, "b8_adaptation", cost, load)
        print(json.dumps(cost, indent=1))
        return
    work = Path(tempfile.mkdtemp(prefix="visrep_b8_"))
    pre = work / "pretrained"
    print(f"b8: pretraining ViT-Tiny on CIFAR-10 for {args.pretrain_steps} steps", flush=True)
    ps = visrep.pretrain(visrep.resolve(pretrain_config(args, str(pre))), quiet=True)
    pre_eval = visrep.evaluate_classifier(str(pre), dataset="imagefolder", root=args.data, device="cpu",
                                          progress=False)
    common_eval = dict(dataset="utkface", root=args.faces, dataset_options=TASK, device="cpu", progress=False,
                       test_subset=args.test_subset)
    results = {}

    # Full labels first (the headline comparison), then the low-label protocols on the same backbone.
    for fraction in [None, *args.label_fractions]:
        tag = "" if fraction is None else f"@{fraction:g}"
        steps = args.steps if fraction is None else args.low_label_steps
        t0 = time.perf_counter()
        lin = visrep.evaluate_linear(str(pre), train_subset=args.subset, label_fraction=fraction, weight_decay=1e-4,
                                     cache_dir=False, **common_eval)
        lin_s = time.perf_counter() - t0
        cal = visrep.evaluate_calibration(str(pre), head="linear", train_subset=args.subset, label_fraction=fraction,
                                          weight_decay=1e-4, cache_dir=False, **common_eval)
        head_params = lin["feature_dim"] * lin["num_classes"] + lin["num_classes"]
        results["linear_probe" + tag] = {
            "label_fraction": fraction, "train_images": lin["dataset"]["train_size"], "top1": lin["top1"],
            "trainable_parameters": head_params, "seconds": lin_s,
            "seconds_what": "feature extraction (train+test) + 100-epoch probe", "ece": cal["ece"],
            "recipe": {k: lin[k] for k in ("epochs", "lr", "weight_decay", "batch_size", "standardize")}}
        print(f"b8: linear probe{tag}: top-1 {lin['top1']:.4f}", flush=True)

        for mode in ("lora", "full"):
            out = work / f"{mode}{tag}"
            rc = visrep.resolve(finetune_config(args, str(pre), str(out), mode, fraction, steps))
            print(f"b8: {mode}{tag}: {steps} steps", flush=True)
            s = visrep.finetune(rc, quiet=True)
            ev = visrep.evaluate_classifier(str(out), **common_eval)
            cal = visrep.evaluate_calibration(str(out), head="own", **common_eval)
            d = rc.to_dict()
            results[mode + tag] = {
                "label_fraction": fraction, "train_images": s.get("train_size"), "top1": ev["top1"],
                "trainable_parameters": s["trainable_parameters"], "total_parameters": s["total_parameters"],
                "seconds": s["loop_seconds"], "seconds_what": "training loop", "steps": s["steps"],
                "final_loss": s["final_loss"], "ece": cal["ece"],
                "recipe": {k: d[k] for k in ("method", "data", "views", "finetune", "classifier", "objective",
                                             "optim", "train")}}
            print(f"b8: {mode}{tag}: top-1 {ev['top1']:.4f}, {s['trainable_parameters']:,} trainable", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    full = results["full"]
    out = {
        "benchmark": "b8_adaptation", "machine": common.machine_info(), "load_at_start": load,
        "setup": {"pretrained": "ViT-Tiny patch 4, 32 px, supervised preset on CIFAR-10",
                  "pretrain_steps": ps["steps"], "pretrain_cifar10_top1": pre_eval["top1"],
                  "target": "UTKFace gender, seeded 80/20 split (split_seed 0), 32 px",
                  "batch_size": args.batch_size, "finetune_steps": args.steps, "threads": args.threads},
        "runs": results,
        "ratios_vs_full": {m: {"top1": r["top1"] / max(full["top1"], 1e-9),
                               "trainable_parameters": r["trainable_parameters"] / full["trainable_parameters"],
                               "seconds": r["seconds"] / max(full["seconds"], 1e-9)}
                           for m, r in results.items() if "@" not in m and m != "full"},
    }
    common.write_json(args.out, out)
    print(json.dumps({m: {k: r[k] for k in ("top1", "trainable_parameters", "seconds", "ece")}
                      for m, r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
