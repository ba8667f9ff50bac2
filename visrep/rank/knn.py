"""Leave-one-out weighted kNN accuracy on the target's own features: a baseline transferability score.

The vote is visrep's kNN evaluation (`visrep.evaluate.knn`: Wu et al. 2018, InstDisc, as used by DINO),
with every sample classified by the others instead of a test set by a training set.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from visrep.errors import ConfigError
from visrep.rank.base import check_features, check_labels, register_score


@register_score("knn", needs="labels")
def knn(features, labels, *, k: int = 20, temperature: float = 0.07, batch_size: int = 1024) -> float:
    """Leave-one-out weighted kNN accuracy (cosine, k=20, T=0.07), visrep's kNN eval without a test split.

    Every sample i is classified by the k most cosine-similar OTHER samples (itself excluded):
        S_c(i) = Σ_{j ∈ N_k(i), y_j = c} exp(s_ij / T),   s_ij = <x_i/‖x_i‖, x_j/‖x_j‖>,   ŷ_i = argmax_c S_c(i)
    (ties go to the lowest class index), and the score is the fraction with ŷ_i = y_i.
    k = 20 and T = 0.07 are the defaults of `visrep eval knn` (InstDisc / DINO); k > N − 1 uses all others.

    Queries go in batches of `batch_size`, so memory is batch_size × N similarities, never N × N, and time
    is O(N² D). Similarities are float32 matmuls, as in visrep's kNN eval (half the time of float64; a vote
    is only changed by an exact near-tie); the votes are summed in float64, shifted by each row's largest
    similarity (exp overflows otherwise for small T; the argmax is unchanged).
    """
    if k < 1:
        raise ConfigError(f"knn: k must be >= 1, got {k}")
    if not temperature > 0:
        raise ConfigError(f"knn: temperature must be > 0, got {temperature}")
    if batch_size < 1:
        raise ConfigError(f"knn: batch_size must be >= 1, got {batch_size}")
    x = check_features(features, "knn")
    y, num_classes = check_labels(labels, x.shape[0], "knn")
    n = x.shape[0]
    x = F.normalize(x, dim=1).float()
    kk = min(int(k), n - 1)
    correct = 0
    for start in range(0, n, batch_size):
        rows = torch.arange(start, min(start + batch_size, n))
        sims = x[rows] @ x.T
        sims[torch.arange(len(rows)), rows] = -float("inf")  # leave the query itself out
        top, idx = sims.topk(kk, dim=1)  # sorted descending
        weights = ((top.double() - top[:, :1].double()) / temperature).exp()
        votes = torch.zeros(len(rows), num_classes, dtype=torch.float64).scatter_add_(1, y[idx], weights)
        correct += int((votes.argmax(1) == y[rows]).sum())
    return correct / n
