"""The one template every method is an instance of (Morningstar et al. 2024, "Augmentations vs Algorithms").

Joint embedding and supervised (no `masking`):

    views ──► backbone ──► projector or classifier [──► predictor] ──► student outputs, one per view
                 └─ target branch (global views only): none | stopgrad | ema teacher ──► target outputs

Masked image modelling (`masking` set; one view):

    view ──► mask generator ──► backbone (visible tokens, or mask tokens) ──► decoder ──► student [pred]
      └──────────────────────────────────────────────── patchified pixels ──► target
                                  backbone tokens ──► loss_predictor ──► extras["loss_pred"]  (HPM; with
                                  share_input it reads the decoder's embedded tokens, as the official code)
    EMA teacher (backbone + loss_predictor) on the full view ──► per-patch scores ──► hard_patches masks

`objective(student, target, **inputs)` turns the two lists (`TemplateOutput.student`, `.target`) into a loss; `inputs` are the extras the
objective names (mask, loss_pred, labels). Nothing here knows which method runs: a method is only the
choice of views, masking, heads, target branch and objective (see `presets.py`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from visrep.data.masking import build_mask_generator
from visrep.errors import ConfigError
from visrep.models import build_backbone, build_head, feature_dim
from visrep.models.decoders import build_decoder
from visrep.models.faceptor import build_task_head
from visrep.models.masked import embed_dim_of, encode_masked, patch_size_of, patchify


@dataclass
class TemplateOutput:
    student: list            # online outputs for every view (after the predictor, if any)
    target: list             # what the student is compared with, global views only: the EMA teacher's or the
                             # stop-gradient outputs, the student's own (no target branch), the patchified pixels
                             # (masked image modelling); empty with a classifier (the labels come with the batch)
    features: torch.Tensor   # detached backbone features of the global views (for online probe/monitors)
    extras: dict = field(default_factory=dict)  # mask, loss_pred: inputs an objective may name


def check_masking(masking, *, decoder_type: str | None, loss_predictor: bool, target: str, n_views: int | None = None,
                  views: str = "", share_input: bool = False, decoder_dim: int | None = None,
                  loss_predictor_dim: int | None = None) -> None:
    """The rules of the masked-image-modelling fields, written once: `visrep.config.validate` checks a config
    with them before anything is built, and `Template` checks the parts it is given."""
    if masking is None:
        if decoder_type is not None or loss_predictor:
            raise ConfigError("a decoder or loss_predictor needs a masking section (e.g. masking.name=random)")
        return
    if decoder_type is None:
        raise ConfigError("masking needs a decoder section (e.g. decoder.type=mae)")
    if n_views is not None and n_views != 1:  # the masked forward reads the first view only
        raise ConfigError(f"masked image modelling reads one view, but view policy '{views}' makes {n_views}; use "
                          "views.policy=crop (or none)")
    if masking.mode == "drop" and decoder_type == "linear":
        raise ConfigError("decoder 'linear' needs every patch token: use masking.mode=token (SimMIM) or decoder.type=mae")
    if masking.needs_scores and (not loss_predictor or target != "ema"):
        raise ConfigError("masking 'hard_patches' needs a loss_predictor section and target.branch=ema (its masks "
                          "come from the EMA teacher's loss predictions)")
    if share_input and decoder_type != "mae":
        raise ConfigError("loss_predictor.share_input needs a decoder with input layers (decoder.type=mae)")
    if share_input and decoder_dim is not None and loss_predictor_dim is not None and decoder_dim != loss_predictor_dim:
        raise ConfigError(f"loss_predictor.share_input reads the decoder's tokens, so its dim must be the decoder's "
                          f"({decoder_dim}), got {loss_predictor_dim}")


class Template(nn.Module):
    def __init__(self, backbone: nn.Module, projector: nn.Module | None, predictor: nn.Module | None,
                 target: str = "none", masking: nn.Module | None = None, decoder: nn.Module | None = None,
                 loss_predictor: nn.Module | None = None, classifier: nn.Module | None = None,
                 task_head: nn.Module | None = None):
        super().__init__()
        if classifier is not None and projector is not None:
            raise ConfigError("a run has one head after its backbone: a classifier or a projector, not both")
        self.backbone = backbone
        self.projector = projector if projector is not None else nn.Identity()
        self.classifier = classifier  # supervised training and fine-tuning: takes the projector's place
        # Multi-task (Faceptor): a head that reads the backbone's layers itself and answers every task; it needs the
        # rows of each task in the batch, which the loop passes as the batch fields named in `inputs`.
        self.task_head = task_head
        self.inputs = ("task_slices",) if task_head is not None else ()
        self.predictor = predictor
        self.target = target
        self.masking, self.decoder, self.loss_predictor = masking, decoder, loss_predictor
        self.mask_embedding = None
        check_masking(masking, decoder_type=getattr(decoder, "kind", type(decoder).__name__) if decoder is not None
                      else None,
                      loss_predictor=loss_predictor is not None, target=target,
                      share_input=bool(getattr(loss_predictor, "share_input", False)),
                      decoder_dim=getattr(decoder, "dim", None), loss_predictor_dim=getattr(loss_predictor, "dim", None))
        if masking is not None:
            self.patch_size = patch_size_of(backbone)
            if masking.mode == "token":  # SimMIM's learned mask token, in the encoder's input space
                self.mask_embedding = MaskToken(embed_dim_of(backbone))
        # HPM's loss predictor may read the reconstruction decoder's embedded input (its `share_input`).
        self.shared_input = bool(getattr(loss_predictor, "share_input", False))
        if target == "ema":
            # The teacher is a frozen copy, updated only by `update_teacher` (BYOL/MoCo/DINO momentum encoder).
            self.teacher_backbone = copy.deepcopy(backbone).requires_grad_(False)
            for m in self.teacher_backbone.modules():  # the teacher runs without stochastic depth (DINO, BYOL)
                if hasattr(m, "drop_prob"):
                    m.drop_prob = 0.0
            self.teacher_projector = copy.deepcopy(self.head).requires_grad_(False)
            if loss_predictor is not None:
                self.teacher_loss_predictor = copy.deepcopy(loss_predictor).requires_grad_(False)
            if self.shared_input:  # the teacher's loss predictor reads the EMA decoder's input layers
                self.teacher_decoder = copy.deepcopy(decoder).requires_grad_(False)

    @property
    def head(self) -> nn.Module:
        """The head on the backbone's features: the classifier of a supervised run, else the projector."""
        return self.classifier if self.classifier is not None else self.projector

    def student_modules(self):
        parts = (self.backbone, self.projector, self.classifier, self.predictor, self.decoder, self.loss_predictor,
                 self.mask_embedding, self.task_head)
        return [m for m in parts if m is not None]

    def _ema_pairs(self):
        pairs = [(self.backbone, self.teacher_backbone), (self.head, self.teacher_projector)]
        if self.loss_predictor is not None:
            pairs.append((self.loss_predictor, self.teacher_loss_predictor))
        if self.shared_input:
            pairs.append((self.decoder, self.teacher_decoder))
        return pairs

    def forward(self, views: list[torch.Tensor], n_global: int, seed: int = 0, task_slices: dict | None = None
                ) -> TemplateOutput:
        if self.masking is not None:
            return self._forward_masked(views[0], seed)
        if self.task_head is not None:  # every task's outputs, from its own rows; no single feature to monitor
            outputs = self.task_head(self.backbone, views[0], task_slices)
            return TemplateOutput([], [], views[0].new_zeros(views[0].shape[0], 0), {"task_outputs": outputs})
        feats = [self.backbone(v) for v in views]
        z = [self.head(f) for f in feats]
        student = [self.predictor(x) for x in z] if self.predictor is not None else z
        if self.classifier is not None:  # supervised: the targets are the labels, which come with the batch
            target = []
        elif self.target == "ema":
            with torch.no_grad():
                target = [self.teacher_projector(self.teacher_backbone(v)) for v in views[:n_global]]
        elif self.target == "stopgrad":
            target = [x.detach() for x in z[:n_global]]
        else:  # no target branch: the student's own outputs
            target = z[:n_global]
        return TemplateOutput(student, target, torch.cat(feats[:n_global]).detach())

    def _forward_masked(self, x: torch.Tensor, seed: int) -> TemplateOutput:
        p = self.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        gen = torch.Generator(device=x.device).manual_seed(int(seed) % (2**63))
        scores = None
        if self.masking.needs_scores:  # HPM: the EMA teacher predicts each patch's loss on the full image
            with torch.no_grad():
                tokens, cls = encode_masked(self.teacher_backbone, x)
                scores = self._predict_loss(self.teacher_decoder if self.shared_input else None,
                                            self.teacher_loss_predictor, tokens, None, grid, cls)
        mask = self.masking(x.shape[0], grid, gen, scores)
        token = self.mask_embedding.mask_token if self.mask_embedding is not None else None
        tokens, cls = encode_masked(self.backbone, x, mask, token)  # cls: the pooled (class) token
        extras = {"mask": mask}
        if self.shared_input:  # one embedded input, two heads (official HPM)
            embedded = self.decoder.embed_input(tokens, mask, grid, cls)
            pred = self.decoder.head(embedded, grid)
            extras["loss_pred"] = self.loss_predictor.head(embedded, grid).mean(-1)
        else:
            pred = self.decoder(tokens, mask, grid, cls)
            if self.loss_predictor is not None:
                extras["loss_pred"] = self._predict_loss(None, self.loss_predictor, tokens, mask, grid, cls)
        return TemplateOutput([pred], [patchify(x, p)], cls.detach(), extras)

    @staticmethod
    def _predict_loss(decoder, loss_predictor, tokens, mask, grid, cls) -> torch.Tensor:
        """[B, L] predicted per-patch losses: the predictor's outputs averaged (official HPM: p·p·3 values per
        patch, averaged; with out_dim 1 the one value), from the decoder's embedded input when shared."""
        if decoder is not None:
            return loss_predictor.head(decoder.embed_input(tokens, mask, grid, cls), grid).mean(-1)
        return loss_predictor(tokens, mask, grid, cls).mean(-1)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """θ_teacher ← m·θ_teacher + (1 − m)·θ_student, parameters only (BYOL/MoCo/DINO).

        The teacher's BatchNorm running statistics come from its own forward passes, as in DINO and MoCo.
        """
        if self.target != "ema":
            return
        for s_mod, t_mod in self._ema_pairs():
            s_params = [p.detach() for p in s_mod.parameters()]
            t_params = list(t_mod.parameters())
            if not t_params:  # e.g. the Identity projector of MIM methods
                continue
            torch._foreach_mul_(t_params, momentum)
            torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


class MaskToken(nn.Module):
    """SimMIM's learned mask token [1, 1, D], in the encoder's input space (not decayed: its name ends in token)."""

    def __init__(self, dim: int):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)


def build_backbone_of(cfg, image_size: int) -> nn.Module:
    """The backbone `cfg.backbone` names, at random init, for images of `image_size`."""
    opts = dict(cfg.backbone.options)
    opts.setdefault("image_size", image_size)
    return build_backbone(cfg.backbone.name, **opts)


def build_template(cfg, image_size: int, num_classes: int | None = None, backbone: nn.Module | None = None,
                   tasks: dict | None = None) -> Template:
    """Backbone + heads + masking + target branch from a RunConfig: the composition only.

    num_classes: out_dim of a classifier head left without one (classes, or regression targets).
    backbone: a backbone built already (default: `build_backbone_of(cfg, image_size)` at random init); fine-tuning
    passes one that starts from a run's weights or carries LoRA adapters (`visrep.runs.build_model`).
    tasks: {name: (output type, queries)} of a multi-task run (its `task_head`), from the training data.
    """
    backbone = build_backbone_of(cfg, image_size) if backbone is None else backbone
    dim = feature_dim(backbone)
    projector = build_head(cfg.projector, dim, num_classes)
    classifier = build_head(cfg.classifier, dim, num_classes)
    out_dim = getattr(classifier or projector, "out_dim", dim)
    predictor = build_head(cfg.predictor, out_dim, num_classes)
    masking = build_mask_generator(cfg.masking)
    decoder = loss_predictor = None
    if masking is not None:
        p, width = patch_size_of(backbone), embed_dim_of(backbone)
        decoder = build_decoder(cfg.decoder, width, p * p * 3, "decoder")
        # official HPM: the loss predictor also predicts p·p·3 values per patch, averaged to one score
        loss_predictor = build_decoder(cfg.loss_predictor, width, p * p * 3, "loss_predictor")
    task_head = None
    if cfg.task_head is not None:
        if not tasks:
            raise ConfigError("task_head needs the tasks' query counts (a multi-task run's training data)")
        task_head = build_task_head(cfg.task_head, embed_dim_of(backbone), tasks, len(backbone.blocks))
    return Template(backbone, projector, predictor, cfg.target.branch, masking, decoder, loss_predictor, classifier,
                    task_head)
