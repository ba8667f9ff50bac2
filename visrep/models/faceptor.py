"""Faceptor's parts: one shared transformer decoder in which every face task is a set of queries, standardised
output heads shared by all tasks of one output shape, and Layer-Attention over several encoder levels.

Qin et al., "Faceptor: A Generalist Model for Face Perception", 2024 (official code: lxq1000/Faceptor). The
shapes and defaults below follow that code:

* **Layer-Attention memory.** Each chosen encoder level l (its patch tokens [B, N, D_enc], through the encoder's
  final norm so that levels of every depth share one scale) is projected to the
  decoder width d by its own Linear, and every token gets a position embedding
  pos = MLP(sine2d(grid centre)) + e_l, where e_l is the level's learned embedding and sine2d the 2-D sine
  embedding of the token's normalised grid centre (2π scale, temperature 10000, d/2 features per axis; sin and
  cos in blocks rather than interleaved, a permutation the MLP absorbs). The
  tokens of all levels are concatenated into the decoder's memory, so the cross-attention softmax weighs the
  levels per query and per task. Stage 1 reads the last level only; stage 2 adds earlier levels (new
  projections and level embeddings) for one target task and trains only those.
* **Decoder layer** (post-norm, dropout 0): with task queries x, their position embeddings q_pos, memory m and
  its position embeddings p:
      x ← LN(x + CrossAttn(q = x + q_pos, k = m + p, v = m))
      x ← LN(x + SelfAttn(q = k = x + q_pos, v = x))
      x ← LN(x + FFN(x)),   FFN = Linear(d, ffn)-ReLU-Linear(ffn, d)   (official: 9 layers, d 256, 8 heads, ffn 2048)
  Only the last layer's output is read.
* **Task queries.** Task t owns a query-feature table F_t [Q_t, d] (init N(0, 1)) and a query-position table
  P_t [Q_t, d] (init U(0, 1)): adding a task costs exactly 2·Q_t·d parameters.
* **Value head** (classification, multilabel, regression, age distribution): one Linear(d → 1) applied to every
  query of every value task (shared by all of them), giving [B, Q_t] outputs.
* **Map head** (landmarks): a pixel decoder upsamples the last level's projected tokens 4×
  (ConvTranspose 2×2/2 → channel LayerNorm → GELU → ConvTranspose 2×2/2), each query's MLP(d, d, d; 3 layers)
  embedding is dot-multiplied with every pixel feature into a heatmap [B, Q_t, 4h, 4w], and a point is the
  heatmap-weighted mean of the pixel centres after a sigmoid, in [0, 1] image coordinates (x + 0.5) / w.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from visrep.errors import ConfigError
from visrep.models.masked import patch_size_of, sincos_1d

__all__ = ["sine_2d", "encoder_levels", "LayerAttentionMemory", "DecoderLayer", "FaceptorDecoder", "TaskQueries",
           "ValueHead", "MapHead", "soft_argmax_points", "FaceptorHead", "NaiveTaskHeads"]


def sine_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """[h·w, dim] sine embedding of the normalised grid centres ((i + 0.5)/n, raster order): dim/2 features for
    y then dim/2 for x, each half [sin(2π·c/T^(2k/(dim/2)))…, cos(…)…] (DETR's / Faceptor's anchor embedding)."""
    if dim % 4:
        raise ConfigError(f"the decoder width must be a multiple of 4 for the 2-D sine embedding, got {dim}")
    half = dim // 2
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    # the 1-D sin-cos of the angle 2π·c: ω_k = T^(-k/(half/2)) = 1/T^(2k/half)
    ey, ex = sincos_1d(half, 2 * math.pi * ys, temperature), sincos_1d(half, 2 * math.pi * xs, temperature)
    return torch.cat([ey[:, None, :].expand(h, w, half), ex[None, :, :].expand(h, w, half)], dim=-1).reshape(h * w, dim)


def encoder_levels(backbone: nn.Module, x: torch.Tensor, levels: list[int]) -> tuple[list[torch.Tensor], tuple]:
    """The patch tokens [B, N, D] after each block in `levels` (0-based, negative from the end), each through the
    encoder's final norm, and the token grid (h, w): timm ViTs through their `forward_intermediates`, iLLaMA through
    its own of the same name."""
    if not hasattr(backbone, "forward_intermediates") or not hasattr(backbone, "patch_embed"):
        raise ConfigError(f"Faceptor reads the patch tokens of several encoder layers; backbone "
                          f"{type(backbone).__name__} has none (use a ViT or iLLaMA backbone)")
    wanted = _block_indices(levels, len(backbone.blocks), "encoder levels")
    ordered = sorted(wanted)  # timm returns the intermediates in block order, whatever order was asked
    # each level through the encoder's final norm (timm's `norm=True`): levels of different depths on one scale
    maps = backbone.forward_intermediates(x, indices=ordered, output_fmt="NLC", intermediates_only=True, norm=True,
                                          stop_early=True)  # the blocks after the deepest level are not run
    by_level = dict(zip(ordered, maps))
    p = patch_size_of(backbone)
    return [by_level[lv] for lv in wanted], (x.shape[-2] // p, x.shape[-1] // p)


class LayerAttentionMemory(nn.Module):
    """Projects each chosen encoder level to the decoder width and adds Faceptor's position embedding; the
    decoder's memory is every level's tokens, concatenated. `add_levels` is stage 2's extension."""

    def __init__(self, encoder_dim: int, dim: int, levels: list[int]):
        super().__init__()
        if not levels:
            raise ConfigError("Layer-Attention needs at least one encoder level")
        self.encoder_dim, self.dim = int(encoder_dim), int(dim)
        self.levels = [int(lv) for lv in levels]
        self.proj = nn.ModuleList(nn.Linear(encoder_dim, dim) for _ in self.levels)
        self.level_embed = nn.Parameter(torch.randn(len(self.levels), dim))
        self.adapt_pos = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))
        self.new_levels: list[int] = []
        self.new_proj = nn.ModuleList()
        self.new_level_embed = None
        for m in self.proj:
            _c2_xavier(m)

    def add_levels(self, levels: list[int]) -> None:
        """Stage 2: more encoder levels, each with a new projection and level embedding (the only new parameters)."""
        levels = [int(lv) for lv in levels]
        clash = sorted(set(levels) & set(self.levels + self.new_levels))
        if clash or len(set(levels)) != len(levels) or not levels:
            raise ConfigError(f"stage-2 levels must be new and distinct, got {levels} (already read: "
                              f"{self.levels + self.new_levels})")
        self.new_levels = levels
        self.new_proj = nn.ModuleList(nn.Linear(self.encoder_dim, self.dim) for _ in levels)
        for m in self.new_proj:
            _c2_xavier(m)
        self.new_level_embed = nn.Parameter(torch.randn(len(levels), self.dim).to(self.level_embed))

    @property
    def all_levels(self) -> list[int]:
        return self.levels + self.new_levels

    def _sine(self, grid: tuple, like: torch.Tensor) -> torch.Tensor:
        """The fixed sine table of a grid, built once per (grid, device, dtype) rather than every step."""
        key = (tuple(grid), like.device, like.dtype)
        cache = self.__dict__.setdefault("_sine_cache", {})
        if key not in cache:
            cache[key] = sine_2d(*grid, self.dim).to(like)
        return cache[key]

    def forward(self, maps: list[torch.Tensor], grid: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """maps: the tokens of `all_levels`, in that order. Returns (memory [B, L·N, d], its position embedding
        [1, L·N, d], the deepest stage-1 level's projected tokens [B, N, d] for the map head)."""
        projs = list(self.proj) + list(self.new_proj)
        embeds = self.level_embed if self.new_level_embed is None else torch.cat([self.level_embed,
                                                                                  self.new_level_embed])
        if len(maps) != len(projs):
            raise ValueError(f"expected {len(projs)} encoder levels, got {len(maps)}")
        base = self.adapt_pos(self._sine(grid, maps[0]))  # [N, d]
        tokens = [proj(m) for proj, m in zip(projs, maps)]
        pos = torch.cat([base + embeds[i] for i in range(len(tokens))]).unsqueeze(0)
        deepest = max(range(len(self.levels)), key=lambda i: self.levels[i])  # the map head reads the last block
        return torch.cat(tokens, dim=1), pos, tokens[deepest]


def _c2_xavier(m: nn.Linear) -> None:
    """Detectron2's c2_xavier_fill (Faceptor's input projections): kaiming-uniform with a = 1, zero bias."""
    nn.init.kaiming_uniform_(m.weight, a=1)
    nn.init.zeros_(m.bias)


class DecoderLayer(nn.Module):
    """Cross-attention to the memory, then self-attention among the queries, then FFN; post-norm (see module)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"decoder width {dim} must be divisible by its {heads} heads")
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Linear(ffn_dim, dim))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, query_pos, memory, memory_pos, need_weights: bool = False):
        a, w = self.cross(x + query_pos, memory + memory_pos, memory, need_weights=need_weights)
        x = self.norm1(x + a)
        q = x + query_pos
        x = self.norm2(x + self.self_attn(q, q, x, need_weights=False)[0])
        return self.norm3(x + self.ffn(x)), w


class FaceptorDecoder(nn.Module):
    """`depth` DecoderLayers shared by every task; returns the last layer's query features [B, Q, d] (and, with
    `return_attention`, the last layer's cross-attention weights [B, Q, L·N], averaged over heads)."""

    def __init__(self, dim: int = 256, depth: int = 9, heads: int = 8, ffn_dim: int = 2048):
        super().__init__()
        if depth < 1:
            raise ConfigError(f"decoder depth must be at least 1, got {depth}")
        self.dim, self.depth, self.heads, self.ffn_dim = int(dim), int(depth), int(heads), int(ffn_dim)
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, ffn_dim) for _ in range(depth))
        for p in self.parameters():  # official: N(0, 1/√fan_in) for every weight with two or more dimensions
            if p.dim() > 1:
                nn.init.normal_(p, std=1.0 / math.sqrt(p.shape[1]))

    def forward(self, queries, query_pos, memory, memory_pos, return_attention: bool = False):
        w = None
        for i, layer in enumerate(self.layers):
            queries, w = layer(queries, query_pos, memory, memory_pos,
                               need_weights=return_attention and i == len(self.layers) - 1)
        return (queries, w) if return_attention else queries


class TaskQueries(nn.Module):
    """One query-feature table [Q_t, d] (N(0, 1)) and one query-position table [Q_t, d] (U(0, 1)) per task."""

    def __init__(self, dim: int, counts: dict[str, int]):
        super().__init__()
        self.dim = int(dim)
        self.feat = nn.ParameterDict()
        self.pos = nn.ParameterDict()
        for name, q in counts.items():
            self.add(name, q)

    def add(self, name: str, count: int) -> None:
        if name in self.feat:
            raise ConfigError(f"task '{name}' is declared twice")
        if int(count) < 1:
            raise ConfigError(f"task '{name}' needs at least one query, got {count}")
        self.feat[name] = nn.Parameter(torch.randn(int(count), self.dim))
        self.pos[name] = nn.Parameter(torch.rand(int(count), self.dim))

    def forward(self, name: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.feat[name].unsqueeze(0).expand(batch, -1, -1),
                self.pos[name].unsqueeze(0).expand(batch, -1, -1))


class ValueHead(nn.Module):
    """One Linear(d → 1) on every query: [B, Q, d] → [B, Q] (shared by all value tasks, as in the official code)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, 1)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.fc(q).squeeze(-1)


class _ChannelNorm(nn.Module):
    """LayerNorm over the channels of [B, C, H, W] (eps 1e-6, the official Norm2d)."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.LayerNorm(c, eps=1e-6)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MapHead(nn.Module):
    """Pixel decoder (4× up) + per-query MLP embedding; `forward(queries, tokens, grid)` → heatmap logits
    [B, Q, 4h, 4w]."""

    def __init__(self, dim: int):
        super().__init__()
        self.pixel = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2), _ChannelNorm(dim), nn.GELU(),
                                   nn.ConvTranspose2d(dim, dim, 2, stride=2))
        self.embed = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim),
                                   nn.ReLU(inplace=True), nn.Linear(dim, dim))

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor, grid: tuple) -> torch.Tensor:
        b, n, d = tokens.shape
        pix = self.pixel(tokens.transpose(1, 2).reshape(b, d, *grid))
        return torch.einsum("bqc,bchw->bqhw", self.embed(queries), pix)


def soft_argmax_points(heatmap_logits: torch.Tensor) -> torch.Tensor:
    """[B, Q, H, W] logits → [B, Q, 2] points (x, y) in [0, 1]: the sigmoid heatmap's weighted mean of the pixel
    centres ((i + 0.5) / size), as Faceptor's `heatmap2points`.

        >>> logits = torch.full((1, 1, 4, 4), -30.0); logits[0, 0, 1, 3] = 30.0   # one hot pixel: row 1, col 3
        >>> soft_argmax_points(logits).tolist()
        [[[0.875, 0.375]]]
    """
    h, w = heatmap_logits.shape[-2:]
    p = torch.sigmoid(heatmap_logits.float())
    p = p / p.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    ys = (torch.arange(h, device=p.device, dtype=p.dtype) + 0.5) / h
    xs = (torch.arange(w, device=p.device, dtype=p.dtype) + 0.5) / w
    return torch.stack([(p.sum(-2) * xs).sum(-1), (p.sum(-1) * ys).sum(-1)], dim=-1)


VALUE_OUTPUTS = ("classification", "multilabel", "regression", "age_distribution")
MAP_OUTPUTS = ("landmarks",)


def _task_rows(tasks: dict, task_slices: dict | None, batch: int):
    """(task, output type, first row, end row) of every task with rows in the batch (all rows when no slices)."""
    for name, (output, _) in tasks.items():
        if task_slices is not None and name not in task_slices:
            continue
        lo, hi = task_slices[name] if task_slices is not None else (0, batch)
        if hi > lo:
            yield name, output, lo, hi


def _map_output(heatmaps: torch.Tensor) -> dict:
    return {"heatmaps": heatmaps, "points": soft_argmax_points(heatmaps)}


class FaceptorHead(nn.Module):
    """The whole Faceptor head on an encoder: Layer-Attention memory, the shared decoder, per-task queries, and one
    value head and one map head shared by the tasks of their output shape.

    tasks: {name: (output type, number of queries)}. `forward(backbone, x, task_slices)` decodes each task's rows
    (`task_slices[name] = (start, end)`; all rows when None) with that task's queries and returns
    {task: {"values": [b, Q]}} for value tasks and {task: {"heatmaps": [b, Q, 4h, 4w] logits, "points": [b, Q, 2]}}
    for landmarks (points in [0, 1] image coordinates, by soft-argmax).
    """

    # embeddings rather than weights: not weight-decayed (as visrep's other tokens and position embeddings)
    no_weight_decay_prefixes = ("queries.", "memory.level_embed", "memory.new_level_embed")

    def __init__(self, encoder_dim: int, tasks: dict[str, tuple[str, int]], dim: int = 256, depth: int = 9,
                 heads: int = 8, ffn_dim: int = 2048, levels: tuple = (-1,)):
        super().__init__()
        if not tasks:
            raise ConfigError("a Faceptor head needs at least one task")
        bad = {n: o for n, (o, _) in tasks.items() if o not in VALUE_OUTPUTS + MAP_OUTPUTS}
        if bad:
            raise ConfigError(f"unknown output type(s) {bad}; valid: {', '.join(VALUE_OUTPUTS + MAP_OUTPUTS)}")
        self.tasks = {n: (o, int(q)) for n, (o, q) in tasks.items()}
        self.memory = LayerAttentionMemory(encoder_dim, dim, list(levels))
        self.decoder = FaceptorDecoder(dim, depth, heads, ffn_dim)
        self.queries = TaskQueries(dim, {n: q for n, (_, q) in self.tasks.items()})
        self.value = ValueHead(dim) if any(o in VALUE_OUTPUTS for o, _ in self.tasks.values()) else None
        self.map = MapHead(dim) if any(o in MAP_OUTPUTS for o, _ in self.tasks.values()) else None

    def forward(self, backbone: nn.Module, x: torch.Tensor, task_slices: dict | None = None,
                return_attention: bool = False):
        maps, grid = encoder_levels(backbone, x, self.memory.all_levels)
        memory, pos, last = self.memory(maps, grid)
        out, attention = {}, {}
        for name, output, lo, hi in _task_rows(self.tasks, task_slices, x.shape[0]):
            qf, qp = self.queries(name, hi - lo)
            feats = self.decoder(qf, qp, memory[lo:hi], pos, return_attention=return_attention)
            if return_attention:
                feats, attention[name] = feats
            out[name] = _map_output(self.map(feats, last[lo:hi], grid)) if output in MAP_OUTPUTS else \
                {"values": self.value(feats)}
        return (out, attention) if return_attention else out

    def parameter_breakdown(self) -> dict:
        """The head's parameters: what every task shares (memory, decoder, output heads) and each task's own
        query tables (2·Q·d)."""
        tasks = {n: self.queries.feat[n].numel() + self.queries.pos[n].numel() for n in self.tasks}
        return {"shared": sum(p.numel() for p in self.parameters()) - sum(tasks.values()), "tasks": tasks}

    def level_profile(self, attention: torch.Tensor) -> torch.Tensor:
        """Layer-Attention profile: the share of the last decoder layer's cross-attention that falls on each
        encoder level, averaged over samples and queries; [B, Q, L·N] weights → [L] (sums to 1)."""
        n_levels = len(self.memory.all_levels)
        b, q, ln = attention.shape
        return attention.detach().reshape(b, q, n_levels, ln // n_levels).sum(-1).mean(dim=(0, 1))

    def stage2(self, levels: list[int]) -> list[str]:
        """Stage 2 of Faceptor: add encoder `levels` to the memory and freeze everything else of the head; returns
        the names of the parameters that stay trainable (the new projections and level embeddings)."""
        self.memory.add_levels(levels)
        return self.freeze_all_but_new_levels()

    def freeze_all_but_new_levels(self) -> list[str]:
        """Stage 2's trainable set: the new levels' projections and embeddings; returns their names."""
        for p in self.parameters():
            p.requires_grad_(False)
        names = []
        for name, p in self.named_parameters():
            if name.startswith(("memory.new_proj.", "memory.new_level_embed")):
                p.requires_grad_(True)
                names.append(name)
        return names


class NaiveTaskHeads(nn.Module):
    """Naive Faceptor: the same encoder with one head per task GROUP (output type), no shared decoder.

    Value groups read the concatenated class-free token means of `levels` (the official SwinFaceHead reads four
    levels too) through an MLP shared by the group, then one Linear per task; the landmark group upsamples the
    last level's tokens 4× (as the map head's pixel decoder) into one heatmap per point through a per-task 1×1
    convolution. A smaller stand-in for the official SwinFace / UPerNet heads, at CPU scale.
    """

    def __init__(self, encoder_dim: int, tasks: dict[str, tuple[str, int]], dim: int = 256, levels: tuple = (-1,)):
        super().__init__()
        self.tasks = {n: (o, int(q)) for n, (o, q) in tasks.items()}
        self.levels = [int(lv) for lv in levels]
        groups = sorted({o for o, _ in self.tasks.values()})
        width = encoder_dim * len(self.levels)
        self.trunks = nn.ModuleDict()
        for g in groups:
            if g in MAP_OUTPUTS:
                self.trunks[g] = nn.Sequential(nn.ConvTranspose2d(encoder_dim, dim, 2, stride=2), _ChannelNorm(dim),
                                               nn.GELU(), nn.ConvTranspose2d(dim, dim, 2, stride=2))
            else:
                self.trunks[g] = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim), nn.ReLU(inplace=True),
                                               nn.Linear(dim, dim), nn.ReLU(inplace=True))
        self.outputs = nn.ModuleDict({n: (nn.Conv2d(dim, q, 1) if o in MAP_OUTPUTS else nn.Linear(dim, q))
                                      for n, (o, q) in self.tasks.items()})

    def parameter_breakdown(self) -> dict:
        """Each output type's shared trunk, and each task's own output layer."""
        return {"shared": sum(p.numel() for p in self.trunks.parameters()),
                "tasks": {n: sum(p.numel() for p in m.parameters()) for n, m in self.outputs.items()}}

    def forward(self, backbone: nn.Module, x: torch.Tensor, task_slices: dict | None = None):
        maps, grid = encoder_levels(backbone, x, self.levels)
        pooled = torch.cat([m.mean(dim=1) for m in maps], dim=1)
        last = maps[self.levels.index(max(self.levels))]  # the deepest level read
        out = {}
        for name, output, lo, hi in _task_rows(self.tasks, task_slices, x.shape[0]):
            if output in MAP_OUTPUTS:
                b, n, d = last[lo:hi].shape
                pix = self.trunks[output](last[lo:hi].transpose(1, 2).reshape(b, d, *grid))
                out[name] = _map_output(self.outputs[name](pix))
            else:
                out[name] = {"values": self.outputs[name](self.trunks[output](pooled[lo:hi]))}
        return out


TASK_HEAD_DEFAULTS = {"faceptor": {"dim": 256, "depth": 9, "heads": 8, "ffn_dim": 2048, "levels": [-1], "stage2": None},
                      "naive": {"dim": 256, "levels": [-1]}}


def check_task_head_spec(spec: dict | None) -> dict | None:
    """Validate the config's `task_head:` section ({type: faceptor | naive, ...}); returns it with its defaults."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ConfigError(f"task_head must be a mapping with a 'type', got {spec!r}")
    kind = spec.get("type", "faceptor")
    if kind not in TASK_HEAD_DEFAULTS:
        raise ConfigError(f"task_head.type must be one of {', '.join(TASK_HEAD_DEFAULTS)}, got {kind!r}")
    options = {k: v for k, v in spec.items() if k != "type"}
    unknown = sorted(set(options) - set(TASK_HEAD_DEFAULTS[kind]))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for task_head '{kind}'; valid: "
                          f"{', '.join(TASK_HEAD_DEFAULTS[kind])}")
    out = {**TASK_HEAD_DEFAULTS[kind], **options}
    for key in ("dim", "depth", "heads", "ffn_dim"):
        if key in out and (not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 1):
            raise ConfigError(f"task_head.{key} must be a positive integer, got {out[key]!r}")
    if out["dim"] % 4:
        raise ConfigError(f"task_head.dim must be a multiple of 4 (the 2-D sine position embedding), got {out['dim']}")
    if "heads" in out and out["dim"] % out["heads"]:
        raise ConfigError(f"task_head.dim {out['dim']} must be divisible by task_head.heads {out['heads']}")
    stage2 = out.get("stage2")
    if stage2 is not None:
        if not isinstance(stage2, dict) or set(stage2) - {"init", "task", "levels"} or \
                not all(stage2.get(k) for k in ("init", "task", "levels")):
            raise ConfigError("task_head.stage2 must be {init: STAGE-1 RUN, task: TARGET TASK, levels: [new encoder "
                              f"levels]}}, got {stage2!r}")
        new = stage2["levels"]
        if not isinstance(new, (list, tuple)) or not all(isinstance(v, int) for v in new) or len(set(new)) != len(new):
            raise ConfigError(f"task_head.stage2.levels must be a list of distinct encoder block indices, got {new!r}")
    levels = out["levels"]
    if not isinstance(levels, (list, tuple)) or not levels or not all(isinstance(v, int) for v in levels) \
            or len(set(levels)) != len(levels):
        raise ConfigError(f"task_head.levels must be a non-empty list of distinct encoder block indices, got {levels!r}")
    return {"type": kind, **out}


def build_task_head(spec: dict, encoder_dim: int, tasks: dict[str, tuple[str, int]], depth: int) -> nn.Module:
    """The task head the `task_head:` section names, for these tasks ({name: (output, queries)}) on an encoder of
    `depth` blocks. Levels are block indices (negative from the end); the last block must be among them, or the
    blocks after the deepest level would never train."""
    spec = check_task_head_spec(spec)
    options = {k: v for k, v in spec.items() if k not in ("type", "stage2")}
    levels = _block_indices(options["levels"], depth, "task_head.levels")
    if depth - 1 not in levels:
        raise ConfigError(f"task_head.levels {options['levels']} must include the encoder's last block (-1): the "
                          "blocks after the deepest level read would never train")
    options["levels"] = tuple(levels)
    if spec["type"] == "naive":
        return NaiveTaskHeads(encoder_dim, tasks, **options)
    head = FaceptorHead(encoder_dim, tasks, **options)
    if spec.get("stage2"):  # the structure of a stage-2 run: its new levels (weights and freezing: `runs.build_model`)
        head.memory.add_levels(_block_indices(spec["stage2"]["levels"], depth, "task_head.stage2.levels"))
    return head


def _block_indices(levels, depth: int, where: str) -> list[int]:
    """Levels as block indices 0..depth−1 (negative ones from the end), each once."""
    out = []
    for lv in levels:
        if not -depth <= lv < depth:
            raise ConfigError(f"{where}: block {lv} does not exist, the encoder has {depth} blocks (0..{depth - 1})")
        out.append(lv % depth)
    if len(set(out)) != len(out):
        raise ConfigError(f"{where} {list(levels)} names a block twice")
    return out
