"""B13: the study runner's overhead: one `visrep study run` of N runs against the same N runs as separate CLI calls.

    .venv/bin/python benchmarks/b13_study_overhead.py [--runs 4] [--steps 40] [--rounds 2]

Both arms do the same work: N SimCLR runs on the bundled digits (ResNet-18 CIFAR stem width 16, 16 px, batch
128, `--steps` steps, seeds 0..N-1, 1 worker, 2 torch threads), each followed by a kNN evaluation on digits.

* study: `visrep study run S.yaml` (one process: plan + N runs + N evaluations + the results store)
* cli:   for each run, `visrep pretrain ...` then `visrep eval knn --model RUN --out ...` (2N processes)

The arms alternate (study, cli, study, cli, ...), each in a fresh output folder and a fresh feature cache, so
neither reuses the other's features, and machine noise hits both. Whole processes are timed from the outside
(wall clock of the subprocess). Reported: the median wall time of each arm, their ratio study / cli (target
<= 1.05: the study costs no more than the separate calls, within 5 %), and the per-run difference in seconds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

VISREP = str(Path(sys.executable).with_name("visrep"))
OVERRIDES = ["method=simclr", "data.dataset=digits", "data.image_size=16", "backbone.name=resnet18",
             "backbone.options.cifar_stem=true", "backbone.options.width=16", "train.batch_size=128",
             "monitor.knn_every=0", "monitor.rankme_every=0", "train.num_threads=2"]


def study_yaml(out_dir: Path, runs: int, steps: int) -> str:
    seeds = ", ".join(str(s) for s in range(runs))
    return f"""name: overhead
out_dir: {out_dir}
base:
  data: {{dataset: digits, image_size: 16}}
  backbone: {{name: resnet18, options: {{cifar_stem: true, width: 16}}}}
  train: {{batch_size: 128, num_threads: 2}}
  monitor: {{knn_every: 0, rankme_every: 0}}
budget: {{steps: {steps}}}
factors:
  method: [simclr]
  seed: [{seeds}]
evaluations:
  - {{protocol: knn, dataset: digits}}
"""


def _run(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t


def arm_study(work: Path, runs: int, steps: int, env: dict) -> float:
    spec = work / "study.yaml"
    spec.write_text(study_yaml(work / "study", runs, steps))
    return _run([VISREP, "study", "run", str(spec)], env)


def arm_cli(work: Path, runs: int, steps: int, env: dict) -> float:
    total = 0.0
    for seed in range(runs):
        run_dir = work / f"run{seed}"
        total += _run([VISREP, "pretrain", *OVERRIDES, f"seed={seed}", f"train.steps={steps}",
                       f"out_dir={run_dir}"], env)
        total += _run([VISREP, "eval", "knn", "--model", str(run_dir), "--dataset", "digits",
                       "--out", str(run_dir / "knn.json")], env)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    load = common.load_check("b13")
    times = {"study": [], "cli": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for arm, fn in (("study", arm_study), ("cli", arm_cli)):
                work = Path(tmp) / f"{arm}{r}"
                work.mkdir()
                env = {**os.environ, "VISREP_CACHE": str(work / "cache"), "CI": "true"}
                seconds = fn(work, args.runs, args.steps, env)
                times[arm].append(seconds)
                print(f"round {r} {arm}: {seconds:.1f} s", flush=True)
    study, cli = statistics.median(times["study"]), statistics.median(times["cli"])
    res = {"benchmark": "b13_study_overhead", "machine": common.machine_info(), "load": load,
           "recipe": {"runs": args.runs, "steps": args.steps, "rounds": args.rounds, "overrides": OVERRIDES,
                      "evaluation": "knn on digits", "order": "study, cli alternating; fresh folders and caches",
                      "study_yaml": study_yaml(Path("<tmp>/study"), args.runs, args.steps)},
           "seconds": times, "median_study_seconds": study, "median_cli_seconds": cli,
           "study_over_cli": study / cli, "per_run_difference_seconds": (study - cli) / args.runs,
           "target": {"study_over_cli_at_most": 1.05, "met": study / cli <= 1.05}}
    path = common.result_path("b13_study_overhead")
    common.write_json(path, res)
    print(f"study / cli = {study / cli:.3f} (median {study:.1f} s vs {cli:.1f} s); wrote {path}")


if __name__ == "__main__":
    main()
