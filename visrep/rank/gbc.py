"""GBC: the overlap of per-class Gaussians in feature space, by their Bhattacharyya coefficients.

Pándy, Agostinelli, Uijlings, Ferrari & Mensink, "Transferability Estimation using Bhattacharyya Class
Separability", CVPR 2022 (official code: google-research/google-research, stable_transfer/transferability).
"""
from __future__ import annotations

import torch

from visrep.errors import ConfigError
from visrep.rank.base import check_features, check_labels, class_sums, gram, register_score

GBC_PCA_DIM = 64  # the official configs reduce the features to 64 dims with PCA first
GBC_MIN_VARIANCE = 1e-4  # the official code's floor on each per-class variance (constant features)
COVARIANCES = ("diagonal", "spherical")
_CHUNK = 1 << 22  # entries of one [rows, C, D] block of the pairwise distances


def pca(x: torch.Tensor, k: int) -> torch.Tensor:
    """[N, min(k, N, D)] scores on the top-k principal axes of x (exact: one eigendecomposition).

    N > D: Xc V_k from the D×D Gram matrix. N ≤ D: U_k Λ_k^½ from the N×N one (the same scores).
    Axes beyond the rank have zero variance; leaving them out changes no Bhattacharyya distance.
    """
    xc = x - x.mean(0)
    n, d = xc.shape
    if n > d:
        _, v = torch.linalg.eigh(gram(xc))
        return xc @ v[:, -k:]
    lam, u = torch.linalg.eigh(gram(xc.T))
    return u[:, -k:] * lam[-k:].clamp_min(0).sqrt()


def bhattacharyya_distances(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """[C, C] Bhattacharyya distances between Gaussians N(μ_i, diag σ²_i), for means/variances [C, D].

        D_B(i, j) = ⅛ Σ_k (μ_ik − μ_jk)²/σ²_k + ½ Σ_k log σ²_k − ¼ Σ_k log σ²_ik − ¼ Σ_k log σ²_jk,
        σ²_k = (σ²_ik + σ²_jk)/2

    (Bhattacharyya 1943 for Gaussians, restricted to diagonal covariances), in blocks of rows.
    """
    classes, d = mean.shape
    half_logdet = 0.5 * var.log().sum(1)
    rows = max(1, _CHUNK // (classes * d))
    out = []
    for i in range(0, classes, rows):
        avg = (var[i:i + rows, None] + var[None]) / 2
        maha = ((mean[i:i + rows, None] - mean[None]) ** 2 / avg).sum(-1) / 8
        logdet = 0.5 * avg.log().sum(-1) - 0.5 * (half_logdet[i:i + rows, None] + half_logdet[None])
        out.append(maha + logdet)
    return torch.cat(out)


@register_score("gbc", needs="labels")
def gbc(features, labels, *, pca_dim: int | None = GBC_PCA_DIM, covariance: str = "diagonal") -> float:
    """GBC (Pándy et al. 2022): minus the summed Bhattacharyya overlap of every pair of class Gaussians.

        GBC = −Σ_{i≠j} BC(c_i, c_j),   BC = exp(−D_B),
        D_B = ⅛ (μ_i − μ_j)ᵀ Σ⁻¹ (μ_i − μ_j) + ½ log(det Σ / √(det Σ_i det Σ_j)),   Σ = (Σ_i + Σ_j)/2

    Each class is a Gaussian with its sample mean and per-dimension (population) variance, floored at
    1e-4 as in the official code; the features are first reduced by exact PCA (fitted on all of them) to
    `pca_dim` = 64 dims when D is larger, as the official configs do (None keeps all). Values lie in
    [−C(C−1), 0]; 0 means perfectly separated classes.

    `covariance="diagonal"` (default) uses diag(σ²_c); `"spherical"` uses (mean_k σ²_ck)·I, the choice of
    the official image-classification configs ("diagonal" is theirs for segmentation). For spherical
    Gaussians in k dims the log-det term is (k/2) log(σ̄² / √(σ_i² σ_j²)) as the formula above gives;
    the official code adds it without the factor k, a deviation of theirs we do not copy.
    """
    if covariance not in COVARIANCES:
        raise ConfigError(f"gbc: covariance must be one of {COVARIANCES}, got {covariance!r}")
    if pca_dim is not None and not (isinstance(pca_dim, int) and pca_dim >= 1):
        raise ConfigError(f"gbc: pca_dim must be a positive integer or None, got {pca_dim!r}")
    x = check_features(features, "gbc")
    y, classes = check_labels(labels, x.shape[0], "gbc")
    if pca_dim is not None and x.shape[1] > pca_dim:
        x = pca(x, pca_dim)
    counts = torch.bincount(y, minlength=classes).to(x.dtype)[:, None]
    mean = class_sums(x, y, classes) / counts
    var = class_sums((x - mean[y]) ** 2, y, classes) / counts  # two passes: no cancellation
    var = var.clamp_min(GBC_MIN_VARIANCE)
    if covariance == "spherical":
        var = var.mean(1, keepdim=True).expand_as(var)
    bc = torch.exp(-bhattacharyya_distances(mean, var))
    return -float(bc.sum() - bc.diagonal().sum())
