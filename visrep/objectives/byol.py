"""Regression objectives without negatives: BYOL (normalized MSE) and SimSiam (negative cosine).

Both pair every global target view i with every student view j ≠ i (with 2 views: the two
symmetric directions (p₀, z₁) and (p₁, z₀)). The objectives never detach `target`: the
method's target mode does (EMA teacher for BYOL, stop-gradient for SimSiam).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visrep.objectives.distributed import float32
from visrep.objectives.inputs import check_views


def _pair_cosines(student: list[Tensor], target: list[Tensor]) -> list[Tensor]:
    """Mean over the batch of cos(student[j], target[i]) for every i (global) and j ≠ i."""
    out = []
    for i, z in enumerate(target):
        z = F.normalize(z.float(), dim=1)
        for j, p in enumerate(student):
            if j != i:
                out.append((F.normalize(p.float(), dim=1) * z).sum(dim=1).mean())
    return out


class BYOLLoss(nn.Module):
    """BYOL's normalized MSE, summed over the two symmetric directions.

    Grill et al. (2020), "Bootstrap Your Own Latent: A New Approach to Self-Supervised
    Learning".

    With p̄ = p/‖p‖ (student = online predictor output) and z̄ = z/‖z‖ (target = EMA
    target projection): ‖p̄ − z̄‖² = 2 − 2·cos(p, z). The paper's loss is the sum of the two
    symmetric terms:
        loss = mean_b[2 − 2cos(p₀, z₁)] + mean_b[2 − 2cos(p₁, z₀)]   ∈ [0, 8].
    With more views (multi-crop) the same scale is kept: loss = 2 · mean over the pairs
    (target global i, student j ≠ i) of mean_b[2 − 2cos(p_j, z_i)].

    No parameters (no temperature, no batch statistics: nothing to gather).

    Example:
        >>> import torch
        >>> p, z = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        >>> BYOLLoss()([p, p], [z, z]).item()   # orthogonal: (2 - 0) + (2 - 0)
        4.0
    """

    def __init__(self):
        super().__init__()

    def forward(self, student: list[Tensor], target: list[Tensor]) -> Tensor:
        check_views("byol", student, target, min_student=2, min_target=2)
        with float32(*student, *target):
            cos = torch.stack(_pair_cosines(student, target))
            return 2 * (2 - 2 * cos).mean()


class SimSiamLoss(nn.Module):
    """SimSiam's symmetrized negative cosine similarity.

    Chen, He (2021), "Exploring Simple Siamese Representation Learning".

    With p = predictor output (student) and z = stop-gradient projector output (target):
        loss = −½ mean_b cos(p₀, z₁) − ½ mean_b cos(p₁, z₀)   ∈ [−1, 1] (minimum −1).
    With more views: −mean over the pairs (target global i, student j ≠ i) of mean_b cos.

    Example:
        >>> import torch
        >>> p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> SimSiamLoss()([p, p], [p, p]).item()   # identical directions: cos = 1
        -1.0
    """

    def __init__(self):
        super().__init__()

    def forward(self, student: list[Tensor], target: list[Tensor]) -> Tensor:
        check_views("simsiam", student, target, min_student=2, min_target=2)
        with float32(*student, *target):
            return -torch.stack(_pair_cosines(student, target)).mean()
