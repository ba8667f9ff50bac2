"""The one training loop, optimisers (incl. LARS), schedules, checkpoints and torchrun helpers."""
from visrep.train.loop import pretrain

__all__ = ["pretrain"]
