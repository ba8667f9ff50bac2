"""RankMe: the effective rank of a representation, a label-free transferability score.

Garrido, Balestriero, Najman & LeCun, "RankMe: Assessing the Downstream Performance of Pretrained
Self-Supervised Representations by Their Rank", ICML 2023, Eq. (1)-(2).
"""
from __future__ import annotations

import torch

from visrep.errors import ConfigError, DataError
from visrep.rank.base import check_features, register_score

RANKME_EPS = 1e-7  # the paper's ε
RANKME_MAX_SAMPLES = 25_600  # the paper evaluates RankMe on 25,600 samples


def _from_singular_values(s: torch.Tensor, eps: float) -> float:
    """exp(−Σ_k p_k log p_k) with p_k = σ_k / ‖σ‖₁ + ε."""
    total = s.sum()
    if not total > 0:
        raise DataError("rankme: the features are all zero; their rank is undefined")
    p = s / total + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def effective_rank(z: torch.Tensor, eps: float = RANKME_EPS) -> float:
    """RankMe of a batch of embeddings [B, D], on their own device: a cheap online collapse monitor.

    Same formula as `rankme` (no subsampling, no input checks); gradients are not tracked and half
    precision is computed in float32. Values lie in [1, min(B, D)] (up to ε); a collapsing run goes to 1.
    """
    z = z.detach()
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()
    return _from_singular_values(torch.linalg.svdvals(z), eps)


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
    return _from_singular_values(s, eps)
