"""Barlow Twins: make the cross-correlation of the two views' embeddings the identity."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from visrep.errors import ConfigError
from visrep.objectives.distributed import float32, gather
from visrep.objectives.inputs import check_views


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins redundancy-reduction loss.

    Zbontar, Jing, Misra, LeCun, Deny (2021), "Barlow Twins: Self-Supervised Learning via
    Redundancy Reduction".

    z₀ = student[0], z₁ = student[1], each [N, D] (gathered over ranks, with gradient).
    Each is standardized per feature over the batch, ẑ = (z − mean) / √(var + 1e-5)
    (biased variance, as the paper's BatchNorm1d(affine=False)); then
        C = ẑ₀ᵀ ẑ₁ / N                      (D × D cross-correlation)
        loss = Σᵢ (1 − Cᵢᵢ)² + λ Σ_{i≠j} Cᵢⱼ²
    Every rank computes this same full-batch loss, so it does not depend on the world size.

    Args:
        lambda_offdiag: λ, default 0.0051 (the paper's value, ≈ 5e-3).
        scale_loss: a constant factor on the whole loss, default 1.0 (solo-learn's CIFAR recipe uses 0.1,
            which with LARS only changes the step of the non-adapted biases/norm parameters).
        gather_distributed: standardize and correlate over the batch of all ranks.

    Example:
        >>> import torch
        >>> z = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])   # both features perfectly correlated
        >>> loss = BarlowTwinsLoss(lambda_offdiag=0.5)([z, z], [z, z])
        >>> round(loss.item(), 4)                           # C ≈ all ones: 0 + 0.5 · 2
        1.0
    """

    def __init__(self, *, lambda_offdiag: float = 0.0051, scale_loss: float = 1.0, gather_distributed: bool = True):
        super().__init__()
        if lambda_offdiag < 0:
            raise ConfigError(f"barlow_twins lambda_offdiag must be >= 0, got {lambda_offdiag}")
        self.lambda_offdiag = float(lambda_offdiag)
        self.scale_loss = float(scale_loss)
        self.gather_distributed = gather_distributed

    @staticmethod
    def _standardize(z: Tensor) -> Tensor:
        return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + 1e-5)

    def forward(self, student: list[Tensor], target: list[Tensor]) -> Tensor:
        check_views("barlow_twins", student, target, min_student=2, max_student=2, min_target=0)
        with float32(*student):
            z0, z1 = student[0].float(), student[1].float()
            if self.gather_distributed:
                z0, z1 = gather(z0), gather(z1)
            if z0.shape[0] < 2:
                raise ConfigError("barlow_twins needs a batch of at least 2 samples")
            c = self._standardize(z0).T @ self._standardize(z1) / z0.shape[0]
            eye = torch.eye(c.shape[0], dtype=torch.bool, device=c.device)
            on = (1 - torch.diagonal(c)).pow(2).sum()
            off = c.pow(2).masked_fill(eye, 0).sum()
            return self.scale_loss * (on + self.lambda_offdiag * off)
