"""B4: masked image modelling under the same CPU budget: MAE vs HPM vs HPM "loss prediction only".

CIFAR-10 at 32 px, ViT-Tiny (192/12/3) with patch 4 (64 patches), mask ratio 0.75, fixed 2-D sin-cos
positions, per-patch normalised pixel targets. Each run pretrains for the same wall-clock budget
(`--budget-s`) through `visrep.pretrain` with the preset and only the overrides listed in its record;
then every backbone (and the random-init ViT as the floor) is scored by one piece of code: weighted kNN
(k=20, T=0.07) and a linear probe on frozen features, with a seeded 20k subset of the training images
as bank / probe training set (`--eval-train`; the full 50k costs ~9 min of feature extraction per model
on 2 cores) and all 10k test images.

Schedules need a horizon (the lr cosine, HPM's α_t from 0 to 0.5, the EMA momentum): each method's step
time is measured first on a few steps, and the horizon is the number of steps that fit in the budget,
so every run ends its schedules near the end of its own budget. HPM does more work per step (an EMA
teacher forward on all 64 patches for its masks, a second decoder), so it gets fewer steps in the same
time: that is the comparison the budget asks for.

    python benchmarks/b4_mim.py                       # 3 x 600 s + evaluation (~50 min on 2 cores)
    python benchmarks/b4_mim.py --fixed-steps 136 --only mae,hpm_loss_pred_only   # equal steps, merged
    python benchmarks/b4_mim.py --budget-s 20 --train-subset 2048 --eval-train 2000 --eval-test 500 \\
        --out /tmp/b4_smoke.json                      # end-to-end sanity check
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

RUNS = ("mae", "hpm", "hpm_loss_pred_only")


def base_config(args, method: str, out_dir: str) -> dict:
    dec = {"type": "mae", "dim": args.decoder_dim, "depth": args.decoder_depth, "heads": args.decoder_heads}
    cfg = {
        "method": method, "seed": args.seed, "out_dir": out_dir,
        "data": {"dataset": "imagefolder", "root": args.data, "subset": args.train_subset},
        "backbone": {"name": "vit_tiny", "options": {"patch_size": 4, "pos_embed": "sincos"}},
        "decoder": dec,
        "train": {"batch_size": args.batch_size, "num_threads": args.threads, "device": "cpu", "progress": False,
                  "log_every": 1},
        "monitor": {"online_probe": False, "knn_every": 0, "rankme_every": 0},
    }
    if method.startswith("hpm"):
        cfg["loss_predictor"] = dec
    return cfg


def run(args, method: str, work: Path) -> dict:
    import visrep

    if args.fixed_steps:  # equal steps instead of equal time: no calibration, no time budget
        step_s, horizon = None, int(args.fixed_steps)
    else:
        step_s = common.calibrate_step_s(base_config(args, method, ""), work / f"calib_{method}", args.calib_steps)
        horizon = max(10, int(args.budget_s / step_s))
    out = work / method
    shutil.rmtree(out, ignore_errors=True)
    cfg = base_config(args, method, str(out))
    n_train = args.train_subset or 50000
    spe = n_train // args.batch_size
    cfg["train"].update(steps=horizon, epochs=max(1, -(-horizon // spe)),
                        time_budget_s=None if args.fixed_steps else float(args.budget_s))
    cfg["optim"] = {"warmup_epochs": 0.05 * horizon / spe}
    rc = visrep.resolve(cfg)
    started = common.now_iso()
    summary = visrep.pretrain(rc, quiet=True)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
    curve = [[r["step"], round(r["loss"], 4)] + ([round(r["reconstruction"], 4), round(r["loss_prediction"], 4)]
                                                 if "reconstruction" in r else [])
             for r in recs if r["step"] % 25 == 0 or r["step"] == summary["steps"]]
    d = rc.to_dict()
    return {
        "method": method, "started_utc": started, "ended_utc": common.now_iso(),
        "calibrated_step_s": step_s, "horizon_steps": horizon, "steps": summary["steps"],
        "epochs": summary["epochs_done"], "stop_reason": summary["stop_reason"],
        "loop_seconds": summary["loop_seconds"], "final_loss": summary["final_loss"],
        "loss_curve_every_25": curve,
        "curve_columns": ["step", "loss"] + (["reconstruction", "loss_prediction"] if method.startswith("hpm") else []),
        "recipe": {k: d[k] for k in ("method", "seed", "data", "views", "backbone", "masking", "decoder",
                                     "loss_predictor", "target", "objective", "optim", "train")},
        "run_dir": str(out),
    }


def evaluate(args, source: str, backbone_options: dict | None = None) -> dict:
    import visrep

    kw = dict(dataset="imagefolder", root=args.data, device="cpu", train_subset=args.eval_train,
              test_subset=args.eval_test, progress=False, backbone_options=backbone_options, image_size=32)
    knn = visrep.evaluate_knn(source, **kw)
    lin = visrep.evaluate_linear(source, epochs=args.probe_epochs, **kw)
    return {"knn_top1": knn["top1"], "knn_top5": knn["top5"], "linear_top1": lin["top1"], "linear_top5": lin["top5"],
            "knn_protocol": {k: knn[k] for k in ("k", "temperature") if k in knn},
            "linear_protocol": {k: lin[k] for k in ("epochs", "lr", "weight_decay", "batch_size") if k in lin},
            "eval_sizes": {"train": knn.get("dataset", {}).get("train_size"),
                           "test": knn.get("dataset", {}).get("test_size")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=common.DEFAULT_DATA)
    ap.add_argument("--budget-s", type=float, default=600.0)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decoder-dim", type=int, default=128)
    ap.add_argument("--decoder-depth", type=int, default=2)
    ap.add_argument("--decoder-heads", type=int, default=4)
    ap.add_argument("--calib-steps", type=int, default=6)
    ap.add_argument("--train-subset", type=int, default=None)
    ap.add_argument("--eval-train", type=int, default=20000)
    ap.add_argument("--eval-test", type=int, default=None)
    ap.add_argument("--probe-epochs", type=int, default=50)
    ap.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(RUNS))
    ap.add_argument("--fixed-steps", type=int, default=None,
                    help="train every run for exactly N steps (no time budget) and MERGE the results into the "
                         "existing JSON under runs_fixed_steps; separates 'fewer steps' from 'worse per step'")
    ap.add_argument("--out", default=str(common.result_path("b4_mim")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    load = common.load_check("b4_mim")
    runs = args.only.split(",") if args.only else list(RUNS)
    work = Path(tempfile.mkdtemp(prefix="visrep_b4_"))
    results = {}
    for method in runs:
        print(f"b4: pretraining {method} for " + (f"{args.fixed_steps} steps" if args.fixed_steps else
                                                   f"{args.budget_s:.0f} s"), flush=True)
        rec = run(args, method, work)
        print(f"b4: {method}: {rec['steps']} steps, evaluating", flush=True)
        rec.update(evaluate(args, rec["run_dir"]))
        results[method] = rec
        print(f"b4: {method}: kNN {rec['knn_top1']:.3f}  linear {rec['linear_top1']:.3f}", flush=True)
    if args.fixed_steps:
        shutil.rmtree(work, ignore_errors=True)
        prev = common.read_json(args.out) or {}
        prev.setdefault("runs_fixed_steps", {})[str(args.fixed_steps)] = {
            "machine": common.machine_info(), "load_at_start": load, "runs": results,
            "note": "same recipe as `runs` but every method trains exactly this many steps (its schedule horizon), "
                    "with no time budget"}
        common.write_json(args.out, prev)
        print(json.dumps({m: {k: r.get(k) for k in ("steps", "knn_top1", "linear_top1")} for m, r in
                          results.items()}, indent=1))
        return
    print("b4: random init", flush=True)
    results["random_init"] = evaluate(args, "vit_tiny", {"patch_size": 4, "pos_embed": "sincos"})
    shutil.rmtree(work, ignore_errors=True)

    out = {
        "benchmark": "b4_mim", "machine": common.machine_info(), "load_at_start": load,
        "setup": {"dataset": "CIFAR-10 (shared JPEG archive), 32 px", "backbone": "vit_tiny patch 4 (64 patches)",
                  "budget_s_per_run": args.budget_s, "batch_size": args.batch_size, "threads": args.threads,
                  "decoder": {"dim": args.decoder_dim, "depth": args.decoder_depth, "heads": args.decoder_heads,
                              "note": "same decoder for reconstruction and HPM's loss predictor; smaller than "
                                      "MAE's 512/8 so the CPU budget trains the encoder, not mostly the decoder"},
                  "eval": "visrep.evaluate_knn (k=20, T=0.07) and evaluate_linear on frozen features, "
                          "student backbone, 32 px eval transform"},
        "runs": results,
        "ratios_vs_mae": {m: {"knn": results[m]["knn_top1"] / results["mae"]["knn_top1"],
                              "linear": results[m]["linear_top1"] / results["mae"]["linear_top1"]}
                          for m in results if m != "mae" and "mae" in results},
    }
    common.write_json(args.out, out)
    print(json.dumps({m: {k: r.get(k) for k in ("steps", "knn_top1", "linear_top1")} for m, r in results.items()},
                     indent=1))


if __name__ == "__main__":
    main()
