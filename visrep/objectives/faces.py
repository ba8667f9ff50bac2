"""Face-task losses of Faceptor (Qin et al. 2024; official code lxq1000/Faceptor, core/model/loss/) and its task
weighting. Each is a plain function of a task's outputs and labels, usable from plain PyTorch.

Auxiliary supervised learning (Faceptor's AuxSL): `FaceptorLoss(main_task=...)` keeps the main task's weight and
multiplies every other task's by `helper_weight` (default 0.1): the helpers shape the shared encoder and decoder
without dominating the loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visrep.errors import ConfigError
from visrep.objectives.distributed import float32

# The output types of face tasks (visrep.data.tasks.OUTPUTS holds the same names with their losses; a test checks).
OUTPUT_TYPES = ("classification", "multilabel", "regression", "age_distribution", "landmarks")

__all__ = ["age_distribution", "expected_age", "dldl_v2_loss", "masked_bce_loss", "landmark_loss",
           "gaussian_heatmaps", "task_weights", "FaceptorLoss"]


def age_distribution(logits: Tensor) -> Tensor:
    """[B, K] value-head logits of the K age bins → a distribution: sigmoid, then L1-normalised (the official
    code's choice, not a softmax)."""
    p = torch.sigmoid(logits.float())
    return p / p.sum(dim=1, keepdim=True).clamp_min(1e-12)


def expected_age(logits: Tensor) -> Tensor:
    """E[age] = Σ_i p_i · i over the bins i = 0..K−1 (years): [B, K] logits → [B]."""
    p = age_distribution(logits)
    return p @ torch.arange(p.shape[1], dtype=p.dtype, device=p.device)


def dldl_v2_loss(logits: Tensor, age: Tensor, sigma: float = 2.0, l1_weight: float = 1.0) -> Tensor:
    """DLDL-v2 (Gao et al., "Age Estimation Using Expectation of Label Distribution Learning", IJCAI 2018), as
    Faceptor uses it for age:

        q_i = N(i; y, σ²) / Σ_j N(j; y, σ²)         (a Gaussian over the bins i = 0..K−1, σ = 2)
        p   = sigmoid(z) / ‖sigmoid(z)‖₁
        ℓ   = (1/B) Σ_b Σ_i q_i log(q_i / p_i)  +  λ · (1/B) Σ_b |Σ_i p_i·i − y|      (λ = 1)

    Example (two bins, true age 0, σ so small that q = (1, 0); logits with p = (0.5, 0.5)):
        >>> round(float(dldl_v2_loss(torch.zeros(1, 2), torch.tensor([0.0]), sigma=0.01)), 4)   # log 2 + |0.5 − 0|
        1.1931
    """
    if logits.ndim != 2 or age.shape != logits.shape[:1]:
        raise ConfigError(f"age: expected logits [B, K] and ages [B], got {tuple(logits.shape)} and {tuple(age.shape)}")
    k = logits.shape[1]
    bins = torch.arange(k, dtype=torch.float32, device=logits.device)
    y = age.float().unsqueeze(1)
    q = torch.exp(-((bins - y.clamp(0, k - 1)) ** 2) / (2 * sigma ** 2))  # an age past the last bin: its edge
    q = q / q.sum(dim=1, keepdim=True)
    p = age_distribution(logits)
    kl = (torch.xlogy(q, q) - q * torch.log(p.clamp_min(1e-12))).sum(dim=1).mean()
    mae = (p @ bins - y.squeeze(1)).abs().mean()  # against the true age, as the official code
    return kl + l1_weight * mae


def masked_bce_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Attributes: BCE-with-logits over the labels that are known; labels −1 (unknown) are left out, and the sum is
    divided by the batch size (official CEL_Sigmoid).

        >>> round(float(masked_bce_loss(torch.zeros(2, 2), torch.tensor([[1, -1], [0, -1]]))), 4)   # 2·log 2 / 2
        0.6931
    """
    known = labels >= 0
    loss = F.binary_cross_entropy_with_logits(logits.float(), labels.clamp_min(0).float(), reduction="none")
    return (loss * known).sum() / logits.shape[0]


def gaussian_heatmaps(points: Tensor, size: tuple, sigma: float) -> Tensor:
    """[B, Q, 2] points (x, y) in [0, 1] → [B, Q, H, W] targets exp(−‖c − p‖² / 2σ²) on the pixel centres c, with
    σ in heatmap pixels (peak 1 at the point)."""
    h, w = size
    ys = torch.arange(h, dtype=torch.float32, device=points.device) + 0.5  # pixel centres, in pixels
    xs = torch.arange(w, dtype=torch.float32, device=points.device) + 0.5
    px, py = points[..., 0:1].float() * w, points[..., 1:2].float() * h
    dx = (xs.view(1, 1, w) - px).unsqueeze(-2)   # [B, Q, 1, W]
    dy = (ys.view(1, 1, h) - py).unsqueeze(-1)   # [B, Q, H, 1]
    return torch.exp(-(dx ** 2 + dy ** 2) / (2 * sigma ** 2))


def landmark_loss(heatmap_logits: Tensor, points_pred: Tensor, points: Tensor, sigma: float = 1.5,
                  heatmap_weight: float = 1.0) -> Tensor:
    """Faceptor's AlignLoss: the mean Euclidean distance between predicted and true points (in [0, 1] image
    coordinates), plus BCE-with-logits of the heatmaps against Gaussian targets (σ in heatmap pixels), weights 1, 1.

        ℓ = (1/BQ) Σ ‖p̂ − p‖₂  +  λ · mean BCE(heatmap, G_σ(p))
    """
    coord = (points_pred.float() - points.float()).norm(dim=-1).mean()
    target = gaussian_heatmaps(points, heatmap_logits.shape[-2:], sigma)
    return coord + heatmap_weight * F.binary_cross_entropy_with_logits(heatmap_logits.float(), target)


def task_weights(tasks: dict[str, tuple[str, float]], type_weights: dict[str, float] | None = None) -> dict[str, float]:
    """Faceptor's task weighting: w_t = λ_t / Σ_{s of t's type} λ_s × W_type, so each output type carries its type
    weight W_type (default 1) whatever number of tasks it holds; the loss is then Σ w_t·ℓ_t / Σ w_t.

    tasks: {name: (output type, λ_t)}.
        >>> task_weights({"age": ("age_distribution", 1.0), "gender": ("classification", 1.0),
        ...               "race": ("classification", 3.0)}, {"classification": 2.0})
        {'age': 1.0, 'gender': 0.5, 'race': 1.5}
    """
    type_weights = dict(type_weights or {})
    totals: dict[str, float] = {}
    for kind, w in tasks.values():
        if w < 0:
            raise ConfigError(f"task weights must be non-negative, got {w}")
        totals[kind] = totals.get(kind, 0.0) + float(w)
    out = {name: (float(w) / totals[kind] * float(type_weights.get(kind, 1.0)) if totals[kind] > 0 else 0.0)
           for name, (kind, w) in tasks.items()}
    if not any(v > 0 for v in out.values()):
        raise ConfigError("every task has weight 0: give at least one task a positive weight")
    return out


class FaceptorLoss(nn.Module):
    """Faceptor's multi-task objective: each task's loss by its output type, combined as Σ w_t·ℓ_t / Σ w_t over the
    tasks in the step, with w_t = `task_weights` (λ_t normalised within its output type, times the type's weight).

        classification     cross-entropy of the [b, Q = classes] values against the class labels
        multilabel         `masked_bce_loss` of the [b, Q] values against the {0, 1, −1} targets
        regression         L1 (or MSE) of the [b, Q] values against the targets
        age_distribution   `dldl_v2_loss` of the [b, K] values against the age (σ = `age_sigma`)
        landmarks          `landmark_loss` of the heatmaps and soft-argmax points against targets x1..xP, y1..yP

    The tasks come from the training data by the data-fitting hook (`fit(dataset)` reads `dataset.tasks`: name →
    (output, loss, weight)) or from `set_tasks`. The template's per-task outputs arrive as the `task_outputs` input
    ({task: {"values"} or {"heatmaps", "points"}}), labels and targets as `task_labels`, `task_targets`
    ({task: tensor}). Returns the total under
    "loss" and every task's own loss under "loss_<task>", which the loop logs.
    """

    inputs = ("task_outputs", "task_labels", "task_targets")

    def __init__(self, *, age_sigma: float = 2.0, heatmap_sigma: float = 1.5, type_weights: dict | None = None,
                 main_task: str | None = None, helper_weight: float = 0.1):
        super().__init__()
        if age_sigma <= 0 or heatmap_sigma <= 0:
            raise ConfigError("faceptor: age_sigma and heatmap_sigma must be positive")
        if not 0 <= helper_weight <= 1:
            raise ConfigError(f"faceptor: helper_weight must be in [0, 1], got {helper_weight}")
        self.main_task, self.helper_weight = main_task, float(helper_weight)
        self.age_sigma, self.heatmap_sigma = float(age_sigma), float(heatmap_sigma)
        self.type_weights = dict(type_weights or {})
        self.tasks: dict[str, tuple[str, str]] = {}
        self.weights: dict[str, float] = {}

    def set_tasks(self, tasks: dict[str, tuple[str, str, float]]) -> None:
        """tasks: {name: (output type, loss, λ_t)}."""
        unknown = sorted(set(self.type_weights) - set(OUTPUT_TYPES))
        if unknown:
            raise ConfigError(f"faceptor: type_weights names unknown output types {', '.join(unknown)}; valid: "
                              f"{', '.join(OUTPUT_TYPES)}")
        negative = {k: v for k, v in self.type_weights.items() if not v >= 0}
        if negative:
            raise ConfigError(f"faceptor: type_weights must be >= 0, got {negative}")
        self.tasks = {n: (o, loss) for n, (o, loss, _) in tasks.items()}
        weights = task_weights({n: (o, w) for n, (o, _, w) in tasks.items()}, self.type_weights)
        if self.main_task is not None:  # auxiliary supervised learning: the helpers' weights scaled down
            if self.main_task not in tasks:
                raise ConfigError(f"faceptor: main_task '{self.main_task}' is not one of the tasks "
                                  f"({', '.join(tasks)})")
            weights = {n: w * (1.0 if n == self.main_task else self.helper_weight) for n, w in weights.items()}
            if weights[self.main_task] == 0:
                raise ConfigError(f"faceptor: the main task '{self.main_task}' has weight 0")
        self.weights = weights

    def fit(self, dataset) -> None:
        tasks = getattr(dataset, "tasks", None)
        if not tasks:
            raise ConfigError("objective 'faceptor' trains on tasks: declare them in the config's tasks: list")
        self.set_tasks(tasks)

    def task_loss(self, name: str, out: dict, labels: Tensor, targets: Tensor | None) -> Tensor:
        output, loss = self.tasks[name]
        if output == "classification":
            return F.cross_entropy(out["values"].float(), labels)
        if output == "multilabel":
            return masked_bce_loss(out["values"], targets)
        if output == "regression":
            fn = F.l1_loss if loss == "l1" else F.mse_loss
            return fn(out["values"].float(), targets.float())
        if output == "age_distribution":
            return dldl_v2_loss(out["values"], targets[:, 0], sigma=self.age_sigma)
        points = targets.view(len(targets), 2, -1).transpose(1, 2)  # x1..xP, y1..yP → [b, P, 2]
        return landmark_loss(out["heatmaps"], out["points"], points, sigma=self.heatmap_sigma)

    def forward(self, student, target, task_outputs: dict, task_labels: dict, task_targets: dict) -> dict:
        if not self.tasks:
            raise ConfigError("objective 'faceptor' has no tasks: it is fitted to the training tasks before step 0")
        terms, total, norm = {}, 0.0, 0.0
        for name, out in task_outputs.items():
            with float32(*out.values()):  # the losses' matmuls and norms in float32 under autocast too
                loss = self.task_loss(name, out, task_labels[name], task_targets.get(name))
            terms[f"loss_{name}"] = loss.detach()
            w = self.weights[name]
            total, norm = total + w * loss, norm + w
        if norm == 0:
            raise ConfigError("faceptor: the tasks in this step all have weight 0")
        return {"loss": total / norm, **terms}
