"""Which device runs the work: one rule for training, evaluation and ranking."""
from __future__ import annotations

import torch

from visrep.errors import ConfigError


def resolve_device(name: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """The torch device a run or an evaluation uses: "auto"/None → this process's GPU when CUDA is available,
    else the CPU; "cuda" → cuda:<local_rank> (torchrun); "cpu" and "cuda:N" as given. One sentence if unknown
    or if CUDA is asked for and absent."""
    name = "auto" if name is None else str(name)
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device is '{name}' but no CUDA GPU is available; use train.device=cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)
