"""Self-supervised objectives (losses).

Every objective is an `nn.Module` with keyword-only constructor params and
`forward(student: list[Tensor], target: list[Tensor]) -> scalar Tensor`:

* `student`: online-branch outputs for ALL views ([B, D] each; global views first, then
  local crops), after the predictor when the method has one;
* `target`: what the student is compared with, for the GLOBAL views only: the EMA teacher's
  outputs (BYOL, DINO, MoCo), the stop-gradient outputs (SimSiam), the student's own outputs
  when the method has no target branch (SimCLR, Barlow Twins, VICReg), the patchified pixels in
  masked image modelling, or nothing with a classifier head (supervised objectives read `labels` or
  `targets` from the batch).
  The objectives never detach it (the method's target mode does) except where the algorithm
  itself needs it (SwAV codes, DINO center, MoCo queue).

Objectives that need more than the two lists (the mask of masked image modelling, the labels of
supervised training) name them in a class attribute `inputs`, e.g. `inputs = ("mask",)`; the loop
passes exactly those as keyword arguments, so it has no per-method branch.

An objective returns the loss as a 0-d tensor, or a dict of loss terms whose "loss" entry is the total
that is optimised (HPM: reconstruction and loss prediction); the loop logs every term as it is.
An objective that must see the training set before the first step (regression: the targets' mean and
standard deviation) has a data-fitting hook `fit(dataset)`, which the loop calls once.

Losses that need batch statistics gather over the process group by default
(`gather_distributed=True`); the mean over ranks of the per-rank losses then equals the loss
of the full batch in one process. All math runs in float32, even under autocast.
"""
from __future__ import annotations

import inspect

from visrep.errors import ConfigError
from visrep.registry import Registry

from visrep.objectives.barlow_twins import BarlowTwinsLoss
from visrep.objectives.byol import BYOLLoss, SimSiamLoss
from visrep.objectives.contrastive import InfoNCELoss, MoCoQueueLoss, NTXentLoss
from visrep.objectives.dino import DINOLoss
from visrep.objectives.faces import FaceptorLoss
from visrep.objectives.reconstruction import HPMLoss, ReconstructionLoss, relative_loss
from visrep.objectives.supervised import CrossEntropyLoss, RegressionLoss
from visrep.objectives.swav import SwAVLoss, sinkhorn_knopp
from visrep.objectives.vicreg import VICRegLoss

OBJECTIVES = Registry("objective")

for _name, _cls in (
    ("ntxent", NTXentLoss),
    ("moco_queue", MoCoQueueLoss),
    ("infonce", InfoNCELoss),
    ("byol", BYOLLoss),
    ("simsiam", SimSiamLoss),
    ("barlow_twins", BarlowTwinsLoss),
    ("vicreg", VICRegLoss),
    ("dino", DINOLoss),
    ("swav", SwAVLoss),
    ("reconstruction", ReconstructionLoss),
    ("hpm", HPMLoss),
    ("cross_entropy", CrossEntropyLoss),
    ("regression", RegressionLoss),
    ("faceptor", FaceptorLoss),
):
    OBJECTIVES.add(_name, _cls)


def loss_terms(output) -> dict:
    """An objective's output as a dict of loss terms: {"loss": total, other terms...}; a tensor is {"loss": it}.

    Example:
        >>> import torch
        >>> sorted(loss_terms(torch.tensor(1.0))), sorted(loss_terms({"loss": torch.tensor(1.0), "a": 0}))
        (['loss'], ['a', 'loss'])
    """
    if isinstance(output, dict):
        if "loss" not in output:
            raise TypeError(f"an objective's dict of loss terms needs a 'loss' entry (the total), got {list(output)}")
        return output
    return {"loss": output}


def objective_params(name: str) -> dict:
    """{param: default} of the objective's constructor."""
    cls = OBJECTIVES.get(name)
    return {
        p.name: p.default
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def objective_inputs(name: str) -> tuple:
    """The batch and template fields the objective reads besides the two lists (its class's `inputs`)."""
    return tuple(getattr(OBJECTIVES.get(name), "inputs", ()))


def build_objective(name: str, **params):
    """Build a registered objective; an unknown param name raises ConfigError listing the valid ones."""
    valid = objective_params(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        listed = ", ".join(valid) if valid else "(none)"
        raise ConfigError(
            f"objective '{name}': unknown param(s) {', '.join(unknown)}; valid params: {listed}"
        )
    try:
        return OBJECTIVES.get(name)(**params)
    except (TypeError, ValueError) as e:  # e.g. temperature="abc": one sentence, not a traceback
        raise ConfigError(f"objective '{name}': bad param value ({e})") from None


__all__ = [
    "OBJECTIVES",
    "build_objective",
    "objective_params",
    "loss_terms",
    "sinkhorn_knopp",
    "NTXentLoss",
    "MoCoQueueLoss",
    "InfoNCELoss",
    "BYOLLoss",
    "SimSiamLoss",
    "BarlowTwinsLoss",
    "VICRegLoss",
    "DINOLoss",
    "SwAVLoss",
    "ReconstructionLoss",
    "HPMLoss",
    "CrossEntropyLoss",
    "relative_loss",
]
