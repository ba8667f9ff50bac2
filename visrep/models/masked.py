"""The masked forward of ViT-style backbones, and the pixel targets of masked image modelling.

    encode_masked(backbone, images, mask)                 MAE: only visible patches enter the encoder
    encode_masked(backbone, images, mask, mask_token)     SimMIM: masked patches are replaced by a token
    encode_masked(backbone, images)                       no mask (HPM's teacher, eval)

Works for timm VisionTransformer (our vit_* backbones; the position embedding is added before the
visible patches are gathered, so each keeps its own position) and for iLLaMA (which implements
`forward_masked`). Both return (patch tokens [B, n, D], pooled feature [B, D]).
"""
from __future__ import annotations

import torch
from torch import nn

from visrep.errors import ConfigError


def sincos_1d(dim: int, positions: torch.Tensor, temperature: float = 10000.0) -> torch.Tensor:
    """[P] -> [P, dim]: [sin(p·ω_k), cos(p·ω_k)], ω_k = T^(−k/(dim/2)), k < dim/2, T = 10000 (Vaswani et al. 2017)."""
    omega = 1.0 / temperature ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = positions.double().unsqueeze(1) * omega.unsqueeze(0)
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table [h·w, dim]: half the channels encode the row, half the column."""
    if dim % 4:
        raise ConfigError(f"2-D sin-cos position embedding needs a dim divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, rows.flatten()), sincos_1d(dim // 2, cols.flatten())], dim=1)


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p·p·C], patches in raster order, pixels as (row, col, channel) (MAE's layout)."""
    B, C, H, W = images.shape
    h, w = H // p, W // p
    x = images.reshape(B, C, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * w, p * p * C)


def unpatchify(patches: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `patchify`."""
    B = patches.shape[0]
    C = patches.shape[-1] // (p * p)
    x = patches.reshape(B, h, w, p, p, C)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, C, h * p, w * p)


def patch_size_of(backbone: nn.Module) -> int:
    if hasattr(backbone, "forward_masked"):
        return int(backbone.patch_size)
    pe = getattr(backbone, "patch_embed", None)
    if pe is None or not hasattr(pe, "patch_size"):
        raise ConfigError(f"masked image modelling needs a ViT-style backbone (vit_*, illama_*), not "
                          f"{type(backbone).__name__}")
    ps = pe.patch_size
    return int(ps[0] if isinstance(ps, (tuple, list)) else ps)


def embed_dim_of(backbone: nn.Module) -> int:
    return int(getattr(backbone, "embed_dim", getattr(backbone, "num_features")))


def encode_masked(backbone: nn.Module, images: torch.Tensor, mask: torch.Tensor | None = None,
                  mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(patch tokens after the final norm [B, n, D], pooled feature [B, D]); mask [B, L], True = masked."""
    if hasattr(backbone, "forward_masked"):
        return backbone.forward_masked(images, mask, mask_token)
    patch_size_of(backbone)  # a clear error for CNNs
    if not hasattr(backbone, "_pos_embed") or not hasattr(backbone, "blocks"):
        raise ConfigError(f"masked image modelling needs a timm VisionTransformer or iLLaMA, not "
                          f"{type(backbone).__name__}")
    x = backbone.patch_embed(images)  # [B, H, W, D] (dynamic size) or [B, L, D]
    B, D = x.shape[0], x.shape[-1]
    if mask is not None and mask_token is not None:
        m = mask.view(*x.shape[:-1], 1)
        x = torch.where(m, mask_token.to(x.dtype).reshape(*([1] * (x.ndim - 1)), D), x)
    x = backbone._pos_embed(x)  # prefix tokens + position embedding
    n_prefix = backbone.num_prefix_tokens
    if mask is not None and mask_token is None:
        visible = x[:, n_prefix:][~mask].view(B, -1, D)
        x = torch.cat([x[:, :n_prefix], visible], dim=1)
    x = backbone.patch_drop(x)
    x = backbone.norm_pre(x)
    x = backbone.blocks(x)
    x = backbone.norm(x)
    return x[:, n_prefix:], backbone.forward_head(x, pre_logits=True)
