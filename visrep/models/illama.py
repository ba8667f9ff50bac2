"""iLLaMA: a LLaMA decoder as a vision backbone (Wang et al. 2024, "Adapting LLaMA Decoder to Vision Transformer").

    image ─► 16x16 patches ─► [x_1 … x_L, cls] ─► N × Block ─► RMSNorm ─► cls (last position)

    Block(x):  h = x + Attn(RMSNorm(x));  out = h + SwiGLU(RMSNorm(h))
    RMSNorm:   y = x / sqrt(mean(x²) + ε) · g                         (Zhang & Sennrich 2019; torch's)
    SwiGLU:    y = W2 (SiLU(W1 x) ⊙ W3 x), no biases, hidden = 8d/3   (Shazeer 2020; LLaMA; timm's layer)
    Attn:      softmax(q kᵀ/√d_h + M) v with RoPE on q and k, no biases, causal mask M
    RoPE:      rotate each pair (x_i, x_{i+d_h/2}) of q and k by angle m·θ_i, θ_i = base^(−2i/d_h)
               (Su et al. 2021), so q_mᵀ k_n depends only on m − n. 1-D over the raster order as in the
               paper (the class token takes position L); `rope: 2d` rotates half the pairs by the row
               and half by the column index (axial; the class token is not rotated).

Post-sequence class token: the class token is appended AFTER the patches and read from the last
position, so under the causal mask it is the one token that sees every patch (the paper's fix for
the attention collapse of a leading class token).

Soft mask (the paper's §3.4): early in training the causal mask is blended with bidirectional attention.
With ratio r ∈ [0, 1] the unnormalised attention weight of every future key (j > i) is multiplied by r:

    M_ij = 0 for j ≤ i,   M_ij = log r for j > i        (r = 1: bidirectional, r = 0: causal)

`soft_mask: linear` lowers r linearly from `soft_mask_ratio` to 0 at epoch `soft_mask_epochs`;
`constant` keeps r = `soft_mask_ratio` until then; `none` is causal from the first step. Once r = 0 the
attention uses the fused causal kernel (`scaled_dot_product_attention(is_causal=True)`); before that one
[N, N] mask is built per forward and shared by every block, head and image. The current r is a buffer,
so a checkpoint evaluates with the attention it was trained with.

Sizes (d/depth/heads): tiny 192/12/3, small 384/12/6, base 768/12/12; at 224 px, patch 16 and a
1000-class head they have 5.65M / 21.92M / 86.31M parameters (paper: 5.7M / 21.9M / 86.3M).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from visrep.errors import ConfigError

SOFT_MASKS = ("none", "constant", "linear")
ROPES = ("1d", "2d")


def RMSNorm(dim: int) -> nn.Module:
    """y = x / sqrt(mean(x²) + ε) · g (Zhang & Sennrich 2019): torch's nn.RMSNorm, ε = 1e-6 as in LLaMA."""
    return nn.RMSNorm(dim, eps=1e-6)


def SwiGLU(dim: int, hidden: int) -> nn.Module:
    """W2 (SiLU(W1 x) ⊙ W3 x) without biases (Shazeer 2020, as in LLaMA): timm's SwiGLU layer
    (fc1_g = W1, fc1_x = W3, fc2 = W2)."""
    from timm.layers import SwiGLU as _SwiGLU

    return _SwiGLU(dim, hidden, bias=False)


def rope_angles(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Angles m·θ_i for integer positions [..., P] -> [..., P·head_dim/2].

    1-D: positions [..., 1] (P=1), θ_i = base^(−2i/d_h), i < d_h/2.
    2-D axial: positions [..., 2] (row, col); each axis gets d_h/4 frequencies base^(−2i/(d_h/2)).
    """
    n_axes = positions.shape[-1]
    per_axis = head_dim // (2 * n_axes)
    theta = base ** (-torch.arange(per_axis, dtype=torch.float32, device=positions.device) * 2 * n_axes / head_dim)
    ang = positions.float().unsqueeze(-1) * theta  # [..., P, per_axis]
    return ang.flatten(-2)


def rope_cos_sin(angles: torch.Tensor, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of [..., d_h/2] angles, each repeated to [..., d_h]: computed once per forward."""
    full = torch.cat([angles, angles], dim=-1)
    return full.cos().to(dtype), full.sin().to(dtype)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate the pairs (x_i, x_{i+d/2}) of the last dim by angle_i (broadcast over heads):

        [x_i, x_{i+d/2}] -> [x_i cos − x_{i+d/2} sin, x_i sin + x_{i+d/2} cos]   (Su et al. 2021, eq. 13)

    the half-split pairing of GPT-NeoX / Hugging Face LLaMA (the paper's pairs (2i, 2i+1) up to a fixed
    permutation of the channels, which the learned q/k projections absorb): x·cos + rotate_half(x)·sin.
    """
    cos, sin = rope
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def soft_causal_mask(n: int, ratio: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """The additive [n, n] soft mask: 0 on and below the diagonal, log(ratio) above it (−inf at ratio 0)."""
    future = torch.ones(n, n, dtype=torch.bool, device=device).triu(1)
    value = math.log(ratio) if ratio > 0 else float("-inf")
    return torch.zeros(n, n, dtype=dtype, device=device).masked_fill(future, value)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"illama dim {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, rope, attn_mask, is_causal):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x, rope, attn_mask=None, is_causal=True):
        x = x + self.attn(self.norm1(x), rope, attn_mask, is_causal)
        return x + self.mlp(self.norm2(x))


class ILLaMA(nn.Module):
    """iLLaMA backbone; `forward` returns the normalised class token [B, dim] (or logits if num_classes > 0)."""

    def __init__(self, *, dim: int = 192, depth: int = 12, heads: int = 3, patch_size: int = 16, image_size: int = 224,
                 num_classes: int = 0, mlp_hidden: int | None = None, rope: str = "1d", rope_base: float = 10000.0,
                 soft_mask: str = "linear", soft_mask_ratio: float = 1.0, soft_mask_epochs: float = 25.0):
        super().__init__()
        if image_size % patch_size:
            raise ConfigError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if rope not in ROPES:
            raise ConfigError(f"illama option rope must be one of {', '.join(ROPES)}, got {rope!r}")
        if soft_mask not in SOFT_MASKS:
            raise ConfigError(f"illama option soft_mask must be one of {', '.join(SOFT_MASKS)}, got {soft_mask!r}")
        if not 0.0 <= soft_mask_ratio <= 1.0:
            raise ConfigError(f"illama option soft_mask_ratio must be in [0, 1], got {soft_mask_ratio}")
        if soft_mask_epochs < 0:
            raise ConfigError(f"illama option soft_mask_epochs must be >= 0, got {soft_mask_epochs}")
        head_dim = dim // heads
        if head_dim % (4 if rope == "2d" else 2):
            raise ConfigError(f"illama head dim {head_dim} must be divisible by {4 if rope == '2d' else 2} for "
                              f"{rope} RoPE")
        hidden = mlp_hidden or int(round(8 * dim / 3))
        self.patch_size, self.image_size, self.num_features, self.embed_dim = patch_size, image_size, dim, dim
        self.rope, self.rope_base, self.head_dim = rope, rope_base, head_dim
        self.soft_mask, self.soft_mask_start, self.soft_mask_epochs = soft_mask, soft_mask_ratio, soft_mask_epochs
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, hidden) for _ in range(depth))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        # r of the soft mask; 0 = causal. A buffer so a checkpoint keeps the attention it was trained with.
        self.register_buffer("soft_mask_current", torch.tensor(0.0))
        self.apply(self._init)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # timm's hooks for layer-wise lr decay (`timm.optim.param_groups_layer_decay`) and weight decay.
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|^patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def no_weight_decay(self) -> set:
        return {"cls_token"}

    # -------------------------------------------------------------- soft-mask schedule
    def ratio_at(self, epoch: float) -> float:
        """r at a (fractional) epoch under this backbone's schedule."""
        if self.soft_mask == "none" or epoch >= self.soft_mask_epochs:
            return 0.0
        if self.soft_mask == "constant":
            return self.soft_mask_start
        return self.soft_mask_start * (1.0 - epoch / self.soft_mask_epochs)

    def set_progress(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        """Called by the training loop before every step."""
        self.soft_mask_current.fill_(self.ratio_at(step / max(steps_per_epoch, 1)))

    # -------------------------------------------------------------- forward
    def _positions(self, h: int, w: int, device) -> torch.Tensor:
        """[L + 1, P] integer positions of the patches (raster order) and the class token."""
        if self.rope == "1d":
            return torch.arange(h * w + 1, device=device).unsqueeze(-1)
        rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        pos = torch.stack([rows.flatten(), cols.flatten()], dim=-1)
        return torch.cat([pos, torch.zeros(1, 2, dtype=pos.dtype, device=device)])  # class token: no rotation

    def _attention_mode(self, n: int, device, dtype):
        r = float(self.soft_mask_current)
        if r <= 0.0:
            return None, True                      # fused causal kernel, no mask tensor
        if r >= 1.0:
            return None, False                     # bidirectional
        return soft_causal_mask(n, r, device, dtype), False  # one mask per forward, shared by all blocks

    def forward_masked(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                       mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch tokens [B, n, D], class token [B, D]), both after the final norm.

        mask [B, L] (True = masked): without `mask_token` only the visible patches enter (MAE; they keep
        their own positions); with it the masked patches are replaced by the token (SimMIM).
        """
        t = self.patch_embed(x)
        B, D, h, w = t.shape
        t = t.flatten(2).transpose(1, 2)
        pos = self._positions(h, w, t.device)
        angles = rope_angles(pos, self.head_dim, self.rope_base)  # [L + 1, d_h/2]
        if mask is not None and mask_token is not None:
            t = torch.where(mask.unsqueeze(-1), mask_token.to(t.dtype).view(1, 1, D), t)
        elif mask is not None:
            keep = ~mask
            t = t[keep].view(B, -1, D)
            patch_angles = angles[:-1].unsqueeze(0).expand(B, -1, -1)[keep].view(B, -1, angles.shape[-1])
            angles = torch.cat([patch_angles, angles[-1:].unsqueeze(0).expand(B, -1, -1)], dim=1).unsqueeze(1)
        t = torch.cat([t, self.cls_token.to(t.dtype).expand(B, -1, -1)], dim=1)
        attn_mask, is_causal = self._attention_mode(t.shape[1], t.device, t.dtype)
        rope = rope_cos_sin(angles, t.dtype)  # once per forward, shared by every block
        for blk in self.blocks:
            t = blk(t, rope, attn_mask, is_causal)
        t = self.norm(t)
        return t[:, :-1], t[:, -1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        patches, cls = self.forward_masked(x)
        return torch.cat([patches, cls.unsqueeze(1)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_masked(x)[1])


ILLAMA_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}


def build_illama(size: str, **options) -> ILLaMA:
    dim, depth, heads = ILLAMA_SIZES[size]
    return ILLaMA(**{"dim": dim, "depth": depth, "heads": heads, **options})  # depth etc. may be overridden
