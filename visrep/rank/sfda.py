"""SFDA: shrinkage Fisher discriminant analysis, a self-challenging ConfMix step, then the fit of the true labels."""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.linalg import blas

from visrep.errors import DataError
from visrep.rank.base import check_features, check_labels, register_score

_ROWS = 4096  # rows per chunk of the N×D passes: bounds the temporaries to 4096×D
_MIN_SHRINKAGE = 1e-10  # the paper's / official floor on λ
_POWER_STEPS = 300


class _Features:
    """The rows x_i, or their ConfMix x̃_i = p_i x_i + (1 − p_i) t_{y_i}, produced chunk by chunk.

    ConfMix is row-wise affine, so the second fit never stores x̃: each pass (class means,
    scatter, scores) rebuilds one chunk of rows at a time, and the peak memory stays the input's.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, p: torch.Tensor | None = None,
                 target: torch.Tensor | None = None):
        self.x, self.y, self.p, self.target = x, y, p, target

    def chunks(self):
        n = self.x.shape[0]
        for start in range(0, n, _ROWS):
            rows = slice(start, min(start + _ROWS, n))
            if self.p is None:
                yield rows, self.x[rows]
            else:  # t + p (x − t), fused in place on the gathered targets
                yield rows, self.target[self.y[rows]].lerp_(self.x[rows], self.p[rows])


def _class_means(f: _Features, counts: torch.Tensor) -> torch.Tensor:
    sums = torch.zeros(len(counts), f.x.shape[1], dtype=torch.float64)
    for rows, chunk in f.chunks():
        sums.index_add_(0, f.y[rows], chunk)
    return sums / counts[:, None]


def _within_scatter(f: _Features, means: torch.Tensor) -> torch.Tensor:
    """S_w = Σ_c π_c Cov_c(x) = (1/N) Σ_i (x_i − μ_{y_i})(x_i − μ_{y_i})ᵀ (biased class covariances)."""
    # This N·D² pass is SFDA's cost; BLAS dsyrk computes one triangle of dᵀd, half a matmul's flops
    # (torch has no syrk). d.T of a C-contiguous chunk is the Fortran-ordered D×rows dsyrk wants.
    dim = f.x.shape[1]
    s = np.zeros((dim, dim), order="F")
    for rows, chunk in f.chunks():
        d = (chunk - means[f.y[rows]]).numpy()
        s = blas.dsyrk(1.0, d.T, beta=1.0, c=s, trans=0, lower=0, overwrite_c=1)
    upper = torch.from_numpy(np.triu(s))
    return (upper + upper.triu(1).T) / f.x.shape[0]


def _largest_eigenvalue(s: torch.Tensor) -> float:
    """σ_max of a PSD matrix by power iteration (the Rayleigh quotient converges in few steps)."""
    v = torch.ones(s.shape[0], dtype=torch.float64) / math.sqrt(s.shape[0])
    v = v + 1e-3 * torch.linspace(-1, 1, s.shape[0], dtype=torch.float64)  # not ⟂ to the top vector by symmetry
    sigma = 0.0
    for _ in range(_POWER_STEPS):
        w = s @ v
        new = float(v @ w) / float(v @ v)
        norm = torch.linalg.vector_norm(w)
        if norm == 0:
            return 0.0
        v = w / norm
        if abs(new - sigma) <= 1e-9 * abs(new):
            return new
        sigma = new
    return sigma


def _shrink(s: torch.Tensor, lam: float) -> torch.Tensor:
    """(1 − λ) S + λ (tr S / D) I: Ledoit–Wolf-style shrinkage towards the mean eigenvalue."""
    out = (1.0 - lam) * s
    out.diagonal().add_(lam * float(s.diagonal().mean()))
    return out


def _solve_spd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a⁻¹ b for a symmetric positive-definite a; eigen-solve with an eigenvalue floor if Cholesky fails."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, chol)
    evals, evecs = torch.linalg.eigh(a)
    evals = evals.clamp_min(float(evals.max()) * 1e-12)
    return evecs @ ((evecs.T @ b) / evals[:, None])


def _fisher_logits(f: _Features, counts: torch.Tensor, lam: float | None):
    """(class scores [N, C], class means [C, D], λ) of the shrinkage-regularised Fisher discriminant.

    The official code projects onto all D generalised eigenvectors V of (S_b, S̃_w) and scores
    with coef = μ V Vᵀ; since Vᵀ S̃_w V = I, V Vᵀ = S̃_w⁻¹, so the scores are the LDA ones below
    and S_b drops out. One Cholesky solve replaces the generalised eigendecomposition.
    """
    means = _class_means(f, counts)
    sw = _within_scatter(f, means)
    if float(sw.diagonal().sum()) <= 0:
        raise DataError("sfda: the features have no within-class variance (every class is a single point), "
                        "so the Fisher space is undefined")
    if lam is None:
        lam = max(math.exp(-5.0 * _largest_eigenvalue(sw)), _MIN_SHRINKAGE)
    w = _solve_spd(_shrink(sw, lam), means.T.contiguous())  # [D, C] = S̃_w⁻¹ μᵀ
    bias = -0.5 * (means * w.T).sum(1) + (counts / counts.sum()).log()
    logits = torch.empty(f.x.shape[0], len(counts), dtype=torch.float64)
    for rows, chunk in f.chunks():
        logits[rows] = torch.addmm(bias, chunk, w)
    return logits, means, lam


@register_score("sfda", needs="labels")
def sfda(features, labels, *, log: bool = True) -> float:
    """SFDA: fit of the labels in a shrinkage Fisher space after a self-challenging ConfMix step.

    Shao, Zhao, Ge, Wang, Wu, Wang, Luo (ECCV 2022), "Not All Models Are Equal: Predicting Model
    Transferability in a Self-challenging Fisher Space"; official code TencentARC/SFDA (metrics.py).

    1. Regularised FDA. With π_c the class frequencies, μ_c the class means and
       S_w = Σ_c π_c Cov_c(x) (biased covariances), shrink
           S̃_w = (1 − λ) S_w + λ (tr S_w / D) I,   λ = max(exp(−a σ_max(S_w)), 1e-10),  a = 5,
       and score class c by  s_c(x) = xᵀ S̃_w⁻¹ μ_c − ½ μ_cᵀ S̃_w⁻¹ μ_c + log π_c
       (the official projection onto all D Fisher directions V, coef = μ V Vᵀ = μ S̃_w⁻¹; the
       between-class scatter only orders V and drops out of the scores).
    2. ConfMix. p = softmax(s(x)) is softened once more, q = softmax(p) (official code), and each
       sample is mixed towards the mean of the other classes' means,
           x̃_i = q_{i,y_i} x_i + (1 − q_{i,y_i}) · (1/(C−1)) Σ_{c≠y_i} μ_c.
    3. Refit step 1 on x̃ with the same λ; SFDA = (1/N) Σ_i log softmax(s̃(x̃_i))_{y_i}  (≤ 0).

    Deviations from the official code: the score keeps the paper's log (the official `SFDA_Score`
    averages the probability itself, "log ignored in case of instability"; `log=False` gives that
    number, and log-softmax makes the log stable here); σ_max is converged by power iteration (the
    official stops after 3 double steps, which can underestimate σ and so raise λ; this matters
    only when σ_max < ~4.6, i.e. λ above its 1e-10 floor); the inputs are not modified in place.
    N < D works (S̃_w is positive definite through the shrinkage). Cost: two N·D² scatter passes
    (BLAS dsyrk, half a matmul each) plus two D³/3 Cholesky factorisations.

    Args:
        features: [N, D] features.
        labels: [N] class indices (at least 2 classes).
        log: average log-probabilities (paper) or probabilities (official code's number).

    Example:
        >>> import torch
        >>> x = torch.tensor([[0.0, 0.0], [0.1, 0.2], [3.0, 3.0], [3.2, 2.9]])
        >>> sfda(x, torch.tensor([0, 0, 1, 1])) > sfda(x, torch.tensor([0, 1, 0, 1]))
        True
    """
    x = check_features(features, score="sfda")
    y, c = check_labels(labels, x.shape[0], score="sfda")
    counts = torch.bincount(y, minlength=c).to(torch.float64)
    logits, means, lam = _fisher_logits(_Features(x, y), counts, None)
    confidence = torch.softmax(torch.softmax(logits, 1), 1).gather(1, y[:, None])  # [N, 1] q_{i, y_i}
    others = (means.sum(0, keepdim=True) - means) / (c - 1)  # row c: mean of the other classes' means
    logits, _, _ = _fisher_logits(_Features(x, y, confidence, others), counts, lam)
    fit = torch.log_softmax(logits, 1).gather(1, y[:, None]).squeeze(1)
    return float(fit.mean() if log else fit.exp().mean())
