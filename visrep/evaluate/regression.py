"""Regression metrics: mean absolute error (UTKFace age) and the normalised mean error of landmarks (MTFL).

NME (as in TCDCN, Zhang et al. ECCV 2014, on MTFL): for image i with K predicted points p̂_ik, ground
truth p_ik and inter-ocular distance d_i = ‖p_i,left_eye − p_i,right_eye‖,

    NME_i = (1/K) Σ_k ‖p̂_ik − p_ik‖ / d_i,       NME = mean_i NME_i,   failure rate = mean_i 1[NME_i > 0.1]

Points are stored as x1..xK, y1..yK (MTFL's order); eyes are points 1 and 2.

Example:
    >>> gt = torch.tensor([[0.0, 1.0, 0.0, 0.0]])         # K=2: (0, 0) and (1, 0); d = 1
    >>> landmark_nme(torch.tensor([[0.0, 1.0, 0.5, 0.0]]), gt)["nme"]    # first point off by 0.5
    0.25
"""
from __future__ import annotations

import torch


def regression_metrics(pred: torch.Tensor, target: torch.Tensor, names: list[str] | None = None) -> dict:
    """MAE and RMSE over all targets, and per target when there are several."""
    err = pred.double() - target.double()
    out = {"mae": float(err.abs().mean()), "rmse": float(err.pow(2).mean().sqrt())}
    if err.shape[1] > 1:
        names = names or [f"t{i}" for i in range(err.shape[1])]
        out["mae_per_target"] = {n: float(e) for n, e in zip(names, err.abs().mean(0))}
    return out


def landmark_nme(pred: torch.Tensor, target: torch.Tensor, failure_threshold: float = 0.1) -> dict:
    """NME normalised by the inter-ocular distance, and the failure rate (NME_i > threshold)."""
    k = pred.shape[1] // 2
    p = torch.stack([pred[:, :k], pred[:, k:]], -1).double()      # [N, K, 2]
    g = torch.stack([target[:, :k], target[:, k:]], -1).double()
    d = (g[:, 0] - g[:, 1]).norm(dim=-1).clamp_min(1e-12)
    per_image = (p - g).norm(dim=-1).mean(1) / d
    per_point = ((p - g).norm(dim=-1) / d.unsqueeze(1)).mean(0)
    return {"nme": float(per_image.mean()), "failure_rate": float((per_image > failure_threshold).double().mean()),
            "failure_threshold": failure_threshold, "nme_per_point": [float(v) for v in per_point],
            "normalisation": "inter-ocular distance (points 1 and 2)"}
