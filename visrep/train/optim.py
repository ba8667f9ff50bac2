"""Optimisers: SGD, AdamW (torch) and LARS (written here: torch has none), parameter groups, and the list of
(optimiser, per-step lr array) pairs the loop steps (`build_optimizers`)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from visrep.errors import ConfigError


class LARS(torch.optim.Optimizer):
    """LARS, You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks".

    For each parameter w with gradient g and weight decay λ:
        trust = η·‖w‖ / (‖g‖ + λ·‖w‖ + ε)      (1 if ‖w‖ = 0 or ‖g‖ = 0; the paper's local learning rate)
        trust = min(trust / lr, 1)            if clip_lr (solo-learn's CIFAR recipes: the local rate never
                                              exceeds the global one)
        d = trust·(g + λ·w) ;  v ← μ·v + d ;  w ← w − lr·v
    Groups with `lars_exclude=True` (biases, norm layers: as in SimCLR/BYOL) skip both weight decay and
    adaptation and become plain SGD with momentum.

    Example:
        >>> w = nn.Parameter(torch.ones(2)); opt = LARS([w], lr=0.1, eta=0.02)
        >>> w.grad = torch.ones(2); opt.step()
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.02, clip_lr: bool = True, eps: float = 1e-8, lars_exclude: bool = False):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip_lr=clip_lr, eps=eps,
                        lars_exclude=lars_exclude)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                d = g.add(p, alpha=wd) if wd else g
                if not group["lars_exclude"]:
                    w_norm, g_norm = torch.norm(p), torch.norm(g)
                    trust = group["eta"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                    trust = torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))
                    if group["clip_lr"] and lr > 0:
                        trust = torch.clamp(trust / lr, max=1.0)
                    d = d.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(d)
                p.sub_(buf, alpha=lr)
        return loss


def param_groups(modules: list[nn.Module], weight_decay: float, exclude_bias_norm: bool,
                 exclude: set | None = None) -> list[dict]:
    """Two groups: regular weights, and biases/norm parameters (no decay, no LARS adaptation).
    `exclude`: ids of parameters another optimiser owns (the GCR bases)."""
    decay, no_decay = [], []
    seen = set(exclude or ())
    for module in modules:
        # a part may name more parameters that are embeddings, not weights (e.g. a task head's query tables)
        embeddings = tuple(getattr(module, "no_weight_decay_prefixes", ()))
        for name, p in module.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            # Tokens and position embeddings are not decayed either (timm, MAE, DeiT).
            if exclude_bias_norm and (p.ndim <= 1 or name.endswith(".bias") or name.endswith("token")
                                      or "pos_embed" in name or (embeddings and name.startswith(embeddings))):
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lars_exclude": False, "wd_scale": 1.0}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_exclude": True, "wd_scale": 0.0})
    return groups


def build_optimizer(cfg, groups: list[dict]) -> torch.optim.Optimizer:
    """cfg: OptimConfig. lr and weight decay are overwritten every step from the schedules."""
    if cfg.name == "lars":
        return LARS(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, eta=cfg.lars_eta,
                    clip_lr=cfg.lars_clip_lr)
    clean = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups]
    if cfg.name == "sgd":
        return torch.optim.SGD(clean, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(clean, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise ConfigError(f"optim.name must be one of sgd, lars, adamw, got {cfg.name!r}")


def build_param_groups(model: nn.Module, cfg) -> tuple[list[dict], list[nn.Parameter]]:
    """(groups for the Euclidean optimiser, parameters for Riemannian SGD) of a Template under RunConfig `cfg`.

    Manifold parameters (modules' `manifold_parameters`, e.g. GCR bases) go to Riemannian SGD only, so
    they get no weight decay. With `finetune.layer_decay` d the backbone's layers come from timm's
    `param_groups_layer_decay` (its `group_matcher`: stem, one layer per block, the final norm with the
    last block) and every scale is multiplied by d once more, because the head sits outside the backbone
    and is the top layer. For L blocks this is BEiT's rule (Bao et al. 2022; MAE fine-tuning):

        head: lr,   block i (0-based): lr · d^(L − i),   stem (patch embed, tokens, positions): lr · d^(L + 1)

    Each group carries its `lr_scale`; the loop multiplies the scheduled lr by it.
    """
    from visrep.train.riemannian import manifold_parameters

    o, ft = cfg.optim, cfg.finetune
    modules = model.student_modules()
    manifold = manifold_parameters(modules)
    skip = {id(p) for p in manifold}
    if ft.layer_decay is None or ft.mode != "full":
        return param_groups(modules, o.weight_decay, o.exclude_bias_norm, skip), manifold
    import timm.optim

    backbone = model.backbone
    no_wd = set(backbone.no_weight_decay()) if hasattr(backbone, "no_weight_decay") else set()
    timm_groups = timm.optim.param_groups_layer_decay(backbone, weight_decay=o.weight_decay,
                                                      no_weight_decay_list=no_wd, layer_decay=ft.layer_decay)
    groups = []
    for g in timm_groups:
        decays = g["weight_decay"] > 0
        groups.append({"params": g["params"], "weight_decay": g["weight_decay"], "lars_exclude": not decays,
                       "wd_scale": 1.0 if decays else 0.0,
                       "lr_scale": float(g.get("lr_scale", 1.0)) * ft.layer_decay})
    rest = param_groups([m for m in modules if m is not backbone], o.weight_decay, o.exclude_bias_norm, skip)
    return groups + rest, manifold


@dataclass
class ScheduledOptimizer:
    """One optimiser and its per-step schedules. `prefix` names its state in a checkpoint ("" for the main one).

    `apply(step)` writes lr[step] (times each group's `lr_scale`, e.g. layer-wise decay) and, when the
    optimiser decays weights, wd[step] (times the group's `wd_scale`) into its parameter groups.
    """
    prefix: str
    optimizer: torch.optim.Optimizer
    lr: np.ndarray
    wd: np.ndarray | None = None

    def apply(self, step: int) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = float(self.lr[step]) * g.get("lr_scale", 1.0)
            if self.wd is not None:
                g["weight_decay"] = float(self.wd[step]) * g.get("wd_scale", 1.0)


def build_optimizers(model: nn.Module, cfg, schedules) -> list[ScheduledOptimizer]:
    """Every optimiser of a Template: the Euclidean one over its parameter groups, plus Riemannian SGD when a
    module declares `manifold_parameters` (GCR's class subspaces: no weight decay, its own lr schedule).
    `schedules`: the run's `Schedules` (lr, wd and manifold_lr arrays)."""
    groups, manifold = build_param_groups(model, cfg)
    out = [ScheduledOptimizer("", build_optimizer(cfg.optim, groups), schedules.lr, schedules.wd)]
    if manifold:
        from visrep.train.riemannian import RiemannianSGD

        o = cfg.optim
        rsgd = RiemannianSGD(manifold, lr=float(o.manifold_lr or o.lr), momentum=o.manifold_momentum,
                             qr_every=o.manifold_qr_every)
        out.append(ScheduledOptimizer("manifold_", rsgd, schedules.manifold_lr))
    return out
