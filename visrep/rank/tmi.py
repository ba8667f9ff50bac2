"""TMI: intra-class feature variance measured as the k-NN (Kozachenko–Leonenko) conditional entropy H(X|Y)."""
from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.spatial import cKDTree
from scipy.special import digamma

from visrep.errors import ConfigError, DataError
from visrep.rank.base import check_features, check_labels, register_score


def class_entropy(x: np.ndarray, k: int, min_dist: float, workers: int = 1) -> tuple[float, float]:
    """Kozachenko–Leonenko entropy (nats) of the rows of x [n, D] under the max-norm; and the floored fraction.

    Ĥ = ψ(n) − ψ(k) + (D/n) Σ_i log(2 ε_i), ε_i the Chebyshev distance from x_i to its k-th nearest
    other row (the unit max-norm ball is the cube of side 2, so log c_D = 0 once ε is doubled),
    each ε_i floored at min_dist.
    """
    n, d = x.shape
    dist, _ = cKDTree(x).query(x, k + 1, p=np.inf, workers=workers)  # column 0 is the point itself
    eps = dist[:, k]
    floored = float((eps < min_dist).mean())
    eps = np.maximum(eps, min_dist)
    return float(digamma(n) - digamma(k) + d * np.mean(np.log(2.0 * eps))), floored


@register_score("tmi", needs="labels")
def tmi(features, labels, *, k: int = 3, min_dist: float = 1.0, normalize: bool = False) -> float:
    """TMI: intra-class feature variance as the k-NN entropy H(X|Y); higher (more spread) transfers better.

    Xu & Kang (ICCV 2023), "Fast and Accurate Transferability Measurement by Evaluating Intra-class
    Feature Variance"; official code snudatalab/TMI (src/trf_measurement.py). The paper views
    transferability as generalisation: a model whose target classes keep more intra-class variance
    adapts better, so the conditional entropy itself is the score (higher is better, as returned by
    the official code). By construction it is not a separability score: shuffling the labels mixes
    the classes and raises it.

    With the features centred (a no-op for the distances, kept from the official code), classes c of
    n_c samples, π_c = n_c / N, and ε_i the max-norm (Chebyshev) distance from x_i to its k-th nearest
    neighbour within its class (floored at min_dist),
        Ĥ_c = ψ(n_c) − ψ(k) + (D / n_c) Σ_{i∈c} log(2 ε_i),      TMI = Σ_c π_c Ĥ_c.
    The official code returns mean_c(π_c Ĥ_c) = TMI / C, the same ranking on a target; this returns
    the conditional entropy H(X|Y) the paper defines. Defaults k = 3 and min_dist = 1.0 are the
    official ones. min_dist is in feature units: distances below it are set to it, so on features of
    small scale (e.g. L2-normalised) it saturates the score (a warning says so when more than half
    the distances are floored); pass a small min_dist (> 0) for the textbook estimator.

    Width: Ĥ_c grows like D · E[log 2ε] — linearly in the feature width D, with a sign set by the
    feature scale — so raw TMI of models of different widths is not comparable. `normalize=True`
    returns TMI / D, the entropy per coordinate. Dividing by D was chosen over a fixed-width
    projection because max-norm k-NN distances are unchanged by zero or duplicated coordinates,
    so the per-coordinate entropy of such a padded embedding moves only by the width-free
    constant term, Σ_c π_c (ψ(n_c) − ψ(k)) · (1/D − 1/D′) (≈ log(n/k) / D, small next to
    E[log 2ε]), whereas a random projection or PCA to a fixed width changes the distances themselves
    (PCA rescales duplicated axes by √2) and costs an N·D² pass.

    Cost: one cKDTree (p = ∞) per class. In high D the tree degenerates to brute force, O(n_c² D) per
    class, O(N² D / C) in all; never an N×N matrix.

    Args:
        features: [N, D] features; labels: [N] class indices.
        k: neighbour order (every class needs at least k + 1 samples).
        min_dist: floor on the k-NN distances (> 0; guards log 0 for duplicates).
        normalize: divide by D (compare pools of different widths).

    Example:
        >>> import math, torch
        >>> x, y = torch.randn(40, 2, generator=torch.Generator().manual_seed(0)), torch.arange(40) % 2
        >>> gap = tmi(2 * x, y, min_dist=1e-12) - tmi(x, y, min_dist=1e-12)  # doubling the scale adds D log 2
        >>> abs(gap - 2 * math.log(2)) < 1e-9
        True
    """
    if k < 1:
        raise ConfigError(f"tmi k must be >= 1, got {k}")
    if not min_dist > 0:
        raise ConfigError(f"tmi min_dist must be > 0 (it guards log 0 for duplicate points), got {min_dist}")
    x = check_features(features, score="tmi")
    y, c = check_labels(labels, x.shape[0], score="tmi")
    counts = torch.bincount(y, minlength=c)
    if int(counts.min()) < k + 1:
        raise DataError(f"tmi: the smallest class holds {int(counts.min())} samples, but the k-NN entropy "
                        f"estimate needs at least k + 1 = {k + 1} per class (lower k or drop that class)")
    xc = (x - x.mean(0, keepdim=True)).numpy()
    y_np = y.numpy()
    workers = max(1, torch.get_num_threads())
    total, floored = 0.0, 0.0
    for cls in range(c):
        h, f = class_entropy(xc[y_np == cls], k, min_dist, workers)
        weight = float(counts[cls]) / x.shape[0]
        total += weight * h
        floored += weight * f
    if floored > 0.5:
        warnings.warn(f"tmi: {floored:.0%} of the k-NN distances fell below min_dist={min_dist} and were "
                      "floored, so the score is saturated; pass a smaller min_dist (e.g. 1e-12; visrep rank: "
                      "--score-options \"{tmi: {min_dist: 1e-12}}\")",
                      stacklevel=2)
    return total / x.shape[1] if normalize else total
