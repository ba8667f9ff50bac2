"""B9: the rank-correlation study. Do transferability scores order a pool of visrep backbones the way their
linear-probe accuracy on a new task does?

Pool (all pretrained by visrep on CIFAR-10 at 32 px on the CPU, the recipe below; ResNet-18 with the CIFAR
stem at width --width unless said otherwise):

    simclr, simclr_short (a quarter of the steps), byol, barlow_twins, dino (2 global + 4 local crops),
    mae (ViT-Tiny, patch 4, decoder 2 x 192: 192-d features beside the ResNets' 8·width), supervised softmax x 3 seeds,
    supervised GCR (k 8, gamma 25, Riemannian SGD) x 3 seeds, and a random-init ResNet-18 of the same shape.

Every trained run has the same number of steps (--steps; simclr_short --steps/4) at batch --batch-size,
warm-up 5 % of the steps, the preset's optimiser and loss otherwise; online monitors off.

Targets (every offline one, 32 px like the pretraining): UTKFace gender / race / age_group (seeded 80/20
split), MTFL smile / glasses / pose (official split), scikit-learn digits, and CIFAR-10 itself (in-domain;
10,000 seeded training images, the full test split). Per target `visrep.rank` computes every registered
score on the training split's frozen features and the truth: the L-BFGS linear probe's test top-1 (L2 grid
chosen on a held-out slice of the training split). LEEP and NCE need a source classifier, which only the
six supervised runs have, so their τw is over those six. TMI runs per coordinate (`normalize`) and without
the reference's distance floor (see SCORE_OPTIONS); every other score with its defaults.

Report (results/b9_rank.json and b9_rank.png): per target the weighted Kendall τ (scipy.stats.weightedtau)
of every score against the truth and the mean over targets; the seconds each score took; the spread of
the truth over the pool; and GCR vs softmax (3 seeds each): their truths on every target.

Resumable: each trained run is a run folder under --runs-dir and a JSON under results/b9_rank/pool/, each
finished target a JSON under results/b9_rank/targets/; what exists is skipped.

    python benchmarks/b9_rank.py                       # the full study (about 1.5 h on 2 cores)
    python benchmarks/b9_rank.py --steps 4 --batch-size 32 --targets digits --out-dir /tmp/b9 --runs-dir /tmp/b9r
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

FACES = str(Path(common.DEFAULT_DATA).parent.parent / "faces")
PUBLISHED = {"source": "Shao et al., ECCV 2022 (SFDA), Table 1: 11 supervised ImageNet models, 11 targets, "
                       "mean weighted tau", "logme": 0.509, "sfda": 0.710}

# TMI: the pool mixes widths (128 and 192), so the per-coordinate entropy (normalize); and no distance floor:
# the reference's min_dist = 1.0 floors every k-NN distance of these features (their max-norm distances are
# far below 1; measured: 100 % floored), which makes TMI one constant per width.
SCORE_OPTIONS = {"tmi": {"normalize": True, "min_dist": 1e-12}}

# name -> (method, backbone, classifier override, seed, step factor)
POOL = {
    "simclr": ("simclr", "resnet18", None, 0, 1.0),
    "simclr_short": ("simclr", "resnet18", None, 0, 0.25),
    "byol": ("byol", "resnet18", None, 0, 1.0),
    "barlow_twins": ("barlow_twins", "resnet18", None, 0, 1.0),
    "dino": ("dino", "resnet18", None, 0, 1.0),
    "mae": ("mae", "vit_tiny", None, 0, 1.0),
    **{f"softmax_s{s}": ("supervised", "resnet18", {"type": "linear"}, s, 1.0) for s in range(3)},
    **{f"gcr_s{s}": ("supervised_gcr", "resnet18", None, s, 1.0) for s in range(3)},
}


def targets(args) -> dict:
    return {
        "utkface_gender": dict(dataset="utkface", root=FACES, dataset_options={"task": "gender"}),
        "utkface_race": dict(dataset="utkface", root=FACES, dataset_options={"task": "race"}),
        "utkface_age_group": dict(dataset="utkface", root=FACES, dataset_options={"task": "age_group"}),
        "mtfl_smile": dict(dataset="mtfl", root=FACES, dataset_options={"task": "smile"}),
        "mtfl_glasses": dict(dataset="mtfl", root=FACES, dataset_options={"task": "glasses"}),
        "mtfl_pose": dict(dataset="mtfl", root=FACES, dataset_options={"task": "pose"}),
        "digits": dict(dataset="digits"),
        "cifar10": dict(dataset="imagefolder", root=args.data, train_subset=args.cifar_train_subset),
    }


def run_config(args, name: str, out_dir: str) -> dict:
    method, backbone, classifier, seed, factor = POOL[name]
    steps = max(1, round(args.steps * factor))
    spe = max(1, 50000 // args.batch_size)
    opts = {"cifar_stem": True, "width": args.width} if backbone == "resnet18" else {"patch_size": 4}
    cfg = {
        "method": method, "seed": seed, "out_dir": out_dir,
        "data": {"dataset": "imagefolder", "root": args.data, "image_size": 32},
        "backbone": {"name": backbone, "options": opts},
        "optim": {"warmup_epochs": 0.05 * steps / spe},
        "train": {"batch_size": args.batch_size, "steps": steps, "epochs": max(1, -(-steps // spe)),
                  "num_threads": args.threads, "device": "cpu", "progress": False, "log_every": 10},
        "monitor": {"online_probe": False, "knn_every": 0, "rankme_every": 0},
    }
    if method == "mae":  # a light decoder (MAE's ablation: depth barely matters), so MAE fits a CPU budget
        cfg["decoder"] = {"type": "mae", "dim": 192, "depth": 2, "heads": 3}
    if method == "dino":
        cfg["views"] = {"policy": "multicrop", "options": {"n_local": 4}}
    if classifier is not None:
        cfg["classifier"] = classifier
    return cfg


def train_pool(args, pool_dir: Path) -> list[str]:
    import visrep

    runs = []
    for name in POOL:
        out = Path(args.runs_dir) / name
        record = pool_dir / f"{name}.json"
        runs.append(str(out))
        if common.read_json(record):
            continue
        cfg = visrep.resolve(run_config(args, name, str(out)))
        print(f"[b9] pretraining {name} ({cfg.method}, {cfg.backbone.name}, {cfg.train.steps} steps)", flush=True)
        t0 = time.perf_counter()
        summary = visrep.pretrain(cfg, resume=(out / "checkpoints").is_dir(), quiet=True)
        rec = {"name": name, "run_dir": str(out), "wall_s": time.perf_counter() - t0,
               "recipe": cfg.to_dict(), "summary": summary}
        if cfg.method.startswith("supervised"):  # own head on CIFAR-10 test: the in-domain number GCR claims
            rec["cifar10_own_head_top1"] = visrep.evaluate_classifier(
                str(out), dataset="imagefolder", root=args.data, progress=False)["top1"]
        common.write_json(record, rec)
    return runs


def rank_targets(args, runs: list[str], target_dir: Path) -> None:
    import visrep

    random_init = "resnet18"  # same shape as the pool's ResNets, seeded
    for tname, spec in targets(args).items():
        if args.targets and tname not in args.targets:
            continue
        path = target_dir / f"{tname}.json"
        done = common.read_json(path)
        if done and done.get("score_options") == SCORE_OPTIONS:
            continue  # finished with the same score settings (other settings: ranked again)
        print(f"[b9] ranking the pool on {tname}", flush=True)
        res = visrep.rank([*runs, random_init], image_size=32, truth="linear", seed=0,
                          backbone_options={"cifar_stem": True, "width": args.width}, progress=True,
                          score_options=SCORE_OPTIONS, test_subset=None, **spec)
        res["target"] = tname
        res["machine"] = common.machine_info()
        common.write_json(path, res)


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def report(args, pool_dir: Path, target_dir: Path) -> dict:
    done = {p.stem: common.read_json(p) for p in sorted(target_dir.glob("*.json"))}
    order = [t for t in targets(args) if t in done]
    if not order:
        raise SystemExit("b9: no target has been ranked yet")
    scores = done[order[0]]["scores"]
    tau = {s: {t: done[t]["agreement"][s].get("weighted_tau") for t in order} for s in scores}
    informative = [t for t in order if len({m["truth"] for m in done[t]["models"]}) > 1]  # else τ is undefined
    summary = {s: {"mean_weighted_tau": _mean(tau[s].values()),
                   "targets_with_tau": sum(tau[s][t] is not None for t in order),
                   "mean_kendall_tau": _mean(done[t]["agreement"][s].get("kendall_tau") for t in order),
                   "mean_pearson_r": _mean(done[t]["agreement"][s].get("pearson_r") for t in order),
                   "top1_hits": sum(bool(done[t]["agreement"][s].get("top1_hit")) for t in informative),
                   "mean_relative_top1": _mean(done[t]["agreement"][s].get("relative_top1") for t in informative),
                   "models_scored": min(done[t]["agreement"][s].get("n", 0) for t in order),
                   "seconds_total": sum(done[t]["score_seconds"][s] for t in order)} for s in scores}
    name_of = {}
    for p in pool_dir.glob("*.json"):
        rec = common.read_json(p)
        name_of[str(Path(rec["run_dir"]))] = rec["name"]
    name_of["resnet18"] = "random_init"
    truths = {t: {name_of.get(m["model"], m["model"]): m["truth"] for m in done[t]["models"]} for t in order}
    spread = {t: {"min": min(v.values()), "max": max(v.values()), "std": statistics.pstdev(v.values()),
                  "best": max(v, key=v.get)} for t, v in truths.items()}
    gcr = {}
    for t in order:
        soft = [truths[t][f"softmax_s{s}"] for s in range(3) if f"softmax_s{s}" in truths[t]]
        g = [truths[t][f"gcr_s{s}"] for s in range(3) if f"gcr_s{s}" in truths[t]]
        if soft and g and t in informative:
            from scipy import stats

            welch = stats.ttest_ind(g, soft, equal_var=False) if len(g) > 1 and len(soft) > 1 else None
            gcr[t] = {"softmax": soft, "gcr": g, "softmax_mean": _mean(soft), "gcr_mean": _mean(g),
                      "std": "sample standard deviation (n - 1)",
                      "welch_p": None if welch is None or not math.isfinite(welch.pvalue) else float(welch.pvalue),
                      "gcr_minus_softmax": _mean(g) - _mean(soft),
                      "softmax_std": statistics.stdev(soft), "gcr_std": statistics.stdev(g)}
    # Holm's step-down correction over the targets' Welch tests (one family: "GCR transfers better").
    ps = sorted((v["welch_p"], t) for t, v in gcr.items() if v.get("welch_p") is not None)
    running = 0.0
    for i, (p_value, t) in enumerate(ps):
        running = max(running, min(1.0, (len(ps) - i) * p_value))
        gcr[t]["holm_p"] = running
    # Targets whose truths span less than 0.03 are nearly degenerate (MTFL pose: 8 of 13 models tie): a second mean.
    wide = [t for t in informative if spread[t]["max"] - spread[t]["min"] >= 0.03]
    for sc in scores:
        summary[sc]["mean_weighted_tau_spread_0_03"] = _mean(tau[sc][t] for t in wide)
    pool = {p.stem: common.read_json(p) for p in sorted(pool_dir.glob("*.json"))}
    own = {n: r.get("cifar10_own_head_top1") for n, r in pool.items() if r.get("cifar10_own_head_top1") is not None}
    result = {
        "benchmark": "b9_rank",
        "setup": {"pool": {n: {"method": r["recipe"]["method"], "backbone": r["recipe"]["backbone"],
                               "steps": r["recipe"]["train"]["steps"], "batch_size": r["recipe"]["train"]["batch_size"],
                               "seed": r["recipe"]["seed"], "train_wall_s": round(r["wall_s"], 1)}
                           for n, r in pool.items()} | {"random_init": "resnet18, cifar stem, seeded init"},
                  "targets": {t: {k: v for k, v in targets(args)[t].items() if k != "root"} for t in order},
                  "image_size": 32, "truth": done[order[0]].get("truth_protocol"),
                  "scores_on": "training split features (CIFAR-10: a seeded 10,000-image subset)",
                  "leep_nce": "need a source classifier: scored on the six supervised runs only",
                  "score_options": SCORE_OPTIONS},
        "uninformative_targets": {t: f"every model's truth is {done[t]['models'][0]['truth']:.4f}: no order to "
                                     "agree with, so τ is undefined there and left out of the means"
                                  for t in order if t not in informative},
        "targets_with_spread_0_03": wide,
        "weighted_tau": tau, "summary": summary, "truth": truths, "truth_spread": spread,
        "gcr_vs_softmax": {"per_target": gcr,
                           "mean_gcr_minus_softmax": _mean(v["gcr_minus_softmax"] for v in gcr.values()),
                           "targets_gcr_better": sum(v["gcr_minus_softmax"] > 0 for v in gcr.values()),
                           "cifar10_own_head_top1": own},
        "published_context": PUBLISHED,
        "recipe": {"full_pool_recipes": "results/b9_rank/pool/*.json", "per_target": "results/b9_rank/targets/*.json"},
        "machine": common.machine_info(),
    }
    common.write_json(Path(args.out_dir).parent / "b9_rank.json" if args.out_dir else common.result_path("b9_rank"),
                      result)
    plot(result, order, Path(args.out_dir).parent / "b9_rank.png")
    return result


def plot(result: dict, order: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    scores = sorted(result["weighted_tau"], key=lambda s: -(result["summary"][s]["mean_weighted_tau"] or -9))
    m = np.array([[result["weighted_tau"][s][t] if result["weighted_tau"][s][t] is not None else np.nan
                   for t in order] + [result["summary"][s]["mean_weighted_tau"] or np.nan] for s in scores])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 0.42 * len(scores) + 1.8),
                                  gridspec_kw={"width_ratios": [3, 1.4]})
    im = ax.imshow(m, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(order) + 1), [*order, "mean"], rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(scores)), scores, fontsize=8)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if not np.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title("weighted τ of each score vs linear-probe top-1 (B9)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    secs = [result["summary"][s]["seconds_total"] for s in scores]
    ax2.barh(range(len(scores)), secs)
    ax2.set_yticks(range(len(scores)), scores, fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xscale("log")
    ax2.set_xlabel("seconds, all models x targets", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SHORT = {"utkface_gender": "UTK gender", "utkface_race": "UTK race", "utkface_age_group": "UTK age",
         "mtfl_smile": "MTFL smile", "mtfl_glasses": "MTFL glasses", "mtfl_pose": "MTFL pose", "digits": "digits",
         "cifar10": "CIFAR-10"}


def markdown(result: dict) -> str:
    """The README's tables, printed from the JSON (so the README quotes the run, not a hand copy)."""
    def f(v, fmt="{:.2f}"):
        return "–" if v is None else fmt.format(v)

    order = list(result["truth"])
    scores = sorted(result["summary"], key=lambda s: -(result["summary"][s]["mean_weighted_tau"] or -9))
    lines = ["| score | " + " | ".join(SHORT.get(t, t) for t in order) +
             " | **mean τw** | mean τw, spread ≥ 0.03 | top-1 hits | s |", "|---|" + "---|" * (len(order) + 4)]
    for sc in scores:
        sm = result["summary"][sc]
        lines.append(f"| `{sc}` | " + " | ".join(f(result["weighted_tau"][sc][t]) for t in order) +
                     f" | **{f(sm['mean_weighted_tau'])}** | {f(sm['mean_weighted_tau_spread_0_03'])}"
                     f" | {sm['top1_hits']}/{len(order) - len(result['uninformative_targets'])}"
                     f" | {sm['seconds_total']:.1f} |")
    lines += ["", "| truth (linear-probe top-1) | " + " | ".join(SHORT.get(t, t) for t in order) + " |",
              "|---|" + "---|" * len(order)]
    models = list(next(iter(result["truth"].values())))
    for m in models:
        lines.append(f"| {m} | " + " | ".join(f(result["truth"][t].get(m), "{:.3f}") for t in order) + " |")
    lines.append("| spread (max − min) | " + " | ".join(
        f"{result['truth_spread'][t]['max'] - result['truth_spread'][t]['min']:.3f}" for t in order) + " |")
    g = result["gcr_vs_softmax"]["per_target"]
    lines += ["", "| GCR − softmax (mean of 3 seeds each, ± std) | " + " | ".join(SHORT.get(t, t) for t in g) + " |",
              "|---|" + "---|" * len(g),
              "| difference | " + " | ".join(f"{v['gcr_minus_softmax']:+.3f}" for v in g.values()) + " |",
              "| softmax | " + " | ".join(f"{v['softmax_mean']:.3f} ± {v['softmax_std']:.3f}" for v in g.values()) + " |",
              "| GCR | " + " | ".join(f"{v['gcr_mean']:.3f} ± {v['gcr_std']:.3f}" for v in g.values()) + " |",
              "| Welch p | " + " | ".join(f(v["welch_p"], "{:.3f}") for v in g.values()) + " |",
              "| Holm-adjusted p | " + " | ".join(f(v.get("holm_p"), "{:.3f}") for v in g.values()) + " |"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=common.DEFAULT_DATA, help="CIFAR-10 JPEG archive or folder")
    p.add_argument("--steps", type=int, default=200, help="training steps of every pool run (simclr_short: 1/4)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--width", type=int, default=16, help="ResNet-18 width (64 = the standard one)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cifar-train-subset", type=int, default=10000)
    p.add_argument("--targets", nargs="*", default=None, help="only these targets (default: all eight)")
    p.add_argument("--runs-dir", default=str(common.REPO_ROOT / "runs" / "b9"))
    p.add_argument("--out-dir", default=None, help="default: benchmarks/results/b9_rank/")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--markdown", action="store_true", help="also print the tables of docs/benchmarks.md")
    args = p.parse_args()
    base = Path(args.out_dir) if args.out_dir else common.RESULTS_DIR / "b9_rank"
    args.out_dir = str(base)
    pool_dir, target_dir = base / "pool", base / "targets"
    import torch

    torch.set_num_threads(args.threads)
    if not args.report_only:
        common.load_check("b9")
        runs = train_pool(args, pool_dir)
        rank_targets(args, runs, target_dir)
    res = report(args, pool_dir, target_dir)
    for s, v in sorted(res["summary"].items(), key=lambda kv: -(kv[1]["mean_weighted_tau"] or -9)):
        mt = v["mean_weighted_tau"]
        print(f"{s:>18}  mean τw {mt if mt is None else round(mt, 3)}  {v['seconds_total']:.1f} s")
    if args.markdown:
        print(markdown(res))


if __name__ == "__main__":
    main()
