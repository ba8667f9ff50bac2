"""RankMe: the effective rank of a representation, a label-free transferability score.

Garrido, Balestriero, Najman & LeCun, "RankMe: Assessing the Downstream Performance of Pretrained
Self-Supervised Representations by Their Rank", ICML 2023, Eq. (1)-(2). The formula itself lives in
`visrep.evaluate.effective_rank` (the training monitor uses it too); `effective_rank` is re-exported here.
"""
from __future__ import annotations

import torch

from visrep.errors import ConfigError
from visrep.evaluate.effective_rank import RANKME_EPS, effective_rank, from_singular_values
from visrep.rank.base import check_features, register_score

__all__ = ["RANKME_EPS", "RANKME_MAX_SAMPLES", "effective_rank", "rankme"]

RANKME_MAX_SAMPLES = 25_600  # the paper evaluates RankMe on 25,600 samples


@register_score("rankme", needs="none")
def rankme(features, *, max_samples: int = RANKME_MAX_SAMPLES, seed: int = 0, eps: float = RANKME_EPS) -> float:
    """RankMe (Garrido et al. 2023): effective rank of the features, exp of the singular-value entropy.

        RankMe(Z) = exp(−Σ_{k=1}^{min(N, D)} p_k log p_k),   p_k = σ_k(Z) / ‖σ(Z)‖₁ + ε,   ε = 1e-7

    on the raw (uncentred) features Z, as in the paper. With N > `max_samples` (25,600, the paper's
    sample count) a seeded random subset of that many rows is used, so the score is deterministic.

    The singular values come from the eigenvalues of the smaller Gram matrix (σ_k = √λ_k, in float64):
    several times faster than an SVD of the 25,600 × D matrix; values below ~1e-8·σ_max, whose p_k is
    already dominated by ε, are not resolved.
    """
    z = check_features(features, "rankme")
    if max_samples < 1:
        raise ConfigError(f"rankme: max_samples must be >= 1, got {max_samples}")
    if z.shape[0] > max_samples:
        rows = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(seed))[:max_samples]
        z = z[rows]
    gram = z.T @ z if z.shape[0] >= z.shape[1] else z @ z.T
    s = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    return from_singular_values(s, eps)
