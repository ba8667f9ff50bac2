"""Contrastive objectives: NT-Xent (SimCLR), InfoNCE with a queue (MoCo v2), batch InfoNCE (MoCo v3).

All three L2-normalize their inputs and compute in float32 (autocast off).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visrep.errors import ConfigError
from visrep.objectives.distributed import float32, gather, rank
from visrep.objectives.inputs import check_views


def _positive(name: str, value: float) -> float:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")
    return float(value)


class NTXentLoss(nn.Module):
    """NT-Xent, the normalized temperature-scaled cross entropy of SimCLR.

    Chen, Kornblith, Norouzi, Hinton (2020), "A Simple Framework for Contrastive Learning
    of Visual Representations".

    Uses student[0] and student[1] (the projector outputs of the two views; `target` is
    ignored). With z the 2N L2-normalized outputs and sim(a, b) = zₐ·z_b / τ, sample a with
    positive p(a) (the other view of the same image) has loss
        ℓ(a) = −log( exp sim(a, p(a)) / Σ_{b≠a} exp sim(a, b) ),
    and the loss is the mean of ℓ over all 2N samples.

    Distributed (`gather_distributed=True`): each rank's 2B local rows are scored against
    the gathered 2B·W columns (all other samples of all ranks are negatives) and averaged
    over the local rows, so the mean of the per-rank losses is the 1-process loss of the
    full batch.

    Args:
        temperature: τ, default 0.1 (common CIFAR setting; the paper uses 0.1 for its
            large-batch ImageNet runs and also reports 0.5 in its CIFAR-10 experiments).
        gather_distributed: gather the negatives over all ranks.

    Example:
        >>> import torch
        >>> z = torch.eye(4)[:2]           # 2 orthogonal samples, both views identical
        >>> loss = NTXentLoss(temperature=0.5)([z, z], [z, z])
        >>> round(loss.item(), 4)           # log(1 + 2 e^(-1/0.5))
        0.2395
    """

    def __init__(self, *, temperature: float = 0.1, gather_distributed: bool = True):
        super().__init__()
        self.temperature = _positive("ntxent temperature", temperature)
        self.gather_distributed = gather_distributed

    def forward(self, student: list[Tensor], target: list[Tensor]) -> Tensor:
        check_views("ntxent", student, target, min_student=2, max_student=2, min_target=0)
        with float32(*student):
            z0 = F.normalize(student[0].float(), dim=1)
            z1 = F.normalize(student[1].float(), dim=1)
            b = z0.shape[0]
            if self.gather_distributed:
                all0, all1, offset = gather(z0), gather(z1), rank() * b
            else:
                all0, all1, offset = z0, z1, 0
            n = all0.shape[0]
            rows = torch.cat([z0, z1])  # [2B, D]
            cols = torch.cat([all0, all1])  # [2N, D], N = B·W
            logits = rows @ cols.T / self.temperature
            local = torch.arange(b, device=rows.device) + offset
            self_col = torch.cat([local, local + n])
            pos_col = torch.cat([local + n, local])
            row_ids = torch.arange(2 * b, device=rows.device)
            mask = torch.zeros_like(logits, dtype=torch.bool)
            mask[row_ids, self_col] = True
            logits = logits.masked_fill(mask, float("-inf"))
            return F.cross_entropy(logits, pos_col)


class MoCoQueueLoss(nn.Module):
    """InfoNCE against a queue of past keys (MoCo v2), symmetrized over the two views.

    He, Fan, Wu, Xie, Girshick (2020), "Momentum Contrast for Unsupervised Visual
    Representation Learning"; Chen, Fan, Girshick, He (2020), "Improved Baselines with
    Momentum Contrastive Learning" (MoCo v2).

    For direction i ∈ {0, 1}: q = normalize(student[i]), k = normalize(target[1−i]),
        ℓᵢ = mean over the batch of −log( exp(q·k/τ) / (exp(q·k/τ) + Σ_m exp(q·queue_m/τ)) ),
    loss = (ℓ₀ + ℓ₁) / 2. After the loss (in training mode only) the keys of both views,
    gathered over ranks, are written into the FIFO queue (wrapping around, no gradient).
    The queue is a buffer, so it is saved in the state_dict; its initial content is
    normalized Gaussian noise drawn from a fixed seed (identical on every rank).

    Args:
        temperature: τ, default 0.2 (MoCo v2).
        queue_size: number of negatives kept, default 65536 (MoCo).
        out_dim: feature size of the keys, default 128 (MoCo projection size).
        gather_distributed: enqueue the keys of all ranks (as MoCo does).

    Example:
        >>> import torch
        >>> loss_fn = MoCoQueueLoss(queue_size=16, out_dim=8)
        >>> q, k = [torch.randn(4, 8), torch.randn(4, 8)], [torch.randn(4, 8), torch.randn(4, 8)]
        >>> loss = loss_fn(q, k)
        >>> loss.shape, int(loss_fn.queue_ptr)   # 2 views x 4 keys enqueued
        (torch.Size([]), 8)
    """

    def __init__(
        self,
        *,
        temperature: float = 0.2,
        queue_size: int = 65536,
        out_dim: int = 128,
        gather_distributed: bool = True,
    ):
        super().__init__()
        self.temperature = _positive("moco_queue temperature", temperature)
        if int(queue_size) < 1 or int(out_dim) < 1:
            raise ConfigError(f"moco_queue queue_size and out_dim must be >= 1, got {queue_size}, {out_dim}")
        self.queue_size, self.out_dim = int(queue_size), int(out_dim)
        self.gather_distributed = gather_distributed
        g = torch.Generator().manual_seed(0)
        queue = F.normalize(torch.randn(self.queue_size, self.out_dim, generator=g), dim=1)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, student: list[Tensor], target: list[Tensor]) -> Tensor:
        check_views("moco_queue", student, target, min_student=2, max_student=2, min_target=2)
        if student[0].shape[1] != self.out_dim:
            raise ConfigError(
                f"moco_queue out_dim={self.out_dim} but the outputs have {student[0].shape[1]} features"
            )
        with float32(*student, *target):
            negatives = self.queue.clone()  # the buffer is overwritten below
            keys = [F.normalize(t.float(), dim=1) for t in target[:2]]
            losses = []
            for i in (0, 1):
                q = F.normalize(student[i].float(), dim=1)
                k = keys[1 - i]
                pos = (q * k).sum(dim=1, keepdim=True)
                neg = q @ negatives.T
                logits = torch.cat([pos, neg], dim=1) / self.temperature
                labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
                losses.append(F.cross_entropy(logits, labels))
            loss = (losses[0] + losses[1]) / 2
            if self.training:
                with torch.no_grad():
                    if self.gather_distributed:
                        keys = [gather(k) for k in keys]
                    self.enqueue(torch.cat(keys).detach())
        return loss

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write `keys` [n, out_dim] at the pointer (FIFO, wrapping) and advance it."""
        n, size = keys.shape[0], self.queue_size
        ptr = int(self.queue_ptr)
        if n > size:  # only the newest `size` keys survive
            ptr, keys = (ptr + n - size) % size, keys[-size:]
        idx = (ptr + torch.arange(keys.shape[0], device=self.queue.device)) % size
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.fill_((int(self.queue_ptr) + n) % size)


class InfoNCELoss(nn.Module):
    """Batch InfoNCE of MoCo v3: each query against the keys of the whole (gathered) batch.

    Chen, Xie, He (2021), "An Empirical Study of Training Self-Supervised Vision
    Transformers" (MoCo v3).

    For q = normalize(student[i]) (predictor outputs) and k = normalize(target[1−i])
    (momentum-encoder outputs), gathered over ranks into k_all [N, D]:
        ctr(q, k) = 2τ · CE(q·k_allᵀ / τ, labels),  labels = arange(B) + rank·B,
    loss = ctr(q₀, k₁) + ctr(q₁, k₀): the SUM of the two directions, exactly as in the
    paper's pseudo-code (Alg. 1), so the loss is twice a one-directional loss.
    The factor 2τ is the paper's (it makes the gradient scale insensitive to τ).
    Each rank averages over its local queries, so the mean over ranks is the full-batch loss.

    Args:
        temperature: τ, default 0.2 (paper's ViT setting; its ResNet-50 setting is 1.0).
        gather_distributed: gather the keys over all ranks.

    Example:
        >>> import torch
        >>> e = torch.eye(2)                 # queries equal their keys, orthogonal otherwise
        >>> loss = InfoNCELoss(temperature=1.0)([e, e], [e, e])
        >>> round(loss.item(), 4)            # 2 · 2τ · log(1 + e^(-1/τ))
        1.253
    """

    def __init__(self, *, temperature: float = 0.2, gather_distributed: bool = True):
        super().__init__()
        self.temperature = _positive("infonce temperature", temperature)
        self.gather_distributed = gather_distributed

    def _ctr(self, q: Tensor, k: Tensor) -> Tensor:
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(k.float(), dim=1)
        offset = 0
        if self.gather_distributed:
            k, offset = gather(k), rank() * q.shape[0]
        logits = q @ k.T / self.temperature
        labels = torch.arange(q.shape[0], device=q.device) + offset
        return F.cross_entropy(logits, labels) * (2 * self.temperature)

    def forward(self, student: list[Tensor], target: list[Tensor]) -> Tensor:
        check_views("infonce", student, target, min_student=2, max_student=2, min_target=2)
        with float32(*student, *target):
            return self._ctr(student[0], target[1]) + self._ctr(student[1], target[0])
