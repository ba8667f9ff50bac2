"""Schedules as plain arrays indexed by step (as in DINO / nanoGPT): easy to plot, test and resume."""
from __future__ import annotations

import math

import numpy as np


def warmup_cosine(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                  warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from `warmup_start` to `base` over `warmup_steps`, then half-cosine to `final`.

    value(t) = final + ½(base − final)(1 + cos(π·(t − w)/(T − w)))   for w ≤ t < T   (Loshchilov & Hutter 2017)
    """
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    warm = np.linspace(warmup_start, base, warmup_steps, endpoint=False) if warmup_steps else np.array([])
    n = total_steps - warmup_steps
    t = np.arange(n)
    cos = final + 0.5 * (base - final) * (1 + np.cos(math.pi * t / max(n, 1)))
    return np.concatenate([warm, cos]).astype(np.float64)


def linear_warmup_constant(start: float, end: float, total_steps: int, warmup_steps: int) -> np.ndarray:
    """Linear from `start` to `end` over `warmup_steps`, then `end` (DINO's teacher temperature)."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    warm = np.linspace(start, end, warmup_steps) if warmup_steps else np.array([])
    return np.concatenate([warm, np.full(total_steps - warmup_steps, end)]).astype(np.float64)


def momentum_schedule(base: float, final: float, total_steps: int, kind: str = "cosine",
                      steps_per_epoch: int = 1, epochs: float | None = None) -> np.ndarray:
    """The EMA teacher's momentum per step.

    cosine (BYOL): τ(t) = 1 − (1 − τ_base)(cos(πt/T) + 1)/2, reaching `final` at the last step.
    linear (HPM's official code): per epoch e = ⌊t / steps_per_epoch⌋, τ = τ_base + min(e, E)/E · (final − τ_base),
        E = `epochs` (None: the whole run), constant within an epoch and `final` from epoch E on.

    Example:
        >>> [round(float(v), 5) for v in momentum_schedule(0.999, 0.9999, 8, "linear", 2, epochs=2)]
        [0.999, 0.999, 0.99945, 0.99945, 0.9999, 0.9999, 0.9999, 0.9999]
    """
    if kind == "cosine":
        return warmup_cosine(base, final, total_steps, 0)
    E = float(epochs) if epochs is not None else total_steps / max(steps_per_epoch, 1)
    epoch = np.arange(total_steps) // max(steps_per_epoch, 1)
    return base + np.minimum(epoch / max(E, 1e-12), 1.0) * (final - base)
