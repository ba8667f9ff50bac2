"""RankMe's effective rank of a representation: the formula shared by the training monitor (`train.monitor`)
and the `rankme` transferability score (`rank.rankme`), kept here so neither package imports the other.

Garrido, Balestriero, Najman & LeCun, "RankMe: Assessing the Downstream Performance of Pretrained
Self-Supervised Representations by Their Rank", ICML 2023, Eq. (1)-(2):

    RankMe(Z) = exp(−Σ_k p_k log p_k),   p_k = σ_k(Z) / ‖σ(Z)‖₁ + ε,   ε = 1e-7
"""
from __future__ import annotations

import torch

from visrep.errors import DataError

RANKME_EPS = 1e-7  # the paper's ε


def from_singular_values(s: torch.Tensor, eps: float = RANKME_EPS) -> float:
    """exp(−Σ_k p_k log p_k) with p_k = σ_k / ‖σ‖₁ + ε, from the singular values σ of the features."""
    total = s.sum()
    if not total > 0:
        raise DataError("rankme: the features are all zero; their rank is undefined")
    p = s / total + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def effective_rank(z: torch.Tensor, eps: float = RANKME_EPS) -> float:
    """RankMe of a batch of embeddings [B, D], on their own device: a cheap online collapse monitor.

    Same formula as the `rankme` score (no subsampling, no input checks); gradients are not tracked and half
    precision is computed in float32. Values lie in [1, min(B, D)] (up to ε); a collapsing run goes to 1.
    """
    z = z.detach()
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()
    return from_singular_values(torch.linalg.svdvals(z), eps)
