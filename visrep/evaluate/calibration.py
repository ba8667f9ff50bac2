"""Calibration: expected calibration error and the reliability diagram (Guo et al., ICML 2017, "On
Calibration of Modern Neural Networks"; ECE of Naeini et al. 2015).

With confidence ĉ_i = max_c p_ic, prediction ŷ_i = argmax_c p_ic and M equal-width bins B_m = ((m−1)/M, m/M]:

    acc(B_m)  = (1/|B_m|) Σ_{i∈B_m} 1[ŷ_i = y_i]
    conf(B_m) = (1/|B_m|) Σ_{i∈B_m} ĉ_i
    ECE       = Σ_m (|B_m| / n) · |acc(B_m) − conf(B_m)|          (M = 15 as Guo et al.)

Example:
    >>> p = torch.tensor([[0.85, 0.15], [0.85, 0.15], [0.55, 0.45], [0.35, 0.65]])
    >>> round(expected_calibration_error(p, torch.tensor([0, 1, 0, 1]), n_bins=10)["ece"], 4)
    0.375

    (bin (0.8, 0.9]: 2 images, accuracy 0.5, confidence 0.85; (0.5, 0.6]: accuracy 1, confidence 0.55;
    (0.6, 0.7]: accuracy 1, confidence 0.65  ->  2/4·0.35 + 1/4·0.45 + 1/4·0.35 = 0.375)
"""
from __future__ import annotations

from pathlib import Path

import torch

from visrep.errors import ConfigError, VisrepError


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict:
    """{"ece", "mce", "top1", "mean_confidence", "nll", "bins": [{lo, hi, count, accuracy, confidence}]}."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ConfigError(f"calibration n_bins must be an integer >= 1, got {n_bins!r}")
    if probs.ndim != 2 or len(probs) != len(labels) or len(probs) == 0:
        raise VisrepError("calibration needs probabilities [N, C] and N labels, N > 0")
    probs = probs.double()
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    # bin m holds confidences in ((m-1)/M, m/M]; a confidence of exactly 0 cannot occur for C >= 1
    index = torch.clamp(torch.ceil(conf * n_bins).long() - 1, 0, n_bins - 1)
    n = len(conf)
    bins, ece, mce = [], 0.0, 0.0
    for m in range(n_bins):
        sel = index == m
        count = int(sel.sum())
        acc = float(correct[sel].mean()) if count else None
        cf = float(conf[sel].mean()) if count else None
        if count:
            gap = abs(acc - cf)
            ece += count / n * gap
            mce = max(mce, gap)
        bins.append({"lo": m / n_bins, "hi": (m + 1) / n_bins, "count": count, "accuracy": acc, "confidence": cf})
    nll = float(-torch.log(probs[torch.arange(n), labels].clamp_min(1e-12)).mean())
    return {"ece": ece, "mce": mce, "top1": float(correct.mean()), "mean_confidence": float(conf.mean()),
            "nll": nll, "n_bins": n_bins, "binning": "equal-width on max-probability", "bins": bins,
            "reference": "Guo et al. 2017"}


def reliability_diagram(result: dict, path: str | Path, title: str = "") -> Path:
    """Plot accuracy per confidence bin against the diagonal (with the gap shaded) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = result["bins"]
    width = bins[0]["hi"] - bins[0]["lo"]
    centers = [(b["lo"] + b["hi"]) / 2 for b in bins]
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(4.5, 5.5), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    acc = [b["accuracy"] if b["count"] else 0.0 for b in bins]
    conf = [b["confidence"] if b["count"] else 0.0 for b in bins]
    ax.bar(centers, acc, width=width, edgecolor="black", color="tab:blue", label="accuracy")
    ax.bar(centers, [c - a for a, c in zip(acc, conf)], bottom=acc, width=width, color="tab:red", alpha=0.3,
           edgecolor="tab:red", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    ax.set_title(title or f"ECE {100 * result['ece']:.2f} %  (top-1 {100 * result['top1']:.1f} %)")
    ax.legend(loc="upper left", fontsize=8)
    hx.bar(centers, [b["count"] for b in bins], width=width, color="gray", edgecolor="black")
    hx.set_xlabel("confidence"), hx.set_ylabel("images")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
