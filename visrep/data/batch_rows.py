"""Per-sample random draws that do not depend on how many processes share the batch.

Under torchrun, rank r holds rows [r·b, (r+1)·b) of the global batch of B = W·b rows (the batch readers
split it that way). If each rank drew its augmentation parameters and masks for its own b rows from the
step's seed, W = 2 would crop and mask its images differently from W = 1, and a 2-GPU run could not
reproduce a 1-GPU run. So every per-sample draw goes through `per_sample`: inside `batch_rows(offset, B)`
it draws for all B rows, from the same seed on every rank, and keeps this rank's b. Outside, or when the
batch is not the rank's b rows (e.g. several views concatenated), it draws for the batch it was given.

    >>> import torch
    >>> g = lambda n: torch.Generator().manual_seed(0)
    >>> full = per_sample(lambda n: torch.rand(n, generator=g(n)), 4)
    >>> with batch_rows(2, 2, 4):
    ...     part = per_sample(lambda n: torch.rand(n, generator=g(n)), 2)
    >>> bool(torch.equal(part, full[2:]))
    True

Drawing for B instead of b rows costs W times the parameter draws (a few hundred numbers), not the images.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

import torch

__all__ = ["batch_rows", "per_sample", "rows_of"]

_ROWS: contextvars.ContextVar[tuple[int, int, int] | None] = contextvars.ContextVar("visrep_batch_rows", default=None)


@contextlib.contextmanager
def batch_rows(offset: int, local: int, total: int) -> Iterator[None]:
    """Within the block, a batch of `local` rows is the slice [offset, offset + local) of a global batch of
    `total` rows."""
    if not (0 <= offset and 0 < local and offset + local <= total):
        raise ValueError(f"batch_rows: rows [{offset}, {offset + local}) do not lie in a batch of {total} rows")
    token = _ROWS.set((int(offset), int(local), int(total)))
    try:
        yield
    finally:
        _ROWS.reset(token)


def rows_of(batch: int) -> tuple[int, int, int] | None:
    """(offset, local, total) when a batch of `batch` rows is this process's part of a larger global batch
    (inside `batch_rows` with local == batch < total); None when its draws are its own."""
    rows = _ROWS.get()
    return rows if rows is not None and rows[1] == batch and rows[1] < rows[2] else None


def per_sample(draw: Callable[[int], torch.Tensor], batch: int) -> torch.Tensor:
    """`draw(n)` returns n rows of random values; this returns the `batch` rows of this process.

    Inside `batch_rows(offset, local, total)` with batch == local: draw(total)[offset : offset + local].
    Otherwise draw(batch).
    """
    rows = rows_of(batch)
    if rows is None:
        return draw(batch)
    offset, local, total = rows
    return draw(total)[offset:offset + local]
