"""B11-faces (the issue's "B11"; b11_score_speed.py is the older B11): one face model for many tasks (Faceptor)
against one model per task, on UTKFace and MTFL, CPU scale.

Every setting trains a ViT-Tiny (64 px, patch 16; from random init, or from `--init`) for the same number of steps,
and every task gets the same number of its own samples per step (`--per-task`), so each task sees as many of its
images in a joint run as in its single-task run. Settings (per seed):

  single:<task>   one model per task: `faceptor` with that task alone (the encoder, the decoder and its queries)
  naive           Naive Faceptor: one head per output type on one encoder, all seven tasks
  faceptor        Faceptor stage 1: the shared decoder with task queries, all seven tasks
  stage2_age      Faceptor stage 2 for age: the stage-1 run + Layer-Attention on `--stage2-levels`, age data only
  aux_age10       auxiliary mode: all tasks, UTKFace age at 10 % of its labels as the main task (helpers × 0.1)
  single_age10    single-task age at the same 10 % of the labels (the same Faceptor head as aux_age10)

Each finished (setting, seed) is one JSON in `--out-dir` (resumable: a rerun skips them) with every task's test
metric (`visrep eval faceptor`: MAE for age, accuracy for classes, NME and failure rate for landmarks), the
parameter counts, the checkpoint size and the training seconds. `--summarise` (also run at the end) writes
`b11_faces.json` (per setting and task: mean and 95 % t-interval over seeds; one model vs seven) and
`b11_faces.png`.

    python benchmarks/b11_faces.py --make-init runs/b11_mae_init_p16   # the encoder start: MAE on UTKFace train
    python benchmarks/b11_faces.py --init runs/b11_mae_init_p16 --threads 1 --seeds 0 &   # one seed per core:
    python benchmarks/b11_faces.py --init runs/b11_mae_init_p16 --threads 1 --seeds 1 &   # about 2 h each on
    python benchmarks/b11_faces.py --init runs/b11_mae_init_p16 --threads 1 --seeds 2 &   # 2 cores for three
    wait; python benchmarks/b11_faces.py --summarise
    python benchmarks/b11_faces.py --seeds 0 --steps 20 --per-task 4 --test-subset 64 --out-dir /tmp/b11  # smoke
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

FACES = str(common.REPO_ROOT.parent / "shared" / "data" / "faces")
TASKS = ["utkface_age", "utkface_gender", "utkface_race", "mtfl_landmarks", "mtfl_smile", "mtfl_glasses", "mtfl_pose"]
HIGHER_IS_BETTER = {"accuracy": True, "mean_accuracy": True, "mae": False, "nme": False}


def settings() -> list[str]:
    return [f"single:{t}" for t in TASKS] + ["naive", "faceptor", "stage2_age", "aux_age10", "single_age10"]


def config(args, setting: str, seed: int, out_dir: Path) -> dict:
    per, n = args.per_task, len(TASKS)
    tasks: list = list(TASKS)
    method, objective = "faceptor", {}
    head = {"dim": args.dim, "depth": args.depth, "heads": args.heads, "ffn_dim": args.ffn_dim, "levels": [-1]}
    if setting.startswith("single"):
        task = "utkface_age" if setting == "single_age10" else setting.split(":", 1)[1]
        tasks = [{"task": task, "label_fraction": 0.1}] if setting == "single_age10" else [task]
    elif setting == "naive":
        method, head = "faceptor_naive", {"dim": args.dim, "levels": [-1]}
    elif setting == "stage2_age":
        head = {**head, "stage2": {"init": str(out_dir.parent / f"faceptor_seed{seed}"), "task": "utkface_age",
                                   "levels": args.stage2_levels}}
    elif setting == "aux_age10":
        tasks = [{"task": "utkface_age", "label_fraction": 0.1}, *TASKS[1:]]
        objective = {"params": {"main_task": "utkface_age", "helper_weight": 0.1}}
    n_trained = 1 if setting.startswith("single") or setting == "stage2_age" else n
    cfg = {
        "method": method, "seed": seed, "out_dir": str(out_dir),
        "data": {"root": args.data, "image_size": args.image_size},
        "backbone": {"name": "vit_tiny", "options": {"patch_size": args.patch_size}},
        "tasks": tasks, "task_head": head,
        "optim": {"lr": args.lr, "lr_scaling": "none", "warmup_epochs": 0.0},
        "train": {"steps": args.steps, "epochs": 10_000, "batch_size": per * n_trained, "num_threads": args.threads,
                  "device": "cpu", "progress": False, "log_every": 10},
    }
    if objective:
        cfg["objective"] = objective
    if args.init:
        cfg["finetune"] = {"init": args.init}
    return cfg


def make_init(args, out: str) -> dict:
    """The shared encoder start: MAE (the `mae` preset) on UTKFace's train split only, so no test face is seen.
    Every setting starts from it, so the comparison is about the heads and the data, not about who learns
    low-level features from scratch fastest in 300 steps."""
    import visrep

    cfg = visrep.resolve({
        "method": "mae", "seed": 0, "out_dir": out,
        "data": {"dataset": "utkface", "root": args.data, "image_size": args.image_size, "options": {"task": "age"}},
        "backbone": {"name": "vit_tiny", "options": {"patch_size": args.patch_size}},
        # a light decoder (MAE's ablation: depth 1-2 loses little for fine-tuning) keeps this ~0.8 s per step
        "decoder": {"type": "mae", "dim": 128, "depth": 2, "heads": 4},
        "train": {"epochs": args.init_epochs, "batch_size": 128, "num_threads": args.threads, "device": "cpu",
                  "progress": False, "log_every": 20},
        "monitor": {"knn_every": 0, "rankme_every": 0, "online_probe": False},
    })
    return visrep.pretrain(cfg, resume=(Path(out) / "checkpoints" / "last.safetensors").exists(), quiet=True)


def run_one(args, setting: str, seed: int) -> dict:
    import visrep

    work = Path(args.work_dir)
    name = f"{setting.replace(':', '_')}_seed{seed}"
    out_dir = work / name
    cfg = visrep.resolve(config(args, setting, seed, out_dir))
    t0 = time.perf_counter()
    summary = visrep.pretrain(cfg, resume=(out_dir / "checkpoints" / "last.safetensors").exists(), quiet=True)
    train_s = time.perf_counter() - t0
    ev = visrep.evaluate_faceptor(str(out_dir), root=args.data, test_subset=args.test_subset, seed=0,
                                  out=str(Path(args.out_dir) / f"{name}_eval.json") if args.figures else None,
                                  figures=args.figures)
    ckpt = out_dir / "checkpoints" / "last.safetensors"
    return {"setting": setting, "seed": seed, "tasks": ev["tasks"], "layer_attention": ev["layer_attention"],
            "parameters": summary.get("parameters"), "checkpoint_bytes": ckpt.stat().st_size,  # + optimiser state
            "model_bytes_fp32": 4 * summary["parameters"]["all"]["total"],
            "steps": summary["steps"], "train_seconds": train_s, "loop_seconds": summary.get("loop_seconds"),
            "final_loss": summary["final_loss"], "recipe": cfg.to_dict(), "machine": common.machine_info()}


def baselines(args) -> dict:
    """What a model that ignores the image scores, from the training split alone: the majority class, the median age
    (the constant of least MAE), the mean landmark shape. A setting at this level has learned nothing."""
    from visrep.data.tasks import TASKS as SPECS, load_task_data
    from visrep.evaluate.regression import landmark_nme

    out = {}
    for name in TASKS:
        spec = SPECS.get(name)
        tr = load_task_data(spec, "train", root=args.data, image_size=args.image_size)
        te = load_task_data(spec, "test", root=args.data, image_size=args.image_size)
        if spec.output == "classification":
            majority = int(tr.labels.bincount().argmax())
            out[name] = {"metric": "accuracy", "accuracy": float((te.labels == majority).double().mean()),
                         "rule": f"majority class '{tr.classes[majority]}'"}
        elif spec.output == "age_distribution":
            med = float(tr.targets[:, 0].median())
            out[name] = {"metric": "mae", "mae": float((te.targets[:, 0] - med).abs().mean()),
                         "rule": f"median training age {med:.0f}"}
        else:
            mean = tr.targets.mean(0, keepdim=True).expand_as(te.targets)
            out[name] = {"metric": "nme", **landmark_nme(mean, te.targets), "rule": "mean training shape"}
    return out


def summarise(out_dir: Path) -> dict:
    from scipy import stats

    recs = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*_seed*.json")) if not p.name.endswith("_eval.json")]
    table: dict = {}
    for r in recs:
        for task, m in r["tasks"].items():
            key = m["metric"]
            table.setdefault(r["setting"], {}).setdefault(task, {"metric": key, "values": []})["values"].append(m[key])
    for setting, tasks in table.items():
        for task, cell in tasks.items():
            v = cell["values"]
            mean = sum(v) / len(v)
            sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None
            half = stats.t.ppf(0.975, len(v) - 1) * sd / math.sqrt(len(v)) if sd is not None else None
            cell.update(n=len(v), mean=mean, sd=sd, ci95=[mean - half, mean + half] if half is not None else None)
    cost: dict = {}
    for r in recs:
        c = cost.setdefault(r["setting"], {"parameters": [], "model_bytes_fp32": [], "checkpoint_bytes": [],
                                           "train_seconds": []})
        c["parameters"].append((r.get("parameters") or {}).get("all", {}).get("total"))
        c["model_bytes_fp32"].append(r.get("model_bytes_fp32"))
        c["checkpoint_bytes"].append(r["checkpoint_bytes"])
        c["train_seconds"].append(r["train_seconds"])
    cost = {k: {m: (sum(x for x in v if x is not None) / max(1, len([x for x in v if x is not None])))
                for m, v in c.items()} for k, c in cost.items()}
    singles = [k for k in cost if k.startswith("single:")]
    if singles:  # seven specialists against one model
        cost["seven single-task models"] = {m: sum(cost[k][m] for k in singles) for m in
                                            ("parameters", "model_bytes_fp32", "checkpoint_bytes", "train_seconds")}
    out = {"benchmark": "B11 joint vs single-task vs naive face models (UTKFace + MTFL, ViT-Tiny 64 px, CPU)",
           "table": table, "cost": cost, "runs": len(recs), "updated_utc": common.now_iso()}
    base = out_dir / "baselines.json"
    if base.is_file():  # the image-blind scores every setting must beat
        out["image_blind_baselines"] = json.loads(base.read_text())["tasks"]
    if recs:
        rec = recs[0]["recipe"]
        out["recipe"] = {"backbone": rec["backbone"], "steps": rec["train"]["steps"], "lr": rec["optim"]["lr"],
                         "image_size": rec["data"]["image_size"], "task_head": rec.get("task_head"),
                         "init": (rec.get("finetune") or {}).get("init")}
    _figure(table, out_dir.parent / "b11_faces.png", out.get("image_blind_baselines"))
    return out


def _figure(table: dict, path: Path, blind: dict | None = None) -> None:
    """One panel per task (mean over seeds, 95 % t-interval; dashed: the image-blind score), plus the auxiliary
    panel: age at 10 % of the labels, alone against with the six helper tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(task, [("single", f"single:{task}"), ("naive", "naive"), ("faceptor", "faceptor")]
               + ([("stage 2", "stage2_age")] if task == "utkface_age" else [])) for task in TASKS]
    panels.append(("utkface_age", [("single\n10 %", "single_age10"), ("aux\n10 %", "aux_age10")]))
    colours = {"single": "#999", "naive": "#6a9", "faceptor": "#36c", "stage 2": "#138", "single\n10 %": "#999",
               "aux\n10 %": "#c63"}
    fig, axes = plt.subplots(1, len(panels), figsize=(2.0 * len(panels), 2.9))
    for i, (ax, (task, bars)) in enumerate(zip(axes, panels)):
        xs, ys, es = [], [], []
        for label, setting in bars:
            cell = (table.get(setting) or {}).get(task)
            if not cell:
                continue
            xs.append(label), ys.append(cell["mean"])
            es.append((cell["ci95"][1] - cell["mean"]) if cell.get("ci95") else 0)
        ax.bar(xs, ys, yerr=es, color=[colours[x] for x in xs], capsize=3)
        metric = next(iter(c["metric"] for s in table.values() for t, c in s.items() if t == task), "")
        if blind and task in blind:
            ax.axhline(blind[task][metric], color="k", ls="--", lw=0.8)
        title = "age, 10 % labels" if i == len(panels) - 1 else task
        ax.set_title(f"{title}\n{metric} ({'higher' if HIGHER_IS_BETTER.get(metric, True) else 'lower'} is better)",
                     fontsize=7)
        ax.tick_params(labelsize=6)
    seeds = max((c["n"] for t in table.values() for c in t.values()), default=0)
    fig.suptitle(f"B11-faces: mean of {seeds} seeds, 95 % t-interval; dashed = image-blind (majority class, "
                 "median age, mean shape)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--only", default=None, help="comma list of settings (default: all)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--per-task", type=int, default=16, help="samples of each task per step")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128, help="decoder / head width (official 256)")
    ap.add_argument("--depth", type=int, default=3, help="decoder layers (official 9)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn-dim", type=int, default=512)
    ap.add_argument("--stage2-levels", type=int, nargs="+", default=[3, 7])
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--init", default=None, help="a visrep run or export to start every encoder from")
    ap.add_argument("--make-init", default=None, metavar="DIR", help="only pretrain the encoder start (MAE) into DIR")
    ap.add_argument("--init-epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--test-subset", type=int, default=None, help="seeded subset of each task's test split")
    ap.add_argument("--figures", action="store_true", help="also write each run's eval figures")
    ap.add_argument("--data", default=FACES)
    ap.add_argument("--work-dir", default=str(common.REPO_ROOT / "runs" / "b11_faces"))
    ap.add_argument("--out-dir", default=str(common.RESULTS_DIR / "b11_faces"))
    ap.add_argument("--summarise", action="store_true", help="only write the summary of the JSONs there")
    args = ap.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.make_init:
        common.set_threads(args.threads)
        s = make_init(args, args.make_init)
        print(f"MAE init: {s['steps']} steps, final loss {s['final_loss']:.4f} -> {args.make_init}")
        return
    if not args.summarise and not (out_dir / "baselines.json").is_file():
        common.write_json(out_dir / "baselines.json", {"tasks": baselines(args), "machine": common.machine_info()})
    if not args.summarise:
        common.set_threads(args.threads)
        wanted = args.only.split(",") if args.only else settings()
        bad = sorted(set(wanted) - set(settings()))
        if bad:
            ap.error(f"unknown setting(s) {bad}; choose from {settings()}")
        order = [s for s in settings() if s in wanted]  # stage 2 after the stage-1 run it extends
        for seed in [int(s) for s in args.seeds.split(",")]:
            for setting in order:
                path = out_dir / f"{setting.replace(':', '_')}_seed{seed}.json"
                if path.is_file():
                    continue
                print(f"== {setting} seed {seed} started {common.now_iso()}", flush=True)
                rec = run_one(args, setting, seed)
                common.write_json(path, rec)
                print("   " + ", ".join(f"{t} {m['metric']} {m[m['metric']]:.4f}" for t, m in rec["tasks"].items()),
                      flush=True)
    summary = summarise(out_dir)
    common.write_json(out_dir.parent / "b11_faces.json", summary)
    print(f"wrote {out_dir.parent / 'b11_faces.json'}")


if __name__ == "__main__":
    main()
