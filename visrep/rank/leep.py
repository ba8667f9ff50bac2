"""Scores from a source classifier's outputs on the target: LEEP and NCE, and the empirical joint they share.

Both read the source model as a soft or hard labeller z of the target images and ask how well the
target label y can be predicted from z alone: the empirical joint P̂(y, z) is the one statistic they
need (`empirical_joint`, also used by NLEEP with a Gaussian mixture as the labeller).
"""
from __future__ import annotations

import torch

from visrep.rank.base import check_labels, check_probs, register_score

# P̂(z) is 0 only for a source class no target image puts mass on; its column of P̂(y|z) is then
# never read with a non-zero weight, so any finite value does (this avoids 0/0).
_TINY = 1e-300


def empirical_joint(source: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    num_source: int | None = None) -> torch.Tensor:
    """P̂(y, z) = (1/n) Σ_i [y_i = y] θ(x_i)_z, a [C, Cs] float64 table that sums to 1.

    `source` is either θ, the [N, Cs] source-class probabilities (soft assignment, LEEP/NLEEP),
    or an int64 [N] vector of source classes z_i (hard assignment θ = onehot(z_i), NCE; then
    `num_source` gives Cs). `labels` are target classes in 0..C-1.
    """
    n = labels.shape[0]
    if source.ndim == 1:
        cs = int(num_source if num_source is not None else source.max() + 1)
        counts = torch.bincount(labels * cs + source, minlength=num_classes * cs)
        return counts.reshape(num_classes, cs).to(torch.float64) / n
    joint = torch.zeros(num_classes, source.shape[1], dtype=torch.float64)
    return joint.index_add_(0, labels, source.to(torch.float64)) / n


def leep_from_probs(theta: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """(1/n) Σ_i log Σ_z P̂(y_i | z) θ(x_i)_z for float64 θ [N, Cs] and labels in 0..C-1."""
    joint = empirical_joint(theta, labels, num_classes)
    conditional = joint / joint.sum(0, keepdim=True).clamp_min(_TINY)  # P̂(y | z), columns sum to 1
    # The "expected empirical predictor" p(y | x) = Σ_z P̂(y|z) θ_z as an [N, C] product, never [N, Cs] gathers.
    predicted = theta @ conditional.T
    true = predicted.gather(1, labels[:, None]).squeeze(1)
    return float(true.clamp_min(_TINY).log().mean())


def _n_labels(labels) -> int:
    """How many labels were passed (-1 if not a sequence: the shape check then names the problem)."""
    try:
        return len(labels)
    except TypeError:
        return -1


@register_score("leep", needs="probs")
def leep(probs, labels) -> float:
    """LEEP: log-likelihood of the target labels under the source classifier's empirical label map.

    Nguyen, Hassner, Seeger, Archambeau (ICML 2020), "LEEP: A New Measure to Evaluate
    Transferability of Learned Representations".

    With θ(x_i) ∈ Δ^{Cs} the source model's softmax on target image i and y_i its target label,
        P̂(y, z) = (1/n) Σ_{i: y_i = y} θ(x_i)_z,   P̂(y | z) = P̂(y, z) / Σ_{y'} P̂(y', z),
        LEEP = (1/n) Σ_i log Σ_z P̂(y_i | z) θ(x_i)_z        (≤ 0; higher transfers better).
    Cost O(N·Cs·C). The transcription in the SFDA repository (TencentARC/SFDA, metrics.py) drops the
    log; this follows the paper.

    Args:
        probs: [N, Cs] source-class probabilities (softmax outputs, rows sum to 1).
        labels: [N] target class indices (any integers; remapped to 0..C-1).

    Example:
        >>> import torch
        >>> round(leep(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])), 6)
        0.0
    """
    theta = check_probs(probs, _n_labels(labels), score="leep")
    y, c = check_labels(labels, theta.shape[0], score="leep")
    return leep_from_probs(theta, y, c)


@register_score("nce", needs="probs")
def nce(probs, labels) -> float:
    """NCE: −H(Y|Z), the negative conditional entropy of the target label given the source's top-1 label.

    Tran, Nguyen, Hassner (ICCV 2019), "Transferability and Hardness of Supervised Classification
    Tasks".

    With z_i = argmax_z θ(x_i)_z the source model's hard label on target image i,
        P̂(y, z) = (1/n) #{i : y_i = y, z_i = z},   P̂(z) = Σ_y P̂(y, z),
        NCE = −H(Y|Z) = Σ_{y,z} P̂(y, z) log( P̂(y, z) / P̂(z) )   (0 log 0 = 0; ≤ 0, higher is better).
    Ties in the argmax go to the lowest source index (torch.argmax). Cost O(N·Cs).

    Args:
        probs: [N, Cs] source-class probabilities (only their argmax is used).
        labels: [N] target class indices.

    Example:
        >>> import torch
        >>> round(nce(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 1])), 6)
        0.0
    """
    theta = check_probs(probs, _n_labels(labels), score="nce")
    y, c = check_labels(labels, theta.shape[0], score="nce")
    joint = empirical_joint(theta.argmax(1), y, c, num_source=theta.shape[1])
    p_z = joint.sum(0, keepdim=True)
    nonzero = joint > 0
    return float((joint[nonzero] * (joint / p_z.clamp_min(_TINY))[nonzero].log()).sum())
