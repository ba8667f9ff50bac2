"""DINO: self-distillation of a centered, sharpened teacher distribution."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visrep.errors import ConfigError
from visrep.objectives.distributed import all_reduce_mean, float32
from visrep.objectives.inputs import check_views


class DINOLoss(nn.Module):
    """DINO cross-entropy between teacher (target) and student output distributions.

    Caron, Touvron, Misra, Jégou, Mairal, Bojanowski, Joulin (2021), "Emerging Properties
    in Self-Supervised Vision Transformers".

    With c the center [1, K] (a buffer), teacher (target) global views tᵢ and all student views sⱼ:
        Pᵢ = softmax((tᵢ − c) / τ_t),  log Qⱼ = log_softmax(sⱼ / τ_s)
        loss = mean over pairs (i, j), j ≠ i, of mean_b[ −Σ_k Pᵢ log Qⱼ ].
    Then, in training mode only and without gradient,
        c ← m·c + (1 − m)·mean(all teacher rows of all ranks)   (all-reduced over ranks).
    `teacher_temp` is a plain float attribute: the training loop overwrites it every step
    from its warm-up schedule. The loss is a mean over the local batch, so the mean over
    ranks (equal batch sizes) is the full-batch loss; only the center is synchronized.

    Args:
        out_dim: K, the number of DINO head outputs, default 65536 (paper).
        student_temp: τ_s, default 0.1 (paper).
        teacher_temp: τ_t at construction, default 0.04 (the paper's warm-up start value;
            its schedule then raises τ_t linearly to a final 0.04-0.07).
        center_momentum: m, default 0.9 (paper).
        gather_distributed: average the center statistics over all ranks.

    Example:
        >>> import torch
        >>> loss_fn = DINOLoss(out_dim=3)
        >>> t = torch.zeros(2, 3)                        # uniform teacher
        >>> s = [torch.zeros(2, 3)] * 4                  # 2 global + 2 local crops
        >>> round(loss_fn(s, [t, t]).item(), 4)           # cross-entropy of uniforms: log 3
        1.0986
        >>> loss_fn.teacher_temp = 0.07                  # set by the schedule each step
    """

    def __init__(
        self,
        *,
        out_dim: int = 65536,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        center_momentum: float = 0.9,
        gather_distributed: bool = True,
    ):
        super().__init__()
        if int(out_dim) < 1 or student_temp <= 0 or teacher_temp <= 0:
            raise ConfigError("dino needs out_dim >= 1 and temperatures > 0")
        if not 0 <= center_momentum <= 1:
            raise ConfigError(f"dino center_momentum must be in [0, 1], got {center_momentum}")
        self.out_dim = int(out_dim)
        self.student_temp = float(student_temp)
        self.teacher_temp = float(teacher_temp)
        self.center_momentum = float(center_momentum)
        self.gather_distributed = gather_distributed
        self.register_buffer("center", torch.zeros(1, self.out_dim))

    def forward(self, student: list[Tensor], target: list[Tensor]) -> Tensor:
        check_views("dino", student, target, min_student=2, min_target=1)
        if len(target) > len(student):
            raise ConfigError("dino: more teacher (target) views than student views")
        if student[0].shape[1] != self.out_dim:
            raise ConfigError(f"dino out_dim={self.out_dim} but the outputs have {student[0].shape[1]}")
        with float32(*student, *target):
            center = self.center.clone()
            probs = [F.softmax((t.float() - center) / self.teacher_temp, dim=-1) for t in target]
            logps = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student]
            terms = [
                -(p * lq).sum(dim=-1).mean()
                for i, p in enumerate(probs)
                for j, lq in enumerate(logps)
                if j != i
            ]
            loss = torch.stack(terms).mean()
            if self.training:
                self.update_center(target)
        return loss

    @torch.no_grad()
    def update_center(self, target: list[Tensor]) -> None:
        """c ← m·c + (1 − m)·(mean of the teacher rows over all views and ranks)."""
        batch_center = torch.cat([t.detach().float() for t in target]).mean(dim=0, keepdim=True)
        if self.gather_distributed:
            batch_center = all_reduce_mean(batch_center)
        m = self.center_momentum
        self.center.mul_(m).add_(batch_center.to(self.center.dtype), alpha=1 - m)
