"""Riemannian SGD on the Grassmann manifold, for the GCR head's class subspaces (written here: neither torch
nor timm has one, geoopt has no Grassmann manifold, and geotorch parametrises its Grassmannian
instead of stepping along geodesics).

Zhang et al., ICCV 2023, "Get the Best of Both Worlds: Improving Accuracy and Transferability by Grassmann
Class Representation", Alg. 1, with the geodesic of Edelman, Arias & Smith 1998 ("The Geometry of
Algorithms with Orthogonality Constraints", Thm. 2.3). For a basis S ∈ R^{d×k} (SᵀS = I) with Euclidean
gradient D = ∂ℓ/∂S, learning rate η and momentum μ:

    1. tangent projection     G = D − S(SᵀD)
    2. momentum, transported  M ← μ·(M − S(SᵀM)) + G      (the old buffer projected onto the tangent
                                                           space at the current point)
    3. geodesic step          H = −η·M = U Σ Vᵀ (thin SVD)
                              S ← S V cos(Σ) Vᵀ + U sin(Σ) Vᵀ
    4. at steps 0, qr_every, 2·qr_every, ... (GCR's official code: every 5 steps, from the first)
       S ← Q of the QR decomposition of S (removes round-off drift; the subspace, and so every logit,
       is unchanged)

The step is computed in float64 and written back in the parameter's dtype. No weight decay: a basis has
unit columns by construction. The optimiser keeps no global state beyond its per-parameter buffers and
a step count, so it runs beside any Euclidean optimiser (the training loop steps both).

Example:
    >>> S = torch.nn.Parameter(torch.tensor([[1.0], [0.0]]))
    >>> opt = RiemannianSGD([S], lr=0.5, momentum=0.0)
    >>> S.grad = torch.tensor([[0.3], [0.4]]); opt.step()
    >>> [round(v, 4) for v in S.data.flatten().tolist()]   # rotated by −0.5·0.4 = −0.2 rad
    [0.9801, -0.1987]
"""
from __future__ import annotations

import torch

from visrep.errors import ConfigError


def tangent_projection(S: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """G = D − S(SᵀD): the component of D tangent to the Grassmannian at S (batched over leading dims)."""
    return D - S @ (S.transpose(-1, -2) @ D)


def geodesic_step(S: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Follow the geodesic from S in tangent direction H for unit time (Edelman et al. 1998, Thm. 2.3):
    H = U Σ Vᵀ (thin SVD), S(1) = S V cos(Σ) Vᵀ + U sin(Σ) Vᵀ."""
    U, sigma, Vh = torch.linalg.svd(H, full_matrices=False)
    V = Vh.transpose(-1, -2)
    cos, sin = torch.cos(sigma).unsqueeze(-2), torch.sin(sigma).unsqueeze(-2)
    return (S @ V * cos) @ Vh + (U * sin) @ Vh


def orthonormalize(S: torch.Tensor) -> torch.Tensor:
    """Q of S = QR, with the signs fixed so Q stays close to S (diag R > 0)."""
    Q, R = torch.linalg.qr(S)
    signs = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return Q * signs.unsqueeze(-2)


class RiemannianSGD(torch.optim.Optimizer):
    """SGD with momentum on the Grassmann manifold (see the module docstring for the formulas).

    params: tensors [..., d, k] with orthonormal columns (e.g. GrassmannHead.bases [C, d, k]).
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, qr_every: int = 5):
        if not lr >= 0:
            raise ConfigError(f"Riemannian SGD lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ConfigError(f"Riemannian SGD momentum must be in [0, 1), got {momentum}")
        if isinstance(qr_every, bool) or not isinstance(qr_every, int) or qr_every < 1:
            raise ConfigError(f"Riemannian SGD qr_every must be an integer >= 1, got {qr_every!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, qr_every=qr_every))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                S = p.detach().double()
                G = tangent_projection(S, p.grad.double())
                state = self.state[p]
                if mu > 0:
                    if "momentum_buffer" in state:
                        M = mu * tangent_projection(S, state["momentum_buffer"].double()) + G
                    else:
                        M = G
                    state["momentum_buffer"] = M.to(p.dtype)
                else:
                    M = G
                S = geodesic_step(S, -lr * M)
                done = int(state.get("step", 0))  # steps taken before this one
                if done % group["qr_every"] == 0:
                    S = orthonormalize(S)
                state["step"] = done + 1
                p.copy_(S.to(p.dtype))
        return loss


def manifold_parameters(modules) -> list[torch.nn.Parameter]:
    """The parameters that modules name in their `manifold_parameters` attribute (GCR bases)."""
    out, seen = [], set()
    for module in modules:
        for m in module.modules():
            for name in getattr(m, "manifold_parameters", ()):
                p = getattr(m, name)
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out
