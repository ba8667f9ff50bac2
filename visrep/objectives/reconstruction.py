"""Masked-image-modelling objectives: pixel reconstruction (MAE, SimMIM) and Hard Patches Mining.

These take the template's masked outputs:  student = [pred [B, L, P]], target = [patchified pixels [B, L, P]]
(the view's patchified pixels), plus keyword inputs named in `inputs`: `mask` [B, L] (True = masked)
and, for HPM, `loss_pred` [B, L]. Per-image counts of masked patches are equal (see data/masking.py),
so the mean over masked patches is the same on every process and needs no gathering.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visrep.errors import ConfigError

LOSSES = ("mse", "l1")


def per_patch_loss(pred: Tensor, target: Tensor, loss: str = "mse", norm_pix: bool = False) -> Tensor:
    """[B, L] mean over the pixels of each patch of (pred − t)² or |pred − t|.

    norm_pix (MAE's best target, He et al. 2022 Table 1c): t = (x − mean(x)) / sqrt(var(x) + 1e-6) per
    patch, with the unbiased variance as in MAE's code.
    """
    pred, target = pred.float(), target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    err = (pred - target).pow(2) if loss == "mse" else (pred - target).abs()
    return err.mean(dim=-1)


def masked_mean(per_patch: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)


def relative_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """HPM's relative loss-prediction objective (Wang et al. 2023, "Hard Patches Mining for Masked Image
    Modeling", eq. 6), over all ordered pairs (i, j) of masked patches of one image:

        ℓ = mean over pairs with t_i ≠ t_j of  BCE( σ(p_j − p_i),  1[t_j > t_i] )

    p: predicted scores [B, L]; t: the detached per-patch reconstruction losses [B, L]; tied pairs (and
    i = j) are dropped. Vectorised over the batch as a [B, L, L] comparison (no per-image loop).

    Example (one image, patches 0 and 1 masked, t = (1, 2), p = (0, 0)): both ordered pairs have logit 0,
    so ℓ = BCE(σ(0), 1) = log 2.
    """
    p, t = pred.float(), target.detach().float()
    logits = p.unsqueeze(1) - p.unsqueeze(2)            # [b, i, j] = p_j − p_i
    labels = (t.unsqueeze(1) > t.unsqueeze(2)).float()  # [b, i, j] = 1[t_j > t_i]
    valid = mask.unsqueeze(1) & mask.unsqueeze(2) & (t.unsqueeze(1) != t.unsqueeze(2))
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    w = valid.float()
    return (bce * w).sum() / w.sum().clamp_min(1.0)


def _check(name: str, student, target, mask) -> None:
    if len(student) != 1 or len(target) != 1:
        raise ConfigError(f"objective '{name}' needs one masked view (the masked template), got "
                          f"{len(student)} student / {len(target)} target outputs; set masking and decoder")
    if mask is None:
        raise ConfigError(f"objective '{name}' needs a mask: set the masking section (e.g. masking.name=random)")


class ReconstructionLoss(nn.Module):
    """Pixel reconstruction on the masked patches only.

        ℓ = (1/|M|) Σ_{b,i ∈ M} mean_k (ŷ_{b,i,k} − t_{b,i,k})²    (MAE, He et al. 2022; norm_pix=True)
        ℓ = (1/|M|) Σ_{b,i ∈ M} mean_k |ŷ_{b,i,k} − x_{b,i,k}|      (SimMIM, Xie et al. 2022; loss=l1)

    M: the masked patches; k: the p·p·3 pixel values of a patch; t the (optionally per-patch normalised)
    target pixels.

    Example:
        >>> import torch
        >>> pred, tgt = torch.zeros(1, 2, 3), torch.ones(1, 2, 3)
        >>> ReconstructionLoss(loss="l1", norm_pix=False)([pred], [tgt], mask=torch.tensor([[True, False]])).item()
        1.0
    """

    inputs = ("mask",)

    def __init__(self, *, loss: str = "mse", norm_pix: bool = True):
        super().__init__()
        if loss not in LOSSES:
            raise ConfigError(f"reconstruction loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        self.loss, self.norm_pix = loss, bool(norm_pix)

    def forward(self, student: list[Tensor], target: list[Tensor], mask: Tensor | None = None) -> Tensor:
        _check("reconstruction", student, target, mask)
        return masked_mean(per_patch_loss(student[0], target[0], self.loss, self.norm_pix), mask)


class HPMLoss(nn.Module):
    """Hard Patches Mining (Wang et al. 2023, CVPR): reconstruction + relative loss prediction.

        ℓ = ℓ_rec + pred_weight · ℓ_pred,   ℓ_rec as in `ReconstructionLoss`, ℓ_pred = `relative_loss`(p, t, M)

    with t the detached per-patch reconstruction losses of this step and p the student's loss-predictor
    scores. With `masking: hard_patches` the masks come from the EMA teacher's scores (method `hpm`);
    with random masks this is the paper's "loss prediction only" ablation (method `hpm_loss_pred_only`).

    Example:
        >>> import torch
        >>> pred, tgt = torch.zeros(1, 2, 3), torch.tensor([[[1.0] * 3, [2.0] * 3]])
        >>> m, p = torch.tensor([[True, True]]), torch.zeros(1, 2)
        >>> terms = HPMLoss(norm_pix=False)([pred], [tgt], mask=m, loss_pred=p)
        >>> {k: round(v.item(), 4) for k, v in terms.items()}   # (1+4)/2 + log 2
        {'loss': 3.1931, 'reconstruction': 2.5, 'loss_prediction': 0.6931}
    """

    inputs = ("mask", "loss_pred")

    def __init__(self, *, loss: str = "mse", norm_pix: bool = True, pred_weight: float = 1.0):
        super().__init__()
        if loss not in LOSSES:
            raise ConfigError(f"hpm loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        self.loss, self.norm_pix, self.pred_weight = loss, bool(norm_pix), float(pred_weight)

    def forward(self, student: list[Tensor], target: list[Tensor], mask: Tensor | None = None,
                loss_pred: Tensor | None = None) -> dict[str, Tensor]:
        _check("hpm", student, target, mask)
        if loss_pred is None:
            raise ConfigError("objective 'hpm' needs loss predictions: set the loss_predictor section")
        per = per_patch_loss(student[0], target[0], self.loss, self.norm_pix)
        rec = masked_mean(per, mask)
        pred = relative_loss(loss_pred, per.detach(), mask)
        # Both terms are logged as they are (the loop logs every term an objective returns).
        return {"loss": rec + self.pred_weight * pred, "reconstruction": rec.detach(), "loss_prediction": pred.detach()}
