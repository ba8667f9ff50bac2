"""Face-task losses of Faceptor (Qin et al. 2024; official code lxq1000/Faceptor, core/model/loss/) and its task
weighting. Each is a plain function of a task's outputs and labels, usable from plain PyTorch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from visrep.errors import ConfigError

__all__ = ["age_distribution", "expected_age", "dldl_v2_loss", "masked_bce_loss", "landmark_loss",
           "gaussian_heatmaps", "task_weights"]


def age_distribution(logits: Tensor) -> Tensor:
    """[B, K] value-head logits of the K age bins → a distribution: sigmoid, then L1-normalised (the official
    code's choice, not a softmax)."""
    p = torch.sigmoid(logits.float())
    return p / p.sum(dim=1, keepdim=True).clamp_min(1e-12)


def expected_age(logits: Tensor) -> Tensor:
    """E[age] = Σ_i p_i · i over the bins i = 0..K−1 (years): [B, K] logits → [B]."""
    p = age_distribution(logits)
    return p @ torch.arange(p.shape[1], dtype=p.dtype, device=p.device)


def dldl_v2_loss(logits: Tensor, age: Tensor, sigma: float = 2.0, l1_weight: float = 1.0) -> Tensor:
    """DLDL-v2 (Gao et al., "Age Estimation Using Expectation of Label Distribution Learning", IJCAI 2018), as
    Faceptor uses it for age:

        q_i = N(i; y, σ²) / Σ_j N(j; y, σ²)         (a Gaussian over the bins i = 0..K−1, σ = 2)
        p   = sigmoid(z) / ‖sigmoid(z)‖₁
        ℓ   = (1/B) Σ_b Σ_i q_i log(q_i / p_i)  +  λ · (1/B) Σ_b |Σ_i p_i·i − y|      (λ = 1)

    Example (two bins, true age 0, σ so small that q = (1, 0); logits with p = (0.5, 0.5)):
        >>> round(float(dldl_v2_loss(torch.zeros(1, 2), torch.tensor([0.0]), sigma=0.01)), 4)   # log 2 + |0.5 − 0|
        1.1931
    """
    if logits.ndim != 2 or age.shape != logits.shape[:1]:
        raise ConfigError(f"age: expected logits [B, K] and ages [B], got {tuple(logits.shape)} and {tuple(age.shape)}")
    k = logits.shape[1]
    bins = torch.arange(k, dtype=torch.float32, device=logits.device)
    y = age.float().clamp(0, k - 1).unsqueeze(1)
    q = torch.exp(-((bins - y) ** 2) / (2 * sigma ** 2))
    q = q / q.sum(dim=1, keepdim=True)
    p = age_distribution(logits)
    kl = (torch.xlogy(q, q) - q * torch.log(p.clamp_min(1e-12))).sum(dim=1).mean()
    mae = (p @ bins - y.squeeze(1)).abs().mean()
    return kl + l1_weight * mae


def masked_bce_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Attributes: BCE-with-logits over the labels that are known; labels −1 (unknown) are left out, and the sum is
    divided by the batch size (official CEL_Sigmoid).

        >>> round(float(masked_bce_loss(torch.zeros(2, 2), torch.tensor([[1, -1], [0, -1]]))), 4)   # 2·log 2 / 2
        0.6931
    """
    known = labels >= 0
    loss = F.binary_cross_entropy_with_logits(logits.float(), labels.clamp_min(0).float(), reduction="none")
    return (loss * known).sum() / logits.shape[0]


def gaussian_heatmaps(points: Tensor, size: tuple, sigma: float) -> Tensor:
    """[B, Q, 2] points (x, y) in [0, 1] → [B, Q, H, W] targets exp(−‖c − p‖² / 2σ²) on the pixel centres c, with
    σ in heatmap pixels (peak 1 at the point)."""
    h, w = size
    ys = torch.arange(h, dtype=torch.float32, device=points.device) + 0.5  # pixel centres, in pixels
    xs = torch.arange(w, dtype=torch.float32, device=points.device) + 0.5
    px, py = points[..., 0:1].float() * w, points[..., 1:2].float() * h
    dx = (xs.view(1, 1, w) - px).unsqueeze(-2)   # [B, Q, 1, W]
    dy = (ys.view(1, 1, h) - py).unsqueeze(-1)   # [B, Q, H, 1]
    return torch.exp(-(dx ** 2 + dy ** 2) / (2 * sigma ** 2))


def landmark_loss(heatmap_logits: Tensor, points_pred: Tensor, points: Tensor, sigma: float = 1.5,
                  heatmap_weight: float = 1.0) -> Tensor:
    """Faceptor's AlignLoss: the mean Euclidean distance between predicted and true points (in [0, 1] image
    coordinates), plus BCE-with-logits of the heatmaps against Gaussian targets (σ in heatmap pixels), weights 1, 1.

        ℓ = (1/BQ) Σ ‖p̂ − p‖₂  +  λ · mean BCE(heatmap, G_σ(p))
    """
    if points.min() < 0 or points.max() > 1:
        raise ConfigError("landmarks outside the image: points must lie in [0, 1] image coordinates")
    coord = (points_pred.float() - points.float()).norm(dim=-1).mean()
    target = gaussian_heatmaps(points, heatmap_logits.shape[-2:], sigma)
    return coord + heatmap_weight * F.binary_cross_entropy_with_logits(heatmap_logits.float(), target)


def task_weights(tasks: dict[str, tuple[str, float]], type_weights: dict[str, float] | None = None) -> dict[str, float]:
    """Faceptor's task weighting: w_t = λ_t / Σ_{s of t's type} λ_s × W_type, so each output type carries its type
    weight W_type (default 1) whatever number of tasks it holds; the loss is then Σ w_t·ℓ_t / Σ w_t.

    tasks: {name: (output type, λ_t)}.
        >>> task_weights({"age": ("age_distribution", 1.0), "gender": ("classification", 1.0),
        ...               "race": ("classification", 3.0)}, {"classification": 2.0})
        {'age': 1.0, 'gender': 0.5, 'race': 1.5}
    """
    type_weights = dict(type_weights or {})
    totals: dict[str, float] = {}
    for kind, w in tasks.values():
        if w < 0:
            raise ConfigError(f"task weights must be non-negative, got {w}")
        totals[kind] = totals.get(kind, 0.0) + float(w)
    out = {name: (float(w) / totals[kind] * float(type_weights.get(kind, 1.0)) if totals[kind] > 0 else 0.0)
           for name, (kind, w) in tasks.items()}
    if not any(v > 0 for v in out.values()):
        raise ConfigError("every task has weight 0: give at least one task a positive weight")
    return out
