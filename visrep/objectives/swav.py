"""SwAV: swapped prediction of Sinkhorn-Knopp cluster assignments."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visrep.errors import ConfigError
from visrep.objectives.distributed import (
    all_reduce_max,
    all_reduce_sum,
    float32,
    world_size,
)
from visrep.objectives.inputs import check_views


@torch.no_grad()
def sinkhorn_knopp(
    scores: Tensor, *, epsilon: float = 0.05, iterations: int = 3, gather_distributed: bool = True
) -> Tensor:
    """Equipartitioned soft codes from prototype scores [B, K] (no gradient).

    Q = exp(scores / ε) (up to a global constant), normalized to sum 1, then `iterations`
    times: divide each prototype column by its sum over the whole (all-reduced) batch and
    by K, then each sample row by its sum and by N (N = B·world size). The result is scaled
    by N, so every row of the returned codes sums to 1 and, as the iterations converge,
    every column sums to N/K over the gathered batch.
    """
    s = scores.detach().float()
    sync = gather_distributed and world_size() > 1
    n = s.shape[0] * (world_size() if sync else 1)
    k = s.shape[1]
    tiny = torch.finfo(torch.float32).tiny
    top = all_reduce_max(s.max()) if sync else s.max()  # a shift common to all ranks
    q = torch.exp((s - top) / epsilon)
    total = all_reduce_sum(q.sum()) if sync else q.sum()
    q = q / total
    for _ in range(iterations):
        cols = q.sum(dim=0, keepdim=True)
        if sync:
            cols = all_reduce_sum(cols)
        q = q / cols.clamp_min(tiny) / k
        q = q / q.sum(dim=1, keepdim=True).clamp_min(tiny) / n
    return q * n


class SwAVLoss(nn.Module):
    """SwAV swapped-prediction loss with Sinkhorn-Knopp codes.

    Caron, Misra, Mairal, Goyal, Bojanowski, Joulin (2020), "Unsupervised Learning of
    Visual Features by Contrasting Cluster Assignments".

    student[j] are the prototype scores of view j (cosine similarities between normalized
    features and normalized prototypes, [B, K]), global views first; target[i] are the
    scores of global view i (detached here). With qᵢ = sinkhorn_knopp(target[i]):
        loss = mean over pairs (i global, j ≠ i any view) of mean_b[ −Σ_k qᵢ log softmax(sⱼ/τ) ].
    The Sinkhorn sums run over the batch of all ranks (all_reduce), so the codes equal the
    1-process codes of the full batch; the loss averages the local batch. Prototype
    normalization/freezing and the optional feature queue belong to the method.

    Args:
        temperature: τ, default 0.1 (paper).
        epsilon: ε of Sinkhorn-Knopp, default 0.05 (paper).
        sinkhorn_iterations: default 3 (paper).
        gather_distributed: run the Sinkhorn sums over all ranks.

    Example:
        >>> import torch
        >>> s = torch.zeros(4, 3)                      # uniform scores, 3 prototypes
        >>> round(SwAVLoss()([s, s], [s, s]).item(), 4)   # codes uniform: log 3
        1.0986
    """

    def __init__(
        self,
        *,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        gather_distributed: bool = True,
    ):
        super().__init__()
        if temperature <= 0 or epsilon <= 0 or int(sinkhorn_iterations) < 1:
            raise ConfigError("swav needs temperature > 0, epsilon > 0 and sinkhorn_iterations >= 1")
        self.temperature = float(temperature)
        self.epsilon = float(epsilon)
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.gather_distributed = gather_distributed

    def forward(self, student: list[Tensor], target: list[Tensor]) -> Tensor:
        check_views("swav", student, target, min_student=2, min_target=1)
        if len(target) > len(student):
            raise ConfigError("swav: more target views than student views")
        with float32(*student, *target):
            codes = [
                sinkhorn_knopp(
                    t,
                    epsilon=self.epsilon,
                    iterations=self.sinkhorn_iterations,
                    gather_distributed=self.gather_distributed,
                )
                for t in target
            ]
            logps = [F.log_softmax(s.float() / self.temperature, dim=1) for s in student]
            terms = [
                -(q * lp).sum(dim=1).mean()
                for i, q in enumerate(codes)
                for j, lp in enumerate(logps)
                if j != i
            ]
            return torch.stack(terms).mean()
