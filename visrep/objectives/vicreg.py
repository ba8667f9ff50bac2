"""VICReg: variance-invariance-covariance regularization."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visrep.errors import ConfigError
from visrep.objectives.distributed import float32, gather
from visrep.objectives.inputs import check_views


class VICRegLoss(nn.Module):
    """VICReg: invariance MSE + variance hinge + covariance penalty.

    Bardes, Ponce, LeCun (2022), "VICReg: Variance-Invariance-Covariance Regularization for
    Self-Supervised Learning".

    z₀ = student[0], z₁ = student[1], each [N, D] gathered over ranks (with gradient):
        inv = mean over N·D of (z₀ − z₁)²                              (MSE)
        var = ½ Σ_v mean_d max(0, γ − √(Var_N(z_v[:, d]) + ε))        (unbiased variance)
        cov = Σ_v Σ_{i≠j} Cov(z_v)ᵢⱼ² / D,  Cov(z) = (z − z̄)ᵀ(z − z̄) / (N − 1)
        loss = sim_coeff·inv + std_coeff·var + cov_coeff·cov
    (½ on the variance and the plain sum over the views on the covariance follow the
    authors' reference code.) Every rank computes the same full-batch loss.

    Args:
        sim_coeff: λ, invariance weight, default 25 (paper).
        std_coeff: μ, variance weight, default 25 (paper).
        cov_coeff: ν, covariance weight, default 1 (paper).
        gamma: target standard deviation γ, default 1 (paper).
        eps: ε inside the square root, default 1e-4 (paper).
        gather_distributed: compute the statistics over the batch of all ranks.

    Example:
        >>> import torch
        >>> z = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])   # feature 2 collapsed, std 0
        >>> loss = VICRegLoss()([z, z], [z, z])
        >>> round(loss.item(), 3)                          # 25 · (0 + (1 − √1e-4)) / 2
        12.375
    """

    def __init__(
        self,
        *,
        sim_coeff: float = 25.0,
        std_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        gamma: float = 1.0,
        eps: float = 1e-4,
        gather_distributed: bool = True,
    ):
        super().__init__()
        if min(sim_coeff, std_coeff, cov_coeff) < 0 or eps <= 0:
            raise ConfigError("vicreg coefficients must be >= 0 and eps > 0")
        self.sim_coeff, self.std_coeff, self.cov_coeff = float(sim_coeff), float(std_coeff), float(cov_coeff)
        self.gamma, self.eps = float(gamma), float(eps)
        self.gather_distributed = gather_distributed

    def forward(self, student: list[Tensor], target: list[Tensor]) -> Tensor:
        check_views("vicreg", student, target, min_student=2, max_student=2, min_target=0)
        with float32(*student):
            z0, z1 = student[0].float(), student[1].float()
            if self.gather_distributed:
                z0, z1 = gather(z0), gather(z1)
            n, d = z0.shape
            if n < 2:
                raise ConfigError("vicreg needs a batch of at least 2 samples")
            inv = F.mse_loss(z0, z1)
            var = cov = z0.new_zeros(())
            eye = torch.eye(d, dtype=torch.bool, device=z0.device)
            for z in (z0, z1):
                z = z - z.mean(dim=0)
                std = torch.sqrt(z.var(dim=0) + self.eps)
                var = var + F.relu(self.gamma - std).mean() / 2
                c = z.T @ z / (n - 1)
                cov = cov + c.pow(2).masked_fill(eye, 0).sum() / d
            return self.sim_coeff * inv + self.std_coeff * var + self.cov_coeff * cov
