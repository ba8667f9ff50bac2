"""B7: classifier heads (softmax vs GCR with k = 1, 4, 8, 16), supervised on CIFAR-10, same backbone and
equal budgets; then the linear-probe transfer of each model's frozen features to two face tasks.

Every run is the `supervised` preset (one crop+flip view, label smoothing 0.1) with the same overrides:
ResNet-18 (CIFAR stem, width --width), SGD momentum 0.9 lr --lr (cosine, warm-up 5 % of the steps),
weight decay 5e-4, batch --batch-size, exactly --steps steps; only `classifier` changes:
`linear`, or `gcr` with k in --ks (γ = 25; the bases are trained by Riemannian SGD at the same lr
schedule, momentum 0.9, QR every 10 steps, no weight decay). The budget is equal in steps, and each
run's loop seconds are reported so the CPU cost can be compared too (the heads are <1 % of the step).

Evaluation: CIFAR-10 top-1 of each run's own head on all 10k test images; then `visrep.evaluate_linear`
(frozen features, standardised, 100-epoch linear probe) on UTKFace gender (seeded 80/20 split) and MTFL
smile (official split), both at 32 px like the pretraining. The GCR paper's claim is that GCR features
transfer better than softmax features.

    python benchmarks/b7_heads.py                                  # 5 runs x 500 steps + probes
    python benchmarks/b7_heads.py --steps 5 --train-subset 2048 --test-subset 500 --ks 4 --out /tmp/b7.json
    python benchmarks/b7_heads.py --cost-only      # per-step cost of each head, interleaved; merged into the JSON

--cost-only times one full training step (views, backbone, head, loss, backward, SGD + Riemannian SGD)
for every head, round-robin over --cost-rounds rounds of 3 steps (the order rotating each round), in one
process on the same batch, and reports medians and ratios to softmax: the side-by-side comparison of the budgets' CPU cost.
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

FACES = str(Path(common.DEFAULT_DATA).parent.parent / "faces")
TASKS = (("utkface", {"task": "gender"}), ("mtfl", {"task": "smile"}))


def config(args, head: dict, out_dir: str) -> dict:
    n_train = args.train_subset or 50000
    spe = n_train // args.batch_size
    return {
        "method": "supervised", "seed": args.seed, "out_dir": out_dir,
        "data": {"dataset": "imagefolder", "root": args.data, "subset": args.train_subset},
        "backbone": {"name": "resnet18", "options": {"cifar_stem": True, "width": args.width}},
        "classifier": head,
        "optim": {"name": "sgd", "lr": args.lr, "lr_scaling": "none", "momentum": 0.9, "weight_decay": 5e-4,
                  "warmup_epochs": 0.05 * args.steps / spe, "manifold_lr": args.lr},
        "train": {"batch_size": args.batch_size, "steps": args.steps, "epochs": max(1, -(-args.steps // spe)),
                  "num_threads": args.threads, "device": "cpu", "progress": False, "log_every": 10},
        "monitor": {"online_probe": False, "knn_every": 0, "rankme_every": 0},
    }


def step_cost(args, heads) -> dict:
    """Median seconds per training step of each head, measured round-robin in this process."""
    from functools import partial

    import visrep
    from visrep.data.views import build_views
    from visrep.methods import build_template
    from visrep.objectives import build_objective
    from visrep.train.optim import build_optimizer, build_param_groups
    from visrep.train.riemannian import RiemannianSGD

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (args.batch_size, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)
    setups = {}
    for name, head in heads:
        rc = visrep.resolve(config(args, head, "/tmp/unused"))
        model = build_template(rc, 32, 10)
        groups, manifold = build_param_groups(model, rc)
        opts = [build_optimizer(rc.optim, groups)] + ([RiemannianSGD(manifold, lr=0.1)] if manifold else [])
        setups[name] = (model, opts, build_views(rc.views.policy, 32, **rc.views.options),
                        build_objective(rc.objective.name, **rc.objective.params))
    paths = {name: partial(common.train_step, model, opts, views, objective, x, y)
             for name, (model, opts, views, objective) in setups.items()}
    return {**common.interleaved_step_cost(paths, args.cost_rounds, "softmax"), "batch_size": args.batch_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=common.DEFAULT_DATA)
    ap.add_argument("--faces", default=FACES)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-subset", type=int, default=None)
    ap.add_argument("--test-subset", type=int, default=None)
    ap.add_argument("--probe-subset", type=int, default=None, help="face train/test subset (smoke runs)")
    ap.add_argument("--cost-only", action="store_true", help="only the interleaved per-step cost, merged into --out")
    ap.add_argument("--cost-rounds", type=int, default=5)
    ap.add_argument("--out", default=str(common.result_path("b7_heads")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import visrep

    load = common.load_check("b7")
    heads = [("softmax", {"type": "linear"})] + [(f"gcr_k{k}", {"type": "gcr", "k": k, "gamma": 25.0})
                                                 for k in args.ks]
    if args.cost_only:
        cost = step_cost(args, heads)
        common.merge_step_cost(args.out, "b7_heads", cost, load)
        print(json.dumps(cost, indent=1))
        return
    work = Path(tempfile.mkdtemp(prefix="visrep_b7_"))
    results = {}
    for name, head in heads:
        out = work / name
        rc = visrep.resolve(config(args, head, str(out)))
        print(f"b7: {name}: training {args.steps} steps", flush=True)
        started = common.now_iso()
        s = visrep.pretrain(rc, quiet=True)
        ev = visrep.evaluate_classifier(str(out), dataset="imagefolder", root=args.data, test_subset=args.test_subset,
                                        device="cpu", progress=False)
        transfer = {}
        for ds, opts in TASKS:
            r = visrep.evaluate_linear(str(out), dataset=ds, root=args.faces, dataset_options=opts, device="cpu",
                                       progress=False, train_subset=args.probe_subset,
                                       test_subset=args.probe_subset, weight_decay=1e-4)
            transfer[f"{ds}_{opts['task']}"] = {"top1": r["top1"], "train_size": r["dataset"]["train_size"],
                                                "test_size": r["dataset"]["test_size"]}
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
        d = rc.to_dict()
        results[name] = {
            "cifar10_top1": ev["top1"], "cifar10_top5": ev["top5"], "test_size": ev["dataset"]["test_size"],
            "linear_probe_transfer": transfer, "steps": s["steps"], "loop_seconds": s["loop_seconds"],
            "final_loss": s["final_loss"],
            "loss_curve_every_50": [[r["step"], round(r["loss"], 4)] for r in recs
                                    if r["step"] % 50 == 0 or r["step"] == s["steps"]],
            "started_utc": started, "ended_utc": common.now_iso(),
            "recipe": {k: d[k] for k in ("method", "seed", "data", "views", "backbone", "classifier", "objective",
                                         "optim", "train")},
        }
        print(f"b7: {name}: top-1 {ev['top1']:.4f}, transfer "
              + ", ".join(f"{k} {v['top1']:.4f}" for k, v in transfer.items()), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    base = results["softmax"]
    out = {
        "benchmark": "b7_heads", "machine": common.machine_info(), "load_at_start": load,
        "setup": {"dataset": "CIFAR-10 (shared JPEG archive), 32 px", "steps_per_run": args.steps,
                  "batch_size": args.batch_size, "backbone": f"resnet18 cifar_stem width {args.width}",
                  "threads": args.threads, "gcr_gamma": 25.0,
                  "eval": "own head top-1 on CIFAR-10 test; visrep.evaluate_linear (100 epochs, wd 1e-4) on "
                          "UTKFace gender (seeded 80/20 split) and MTFL smile, 32 px"},
        "runs": results,
        "ratios_vs_softmax": {
            n: {"cifar10_top1": r["cifar10_top1"] / max(base["cifar10_top1"], 1e-9),
                "loop_seconds": r["loop_seconds"] / max(base["loop_seconds"], 1e-9),
                **{t: r["linear_probe_transfer"][t]["top1"] / max(base["linear_probe_transfer"][t]["top1"], 1e-9)
                   for t in r["linear_probe_transfer"]}}
            for n, r in results.items() if n != "softmax"},
    }
    common.write_json(args.out, out)
    print(json.dumps({n: {"cifar10_top1": r["cifar10_top1"],
                          **{t: v["top1"] for t, v in r["linear_probe_transfer"].items()}}
                      for n, r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
