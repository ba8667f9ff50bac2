"""Heads that sit on the backbone's pooled features: projectors, predictors, DINO and SwAV heads, and the
classifier heads of supervised training and fine-tuning (linear softmax, cosine, GCR Grassmann).

A head is built from a small dict (the `projector:` / `predictor:` / `classifier:` sections of a config):

    {"type": "mlp", "hidden_dim": 2048, "out_dim": 128, "num_layers": 2, "bn": True, "last_bn": False}
    {"type": "dino", "hidden_dim": 2048, "bottleneck_dim": 256, "out_dim": 4096, "num_layers": 3}
    {"type": "swav", "hidden_dim": 2048, "out_dim": 128, "num_prototypes": 3000}
    {"type": "linear"} | {"type": "cosine", "scale": 16} | {"type": "gcr", "k": 8, "gamma": 25}

Classifier heads (`CLASSIFIER_HEADS`) take `out_dim` = the number of classes (or regression targets)
from the dataset when the config leaves it out.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from visrep.errors import ConfigError
from visrep.registry import Registry

HEADS = Registry("head")


@HEADS.register("mlp")
class MLPHead(nn.Module):
    """MLP projector/predictor: (Linear-BN-ReLU) x (num_layers-1), then Linear [+ BN] (SimCLR/BYOL/Barlow style).

    last_bn: a BatchNorm on the output (the last Linear then has no bias); last_bn_affine=False drops its scale and
    shift (MoCo v3), last_bn_center=False only its shift (SimCLR's official head: TF batch norm with center=False).
    """

    def __init__(self, in_dim: int, *, hidden_dim: int = 2048, out_dim: int = 128, num_layers: int = 2,
                 bn: bool = True, last_bn: bool = False, last_bn_affine: bool = True, last_bn_center: bool = True):
        super().__init__()
        if num_layers < 1:
            raise ConfigError(f"mlp head needs num_layers >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim, bias=not bn)]
            if bn:
                layers += [nn.BatchNorm1d(hidden_dim)]
            layers += [nn.ReLU(inplace=True)]
            dim = hidden_dim
        layers += [nn.Linear(dim, out_dim, bias=not last_bn)]
        if last_bn:
            norm = nn.BatchNorm1d(out_dim, affine=last_bn_affine)
            if last_bn_affine and not last_bn_center:  # scale only: the shift stays 0 and is not trained
                norm.bias.requires_grad_(False)
            layers += [norm]
        self.net = nn.Sequential(*layers)
        self.out_dim = out_dim

    def forward(self, x):
        return self.net(x)


@HEADS.register("dino")
class DINOHead(nn.Module):
    """DINO head (Caron et al. 2021): GELU MLP -> L2-normalise -> weight-normalised linear to out_dim prototypes."""

    def __init__(self, in_dim: int, *, hidden_dim: int = 2048, bottleneck_dim: int = 256, out_dim: int = 4096,
                 num_layers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim), nn.GELU()]
            dim = hidden_dim
        layers += [nn.Linear(dim, bottleneck_dim)]
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        # DINO fixes the weight-norm magnitude g = 1 (norm_last_layer=True) for stability.
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad = False
        self.out_dim = out_dim

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1)
        return self.last_layer(x)


@HEADS.register("swav")
class SwAVHead(nn.Module):
    """SwAV head (Caron et al. 2020): MLP projector, L2-normalise, then cosine scores against unit-norm prototypes."""

    def __init__(self, in_dim: int, *, hidden_dim: int = 2048, out_dim: int = 128, num_prototypes: int = 3000):
        super().__init__()
        self.projector = MLPHead(in_dim, hidden_dim=hidden_dim, out_dim=out_dim, num_layers=2, bn=True)
        self.prototypes = nn.Linear(out_dim, num_prototypes, bias=False)
        self.out_dim = num_prototypes

    def forward(self, x):
        z = F.normalize(self.projector(x), dim=-1)
        # Normalising the prototypes in the forward keeps them on the sphere without an extra step in the loop.
        return z @ F.normalize(self.prototypes.weight, dim=-1).t()


@HEADS.register("linear")
class LinearHead(nn.Module):
    """Linear softmax classifier (or regression head); out_dim defaults to the data's classes / targets."""

    def __init__(self, in_dim: int, *, out_dim: int | None = None, bias: bool = True):
        super().__init__()
        if out_dim is None or out_dim < 1:
            raise ConfigError(f"linear head needs out_dim >= 1 (the number of classes), got {out_dim}")
        self.fc = nn.Linear(in_dim, out_dim, bias=bias)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)  # timm's classifier init
        if bias:
            nn.init.zeros_(self.fc.bias)
        self.out_dim = out_dim

    def forward(self, x):
        return self.fc(x)


@HEADS.register("cosine")
class CosineHead(nn.Module):
    """Cosine classifier: logit = s·cos(w_c, x) (NormFace, Wang et al. 2017; CosFace without margin).

        logit_c = s · cos(w_c, x) = s · (w_c / ‖w_c‖)ᵀ (x / ‖x‖)

    Example:
        >>> h = CosineHead(2, out_dim=2, scale=10.0); h.weight.data = torch.eye(2)
        >>> h(torch.tensor([[3.0, 0.0]])).tolist()
        [[10.0, 0.0]]
    """

    def __init__(self, in_dim: int, *, out_dim: int | None = None, scale: float = 16.0):
        super().__init__()
        if out_dim is None or out_dim < 1:
            raise ConfigError(f"cosine head needs out_dim >= 1 (the number of classes), got {out_dim}")
        if not scale > 0:
            raise ConfigError(f"cosine head needs scale > 0, got {scale}")
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight, std=0.02)
        self.scale, self.out_dim = float(scale), out_dim

    def forward(self, x):
        return self.scale * F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).t()


@HEADS.register("gcr")
class GrassmannHead(nn.Module):
    """GCR Grassmann class subspaces: logit = γ‖S_cᵀx̂‖, bases trained by Riemannian SGD (Zhang et al. 2023).

    Grassmann Class Representation, Zhang et al., ICCV 2023, "Get the Best of Both Worlds: Improving
    Accuracy and Transferability by Grassmann Class Representation".

    Class c is a k-dimensional subspace of the feature space with an orthonormal basis S_c ∈ R^{d×k}
    (a point on the Grassmann manifold); the logit is the scaled norm of the normalised feature's
    projection onto it:

        logit_c = γ · ‖S_cᵀ x̂‖,   x̂ = x / ‖x‖,   S_cᵀ S_c = I_k          (defaults γ = 25, k = 8)

    k = 1 gives γ·|s_cᵀx̂|, a cosine classifier that ignores the sign. The bases are *not* trained by the
    Euclidean optimiser: `manifold_parameters` names them, and `visrep.train.riemannian.RiemannianSGD`
    (run beside AdamW/SGD by the training loop, without weight decay) keeps them orthonormal.

    Example:
        >>> h = GrassmannHead(3, out_dim=2, k=1, gamma=25.0)
        >>> h.bases.data = torch.tensor([[[1.0], [0.0], [0.0]], [[0.0], [1.0], [0.0]]])
        >>> h(torch.tensor([[0.0, -2.0, 0.0]])).tolist()
        [[0.0, 25.0]]
    """

    manifold_parameters = ("bases",)  # trained by Riemannian SGD on the Grassmann manifold

    def __init__(self, in_dim: int, *, out_dim: int | None = None, k: int = 8, gamma: float = 25.0):
        super().__init__()
        if out_dim is None or out_dim < 1:
            raise ConfigError(f"gcr head needs out_dim >= 1 (the number of classes), got {out_dim}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= in_dim:
            raise ConfigError(f"gcr head needs an integer k in [1, {in_dim}] (the feature size), got {k!r}")
        if not gamma > 0:
            raise ConfigError(f"gcr head needs gamma > 0, got {gamma}")
        # Random orthonormal bases: QR of a Gaussian matrix (uniform on the Grassmannian).
        q, _ = torch.linalg.qr(torch.randn(out_dim, in_dim, k))
        self.bases = nn.Parameter(q.contiguous())            # [C, d, k]
        self.k, self.gamma, self.out_dim = k, float(gamma), out_dim

    def forward(self, x):
        x = F.normalize(x, dim=-1)
        proj = torch.einsum("bd,cdk->bck", x, self.bases.to(x.dtype))   # S_cᵀ x̂ for every class
        return self.gamma * torch.linalg.vector_norm(proj, dim=-1)


# Heads whose out_dim defaults to the number of classes (or regression targets) of the training data.
CLASSIFIER_HEADS = (LinearHead, CosineHead, GrassmannHead)


def classifier_head_names() -> list[str]:
    """The registered heads that are classifiers (the `classifier:` section's types)."""
    return [n for n in HEADS.names() if HEADS.get(n) in CLASSIFIER_HEADS]


def check_head_spec(spec: dict | None, where: str = "head"):
    """Validate a head's config dict; returns (class, options) or None for no head."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping with a 'type' or null, got {spec!r}")
    spec = dict(spec)
    kind = spec.pop("type", "mlp")
    if kind in ("none", None):
        return None
    cls = HEADS.get(kind)
    valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "in_dim")]
    bad = [k for k in spec if k not in valid]
    if bad:
        raise ConfigError(f"unknown option '{bad[0]}' for {where} '{kind}'; valid options: {', '.join(valid)}")
    return cls, spec


def build_head(spec: dict | None, in_dim: int, num_classes: int | None = None) -> nn.Module | None:
    """Build a head from its config dict; None or {"type": "none"} gives no head.

    A classifier head without `out_dim` gets `num_classes` (the training dataset's).
    """
    checked = check_head_spec(spec)
    if checked is None:
        return None
    cls, options = checked
    if cls in CLASSIFIER_HEADS and options.get("out_dim") is None:
        options["out_dim"] = num_classes
    try:
        return cls(in_dim, **options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad option for head '{spec.get('type', 'mlp')}': {e}") from None
