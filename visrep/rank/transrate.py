"""TransRate: the coding rate of the features minus the coding rate of each class, a mutual-information proxy.

Huang, Huang, Rong, Yang & Wei, "Frustratingly Easy Transferability Estimation", ICML 2022
(official code: Long-Kai/TransRate).
"""
from __future__ import annotations

import torch

from visrep.errors import ConfigError
from visrep.rank.base import check_features, check_labels, gram, register_score

TRANSRATE_EPS = 1e-4  # the `eps` of the paper's code listing and of the official result scripts
CLASS_WEIGHTS = ("uniform", "size")


def coding_rate(z: torch.Tensor, eps: float) -> torch.Tensor:
    """R(Z) = ½ logdet(I_D + ZᵀZ/(n ε)) for Z [n, D], through the smaller of ZᵀZ and ZZᵀ.

    The two determinants are equal (Sylvester); I + cG is positive definite, so one Cholesky gives it.
    """
    n, d = z.shape
    g = gram(z) if n > d else gram(z.T)
    g.mul_(1.0 / (n * eps)).diagonal().add_(1.0)
    return torch.log(torch.linalg.cholesky(g).diagonal()).sum()  # ½ · 2 Σ log L_ii


@register_score("transrate", needs="labels")
def transrate(features, labels, *, eps: float = TRANSRATE_EPS, normalize: bool = True,
              class_weights: str = "uniform") -> float:
    """TransRate (Huang et al. 2022): coding rate of all features minus the mean coding rate per class.

        TrR = R(Z) − (1/C) Σ_c R(Z_c),   R(Z) = ½ logdet(I + ZᵀZ/(n ε)),   ε = 1e-4

    Z holds the N samples, centred by the overall mean (the classes are not re-centred); Z_c its n_c rows
    of class c, with n = n_c in R(Z_c). With `normalize` (default), as the official pipeline: each feature
    vector is scaled to unit L2 norm, the set is centred, and each row scaled to unit norm again
    (extract → F.normalize, then z − mean, then pre_transrate's row normalisation), which makes the
    score independent of the features' scale. `normalize=False` only centres, as the paper's listing.

    The class weights 1/C are those of the paper's code listing (RZ − RZY/K); `class_weights="size"`
    uses n_c/N, as the official repository's result script does. That script also divides both rates by
    the rank of ZᵀZ ("normalize_opt='rank'"), which is not in the paper's formula and is left out here.
    Each log-determinant is taken on the smaller Gram matrix (n_c × n_c when n_c < D), so N < D works.
    """
    if class_weights not in CLASS_WEIGHTS:
        raise ConfigError(f"transrate: class_weights must be one of {CLASS_WEIGHTS}, got {class_weights!r}")
    if not eps > 0:
        raise ConfigError(f"transrate: eps must be positive, got {eps!r}")
    x = check_features(features, "transrate")
    y, classes = check_labels(labels, x.shape[0], "transrate")
    # One copy, sorted by class so that each Z_c is a view; the rest is done in place on it.
    z = x.index_select(0, torch.argsort(y, stable=True))
    if normalize:
        _unit_rows_(z)
    z.sub_(z.mean(0))
    if normalize:
        _unit_rows_(z)  # a row equal to the mean stays zero
    sizes = torch.bincount(y, minlength=classes).tolist()
    weights = [m / len(y) if class_weights == "size" else 1.0 / classes for m in sizes]
    within = sum(w * float(coding_rate(zc, eps)) for w, zc in zip(weights, z.split(sizes)))
    return float(coding_rate(z, eps)) - within


def _unit_rows_(z: torch.Tensor) -> None:
    """Scale each row of z to unit L2 norm in place (F.normalize's 1e-12 guard for zero rows)."""
    z.div_(torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min_(1e-12))
