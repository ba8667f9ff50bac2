"""B11: speed of every transferability score at N = 50,000, D = 2,048, C = 100, beside the reference formula
written naively (numpy, as in the papers' listings), in one run.

Features: seeded standard-normal float32 [N, D] with a class-dependent mean shift (so classes are not pure
noise); labels: N/C per class; source probabilities for LEEP/NCE: a seeded softmax over 1,000 source classes.
Each visrep score runs once (they are deterministic); each naive reference runs once where it fits in
memory and time. Naive references, one per score where one is practical:
- logme: the paper's per-class fixed point with an explicit D×D solve per iteration (numpy.linalg.solve);
- hscore: numpy.linalg.pinv(cov(f)) @ cov(E[f|y]);
- transrate: numpy.linalg.slogdet of the D×D matrix I + ZᵀZ/(nε) for all data and every class (after
  the official row normalisation and centring);
- rankme: numpy.linalg.svd of the 25,600-sample matrix;
- leep / nce: the joint by a Python loop over source classes.
kNN and TMI have no naive reference that fits in memory (an N×N distance matrix is 10 GB); NLEEP's reference
is its own scikit-learn pipeline, so it is timed alone (skipped by default: minutes; --with-nleep).

    python benchmarks/b11_score_speed.py                        # ~10 min on 2 cores
    python benchmarks/b11_score_speed.py --n 5000 --d 256 --c 10 --out /tmp/b11.json
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def data(n, d, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    f = torch.randn(n, d, generator=g) + 0.5 * torch.randn(c, d, generator=g)[y]
    probs = torch.softmax(2 * torch.randn(n, 1000, generator=g), 1)
    return f, y, probs


# ----------------------------------------------------------------------------------- naive references
def naive_logme(f, y):
    f, n, d = f.astype(np.float64), f.shape[0], f.shape[1]
    ftf = f.T @ f
    out = []
    for c in np.unique(y):
        t = (y == c).astype(np.float64)
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            a = alpha * np.eye(d) + beta * ftf
            m = beta * np.linalg.solve(a, f.T @ t)
            gamma = d - alpha * np.trace(np.linalg.inv(a))
            res = np.sum((t - f @ m) ** 2)
            alpha, beta = gamma / (m @ m + 1e-5), (n - gamma) / (res + 1e-5)
        a = alpha * np.eye(d) + beta * ftf
        m = beta * np.linalg.solve(a, f.T @ t)
        res = np.sum((t - f @ m) ** 2)
        ev = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - beta / 2 * res - alpha / 2 * m @ m
              - 0.5 * np.linalg.slogdet(a)[1] - n / 2 * math.log(2 * math.pi))
        out.append(ev / n)
    return float(np.mean(out))


def naive_hscore(f, y):
    f = f.astype(np.float64) - f.mean(0)
    g = np.zeros_like(f)
    for c in np.unique(y):
        g[y == c] = f[y == c].mean(0)
    return float(np.trace(np.linalg.pinv(np.cov(f, rowvar=False, bias=True)) @ np.cov(g, rowvar=False, bias=True)))


def naive_transrate(f, y, eps=1e-4):
    def rate(z):  # the classes are not re-centred: Z_c are rows of the globally centred Z
        return 0.5 * np.linalg.slogdet(np.eye(z.shape[1]) + z.T @ z / (z.shape[0] * eps))[1]

    z = f.astype(np.float64)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)  # the official pipeline: unit rows, centre, unit rows
    z = z - z.mean(0)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    return float(rate(z) - np.mean([rate(z[y == c]) for c in np.unique(y)]))


def naive_rankme(f, eps=1e-7, cap=25_600):
    s = np.linalg.svd(f[:cap].astype(np.float64), compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def naive_leep(p, y):
    joint = np.stack([p[y == c].sum(0) for c in np.unique(y)], 1) / len(y)  # [Cs, C]
    cond = joint / joint.sum(1, keepdims=True)
    return float(np.mean(np.log((p @ cond)[np.arange(len(y)), y])))


NAIVE = {"logme": naive_logme, "hscore": naive_hscore, "transrate": naive_transrate}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--c", type=int, default=100)
    p.add_argument("--with-nleep", action="store_true")
    p.add_argument("--skip-naive", default="", help="comma-separated scores whose naive reference to skip")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(common.result_path("b11_score_speed")))
    args = p.parse_args()
    common.set_threads(args.threads)
    from visrep.rank import SCORES

    out = common.read_json(args.out) or {}
    if out.get("shape") != [args.n, args.d, args.c]:
        out = {}
    out.update(benchmark="b11_score_speed", machine=common.machine_info(), load=common.load_check("b11"),
               shape=[args.n, args.d, args.c], recipe={k: v for k, v in vars(args).items() if k != "out"})
    runs = out.setdefault("scores", {})
    f, y, probs = data(args.n, args.d, args.c)
    fn_, yn, pn = f.numpy(), y.numpy(), probs.double().numpy()
    probs = torch.from_numpy(pn)  # LEEP/NCE: the same float64 array as the naive reference, no copy on either side
    skip = set(filter(None, args.skip_naive.split(",")))
    for name in SCORES.names():
        if name == "nleep" and not args.with_nleep:
            continue
        rec = runs.setdefault(name, {})
        fn = SCORES.get(name)
        if "visrep_seconds" not in rec:
            t = time.perf_counter()
            v = fn(probs, y) if fn.needs == "probs" else fn(f) if fn.needs == "none" else fn(f, y)
            rec.update(visrep_seconds=time.perf_counter() - t, value=float(v), measured_utc=common.now_iso(),
                       loadavg_1min_after=os.getloadavg()[0])  # rows may come from different resumed runs
            common.write_json(args.out, out)
        naive = {"rankme": lambda: naive_rankme(fn_), "leep": lambda: naive_leep(pn, yn),
                 **{k: (lambda k=k: NAIVE[k](fn_, yn)) for k in NAIVE}}.get(name)
        if naive is not None and name not in skip and "naive_seconds" not in rec:
            t = time.perf_counter()
            v = naive()
            rec.update(naive_seconds=time.perf_counter() - t, naive_value=float(v),
                       naive_over_visrep_seconds=(time.perf_counter() - t) / rec["visrep_seconds"])
            common.write_json(args.out, out)
        print(f"b11: {name:17s} visrep {rec['visrep_seconds']:7.1f} s" +
              (f"   naive {rec['naive_seconds']:7.1f} s ({rec['naive_over_visrep_seconds']:.1f}x)  "
               f"values {rec['value']:.6g} / {rec['naive_value']:.6g}" if "naive_seconds" in rec else ""), flush=True)
    common.write_json(args.out, out)


if __name__ == "__main__":
    main()
