"""Decoders: heads on the encoder's patch tokens that predict one vector per patch.

Config (the `decoder:` and `loss_predictor:` sections):

    {type: mae, dim: 512, depth: 8, heads: 16}     MAE's asymmetric decoder (He et al. 2022)
    {type: linear}                                  SimMIM's one-layer prediction head (Xie et al. 2022)

`out_dim` defaults to the pixels of one patch (p·p·3), for a loss predictor too (official HPM: its p·p·3
outputs per patch are averaged into one score; `out_dim: 1` predicts the score directly).
A decoder is called as `decoder(tokens, mask, grid, cls)`: `tokens` are the encoder's patch tokens, only
the visible ones when the encoder dropped the masked patches (mask given and `mode: drop`), all L
otherwise; `cls` the encoder's class token [B, D]. It returns [B, L, out_dim] in raster order.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from visrep.errors import ConfigError
from visrep.models.masked import sincos_2d
from visrep.registry import Registry

DECODERS = Registry("decoder")


@DECODERS.register("mae")
class MAEDecoder(nn.Module):
    """MAE's decoder: Linear to `dim`, mask tokens at the masked positions, fixed 2-D sin-cos positions,
    `depth` pre-norm Transformer blocks (timm), LayerNorm, Linear to `out_dim` (He et al. 2022, §3).

    The decoder is light on purpose (MAE: 8 blocks of 512 for ViT-L; one block still works, Table 1a):
    its cost falls on all L tokens while the encoder sees only the visible quarter.

    As in the official MAE and HPM code (the defaults): the encoder's class token enters the decoder too
    (`cls_token`, position 0 of the table), Linear layers start from xavier-uniform with zero biases and the
    LayerNorms use ε = 1e-6 (`init: xavier`, `norm_eps`); `init: torch` keeps PyTorch's defaults.

    `share_input` (HPM's loss predictor): this decoder has no input layers of its own; it reads the embedded
    tokens of the reconstruction decoder (its Linear, mask token and positions: `embed_input`), as the official
    HPM code's loss predictor shares `decoder_embed`, `mask_token` and `decoder_pos_embed`. The template wires it.
    """

    kind = "mae"

    def __init__(self, in_dim: int, *, out_dim: int, dim: int = 512, depth: int = 8, heads: int = 16,
                 mlp_ratio: float = 4.0, cls_token: bool = True, init: str = "xavier", norm_eps: float = 1e-6,
                 share_input: bool = False):
        super().__init__()
        from functools import partial

        from timm.models.vision_transformer import Block

        if min(dim, heads, out_dim) < 1 or depth < 0:
            raise ConfigError(f"decoder needs dim, heads, out_dim >= 1 and depth >= 0, got dim={dim}, heads={heads}, "
                              f"out_dim={out_dim}, depth={depth}")
        if dim % heads:
            raise ConfigError(f"decoder dim {dim} is not divisible by {heads} heads")
        if init not in ("xavier", "torch"):
            raise ConfigError(f"decoder init must be xavier or torch, got {init!r}")
        norm = partial(nn.LayerNorm, eps=norm_eps)
        self.share_input, self.cls_token = bool(share_input), bool(cls_token)
        if not share_input:
            self.embed = nn.Linear(in_dim, dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
                                      for _ in range(depth)])
        self.norm = norm(dim)
        self.pred = nn.Linear(dim, out_dim)
        self.dim, self.out_dim = dim, out_dim
        if init == "xavier":
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        if not share_input:
            nn.init.normal_(self.mask_token, std=0.02)
        self._pos_cache: dict = {}

    def _pos(self, grid, device, dtype) -> torch.Tensor:
        key = (tuple(grid), device, dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_2d(self.dim, *grid).to(device=device, dtype=dtype).unsqueeze(0)
        return self._pos_cache[key]

    def embed_input(self, tokens: torch.Tensor, mask: torch.Tensor | None, grid: tuple[int, int],
                    cls: torch.Tensor | None = None) -> torch.Tensor:
        """[B, (1 +) L, dim]: the embedded tokens in raster order, mask tokens at the masked positions, plus the
        positions; the embedded class token first (position zeros) when `cls_token` and `cls` [B, D] is given."""
        if self.share_input:
            raise ConfigError("a decoder with share_input reads another decoder's input; it is not called alone")
        x = self.embed(tokens)
        B, L = x.shape[0], grid[0] * grid[1]
        if x.shape[1] != L:  # visible tokens only: put them back in place, mask tokens elsewhere
            if mask is None:
                raise ValueError("the decoder got fewer tokens than patches but no mask")
            visible = (~mask).unsqueeze(-1)
            full = torch.zeros(B, L, self.dim, dtype=x.dtype, device=x.device).masked_scatter(visible, x)
            x = torch.where(visible, full, self.mask_token.to(x.dtype))
        x = x + self._pos(grid, x.device, x.dtype)
        if self.cls_token and cls is not None:
            x = torch.cat([self.embed(cls).unsqueeze(1), x], dim=1)
        return x

    def head(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Blocks, norm and prediction on embedded tokens; [B, L, out_dim] for the patches (class token dropped)."""
        out = self.pred(self.norm(self.blocks(x)))
        return out[:, out.shape[1] - grid[0] * grid[1]:]

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None, grid: tuple[int, int],
                cls: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.embed_input(tokens, mask, grid, cls), grid)


@DECODERS.register("linear")
class LinearDecoder(nn.Module):
    """SimMIM's prediction head: one linear layer per token to the patch's pixels (Xie et al. 2022, §3.3).

    Needs every patch token, so it pairs with `masking.mode: token`.
    """

    kind = "linear"

    def __init__(self, in_dim: int, *, out_dim: int):
        super().__init__()
        self.pred = nn.Linear(in_dim, out_dim)
        self.out_dim = out_dim

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None, grid: tuple[int, int],
                cls: torch.Tensor | None = None) -> torch.Tensor:
        if tokens.shape[1] != grid[0] * grid[1]:
            raise ConfigError("decoder 'linear' needs every patch token: use masking.mode=token (SimMIM)")
        return self.pred(tokens)


def check_decoder_spec(spec: dict | None, where: str = "decoder"):
    if spec is None:
        return None
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"{where} must be a mapping with a 'type' ({', '.join(DECODERS.names())}) or null, "
                          f"got {spec!r}")
    opts = {k: v for k, v in spec.items() if k != "type"}
    cls = DECODERS.get(spec["type"])
    valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "in_dim")]
    bad = [k for k in opts if k not in valid]
    if bad:
        raise ConfigError(f"unknown option '{bad[0]}' for {where} '{spec['type']}'; valid options: {', '.join(valid)}")
    return cls, opts


def build_decoder(spec: dict | None, in_dim: int, out_dim: int, where: str = "decoder") -> nn.Module | None:
    checked = check_decoder_spec(spec, where)
    if checked is None:
        return None
    cls, opts = checked
    opts.setdefault("out_dim", out_dim)
    try:
        return cls(in_dim, **opts)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad option for {where} '{spec['type']}': {e}") from None
