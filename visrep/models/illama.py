"""iLLaMA: a LLaMA decoder as a vision backbone (Wang et al. 2024, "Adapting LLaMA Decoder to Vision Transformer").

    image ─► 16x16 patches ─► [x_1 … x_L, cls] + learned position embedding ─► N × Block ─► RMSNorm ─► cls (last)

    Block(x):  h = x + DropPath(Attn(RMSNorm(x)));  out = h + DropPath(SwiGLU(RMSNorm(h)))
    RMSNorm:   y = x / sqrt(mean(x²) + ε) · g                         (Zhang & Sennrich 2019; torch's)
    SwiGLU:    y = W2 (SiLU(W1 x) ⊙ W3 x), no biases, hidden = 8d/3   (Shazeer 2020; LLaMA; timm's layer)
    Attn:      A v with RoPE on q and k, biases on the q/k/v and output projections, A the (soft) causal
               attention below
    RoPE:      rotate each pair (x_i, x_{i+d_h/2}) of q and k by angle m·θ_i, θ_i = base^(−2i/d_h)
               (Su et al. 2021), so q_mᵀ k_n depends only on m − n. 1-D over the raster order as in the
               paper (the class token takes position L); `rope: 2d` rotates half the pairs by the row
               and half by the column index (axial; the class token is not rotated).

Post-sequence class token: the class token is appended AFTER the patches and read from the last
position, so under the causal mask it is the one token that sees every patch (the paper's fix for
the attention collapse of a leading class token).

Soft mask (the paper's §3.4): early in training the causal mask is blended with bidirectional attention,
with a ratio r ∈ [0, 1] (r = 1: bidirectional). Two forms, `soft_mask_form`:

    official      A = softmax(q kᵀ/√d_h) ⊙ (r·1 + (1 − r)·tril)         (the official code; the default)
    renormalised  A = softmax(q kᵀ/√d_h + M),  M_ij = 0 for j ≤ i, log r for j > i

The official form scales the future keys' weights by r AFTER normalising over all keys, so a row's weights
sum to less than 1, and at r = 0 every query still divides by its future keys' exp-scores: the official
"causal" attention is softmax over all keys with the future weights then zeroed. The renormalised form scales
the future keys' unnormalised weights by r, so rows sum to 1 and r = 0 is exact causal attention, which runs
on the fused kernel (`scaled_dot_product_attention(is_causal=True)`). Both equal bidirectional attention at
r = 1. The official form is computed explicitly ([N, N] scores per head); the renormalised one through
`scaled_dot_product_attention` with one [N, N] mask per forward shared by every block, head and image.

Schedule (the official `mask_scheduler`): with n = soft_mask_epochs × steps per epoch early steps,
`linear` gives r_i = soft_mask_ratio · (1 − i/(n − 1)) at step i < n (numpy's linspace from the ratio to 0),
`constant` keeps r = soft_mask_ratio, and r = 0 from step n on; `none` is r = 0 from the first step. The current
r is a buffer, so a checkpoint evaluates with the attention it was trained with.

Official recipes per size (ImageNet-1k, 300 epochs), the defaults of `build_illama`: tiny `constant` for 50
epochs and no drop path; small `linear` for 50 epochs, drop path 0.1; base `linear` for 25 epochs, drop path
0.4 (stochastic depth rising linearly over the blocks from 0).

Sizes (d/depth/heads): tiny 192/12/3, small 384/12/6, base 768/12/12; at 224 px, patch 16 and a
1000-class head they have exactly the official 5,701,096 / 22,018,024 / 86,502,376 parameters (paper:
5.7M / 21.9M / 86.3M): the learned absolute position embedding on top of RoPE and the attention biases are
the official model's. For another patch grid (multi-crop's small crops) the learned patch positions are
resampled bicubically, as DINO does for ViTs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from visrep.errors import ConfigError

SOFT_MASKS = ("none", "constant", "linear")
SOFT_MASK_FORMS = ("official", "renormalised")
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


def official_soft_mask(n: int, ratio: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """The multiplicative [n, n] mask of the official form: r·1 + (1 − r)·tril (1 on and below the diagonal)."""
    tril = torch.ones(n, n, device=device, dtype=dtype).tril()
    return ratio + (1.0 - ratio) * tril


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: tuple) -> torch.Tensor:
    """Attention of q, k, v [B, H, N, d_h] under `mode`, one of the two soft-mask forms (module docstring):
    ("multiply", M): softmax(q kᵀ/√d_h) ⊙ M, then · v (official; M from `official_soft_mask`), or
    ("sdpa", additive mask or None, is_causal): `scaled_dot_product_attention` (renormalised, bidirectional)."""
    if mode[0] == "multiply":
        weights = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1) * mode[1]
        return weights @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mode[1], is_causal=mode[2])


class Attention(nn.Module):
    """Multi-head attention with RoPE, biases on the q/k/v and output projections (official iLLaMA)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"illama dim {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope, mode):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = attend(apply_rope(q, rope), apply_rope(k, rope), v, mode)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, qkv_bias: bool = True, drop_path: float = 0.0):
        from timm.layers import DropPath

        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, hidden)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, rope, mode=("sdpa", None, True)):
        x = x + self.drop_path(self.attn(self.norm1(x), rope, mode))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ILLaMA(nn.Module):
    """iLLaMA backbone; `forward` returns the normalised class token [B, dim] (or logits if num_classes > 0)."""

    def __init__(self, *, dim: int = 192, depth: int = 12, heads: int = 3, patch_size: int = 16, image_size: int = 224,
                 num_classes: int = 0, mlp_hidden: int | None = None, rope: str = "1d", rope_base: float = 10000.0,
                 soft_mask: str = "linear", soft_mask_ratio: float = 1.0, soft_mask_epochs: float = 25.0,
                 soft_mask_form: str = "official", pos_embed: str = "learned", qkv_bias: bool = True,
                 drop_path: float = 0.0):
        super().__init__()
        if image_size % patch_size:
            raise ConfigError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if rope not in ROPES:
            raise ConfigError(f"illama option rope must be one of {', '.join(ROPES)}, got {rope!r}")
        if soft_mask not in SOFT_MASKS:
            raise ConfigError(f"illama option soft_mask must be one of {', '.join(SOFT_MASKS)}, got {soft_mask!r}")
        if soft_mask_form not in SOFT_MASK_FORMS:
            raise ConfigError(f"illama option soft_mask_form must be one of {', '.join(SOFT_MASK_FORMS)}, got "
                              f"{soft_mask_form!r}")
        if pos_embed not in ("learned", "none"):
            raise ConfigError(f"illama option pos_embed must be learned or none, got {pos_embed!r}")
        if not 0.0 <= drop_path < 1.0:
            raise ConfigError(f"illama option drop_path must be in [0, 1), got {drop_path}")
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
        self.soft_mask_form = soft_mask_form
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        n_patches = (image_size // patch_size) ** 2
        # Learned absolute positions of [patches..., cls] on top of RoPE, as in the official model.
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, dim)) if pos_embed == "learned" else None
        rates = torch.linspace(0, drop_path, depth).tolist()  # stochastic depth rising over the blocks
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, qkv_bias, rates[i]) for i in range(depth))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        # r of the soft mask; 0 = causal. A buffer so a checkpoint keeps the attention it was trained with.
        self.register_buffer("soft_mask_current", torch.tensor(0.0))
        self.apply(self._init)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # timm's hooks for layer-wise lr decay (`timm.optim.param_groups_layer_decay`) and weight decay.
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def no_weight_decay(self) -> set:
        return {"cls_token", "pos_embed"}

    # -------------------------------------------------------------- soft-mask schedule
    def ratio_at(self, step: int, steps_per_epoch: int) -> float:
        """r at a step under this backbone's schedule (the official per-iteration `mask_scheduler`)."""
        n = round(self.soft_mask_epochs * steps_per_epoch)  # early steps
        if self.soft_mask == "none" or step >= n:
            return 0.0
        if self.soft_mask == "constant" or n == 1:
            return self.soft_mask_start
        return self.soft_mask_start * (1.0 - step / (n - 1))

    def set_progress(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        """Called by the training loop before every step."""
        self.soft_mask_current.fill_(self.ratio_at(step, max(steps_per_epoch, 1)))

    # -------------------------------------------------------------- forward
    def _positions(self, h: int, w: int, device) -> torch.Tensor:
        """[L + 1, P] integer positions of the patches (raster order) and the class token."""
        if self.rope == "1d":
            return torch.arange(h * w + 1, device=device).unsqueeze(-1)
        rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        pos = torch.stack([rows.flatten(), cols.flatten()], dim=-1)
        return torch.cat([pos, torch.zeros(1, 2, dtype=pos.dtype, device=device)])  # class token: no rotation

    def _patch_positions(self, h: int, w: int) -> torch.Tensor:
        """The learned patch positions [1, h·w, D]; for another grid (multi-crop's small crops, another image size)
        resampled bicubically from the built one (timm's `resample_abs_pos_embed`, as DINO interpolates)."""
        from timm.layers import resample_abs_pos_embed

        pos = self.pos_embed[:, :-1]
        side = self.image_size // self.patch_size
        if (h, w) == (side, side):
            return pos
        return resample_abs_pos_embed(pos, new_size=[h, w], old_size=[side, side], num_prefix_tokens=0)

    def _attention_mode(self, n: int, device, dtype):
        """How every block attends in this forward; one mask tensor per forward, shared by all blocks."""
        r = float(self.soft_mask_current)
        if r >= 1.0:
            return ("sdpa", None, False)                                # bidirectional (both forms)
        if self.soft_mask_form == "official":
            return ("multiply", official_soft_mask(n, r, device, dtype))
        if r <= 0.0:
            return ("sdpa", None, True)                                 # fused causal kernel, no mask tensor
        return ("sdpa", soft_causal_mask(n, r, device, dtype), False)

    def _tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None):
        """The block input [B, n + 1, D] (patches, then the class token), its RoPE cos/sin and the attention mode.

        mask [B, L] (True = masked): without `mask_token` only the visible patches enter (MAE; they keep
        their own positions); with it the masked patches are replaced by the token (SimMIM).
        """
        t = self.patch_embed(x)
        B, D, h, w = t.shape
        t = t.flatten(2).transpose(1, 2)
        pos = self._positions(h, w, t.device)
        angles = rope_angles(pos, self.head_dim, self.rope_base)  # [L + 1, d_h/2]
        cls = self.cls_token.to(t.dtype).expand(B, -1, -1)
        if mask is not None and mask_token is not None:
            t = torch.where(mask.unsqueeze(-1), mask_token.to(t.dtype).view(1, 1, D), t)
        if self.pos_embed is not None:  # before dropping patches, so the visible ones keep their positions
            t = t + self._patch_positions(h, w).to(t.dtype)
            cls = cls + self.pos_embed[:, -1:].to(t.dtype)
        if mask is not None and mask_token is None:
            keep = ~mask
            t = t[keep].view(B, -1, D)
            patch_angles = angles[:-1].unsqueeze(0).expand(B, -1, -1)[keep].view(B, -1, angles.shape[-1])
            angles = torch.cat([patch_angles, angles[-1:].unsqueeze(0).expand(B, -1, -1)], dim=1).unsqueeze(1)
        t = torch.cat([t, cls], dim=1)
        mode = self._attention_mode(t.shape[1], t.device, t.dtype)
        return t, rope_cos_sin(angles, t.dtype), mode  # RoPE once per forward, shared by every block

    def forward_masked(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                       mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch tokens [B, n, D], class token [B, D]), both after the final norm; `mask` as in `_tokens`."""
        t, rope, mode = self._tokens(x, mask, mask_token)
        for blk in self.blocks:
            t = blk(t, rope, mode)
        t = self.norm(t)
        return t[:, :-1], t[:, -1]

    def forward_intermediates(self, x: torch.Tensor, indices: list[int], output_fmt: str = "NLC",
                              intermediates_only: bool = True, norm: bool = False,
                              stop_early: bool = True) -> list[torch.Tensor]:
        """The patch tokens [B, n, D] after each block in `indices` (0-based; the class token dropped), as timm's
        ViT `forward_intermediates(..., output_fmt="NLC", intermediates_only=True)` gives them (Faceptor's
        Layer-Attention reads several levels). Blocks after the last index are never run (`stop_early` is accepted
        for timm's signature)."""
        if output_fmt != "NLC" or not intermediates_only:
            raise ValueError("iLLaMA's forward_intermediates returns NLC patch tokens only")
        depth = len(self.blocks)
        want = sorted({i % depth for i in indices})
        t, rope, mode = self._tokens(x)
        out = {}
        for i, blk in enumerate(self.blocks[:want[-1] + 1]):
            t = blk(t, rope, mode)
            if i in want:
                out[i] = self.norm(t)[:, :-1] if norm else t[:, :-1]
        return [out[i % depth] for i in indices]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        patches, cls = self.forward_masked(x)
        return torch.cat([patches, cls.unsqueeze(1)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_masked(x)[1])


ILLAMA_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}
# The official ImageNet-1k scripts (scripts/train_illama_*_in1k.sh): soft-mask schedule and drop path per size.
ILLAMA_RECIPES = {"tiny": dict(soft_mask="constant", soft_mask_epochs=50.0, drop_path=0.0),
                  "small": dict(soft_mask="linear", soft_mask_epochs=50.0, drop_path=0.1),
                  "base": dict(soft_mask="linear", soft_mask_epochs=25.0, drop_path=0.4)}


def build_illama(size: str, **options) -> ILLaMA:
    dim, depth, heads = ILLAMA_SIZES[size]
    # depth, schedule etc. may be overridden
    return ILLaMA(**{"dim": dim, "depth": depth, "heads": heads, **ILLAMA_RECIPES[size], **options})
