"""H-score and its shrinkage estimate: the share of the feature covariance that the class means explain.

Bao, Li, Huang, Zhang, Zheng, Zamir & Guibas, "An Information-Theoretic Approach to Transferability in
Task Transfer Learning", ICIP 2019 (official code: YaojieBao/An-Information-theoretic-Metric-of-Transferability).
Ibrahim, Ponomareva & Mazumder, "Newer is not always better: Rethinking transferability metrics, their
peculiarities, stability and performance", ICLR 2022 (the shrinkage H-score).

Both are computed from one eigendecomposition of the centred features' Gram matrix, in the smaller of the
sample space (N ≤ D) and the feature space (N > D). `gram` is shared with transrate.py and gbc.py.
"""
from __future__ import annotations

import torch

from visrep.errors import ConfigError, DataError
from visrep.rank.base import check_features, check_labels, class_sums, gram, register_score


def _spectrum(xc: torch.Tensor, y: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ, e): eigenvalues λ_i of Σ_f = XcᵀXc/N and e_i = v_iᵀ Σ_g v_i, with Σ_g the class-mean covariance.

    Σ_g = GᵀG/N where G's rows are √n_c m_c (m_c the centred class means), i.e. the covariance of the
    features with every sample replaced by its class mean. For N ≤ D the min(N, D) nonzero eigenpairs
    come from K = Xc Xcᵀ = U Λ Uᵀ: with v_i = Xcᵀu_i/√λ_i, ‖G v_i‖² = λ_i Σ_c (Σ_{j∈c} u_ji)² / n_c.
    The eigenvectors of the zero eigenvalues this leaves out carry no class-mean energy (e = 0).
    """
    n, d = xc.shape
    counts = torch.bincount(y, minlength=classes).to(xc.dtype)
    if n > d:
        lam, v = torch.linalg.eigh(gram(xc))
        g = class_sums(xc, y, classes) / counts.sqrt()[:, None]
        energy = ((g @ v) ** 2).sum(0)
    else:
        lam, u = torch.linalg.eigh(gram(xc.T))
        energy = lam.clamp_min(0) * (class_sums(u, y, classes) ** 2 / counts[:, None]).sum(0)
    return lam.clamp_min(0) / n, energy / n


def _inputs(features, labels, score: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    x = check_features(features, score)
    y, classes = check_labels(labels, x.shape[0], score)
    low, high = torch.aminmax(x, dim=0)
    if torch.equal(low, high):
        raise DataError(f"{score}: every sample has the same features; the score is undefined")
    return x - x.mean(0), y, classes


@register_score("hscore", needs="labels")
def hscore(features, labels, *, rtol: float | None = None) -> float:
    """H-score (Bao et al. 2019): class-mean covariance measured against the feature covariance.

        H(f) = tr(cov(f)⁺ cov(E[f|y]))

    with cov(f) the feature covariance, ⁺ its pseudo-inverse, and cov(E[f|y]) the covariance of the
    features after every sample is replaced by the mean of its class. Both covariances use 1/N (the
    official code's 1/(N−1) on both cancels). The trace is of the matrix product, as in the paper and the
    official code (one public reimplementation multiplies elementwise inside the trace, a bug).

    Computed as Σ_i e_i/λ_i over the eigenpairs of cov(f) (see `_spectrum`), which needs one
    eigendecomposition and no D×D inverse. Deviation: eigenvalues below `rtol`·λ_max are dropped, with
    rtol = min(N, D)·float64 eps by default (torch.linalg.pinv's default for that Gram matrix); the
    official code's pinv rcond 1e-15 keeps round-off directions of rank-deficient features.
    With N ≤ D every model scores C − 1 exactly (the centred features span the whole centred sample
    space); use `shrinkage_hscore` there.
    """
    xc, y, classes = _inputs(features, labels, "hscore")
    lam, energy = _spectrum(xc, y, classes)
    if rtol is None:
        rtol = lam.numel() * torch.finfo(lam.dtype).eps
    elif not rtol >= 0:
        raise ConfigError(f"hscore: rtol must be a non-negative number, got {rtol!r}")
    keep = lam > rtol * lam.max()
    return float((energy[keep] / lam[keep]).sum())


def ledoit_wolf_shrinkage(lam: torch.Tensor, row_sq: torch.Tensor, d: int) -> float:
    """Ledoit & Wolf (2004)'s shrinkage α of S = XcᵀXc/N towards μI, μ = tr(S)/D (sklearn's estimate).

        δ = ‖S − μI‖²_F / D,   β = (Σ_k ‖x_k‖⁴/N − ‖S‖²_F) / (D N),   α = min(β, δ)/δ

    from the eigenvalues λ of S (‖S‖²_F = Σλ², tr S = Σλ) and the squared row norms ‖x_k‖² of Xc.
    """
    n = row_sq.numel()
    trace = lam.sum()
    fro2 = (lam ** 2).sum()
    delta = (fro2 - trace ** 2 / d) / d
    beta = ((row_sq ** 2).sum() / n - fro2) / (d * n)
    if not delta > 0:  # S is already a multiple of the identity: nothing to shrink
        return 0.0
    return float(beta.clamp(0.0, float(delta)) / delta)


@register_score("shrinkage_hscore", needs="labels")
def shrinkage_hscore(features, labels) -> float:
    """Shrinkage H-score (Ibrahim et al. 2022): H-score with a Ledoit–Wolf feature covariance.

        H_α(f) = tr(Σ_α⁻¹ (1 − α) cov(E[f|y])),   Σ_α = (1 − α) cov(f) + α μ I,   μ = tr(cov(f))/D

    with α the Ledoit–Wolf shrinkage (`ledoit_wolf_shrinkage`, the estimate of sklearn.covariance.
    ledoit_wolf) and the class-mean covariance shrunk by the same (1 − α), as in the paper and its
    reference code. Both covariances use 1/N; the reference code takes np.cov (1/(N−1)) for the class
    means against sklearn's 1/N for Σ_α, a factor N/(N−1) we leave out.

    In the eigenbasis of cov(f): H_α = (1 − α) Σ_i e_i / ((1 − α) λ_i + α μ), so N < D needs only the
    N×N Gram matrix. Higher is better; well defined for N < D, where the plain H-score is not.
    """
    xc, y, classes = _inputs(features, labels, "shrinkage_hscore")
    lam, energy = _spectrum(xc, y, classes)
    d = xc.shape[1]
    alpha = ledoit_wolf_shrinkage(lam, torch.linalg.vector_norm(xc, dim=1) ** 2, d)
    denom = (1 - alpha) * lam + alpha * lam.sum() / d
    keep = denom > denom.numel() * torch.finfo(denom.dtype).eps * denom.max()  # only α = 0 leaves zeros
    return float((1 - alpha) * (energy[keep] / denom[keep]).sum())
