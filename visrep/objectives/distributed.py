"""Process-group helpers used by the objectives.

Every helper is the identity (or a plain local computation) when no process group is
initialized or the world size is 1, so the objectives run unchanged in a single process.

Conventions the objectives rely on:

* `gather(x)` concatenates every rank's `x` along dim 0 in rank order and keeps the
  gradient. Its backward SUMS, over the ranks, the gradients that each rank's loss sends
  to a rank's rows. With DDP averaging parameter gradients over the ranks, a rank's rows
  therefore receive `(1/W) Σ_r ∂L_r/∂x`, i.e. the gradient of the mean of the per-rank
  losses, which the objectives make equal to the loss of the full (gathered) batch.
* All ranks must hold the same number of rows (use `drop_last=True` in the sampler).
* `all_reduce_*` are for statistics (DINO center, Sinkhorn sums): no gradient.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True when torch.distributed is usable and a default process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def gather(x: torch.Tensor) -> torch.Tensor:
    """All-gather `x` along dim 0 (rank order) with gradient; identity without a group."""
    if world_size() == 1:
        return x
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private API; still the autograd-aware gather
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x.contiguous()), dim=0)


def _all_reduce(x: torch.Tensor, op) -> torch.Tensor:
    out = x.detach().clone()
    if world_size() > 1:
        dist.all_reduce(out, op=op)
    return out


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over the ranks (a detached copy; `x` is left untouched)."""
    return _all_reduce(x, dist.ReduceOp.SUM if dist.is_available() else None)


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over the ranks (a detached copy; `x` is left untouched)."""
    return all_reduce_sum(x) / world_size()


@torch.no_grad()
def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise max of `x` over the ranks (a detached copy)."""
    return _all_reduce(x, dist.ReduceOp.MAX if dist.is_available() else None)


@contextmanager
def float32(*tensors: torch.Tensor) -> Iterator[None]:
    """Turn autocast off on the devices of `tensors`, so the loss math runs in float32.

    The objectives cast their inputs with `.float()` inside this block: without it, an
    enclosing bf16/fp16 autocast would push the matmuls back to low precision.
    """
    devices = sorted({t.device.type for t in tensors})
    ctxs = []
    try:
        for d in devices:
            try:
                c = torch.autocast(device_type=d, enabled=False)
            except RuntimeError:  # a device type autocast does not know
                continue
            c.__enter__()
            ctxs.append(c)
        yield
    finally:
        for c in reversed(ctxs):
            c.__exit__(None, None, None)
