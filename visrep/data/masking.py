"""Mask generators for masked image modelling: which patches of each image the encoder does not see.

A generator returns a boolean mask [B, L] over the L = h·w patches of a grid, True = masked. Every image
gets exactly ⌊L·ratio⌋ masked patches, so MAE can gather the visible tokens into a dense [B, L_keep, D]
tensor without padding. Generators are seeded per step (resume replays the same masks), and per-image draws
go through `batch_rows.per_sample`, so W processes mask the global batch as one process does.

    random        MAE (He et al. 2022): a uniformly random subset, per image
    block         BEiT (Bao et al. 2022): rectangles of random area and aspect until the count is reached
    hard_patches  HPM (Wang et al. 2023): ⌊L·r·α_t⌋ patches with the highest loss predicted by the EMA
                  teacher, the rest at random; α_t rises linearly from 0 to `alpha_end` over training

Config (the `masking:` section):  {name: random, ratio: 0.75, mode: drop}
`mode` says how the encoder takes the mask: `drop` (MAE, only visible tokens enter the encoder) or
`token` (SimMIM, a learned mask token replaces the masked patches).
"""
from __future__ import annotations

import inspect
import math

import numpy as np
import torch
from torch import nn

from visrep.data.batch_rows import per_sample
from visrep.errors import ConfigError
from visrep.registry import Registry

MASKS = Registry("mask generator")
MODES = ("drop", "token")


def num_masked(num_patches: int, ratio: float) -> int:
    """⌊L·r⌋ (the 1e-9 keeps 64·0.75 = 48 from becoming 47 through float error)."""
    return int(math.floor(num_patches * ratio + 1e-9))


def _check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise ConfigError(f"masking.ratio must be a number strictly between 0 and 1, got {ratio!r}")
    return float(ratio)


def _first_k(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Mask with True at the k largest keys of each row (vectorised over the batch)."""
    mask = torch.zeros_like(keys, dtype=torch.bool)
    if k > 0:
        idx = keys.argsort(dim=1, descending=True)[:, :k]
        mask.scatter_(1, idx, True)
    return mask


class MaskGenerator(nn.Module):
    """Base for generators: holds ratio and mode; subclasses implement `forward`. No parameters."""

    needs_scores = False  # True: the template must pass the teacher's per-patch scores

    def __init__(self, ratio: float, mode: str = "drop"):
        super().__init__()
        self.ratio = _check_ratio(ratio)
        if mode not in MODES:
            raise ConfigError(f"masking.mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, mode={self.mode!r}"


@MASKS.register("random")
class RandomMask(MaskGenerator):
    """Uniformly random ⌊L·ratio⌋ patches per image (MAE: He et al. 2022, default ratio 0.75)."""

    def forward(self, batch: int, grid: tuple[int, int], generator: torch.Generator, scores=None) -> torch.Tensor:
        L = grid[0] * grid[1]
        keys = per_sample(lambda n: torch.rand(n, L, generator=generator, device=generator.device), batch)
        return _first_k(keys, num_masked(L, self.ratio))


@MASKS.register("block")
class BlockMask(MaskGenerator):
    """BEiT's block-wise masking (Bao et al. 2022, Alg. 1), filled to the exact count.

    Repeat: draw a block area s ∈ [min_patches, remaining], aspect a with log a ~ U(log min_aspect,
    log 1/min_aspect), h = round(√(s·a)), w = round(√(s/a)), a random position; keep the block if it adds
    at least one and at most `remaining` new patches. BEiT stops when ten tries fail, leaving fewer than
    L·r patches; here the remainder is then drawn at random so every image has exactly ⌊L·r⌋ masked.
    """

    def __init__(self, ratio: float = 0.4, mode: str = "token", min_patches: int = 4, min_aspect: float = 0.3):
        super().__init__(ratio, mode)
        if min_patches < 1:
            raise ConfigError(f"masking.min_patches must be at least 1, got {min_patches}")
        if not 0.0 < min_aspect <= 1.0:
            raise ConfigError(f"masking.min_aspect must be in (0, 1], got {min_aspect}")
        self.min_patches, self.min_aspect = int(min_patches), float(min_aspect)

    def _one(self, rng: np.random.Generator, h: int, w: int, target: int) -> np.ndarray:
        mask = np.zeros((h, w), dtype=bool)
        count = 0
        log_aspect = (math.log(self.min_aspect), -math.log(self.min_aspect))
        while count < target:
            remaining = target - count
            added = 0
            for _ in range(10):
                area = rng.uniform(min(self.min_patches, remaining), remaining)
                aspect = math.exp(rng.uniform(*log_aspect))
                bh, bw = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                if 1 <= bh <= h and 1 <= bw <= w:
                    top, left = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
                    block = mask[top:top + bh, left:left + bw]
                    new = int(bh * bw - block.sum())
                    if 0 < new <= remaining:
                        block[:] = True
                        added = new
                        break
            if added == 0:
                break
            count += added
        if count < target:  # top up at random (BEiT would stop short here)
            free = np.flatnonzero(~mask.ravel())
            mask.ravel()[rng.choice(free, target - count, replace=False)] = True
        return mask.ravel()

    def forward(self, batch: int, grid: tuple[int, int], generator: torch.Generator, scores=None) -> torch.Tensor:
        h, w = grid
        seeds = per_sample(lambda n: torch.randint(0, 2**62, (n,), generator=generator, device=generator.device),
                           batch).tolist()  # one stream per image: its mask does not depend on the others
        target = num_masked(h * w, self.ratio)
        masks = np.stack([self._one(np.random.default_rng(seed), h, w, target) for seed in seeds])
        return torch.from_numpy(masks).to(generator.device)


@MASKS.register("hard_patches")
class HardPatchesMask(MaskGenerator):
    """HPM's easy-to-hard masks (Wang et al. 2023, "Hard Patches Mining for Masked Image Modeling", §3.3).

    Of the n = ⌊L·r⌋ masked patches, ⌊L·r·α_t⌋ are the patches with the highest predicted loss
    (`scores`, from the EMA teacher's loss predictor on the full image); the rest are drawn uniformly at
    random from the remaining patches, so early masks are random (easy) and later ones increasingly hard.
    α_t rises linearly to `alpha_end`:

        alpha_schedule=epoch (the official code):  α = alpha_end · (e + 1)/E   at epoch e of E (per epoch)
        alpha_schedule=step:                       α = alpha_end · t/T        at step t of T
    """

    needs_scores = True

    def __init__(self, ratio: float = 0.75, mode: str = "drop", alpha_end: float = 0.5, alpha_schedule: str = "epoch"):
        super().__init__(ratio, mode)
        if not 0.0 <= alpha_end <= 1.0:
            raise ConfigError(f"masking.alpha_end must be in [0, 1], got {alpha_end}")
        if alpha_schedule not in ("epoch", "step"):
            raise ConfigError(f"masking.alpha_schedule must be epoch or step, got {alpha_schedule!r}")
        self.alpha_end, self.alpha_schedule = float(alpha_end), alpha_schedule
        self.alpha = 0.0  # set every step by `set_progress`

    @staticmethod
    def alpha_at(step: int, total_steps: int, alpha_end: float = 0.5, steps_per_epoch: int | None = None) -> float:
        """α at a step: per epoch when `steps_per_epoch` is given (official), else per step."""
        if steps_per_epoch is None:
            return alpha_end * step / max(total_steps, 1)
        epochs = total_steps / max(steps_per_epoch, 1)
        return min(alpha_end, alpha_end * (step // steps_per_epoch + 1) / max(epochs, 1e-12))

    def set_progress(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        self.alpha = self.alpha_at(step, total_steps, self.alpha_end,
                                   steps_per_epoch if self.alpha_schedule == "epoch" else None)

    def forward(self, batch: int, grid: tuple[int, int], generator: torch.Generator, scores=None) -> torch.Tensor:
        if scores is None:
            raise ConfigError("masking 'hard_patches' needs loss predictions: add a loss_predictor head and "
                              "target.branch=ema (see method hpm)")
        L = grid[0] * grid[1]
        n = num_masked(L, self.ratio)
        n_hard = int(math.floor(L * self.ratio * self.alpha + 1e-9))
        keys = per_sample(lambda m: torch.rand(m, L, generator=generator, device=generator.device), batch)  # [0, 1)
        if n_hard > 0:
            hard = scores.detach().float().topk(n_hard, dim=1).indices
            keys.scatter_(1, hard.to(keys.device), 2.0)  # above every random key: chosen first
        return _first_k(keys, n)


def build_mask_generator(spec: dict | None) -> MaskGenerator | None:
    """`{name: random, ratio: 0.75, mode: drop}` -> a generator; None -> no masking."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"masking must be a mapping with a 'name' ({', '.join(MASKS.names())}), got {spec!r}")
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    cls = MASKS.get(spec["name"])
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    bad = [k for k in kwargs if k not in valid]
    if bad:
        raise ConfigError(f"masking '{spec['name']}': unknown option(s) {', '.join(bad)}; valid options: "
                          f"{', '.join(valid)}")
    return cls(**kwargs)
