"""Mixup and CutMix on a batch and its labels, through timm's `Mixup` (config section `mixing`).

Mixup (Zhang et al., ICLR 2018) and CutMix (Yun et al., ICCV 2019) pair every image i with image j of the
reversed batch (timm's "batch" mode) and one λ per batch:

    mixup:   x̃ = λ·x_i + (1 − λ)·x_j,                    λ ~ Beta(α_mixup, α_mixup)
    cutmix:  x̃ = x_i with a box of area (1 − λ)·H·W from x_j, λ ~ Beta(α_cutmix, α_cutmix), then λ is
             corrected to the box's actual area
    target:  ỹ = λ·onehot(y_i) + (1 − λ)·onehot(y_j)

With both alphas > 0 a batch uses CutMix with probability `switch_prob`, else Mixup; `prob` is the chance a
batch is mixed at all. Label smoothing is left to the objective (`cross_entropy`'s `label_smoothing`
applies to the soft targets), so it is not applied twice. λ and the box are drawn from numpy's generator
seeded with the step's seed (the global numpy state is restored), so a resumed run mixes the same way.

Example:
    >>> mix = build_mixing({"mixup_alpha": 0.8, "cutmix_alpha": 1.0}, num_classes=10)
    >>> x, y = mix(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), seed=0)
    >>> y.shape, float(y.sum(1).min())
    (torch.Size([4, 10]), 1.0)
"""
from __future__ import annotations

import inspect

import numpy as np
import torch

from visrep.errors import ConfigError


class BatchMixing:
    """Mixup / CutMix for one batch of normalised images; returns (mixed images, soft targets [B, C])."""

    def __init__(self, num_classes: int, *, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 prob: float = 1.0, switch_prob: float = 0.5):
        from timm.data import Mixup

        for name, v in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"mixing.{name} must be a number >= 0, got {v!r}")
        if mixup_alpha == 0 and cutmix_alpha == 0:
            raise ConfigError("mixing needs mixup_alpha > 0 or cutmix_alpha > 0 (or no mixing section)")
        for name, v in (("prob", prob), ("switch_prob", switch_prob)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ConfigError(f"mixing.{name} must be in [0, 1], got {v!r}")
        self.num_classes = int(num_classes)
        self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob,
                           mode="batch", label_smoothing=0.0, num_classes=self.num_classes)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if y.ndim != 1:
            raise ConfigError("mixing needs class labels; it does not apply to regression targets")
        state = np.random.get_state()
        try:
            np.random.seed(int(seed) % 2**32)
            x = x.clone()  # timm mixes in place
            x, target = self.mixup(x, y)
        finally:
            np.random.set_state(state)
        return x, target

    def transform_views(self, views: list[torch.Tensor], labels: torch.Tensor,
                        seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The loop's batch-transform form: mix the (only) view, return the soft targets as the labels."""
        mixed, target = self(views[0], labels, seed)
        return [mixed, *views[1:]], target


def build_batch_transforms(spec: dict | None, num_classes: int) -> list:
    """The batch transforms the `mixing` section asks for: callables (views, labels, seed) → (views, labels)
    that the loop applies after the views and before the model, in order."""
    mixing = build_mixing(spec, num_classes)
    return [] if mixing is None else [mixing.transform_views]


def build_mixing(spec: dict | None, num_classes: int) -> BatchMixing | None:
    """BatchMixing from the `mixing` config section (None: no mixing); unknown keys raise ConfigError."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ConfigError(f"mixing must be a mapping such as {{mixup_alpha: 0.8, cutmix_alpha: 1.0}}, got {spec!r}")
    valid = [p for p in inspect.signature(BatchMixing.__init__).parameters if p not in ("self", "num_classes")]
    bad = [k for k in spec if k not in valid]
    if bad:
        raise ConfigError(f"unknown option 'mixing.{bad[0]}'; valid options: {', '.join(valid)}")
    return BatchMixing(num_classes, **spec)
