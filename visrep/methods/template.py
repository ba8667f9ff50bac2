"""The one template every method is an instance of (Morningstar et al. 2024, "Augmentations vs Algorithms").

    views ──► backbone ──► projector [──► predictor] ──► student outputs, one per view
                 └─ target branch (global views only): none | stopgrad | ema teacher ──► teacher outputs

`objective(student, teacher)` turns the two lists into a loss. Nothing here knows which method runs:
a method is only the choice of views, heads, target branch and objective (see `presets.py`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from visrep.models import build_backbone, build_head, feature_dim


@dataclass
class TemplateOutput:
    student: list            # online outputs for every view (after the predictor, if any)
    teacher: list            # target-branch outputs for the global views
    features: torch.Tensor   # detached backbone features of the global views (for online probe/monitors)


class Template(nn.Module):
    def __init__(self, backbone: nn.Module, projector: nn.Module | None, predictor: nn.Module | None,
                 target: str = "none"):
        super().__init__()
        self.backbone = backbone
        self.projector = projector if projector is not None else nn.Identity()
        self.predictor = predictor
        self.target = target
        if target == "ema":
            # The teacher is a frozen copy, updated only by `update_teacher` (BYOL/MoCo/DINO momentum encoder).
            self.teacher_backbone = copy.deepcopy(backbone).requires_grad_(False)
            self.teacher_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def student_modules(self):
        return [m for m in (self.backbone, self.projector, self.predictor) if m is not None]

    def forward(self, views: list[torch.Tensor], n_global: int) -> TemplateOutput:
        feats = [self.backbone(v) for v in views]
        z = [self.projector(f) for f in feats]
        student = [self.predictor(x) for x in z] if self.predictor is not None else z
        if self.target == "ema":
            with torch.no_grad():
                teacher = [self.teacher_projector(self.teacher_backbone(v)) for v in views[:n_global]]
        elif self.target == "stopgrad":
            teacher = [x.detach() for x in z[:n_global]]
        else:
            teacher = z[:n_global]
        return TemplateOutput(student, teacher, torch.cat(feats[:n_global]).detach())

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """θ_teacher ← m·θ_teacher + (1 − m)·θ_student, parameters only (BYOL/MoCo/DINO).

        The teacher's BatchNorm running statistics come from its own forward passes, as in DINO and MoCo.
        """
        if self.target != "ema":
            return
        for s_mod, t_mod in ((self.backbone, self.teacher_backbone), (self.projector, self.teacher_projector)):
            s_params = [p.detach() for p in s_mod.parameters()]
            t_params = list(t_mod.parameters())
            torch._foreach_mul_(t_params, momentum)
            torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


def build_template(cfg, image_size: int) -> Template:
    """Backbone + heads + target branch from a RunConfig."""
    opts = dict(cfg.backbone.options)
    if cfg.backbone.name.startswith("vit"):
        opts.setdefault("image_size", image_size)
    backbone = build_backbone(cfg.backbone.name, **opts)
    dim = feature_dim(backbone)
    projector = build_head(cfg.projector, dim)
    out_dim = getattr(projector, "out_dim", dim)
    predictor = build_head(cfg.predictor, out_dim)
    return Template(backbone, projector, predictor, cfg.target.branch)
