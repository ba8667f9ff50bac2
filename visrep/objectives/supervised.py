"""Supervised objectives: cross-entropy on the classifier head's logits, and regression losses on a
regression head's outputs (UTKFace age, MTFL landmarks)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visrep.errors import ConfigError


class CrossEntropyLoss(nn.Module):
    """Cross-entropy with optional label smoothing (Szegedy et al. 2016):

        ℓ = −(1/B) Σ_b Σ_c q_{b,c} log softmax(z_b)_c,   q = (1 − ε)·onehot(y) + ε/C

    student: logits of every view ([B, C] each; labels are repeated per view); `target` is unused.
    labels: class indices [B], or soft targets [B, C] (Mixup/CutMix), which are smoothed the same way.

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

    def forward(self, student: list[Tensor], target: list[Tensor], labels: Tensor | None = None) -> Tensor:
        if labels is None:
            raise ConfigError("objective 'cross_entropy' needs labels")
        logits = torch.cat([s.float() for s in student])
        labels = labels.repeat(len(student), *([1] * (labels.ndim - 1)))
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)


class RegressionLoss(nn.Module):
    """Regression loss between a head's outputs and the dataset's float targets, on standardised targets:

        ℓ = mean_{b,t} ρ(ŷ_{b,t} − (y_{b,t} − μ_t)/σ_t),   ρ = |·| (l1) | (·)² (mse) | Huber_δ=1 (smooth_l1)

    μ, σ: per-target mean and standard deviation of the training set (`fit(dataset)`, the data-fitting hook
    the loop calls once before training; `set_target_stats(targets)` from plain PyTorch), so ages in years and landmark coordinates in [0, 1] train with the same learning rate; the
    head predicts standardised values and `denormalize` maps them back. Buffers, so checkpoints keep them.

    Example:
        >>> loss = RegressionLoss(loss="l1")
        >>> loss.set_target_stats(torch.tensor([[10.0], [30.0]]))   # μ = 20, σ = 10
        >>> loss([torch.tensor([[1.0], [0.0]])], [], targets=torch.tensor([[30.0], [30.0]])).item()
        0.5
    """

    inputs = ("targets",)

    def __init__(self, *, loss: str = "smooth_l1"):
        super().__init__()
        fns = {"l1": F.l1_loss, "mse": F.mse_loss, "smooth_l1": F.smooth_l1_loss}
        if loss not in fns:
            raise ConfigError(f"regression loss must be one of {', '.join(fns)}, got {loss!r}")
        self.loss, self._fn = loss, fns[loss]
        self.register_buffer("target_mean", torch.zeros(0))
        self.register_buffer("target_std", torch.ones(0))

    def fit(self, dataset) -> None:
        """Data-fitting hook: standardise by the training set's targets (a dataset with `.targets`)."""
        if dataset.targets is None:
            raise ConfigError("objective 'regression' needs a dataset with regression targets (e.g. utkface "
                              "task=age, mtfl task=landmarks)")
        self.set_target_stats(dataset.targets)

    def set_target_stats(self, targets: Tensor) -> None:
        targets = targets.float().reshape(len(targets), -1)
        self.target_mean = targets.mean(0)
        self.target_std = targets.std(0, unbiased=False).clamp_min(1e-6)

    def normalize(self, y: Tensor) -> Tensor:
        return (y - self.target_mean.to(y)) / self.target_std.to(y) if self.target_mean.numel() else y

    def denormalize(self, pred: Tensor) -> Tensor:
        return pred * self.target_std.to(pred) + self.target_mean.to(pred) if self.target_mean.numel() else pred

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("target_mean", "target_std"):  # sizes are only known once the data is seen
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, student: list[Tensor], target: list[Tensor], targets: Tensor | None = None) -> Tensor:
        # `target` (the template's target-branch list) is unused: the regression targets come from the batch
        if targets is None:
            raise ConfigError("objective 'regression' needs a dataset with regression targets (e.g. utkface "
                              "task=age, mtfl task=landmarks)")
        y = self.normalize(targets.float())
        pred = torch.cat([s.float() for s in student])
        y = y.repeat(len(student), 1)
        if pred.shape != y.shape:
            raise ConfigError(f"the head gives {pred.shape[-1]} outputs for {y.shape[-1]} regression targets; "
                              "leave the head's out_dim unset so it follows the data")
        return self._fn(pred, y)
