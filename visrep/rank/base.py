"""What every transferability score shares: the registry, and the checks on its inputs.

A score is a pure function of frozen features (and, by kind, labels or a source classifier's
probabilities) that returns one float; higher means "expected to transfer better". Scores are
comparable only within a pool of models on the same target: `visrep rank` reports raw values and ranks.

    @register_score("logme", needs="labels")
    def logme(features, labels) -> float: ...

needs: "labels" (features [N, D] + target labels [N]), "probs" (a source classifier's probabilities
[N, Cs] on the target images + target labels [N]) or "none" (features only, label-free).
Inputs may be torch tensors or numpy arrays; the checks return float64 / int64 CPU tensors.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from visrep.errors import DataError
from visrep.registry import Registry

SCORES = Registry("score")
NEEDS = ("labels", "probs", "none")


def register_score(name: str, needs: str = "labels") -> Callable:
    """Register `fn` under `name`; `fn.needs` tells `visrep rank` which inputs to pass."""
    if needs not in NEEDS:
        raise ValueError(f"needs must be one of {NEEDS}, got {needs!r}")

    def deco(fn):
        fn.needs = needs
        SCORES.add(name, fn)
        return fn

    return deco


def _tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not torch.is_tensor(x):
        raise DataError(f"{what} must be a tensor or numpy array, got {type(x).__name__}")
    return x.detach().cpu()


def check_features(features, score: str = "score") -> torch.Tensor:
    """float64 [N, D] features; one clear sentence for wrong shapes, too few samples or NaN/Inf."""
    f = _tensor(features, "features")
    if f.ndim != 2:
        raise DataError(f"{score}: features must be a 2-D [samples, dims] array, got shape {tuple(f.shape)}")
    if f.shape[0] < 2 or f.shape[1] < 1:
        raise DataError(f"{score}: needs at least 2 samples of at least 1 dimension, got shape {tuple(f.shape)}")
    f = f.to(torch.float64)
    if not bool(torch.isfinite(f).all()):
        raise DataError(f"{score}: the features hold NaN or Inf (a diverged model?); no score can be computed")
    return f


def check_labels(labels, n: int, score: str = "score", min_classes: int = 2) -> tuple[torch.Tensor, int]:
    """(int64 [N] labels remapped to 0..C-1 in sorted order, C); one sentence for a mismatch or one class."""
    y = _tensor(labels, "labels").reshape(-1)
    if y.is_floating_point() or y.dtype == torch.bool:
        if y.is_floating_point() and not bool((y == y.round()).all()):
            raise DataError(f"{score}: labels must be integer class indices")
    if len(y) != n:
        raise DataError(f"{score}: {n} feature rows but {len(y)} labels")
    classes, y = torch.unique(y.to(torch.int64), return_inverse=True)
    if len(classes) < min_classes:
        raise DataError(f"{score}: the target holds {len(classes)} class; it needs at least {min_classes}")
    return y, len(classes)


def check_probs(probs, n: int, score: str = "score") -> torch.Tensor:
    """float64 [N, Cs] source-class probabilities (rows on the simplex, within 1e-3)."""
    p = _tensor(probs, "probabilities")
    if p.ndim != 2 or p.shape[0] != n:
        raise DataError(f"{score}: probabilities must be [{n}, source classes], got shape {tuple(p.shape)}")
    if not p.is_floating_point():
        p = p.to(torch.float64)
    if p.numel() == 0:
        raise DataError(f"{score}: probabilities must be [{n}, source classes] with at least one source class")
    # Two passes over what may be N x 1000 values: min/max (NaN propagates, so NaN, ±inf and negatives all
    # fail `0 <= lo <= hi < inf`) and the row sums (accumulated in float64).
    lo, hi = (float(v) for v in torch.aminmax(p))
    if not 0 <= lo <= hi < float("inf") or \
            not torch.allclose(p.sum(1, dtype=torch.float64), torch.ones(n, dtype=torch.float64), atol=1e-3):
        raise DataError(f"{score}: probabilities must be finite, non-negative and sum to 1 per row "
                        "(pass softmax outputs, not logits)")
    return p.to(torch.float64)


# ------------------------------------------------------------------- linear algebra shared by the scores
def gram(x: torch.Tensor, block: int = 256) -> torch.Tensor:
    """xᵀx [D, D] from the block strips on and above the diagonal (it is symmetric).

    9/16 of a full matmul's work at D = 2048; x may be a transposed view (xᵀx of zᵀ is z zᵀ).
    """
    d = x.shape[1]
    g = x.new_empty(d, d)
    for i in range(0, d, block):
        g[i:i + block, i:] = x[:, i:i + block].T @ x[:, i:]
        g[i + block:, i:i + block] = g[i:i + block, i + block:].T
    return g


def class_sums(x: torch.Tensor, y: torch.Tensor, classes: int) -> torch.Tensor:
    """[C, D]: the sum of the rows of x in each class."""
    return x.new_zeros(classes, x.shape[1]).index_add_(0, y, x)
