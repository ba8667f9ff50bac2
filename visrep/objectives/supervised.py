"""Supervised objective: cross-entropy on the classifier head's logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visrep.errors import ConfigError


class CrossEntropyLoss(nn.Module):
    """Cross-entropy with optional label smoothing (Szegedy et al. 2016):

        ℓ = −(1/B) Σ_b Σ_c q_{b,c} log softmax(z_b)_c,   q = (1 − ε)·onehot(y) + ε/C

    student: logits of every view ([B, C] each; labels are repeated per view); teacher is unused.

    Example:
        >>> import torch
        >>> CrossEntropyLoss()([torch.zeros(1, 4)], [], labels=torch.tensor([2])).item() == torch.log(torch.tensor(4.)).item()
        True
    """

    inputs = ("labels",)

    def __init__(self, *, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def forward(self, student: list[Tensor], teacher: list[Tensor], labels: Tensor | None = None) -> Tensor:
        if labels is None:
            raise ConfigError("objective 'cross_entropy' needs labels")
        logits = torch.cat([s.float() for s in student])
        return F.cross_entropy(logits, labels.repeat(len(student)), label_smoothing=self.label_smoothing)
