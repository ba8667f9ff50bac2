"""B8: adapting one pretrained backbone to a face task: linear probe vs LoRA vs full fine-tuning.

1. Pretrain: ViT-Tiny (patch 4, 32 px) with the `supervised` preset on CIFAR-10 for --pretrain-steps steps
   (batch --batch-size, AdamW). This is the one backbone all three adaptations start from.
2. Target: UTKFace gender (seeded 80/20 split, 18,962 train / 4,740 test images) at 32 px.
   - linear probe: `visrep.evaluate_linear` on frozen features (standardised, 100 epochs SGD, wd 1e-4);
   - LoRA: `visrep.finetune` mode lora (peft; r 8, α 16 on every block's qkv, proj, fc1, fc2), a new linear
     head, AdamW lr --lora-lr, --steps steps;
   - full: `visrep.finetune` mode full with layer-wise lr decay 0.75, AdamW lr --full-lr, --steps steps.
   Both fine-tunings use the preset's crop+flip view and label smoothing 0.1, warm-up 10 % of the steps.
3. Report: test top-1, trainable parameters, seconds (probe: feature extraction + probe; fine-tunings:
   training loop), and the expected calibration error of each (15 bins).

    python benchmarks/b8_adaptation.py                         # ~25 min on 2 cores
    python benchmarks/b8_adaptation.py --pretrain-steps 3 --steps 3 --subset 1024 --out /tmp/b8.json
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
        "monitor": {"online_probe": False, "knn_every": 0},
    }


def finetune_config(args, init: str, out_dir: str, mode: str) -> dict:
    n = args.subset or 18962
    spe = n // args.batch_size
    optim = {"lr": args.lora_lr if mode == "lora" else args.full_lr, "lr_scaling": "none",
             "warmup_epochs": 0.1 * args.steps / spe}
    return {
        "method": "supervised", "seed": args.seed, "out_dir": out_dir,
        "data": {"dataset": "utkface", "root": args.faces, "options": TASK, "subset": args.subset},
        "finetune": {"init": init, "mode": mode, "layer_decay": 0.75 if mode == "full" else None,
                     "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "optim": optim,
        "train": {"batch_size": args.batch_size, "steps": args.steps, "epochs": max(1, -(-args.steps // spe)),
                  "num_threads": args.threads, "device": "cpu", "progress": False, "log_every": 10},
        "monitor": {"online_probe": False, "knn_every": 0},
    }


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
    ap.add_argument("--test-subset", type=int, default=None)
    ap.add_argument("--out", default=str(common.result_path("b8_adaptation")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import visrep

    load = common.load_check("b8")
    work = Path(tempfile.mkdtemp(prefix="visrep_b8_"))
    pre = work / "pretrained"
    print(f"b8: pretraining ViT-Tiny on CIFAR-10 for {args.pretrain_steps} steps", flush=True)
    ps = visrep.pretrain(visrep.resolve(pretrain_config(args, str(pre))), quiet=True)
    pre_eval = visrep.evaluate_classifier(str(pre), dataset="imagefolder", root=args.data, device="cpu",
                                          progress=False)
    common_eval = dict(dataset="utkface", root=args.faces, dataset_options=TASK, device="cpu", progress=False,
                       test_subset=args.test_subset)
    results = {}

    t0 = time.perf_counter()
    lin = visrep.evaluate_linear(str(pre), train_subset=args.subset, weight_decay=1e-4, cache_dir=False,
                                 **common_eval)
    lin_s = time.perf_counter() - t0
    cal = visrep.evaluate_calibration(str(pre), head="linear", train_subset=args.subset, weight_decay=1e-4,
                                      **common_eval)
    head_params = lin["feature_dim"] * lin["num_classes"] + lin["num_classes"]
    results["linear_probe"] = {"top1": lin["top1"], "trainable_parameters": head_params,
                               "seconds": lin_s, "seconds_what": "feature extraction (train+test) + 100-epoch probe",
                               "ece": cal["ece"], "recipe": {k: lin[k] for k in ("epochs", "lr", "weight_decay",
                                                                                 "batch_size", "standardize")}}
    print(f"b8: linear probe top-1 {lin['top1']:.4f}", flush=True)

    for mode in ("lora", "full"):
        out = work / mode
        rc = visrep.resolve(finetune_config(args, str(pre), str(out), mode))
        print(f"b8: {mode}: {args.steps} steps", flush=True)
        s = visrep.finetune(rc, quiet=True)
        ev = visrep.evaluate_classifier(str(out), **common_eval)
        cal = visrep.evaluate_calibration(str(out), head="own", **common_eval)
        d = rc.to_dict()
        results[mode] = {"top1": ev["top1"], "trainable_parameters": s["trainable_parameters"],
                         "total_parameters": s["total_parameters"], "seconds": s["loop_seconds"],
                         "seconds_what": "training loop", "steps": s["steps"], "final_loss": s["final_loss"],
                         "ece": cal["ece"],
                         "recipe": {k: d[k] for k in ("method", "data", "views", "finetune", "projector", "objective",
                                                      "optim", "train")}}
        print(f"b8: {mode}: top-1 {ev['top1']:.4f}, {s['trainable_parameters']:,} trainable", flush=True)
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
                           for m, r in results.items() if m != "full"},
    }
    common.write_json(args.out, out)
    print(json.dumps({m: {k: r[k] for k in ("top1", "trainable_parameters", "seconds", "ece")}
                      for m, r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
