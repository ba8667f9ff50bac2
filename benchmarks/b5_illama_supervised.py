"""B5: iLLaMA-Tiny vs ViT-Tiny, supervised from scratch on CIFAR-10 with equal CPU budgets.

Both runs use the `supervised` preset (one crop+flip view, linear classifier head, cross-entropy with label
smoothing 0.1, AdamW) with the same overrides: backbone (patch 4 at 32 px: 64 patch tokens + class
token), batch size, time budget, lr warm-up and horizon. Top-1/top-5 is the run's own classifier on all
10k test images (`visrep.evaluate_classifier`).

As in B4, each backbone's step time is measured first and the schedule horizon is the number of steps that
fit in the budget. iLLaMA's soft mask (linear, r from 1 to 0) reaches fully causal attention at
`--soft-mask-frac` of the horizon (the paper uses the first epochs of a 300-epoch run; a budget of a
few hundred steps needs a proportionally early cutoff).

    python benchmarks/b5_illama_supervised.py                   # 2 x 600 s + evaluation (~25 min)
    python benchmarks/b5_illama_supervised.py --budget-s 10 --train-subset 2048 --test-subset 500 \\
        --out /tmp/b5_smoke.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

RUNS = ("vit_tiny", "illama_tiny")


def config(args, backbone: str, out_dir: str, horizon: int | None = None) -> dict:
    n_train = args.train_subset or 50000
    spe = n_train // args.batch_size
    opts = {"patch_size": 4}
    cfg = {
        "method": "supervised", "seed": args.seed, "out_dir": out_dir,
        "data": {"dataset": "imagefolder", "root": args.data, "subset": args.train_subset},
        "backbone": {"name": backbone, "options": opts},
        "train": {"batch_size": args.batch_size, "num_threads": args.threads, "device": "cpu", "progress": False,
                  "log_every": 1},
        "monitor": {"online_probe": False, "knn_every": 0, "rankme_every": 0},
    }
    if horizon is not None:
        cfg["train"].update(steps=horizon, epochs=max(1, -(-horizon // spe)), time_budget_s=float(args.budget_s))
        cfg["optim"] = {"warmup_epochs": 0.05 * horizon / spe}
        if backbone.startswith("illama"):
            opts.update(soft_mask="linear", soft_mask_ratio=1.0, soft_mask_epochs=args.soft_mask_frac * horizon / spe)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=common.DEFAULT_DATA)
    ap.add_argument("--budget-s", type=float, default=600.0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--soft-mask-frac", type=float, default=0.25)
    ap.add_argument("--calib-steps", type=int, default=6)
    ap.add_argument("--train-subset", type=int, default=None)
    ap.add_argument("--test-subset", type=int, default=None)
    ap.add_argument("--out", default=str(common.result_path("b5_illama_supervised")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import visrep

    load = common.load_check("b5")
    work = Path(tempfile.mkdtemp(prefix="visrep_b5_"))
    results = {}
    for backbone in RUNS:
        step_s = common.calibrate_step_s(config(args, backbone, ""), work / f"calib_{backbone}", args.calib_steps)
        horizon = max(10, int(args.budget_s / step_s))
        out = work / backbone
        rc = visrep.resolve(config(args, backbone, str(out), horizon))
        print(f"b5: {backbone}: {step_s:.2f} s/step -> horizon {horizon} steps; training {args.budget_s:.0f} s",
              flush=True)
        started = common.now_iso()
        s = visrep.pretrain(rc, quiet=True)
        ev = visrep.evaluate_classifier(str(out), dataset="imagefolder", root=args.data, test_subset=args.test_subset,
                                        device="cpu", progress=False)
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
        d = rc.to_dict()
        results[backbone] = {
            "top1": ev["top1"], "top5": ev["top5"], "test_size": ev["dataset"]["test_size"],
            "calibrated_step_s": step_s, "horizon_steps": horizon, "steps": s["steps"], "epochs": s["epochs_done"],
            "stop_reason": s["stop_reason"], "loop_seconds": s["loop_seconds"], "final_loss": s["final_loss"],
            "params": sum(p.numel() for p in visrep.methods.build_template(rc, 32, 10).backbone.parameters()),
            "loss_curve_every_25": [[r["step"], round(r["loss"], 4)] for r in recs
                                    if r["step"] % 25 == 0 or r["step"] == s["steps"]],
            "started_utc": started, "ended_utc": common.now_iso(),
            "recipe": {k: d[k] for k in ("method", "seed", "data", "views", "backbone", "classifier", "objective",
                                         "optim", "train")},
        }
        print(f"b5: {backbone}: {s['steps']} steps, top-1 {ev['top1']:.4f}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    out = {
        "benchmark": "b5_illama_supervised", "machine": common.machine_info(), "load_at_start": load,
        "setup": {"dataset": "CIFAR-10 (shared JPEG archive), 32 px, patch 4", "budget_s_per_run": args.budget_s,
                  "batch_size": args.batch_size, "threads": args.threads, "soft_mask_frac": args.soft_mask_frac,
                  "eval": "visrep.evaluate_classifier: the run's own linear head, all test images"},
        "runs": results,
        "ratio_illama_over_vit_top1": results["illama_tiny"]["top1"] / max(results["vit_tiny"]["top1"], 1e-9),
        "ratio_illama_over_vit_steps": results["illama_tiny"]["steps"] / max(results["vit_tiny"]["steps"], 1),
    }
    common.write_json(args.out, out)
    print(json.dumps({b: {k: r[k] for k in ("steps", "top1")} for b, r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
