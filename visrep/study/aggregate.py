"""Aggregation of a study's results: per task, across tasks, and per factor.

The input is one value per (run, task): a task is one evaluation of the study (e.g. kNN on CIFAR-10) and its
value the evaluation's main metric (top-1, or ECE for calibration, where lower is better). Runs that differ only
by `seed` form one *configuration*; seeds are the replicates every interval is computed over.

Per task (mean ± 95 % CI over seeds, Student's t):

    mean = (1/n) Σ_s x_s,   CI = mean ± t_{0.975, n-1} · sd / √n,   sd with n - 1 in the denominator.

Across tasks, as "Battle of the Backbones" (Goldblum et al., NeurIPS 2023) aggregates backbones:

    z_{c,t} = sign_t · (M_{c,t} - mean_c' M_{c',t}) / std_c' M_{c',t}     (std over configurations, ddof 0;
    z = 0 when every configuration ties), mean z_c = (1/T) Σ_t z_{c,t},   mean rank_c = (1/T) Σ_t rank_{c,t}
    (rank 1 = best, ties share the mean rank), where M_{c,t} is configuration c's mean over its seeds and sign_t
    is -1 for lower-is-better metrics. Intervals: percentile bootstrap, resampling each configuration's seeds
    with replacement (a seed is one trained run, so its values on all tasks move together).

Task-to-task agreement: Spearman's ρ between the configurations' means on two tasks, each oriented so that
higher is better (an ECE task is negated first).

Factor effects, as "Augmentations vs Algorithms" (Morningstar et al. 2024) asks "how much is due to the
augmentation and how much to the algorithm": for a factor F with levels l_0 (the reference, first listed), l_1, ...

    contrast(l) = mean over matched pairs of  x(F = l, others) - x(F = l_0, others)

where a matched pair shares every other factor value and the seed (so it averages over the other factors), with
a t interval over the pairs. The level means m_F(l) are marginal: the mean over the configurations at level l
of each configuration's mean over seeds. Their range describes the spread, but the range of k noisy means grows
with k and with the noise, so factors are compared by a noise-corrected effect size (the between-level variance
component of a fixed-effects ANOVA):

    effect_sd_F = sqrt(max(0, var_{ddof 1}(m_F(l) over l) - mean_l Var[m_F(l)])),
    Var[m_F(l)] = s² · Σ_{c at l} (1/n_c) / C_l²,   s² = the pooled within-configuration variance over seeds,

which is unbiased for the spread of the true level means whatever the number of levels; its interval is a
percentile bootstrap (seeds resampled within each configuration), and the difference effect_sd_A - effect_sd_B
of two factors gets its interval from the same resamples: "is the augmentation effect larger than the algorithm
effect" is answered only when that interval excludes 0. Without replicates (one seed) there are no intervals.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

# Metrics where a lower value is better (everything else: higher is better).
LOWER_IS_BETTER = {"ece", "mce", "nll", "mae", "rmse", "nme", "loss", "seconds", "error"}
# The metric each protocol is judged by in the report (an evaluation's `metric:` overrides it).
PRIMARY = {"knn": "top1", "linear": "top1", "fewshot": "top1", "classifier": "top1", "calibration": "ece",
           "rank": "truth"}


def t_ci95(values) -> float | None:
    """Half-width of the 95 % Student-t interval of the mean; None for fewer than two values.

    >>> round(t_ci95([1.0, 2.0, 3.0]), 4)   # sd 1, n 3: t_{0.975,2} = 4.3027 -> 4.3027 / sqrt(3)
    2.4841
    """
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return None
    return float(stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))


def sign_of(metric: str) -> float:
    return -1.0 if metric in LOWER_IS_BETTER else 1.0


@dataclass
class Table:
    """`values[config][task] = {seed: value}`; configs keep the study's order."""
    configs: list[str]
    tasks: list[str]
    values: dict
    signs: dict                       # task -> +1 (higher is better) or -1
    config_factors: dict = field(default_factory=dict)   # config -> its factor values (seed excluded)

    def means(self, configs=None) -> np.ndarray:
        configs = self.configs if configs is None else configs
        return np.array([[float(np.mean(list(self.values[c][t].values()))) for t in self.tasks] for c in configs])

    def complete(self) -> list[str]:
        """Configurations with a value on every task (the only ones aggregated across tasks)."""
        return [c for c in self.configs if all(self.values[c].get(t) for t in self.tasks)]


def build_table(records: list[dict], signs: dict, config_of, seed_key: str = "seed") -> Table:
    """records: {"factors", "task", "value"} dicts. config_of(factors) -> the configuration's label."""
    configs, tasks, values, cfactors = [], [], {}, {}
    for r in records:
        c, t = config_of(r["factors"]), r["task"]
        if c not in values:
            configs.append(c)
            values[c] = {}
            cfactors[c] = {k: v for k, v in r["factors"].items() if k != seed_key}
        if t not in tasks:
            tasks.append(t)
        values[c].setdefault(t, {})[r["factors"].get(seed_key, 0)] = float(r["value"])
    for c in configs:
        for t in tasks:
            values[c].setdefault(t, {})
    return Table(configs, tasks, values, {t: signs.get(t, 1.0) for t in tasks}, cfactors)


def per_task(table: Table) -> dict:
    """task -> config -> {n, mean, sd, ci95}."""
    out = {}
    for t in table.tasks:
        out[t] = {}
        for c in table.configs:
            xs = list(table.values[c][t].values())
            if not xs:
                continue
            out[t][c] = {"n": len(xs), "mean": float(np.mean(xs)),
                         "sd": float(np.std(xs, ddof=1)) if len(xs) > 1 else None, "ci95": t_ci95(xs)}
    return out


def zscores_and_ranks(means: np.ndarray, signs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean z-score and mean rank per row of `means` (configs x tasks), as defined in the module docstring.

    >>> z, r = zscores_and_ranks(np.array([[1.0, 10.0], [2.0, 30.0], [3.0, 20.0]]), np.array([1.0, 1.0]))
    >>> [round(float(v), 4) for v in z], [float(v) for v in r]
    ([-1.2247, 0.6124, 0.6124], [3.0, 1.5, 1.5])
    """
    from scipy.stats import rankdata

    x = means * signs[None, :]
    sd = x.std(axis=0)
    z = np.where(sd > 0, (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0), 0.0)
    ranks = np.column_stack([rankdata(-x[:, j]) for j in range(x.shape[1])])
    return z.mean(axis=1), ranks.mean(axis=1)


def _resampled_means(table: Table, configs: list[str], rng: np.random.Generator) -> np.ndarray:
    """Configs x tasks means after drawing each configuration's seeds with replacement."""
    rows = []
    for c in configs:
        seeds = sorted(set().union(*[set(table.values[c][t]) for t in table.tasks]), key=str)
        draw = [seeds[i] for i in rng.integers(0, len(seeds), len(seeds))]
        rows.append([float(np.mean([table.values[c][t][s] for s in draw if s in table.values[c][t]]
                                   or list(table.values[c][t].values()))) for t in table.tasks])
    return np.array(rows)


def aggregate(table: Table, bootstrap: int = 1000, seed: int = 0) -> dict:
    """Mean z-score and mean rank per complete configuration with percentile bootstrap intervals over seeds,
    best first; plus the configurations left out (a task missing)."""
    configs = table.complete()
    if not configs:
        return {"rows": [], "excluded": list(table.configs), "bootstrap": bootstrap}
    signs = np.array([table.signs[t] for t in table.tasks])
    z, rank = zscores_and_ranks(table.means(configs), signs)
    rng = np.random.default_rng(seed)
    seeds = {c: len(set().union(*[set(table.values[c][t]) for t in table.tasks])) for c in configs}
    # no replicates anywhere: nothing to resample, so no interval (a zero-width one would claim certainty)
    n_boot = int(bootstrap) if any(n > 1 for n in seeds.values()) else 0
    zb, rb = [], []
    for _ in range(n_boot):
        zz, rr = zscores_and_ranks(_resampled_means(table, configs, rng), signs)
        zb.append(zz)
        rb.append(rr)
    zb, rb = (np.array(zb), np.array(rb)) if n_boot else (None, None)
    rows = []
    for i, c in enumerate(configs):
        row = {"config": c, "mean_z": float(z[i]), "mean_rank": float(rank[i]), "seeds": seeds[c],
               "mean_z_ci": None, "mean_rank_ci": None}
        if zb is not None and seeds[c] > 1:  # a one-seed configuration has no interval of its own
            row["mean_z_ci"] = [float(np.percentile(zb[:, i], 2.5)), float(np.percentile(zb[:, i], 97.5))]
            row["mean_rank_ci"] = [float(np.percentile(rb[:, i], 2.5)), float(np.percentile(rb[:, i], 97.5))]
        rows.append(row)
    rows.sort(key=lambda r: (-r["mean_z"], r["mean_rank"]))
    return {"rows": rows, "excluded": [c for c in table.configs if c not in configs], "bootstrap": n_boot}


def task_correlation(table: Table) -> dict:
    """Spearman's ρ between every two tasks over the complete configurations (None with fewer than 3)."""
    from scipy.stats import spearmanr

    configs = table.complete()
    m = table.means(configs) * np.array([table.signs[t] for t in table.tasks])[None, :] if configs else None
    out = {}
    for i, a in enumerate(table.tasks):
        for j, b in enumerate(table.tasks):
            if m is None or len(configs) < 3 or np.ptp(m[:, i]) == 0 or np.ptp(m[:, j]) == 0:
                out[(a, b)] = 1.0 if a == b and m is not None and len(configs) >= 3 else None
            else:
                out[(a, b)] = float(spearmanr(m[:, i], m[:, j]).statistic)
    return out


def _key(value) -> str:
    """A factor value as a hashable key (values may be lists or mappings, e.g. backbone options)."""
    return json.dumps(value, sort_keys=True, default=str)


def _cells(have: list[tuple[dict, float]], seed_key: str) -> dict:
    """configuration (every factor but the seed) -> (its factor values, [its runs' values])."""
    cells: dict = {}
    for fac, x in have:
        key = _key({k: v for k, v in fac.items() if k != seed_key})
        cells.setdefault(key, ({k: v for k, v in fac.items() if k != seed_key}, []))[1].append(x)
    return cells


def _effect(cells: dict, f: str, levels: list[str]) -> tuple[dict, float | None]:
    """Marginal level means (the mean of the configurations' means at each level, so a missing run does not
    re-weight the other factors) and the noise-corrected effect sd (module docstring); None without replicates."""
    per_level: dict = {lv: [] for lv in levels}
    for fac, xs in cells.values():
        per_level[_key(fac.get(f))].append(xs)
    means = {lv: float(np.mean([np.mean(xs) for xs in groups])) for lv, groups in per_level.items() if groups}
    if len(means) < len(levels):
        return means, None
    dof = sum(len(xs) - 1 for _, xs in cells.values())
    if dof == 0:
        return means, None
    pooled = sum(float(np.sum((np.asarray(xs) - np.mean(xs)) ** 2)) for _, xs in cells.values()) / dof
    noise = np.mean([pooled * sum(1.0 / len(xs) for xs in groups) / len(groups) ** 2
                     for groups in per_level.values()])
    between = float(np.var(list(means.values()), ddof=1)) - float(noise)
    return means, math.sqrt(max(between, 0.0))


def factor_effects(runs: list[dict], factor_keys: list[str], tasks: list[str], bootstrap: int = 1000,
                   seed: int = 0, seed_key: str = "seed") -> dict:
    """Per factor (seed excluded, at least two levels) and task: marginal level means, paired contrasts against
    the first level with t intervals, the range of the level means, and the noise-corrected effect sd with a
    bootstrap interval over seeds; and, per task and pair of factors, the difference of their effect sds with an
    interval from the same resamples. Intervals need replicates (two or more seeds of a configuration).

    runs: `{"factors": {...}, "values": {task: value}}` for the trained runs of the grid.
    Returns `{"effects": [...], "comparisons": [...]}`.

    Examples:
        >>> runs = [{"factors": {"a": a, "b": b, "seed": s}, "values": {"t": x}} for a, b, s, x in [
        ...     ("p", "u", 0, 1.0), ("p", "u", 1, 3.0), ("q", "u", 0, 2.0), ("q", "u", 1, 6.0),
        ...     ("p", "v", 0, 1.0), ("p", "v", 1, 1.0), ("q", "v", 0, 1.0), ("q", "v", 1, 1.0)]]
        >>> e = factor_effects(runs, ["a", "b", "seed"], ["t"], bootstrap=0)["effects"]
        >>> e[0]["level_means"], e[0]["contrasts"][0]["mean"], e[0]["range"]   # a: q - p over 4 matched pairs
        ({'p': 1.5, 'q': 2.5}, 1.0, 1.0)
    """
    factors = []
    for f in [k for k in factor_keys if k != seed_key]:
        levels, names = [], {}
        for r in runs:
            k = _key(r["factors"].get(f))
            if k not in names:
                levels.append(k)
                names[k] = str(r["factors"].get(f))
        if len(levels) >= 2:
            factors.append((f, levels, names))
    rng = np.random.default_rng(seed)
    effects, comparisons = [], []
    for t in tasks:
        have = [(r["factors"], float(r["values"][t])) for r in runs if t in r["values"]]
        cells = _cells(have, seed_key)
        replicated = any(len(xs) > 1 for _, xs in cells.values())
        present = []
        for f, levels, names in factors:
            level_means, sd = _effect(cells, f, levels)
            if len(level_means) < len(levels):
                continue  # a level has no result on this task
            # matched pairs: the same other factors and seed, F at level l vs the reference level
            groups: dict = {}
            for fac, x in have:
                groups.setdefault(_key({k: v for k, v in fac.items() if k != f}), {})[_key(fac.get(f))] = x
            contrasts = []
            for lv in levels[1:]:
                d = [g[lv] - g[levels[0]] for g in groups.values() if lv in g and levels[0] in g]
                contrasts.append({"level": names[lv], "reference": names[levels[0]], "pairs": len(d),
                                  "mean": float(np.mean(d)) if d else None, "ci95": t_ci95(d)})
            effects.append({"factor": f, "task": t, "levels": [names[lv] for lv in levels],
                            "level_means": {names[k]: v for k, v in level_means.items()}, "contrasts": contrasts,
                            "range": max(level_means.values()) - min(level_means.values()),
                            "effect_sd": sd, "effect_sd_ci": None, "runs": len(have)})
            present.append((f, levels, effects[-1]))
        if not present or not bootstrap or not replicated:
            continue
        # bootstrap: within each configuration draw its runs with replacement; the same resample serves every
        # factor, so differences between factors get an interval too
        boot = np.zeros((int(bootstrap), len(present)))
        for b in range(int(bootstrap)):
            sample = {k: (fac, [xs[i] for i in rng.integers(0, len(xs), len(xs))]) for k, (fac, xs) in cells.items()}
            for j, (f, levels, _) in enumerate(present):
                boot[b, j] = _effect(sample, f, levels)[1] or 0.0
        for j, (_, _, e) in enumerate(present):
            e["effect_sd_ci"] = [float(np.percentile(boot[:, j], 2.5)), float(np.percentile(boot[:, j], 97.5))]
        for i in range(len(present)):
            for j in range(i + 1, len(present)):
                d = boot[:, i] - boot[:, j]
                comparisons.append({"task": t, "a": present[i][0], "b": present[j][0],
                                    "difference": present[i][2]["effect_sd"] - present[j][2]["effect_sd"],
                                    "ci95": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))],
                                    "p_a_larger": float(np.mean(d > 0))})
    return {"effects": effects, "comparisons": comparisons}


def weighted_tau(x, y) -> float | None:
    """Weighted Kendall τ (Vigna 2015, hyperbolic weights; the measure rank papers report) of a score against the
    truth; None when either is constant or fewer than 3 values."""
    from scipy.stats import weightedtau

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(weightedtau(x, y).statistic)
