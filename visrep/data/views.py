"""View policies: the augmentations that turn one batch of images into several "views".

Every policy runs on a WHOLE batch of uint8 images at once, on whatever device the batch is
on, with per-sample random parameters. Policies are registered in ``VIEWS`` and built with
``build_views(name, image_size, **options)``.

Randomness: ``policy(images, seed)`` forks torch's RNG (CPU and, for CUDA inputs, the input's
device), seeds it with ``seed`` and restores it afterwards, so the same (images, seed) gives the
same views bit for bit on CPU and the caller's global RNG is untouched. All random parameters are
drawn on the CPU generator, then moved to the images' device. Per-sample parameters go through
``visrep.data.batch_rows.per_sample``, so under torchrun each rank draws them for the whole global
batch and keeps its rows: W ranks augment the global batch exactly as one process does.

Ops: grayscale and gaussian blur are ``kornia.augmentation`` modules. Three ops are written here
as batched torch code because their kornia versions cost far more on CPU than the op itself
(measured at batch 256, 32x32, 2 threads): RandomResizedCrop + horizontal flip (one
``affine_grid``/``grid_sample`` per view, the flip folded into the affine; kornia ~13 ms +
~2 ms), ColorJitter (torchvision's formulas, HSV hue shift, ~20 ms in kornia) and Solarize
(one ``torch.where``, ~5 ms in kornia).
"""
from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Sequence

import kornia.augmentation as KA
import torch
import torch.nn.functional as F
from torch import nn

from visrep.data.batch_rows import per_sample, rows_of
from visrep.errors import ConfigError
from visrep.registry import Registry

__all__ = [
    "VIEWS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ViewSpec",
    "ViewPolicy",
    "build_views",
    "eval_transform",
    "resize_center_crop",
]

VIEWS = Registry("view policy")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] (or float already in [0,1]) -> float32 in [0,1]."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected an image batch of shape [B, 3, H, W], got {shape}")
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if images.is_floating_point():
        return images.to(torch.float32)
    raise ValueError(f"expected uint8 (or float in [0,1]) images, got {images.dtype}")


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float [B,C,H,W] -> [B,C,size,size]: resize the shorter side to ``size`` (bilinear,
    antialiased) then center-crop. A no-op when the batch already has that size."""
    h, w = x.shape[-2:]
    if h == size and w == size:
        return x
    if h != w:
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    else:
        nh = nw = size
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top : top + size, left : left + size]


def _normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean.to(x.device).view(1, -1, 1, 1)) / std.to(x.device).view(1, -1, 1, 1)


def eval_transform(
    images_uint8: torch.Tensor,
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Deterministic evaluation transform: resize (shorter side + center crop) if the batch is not
    already ``image_size`` square, scale to [0,1], normalize. Returns float32 on the input's device."""
    x = resize_center_crop(_to_float(images_uint8), int(image_size))
    return _normalize(x, torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32))


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Fork torch's RNG (CPU + the CUDA device of the images), seed it, restore it on exit."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        seed = int(seed) % (2**63)
        torch.random.default_generator.manual_seed(seed)
        for idx in devices:
            with torch.cuda.device(idx):
                torch.cuda.manual_seed(seed)
        yield


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, [B,3,H,W] -> [B,1,H,W] (the weights torchvision and kornia use)."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (fraction of a turn, per sample [B]) in HSV space, keeping S and V.

    Same result as torchvision's adjust_hue (RGB->HSV, h += shift mod 1, HSV->RGB) to ~1e-6, but
    without building the HSV image: V = max, V*S = max - min are unchanged by the shift, and
    HSV->RGB is written as channel = V - V*S * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6,
    n = 5, 3, 1 for R, G, B."""
    maxc = x.amax(dim=1)  # amax/amin: max(dim) with indices is ~30x slower on CPU
    minc = x.amin(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = x.unbind(dim=1)
    # hue in sextants, [-1, 5) (ties resolved r, then g, as torchvision); shift added before the mod
    h = torch.where(r == maxc, (g - b) / safe, torch.where(g == maxc, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = h + shift.view(-1, 1, 1) * 6.0
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(n + h.unsqueeze(1), 6.0)
    return maxc.unsqueeze(1) - delta.unsqueeze(1) * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# ops (batched, per-sample parameters from the CPU generator)
# ----------------------------------------------------------------------------------------------
class RandomResizedCropFlip(nn.Module):
    """torchvision's RandomResizedCrop sampling (10 tries of area/log-ratio, then a center-crop
    fallback), done for the whole batch with one affine grid_sample (bilinear), plus a random
    horizontal flip folded into the same affine."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_p: float = 0.5, tries: int = 10):
        super().__init__()
        self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)
        self.flip_p, self.tries = float(flip_p), int(tries)

    def sample(self, batch: int, height: int, width: int) -> torch.Tensor:
        """Per-sample boxes [B, 5]: x0, y0, w, h (pixels) and flip (0/1)."""
        area = float(height * width)
        target = torch.empty(batch, self.tries).uniform_(self.scale[0], self.scale[1]) * area
        logr = torch.empty(batch, self.tries).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = torch.exp(logr)
        w = torch.round(torch.sqrt(target * aspect))
        h = torch.round(torch.sqrt(target / aspect))
        ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
        found = ok.any(dim=1)
        first = ok.to(torch.int64).argmax(dim=1, keepdim=True)
        # fallback (torchvision): the whole image, clipped to the ratio range, centered
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            fw, fh = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            fw, fh = round(height * self.ratio[1]), height
        else:
            fw, fh = width, height
        cw = torch.where(found, w.gather(1, first).squeeze(1), torch.tensor(float(fw)))
        ch = torch.where(found, h.gather(1, first).squeeze(1), torch.tensor(float(fh)))
        ux, uy = torch.rand(batch), torch.rand(batch)
        x0 = torch.where(found, torch.floor(ux * (width - cw + 1)), torch.floor((width - cw) / 2))
        y0 = torch.where(found, torch.floor(uy * (height - ch + 1)), torch.floor((height - ch) / 2))
        flip = (torch.rand(batch) < self.flip_p).to(torch.float32)
        return torch.stack([x0, y0, cw, ch, flip], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        box = per_sample(lambda n: self.sample(n, height, width), b)
        x0, y0, cw, ch, flip = box.unbind(1)
        # align_corners=False: normalized u_in = (cw/W) * u_out + (2*x0 + cw)/W - 1
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = (cw / width) * (1.0 - 2.0 * flip)
        theta[:, 0, 2] = (2.0 * x0 + cw) / width - 1.0
        theta[:, 1, 1] = ch / height
        theta[:, 1, 2] = (2.0 * y0 + ch) / height - 1.0
        theta = theta.to(device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta, [b, c, self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class ColorJitter(nn.Module):
    """torchvision ColorJitter semantics, batched: with probability p per sample, brightness,
    contrast, saturation (factors uniform in [max(0, 1-s), 1+s]) and hue (uniform in [-h, h])
    applied in a random order (one order per call, as kornia does), clamped to [0,1]."""

    def __init__(self, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p: float = 0.8):
        super().__init__()
        self.strengths = (float(brightness), float(contrast), float(saturation), float(hue))
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs, cs, ss, hs = self.strengths

        def draw(n: int) -> torch.Tensor:  # [n, 5]: on, brightness, contrast, saturation, hue
            on = (torch.rand(n) < self.p).to(torch.float32)
            fb = torch.empty(n).uniform_(max(0.0, 1 - bs), 1 + bs)
            fc = torch.empty(n).uniform_(max(0.0, 1 - cs), 1 + cs)
            fs = torch.empty(n).uniform_(max(0.0, 1 - ss), 1 + ss)
            return torch.stack([on, fb, fc, fs, torch.empty(n).uniform_(-hs, hs)], dim=1)

        on, fb, fc, fs, fh = per_sample(draw, x.shape[0]).unbind(1)
        on = on > 0
        order = torch.randperm(4).tolist()  # one order for the whole (global) batch
        if not bool(on.any()):
            return x
        everyone = bool(on.all())
        idx = on.nonzero().squeeze(1)
        y = x if everyone else x.index_select(0, idx.to(x.device))

        def per(f):
            f = f if everyone else f[idx]
            return f.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)

        for op in order:
            if op == 0 and bs > 0:
                y = (y * per(fb)).clamp_(0.0, 1.0)
            elif op == 1 and cs > 0:
                mean = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
                f = per(fc)
                y = (f * y + (1 - f) * mean).clamp_(0.0, 1.0)
            elif op == 2 and ss > 0:
                f = per(fs)
                y = (f * y + (1 - f) * _gray(y)).clamp_(0.0, 1.0)
            elif op == 3 and hs > 0:
                y = _hue_shift(y, per(fh).view(-1))
        if everyone:
            return y
        out = x.clone()
        out.index_copy_(0, idx.to(x.device), y)
        return out


class RandomSolarize(nn.Module):
    """With probability p per sample, invert every pixel >= threshold (torchvision's solarize)."""

    def __init__(self, p: float = 0.2, threshold: float = 0.5):
        super().__init__()
        self.p, self.threshold = float(p), float(threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        on = (per_sample(torch.rand, x.shape[0]) < self.p).to(x.device).view(-1, 1, 1, 1)
        return torch.where(on & (x >= self.threshold), 1.0 - x, x)


# ----------------------------------------------------------------------------------------------
# one view = one pipeline
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ViewSpec:
    """The recipe of one view. ``crop=False`` gives the deterministic eval transform."""

    size: int
    crop: bool = True
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple = (0.1, 2.0)
    solarize_p: float = 0.0

    @property
    def blur_kernel(self) -> int:
        """Odd kernel of ~10% of the view side (SimCLR/BYOL: 23 px at 224), at least 3."""
        k = int(round(0.1 * self.size))
        k = k if k % 2 == 1 else k + 1
        return max(3, min(k, self.size - 1 if self.size % 2 == 0 else self.size - 2))


class _View(nn.Module):
    def __init__(self, spec: ViewSpec):
        super().__init__()
        self.spec = spec
        ops: list[nn.Module] = []
        if spec.crop:
            ops.append(RandomResizedCropFlip(spec.size, spec.scale, spec.ratio, spec.flip_p))
            if spec.jitter_p > 0 and any(s > 0 for s in spec.jitter):
                ops.append(ColorJitter(*spec.jitter, p=spec.jitter_p))
            if spec.gray_p > 0:
                ops.append(KA.RandomGrayscale(p=spec.gray_p))
            if spec.blur_p > 0:
                k = spec.blur_kernel
                ops.append(KA.RandomGaussianBlur((k, k), tuple(spec.blur_sigma), p=spec.blur_p))
            if spec.solarize_p > 0:
                ops.append(RandomSolarize(p=spec.solarize_p))
        self.ops = nn.ModuleList(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.spec.crop:
            return resize_center_crop(x, self.spec.size)
        for op in self.ops:
            x = _kornia_rows(op, x) if isinstance(op, KA.AugmentationBase2D) else op(x)
        return x


def _kornia_rows(op: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A kornia augmentation on this process's rows of the global batch (`batch_rows`): its parameters are
    drawn for every row, then sliced, so the ranks together augment as one process would."""
    rows = rows_of(x.shape[0])
    if rows is None:
        return op(x)
    offset, local, total = rows
    params = op.forward_parameters(torch.Size([total, *x.shape[1:]]))
    sliced = {}
    for key, value in params.items():
        if key == "forward_input_shape":
            sliced[key] = torch.tensor(x.shape)
        elif torch.is_tensor(value) and value.ndim and value.shape[0] == total:
            sliced[key] = value[offset:offset + local]
        else:  # a kornia that draws per applied row only: these rows' own draws (no longer rank-invariant)
            return op(x)
    return op(x, params=sliced)


class ViewPolicy(nn.Module):
    """A list of views: ``policy(images_uint8, seed)`` -> list of float32 normalized tensors,
    global views first (``image_size``), then local crops (``local_size``)."""

    def __init__(self, name: str, image_size: int, global_views: list[ViewSpec], local_views: list[ViewSpec] = (),
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, options: dict | None = None):
        super().__init__()
        self.name = name
        self.image_size = int(image_size)
        self.specs = list(global_views) + list(local_views)
        self.n_global = len(global_views)
        self.n_local = len(local_views)
        self.n_views = self.n_global + self.n_local
        self.local_size = local_views[0].size if self.n_local else None
        self.options = dict(options or {})
        self.views = nn.ModuleList(_View(s) for s in self.specs)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, seed: int) -> list[torch.Tensor]:
        x = _to_float(images)
        with _seeded(seed, x.device):
            views = [view(x) for view in self.views]
        return [_normalize(v, self.mean, self.std).contiguous() for v in views]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, n_global={self.n_global}, n_local={self.n_local}, image_size={self.image_size}"


# ----------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------
def _prob(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"view option '{name}' must be a probability in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0:
        raise ConfigError(f"view option '{name}' must be a probability in [0, 1], got {value!r}")
    return v


def _probs(name: str, value, n: int) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ConfigError(f"view option '{name}' must be a list of {n} probabilities, got {value!r}")
    return tuple(_prob(name, v) for v in value)


def _scale(name: str, value) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"view option '{name}' must be a pair [min, max] of area fractions, got {value!r}") from None
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"view option '{name}' must satisfy 0 < min <= max <= 1, got {value!r}")
    return lo, hi


def _nonneg(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"view option '{name}' must be a number >= 0, got {value!r}") from None
    if v < 0:
        raise ConfigError(f"view option '{name}' must be >= 0, got {value!r}")
    return v


# ----------------------------------------------------------------------------------------------
# policies
# ----------------------------------------------------------------------------------------------
@VIEWS.register("simclr")
def simclr(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, *, crop_scale=(0.08, 1.0), jitter_strength: float = 1.0,
           jitter_prob: float = 0.8, gray_prob: float = 0.2, blur_prob: float = 0.5, flip_prob: float = 0.5) -> ViewPolicy:
    """SimCLR (Chen et al. 2020): 2 views of crop, flip, colour jitter, grayscale, blur.

    Colour jitter is (0.8s, 0.8s, 0.8s, 0.2s) with p=jitter_prob; the paper uses s=1.0 on
    ImageNet (default here) and s=0.5 on CIFAR. Gaussian blur (kernel ~10% of the side, sigma in
    [0.1, 2]) with p=blur_prob=0.5 as on ImageNet; the paper's CIFAR recipe drops blur
    (blur_prob=0).
    """
    s = _nonneg("jitter_strength", jitter_strength)
    spec = ViewSpec(size=image_size, scale=_scale("crop_scale", crop_scale), flip_p=_prob("flip_prob", flip_prob),
                    jitter=(0.8 * s, 0.8 * s, 0.8 * s, min(0.5, 0.2 * s)), jitter_p=_prob("jitter_prob", jitter_prob),
                    gray_p=_prob("gray_prob", gray_prob), blur_p=_prob("blur_prob", blur_prob))
    opts = dict(crop_scale=crop_scale, jitter_strength=jitter_strength, jitter_prob=jitter_prob, gray_prob=gray_prob,
                blur_prob=blur_prob, flip_prob=flip_prob)
    return ViewPolicy("simclr", image_size, [spec, spec], [], mean, std, opts)


@VIEWS.register("byol")
def byol(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, *, crop_scale=(0.08, 1.0), jitter_prob: float = 0.8,
         gray_prob: float = 0.2, blur_probs=(1.0, 0.1), solarize_probs=(0.0, 0.2), flip_prob: float = 0.5) -> ViewPolicy:
    """BYOL (Grill et al. 2020): 2 asymmetric views; view 1 always blurred, view 2 sometimes solarized.

    Both: crop (0.08, 1), flip, jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2. Blur p = (1.0,
    0.1) and solarize p = (0.0, 0.2) for (view 1, view 2).
    """
    blur = _probs("blur_probs", blur_probs, 2)
    sol = _probs("solarize_probs", solarize_probs, 2)
    base = dict(size=image_size, scale=_scale("crop_scale", crop_scale), flip_p=_prob("flip_prob", flip_prob),
                jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=_prob("jitter_prob", jitter_prob), gray_p=_prob("gray_prob", gray_prob))
    specs = [ViewSpec(**base, blur_p=blur[0], solarize_p=sol[0]), ViewSpec(**base, blur_p=blur[1], solarize_p=sol[1])]
    opts = dict(crop_scale=crop_scale, jitter_prob=jitter_prob, gray_prob=gray_prob, blur_probs=blur_probs,
                solarize_probs=solarize_probs, flip_prob=flip_prob)
    return ViewPolicy("byol", image_size, specs, [], mean, std, opts)


def _default_local_size(image_size: int) -> int:
    """DINO's 96/224 ratio, rounded to a multiple of 8, at least 8: 32 -> 16, 64 -> 24, 224 -> 96."""
    return min(image_size, max(8, int(round(image_size * 96 / 224 / 8)) * 8))


@VIEWS.register("multicrop")
def multicrop(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, *, n_local: int = 6, local_size: int | None = None,
              global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), blur_probs=(1.0, 0.1, 0.5), solarize_prob: float = 0.2,
              jitter_prob: float = 0.8, gray_prob: float = 0.2, flip_prob: float = 0.5) -> ViewPolicy:
    """Multi-crop (Caron et al. 2020/2021, SwAV/DINO): 2 global crops + n_local small local crops.

    DINO defaults: global crops scale (0.4, 1) at image_size, local crops scale (0.05, 0.4) at
    local_size (default image_size*96/224 rounded to a multiple of 8: 16 for 32 px, 96 for 224);
    n_local=6 (SwAV's 2x224+6x96). Jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2, flip; blur
    p = (1.0, 0.1, 0.5) for (global 1, global 2, locals); solarize p=0.2 on global 2 only.
    """
    try:
        n_local_i = int(n_local)
    except (TypeError, ValueError):
        raise ConfigError(f"view option 'n_local' must be an integer >= 0, got {n_local!r}") from None
    if n_local_i < 0 or n_local_i != n_local:
        raise ConfigError(f"view option 'n_local' must be an integer >= 0, got {n_local!r}")
    if local_size is None:
        ls = _default_local_size(image_size)
    else:
        if not isinstance(local_size, int) or isinstance(local_size, bool) or not 4 <= local_size <= image_size:
            raise ConfigError(f"view option 'local_size' must be an integer in [4, image_size={image_size}], got {local_size!r}")
        ls = local_size
    blur = _probs("blur_probs", blur_probs, 3)
    g_scale = _scale("global_scale", global_scale)
    l_scale = _scale("local_scale", local_scale)
    common = dict(flip_p=_prob("flip_prob", flip_prob), jitter=(0.4, 0.4, 0.2, 0.1),
                  jitter_p=_prob("jitter_prob", jitter_prob), gray_p=_prob("gray_prob", gray_prob))
    globals_ = [
        ViewSpec(size=image_size, scale=g_scale, blur_p=blur[0], solarize_p=0.0, **common),
        ViewSpec(size=image_size, scale=g_scale, blur_p=blur[1], solarize_p=_prob("solarize_prob", solarize_prob), **common),
    ]
    locals_ = [ViewSpec(size=ls, scale=l_scale, blur_p=blur[2], **common) for _ in range(n_local_i)]
    opts = dict(n_local=n_local_i, local_size=ls, global_scale=global_scale, local_scale=local_scale,
                blur_probs=blur_probs, solarize_prob=solarize_prob, jitter_prob=jitter_prob, gray_prob=gray_prob,
                flip_prob=flip_prob)
    return ViewPolicy("multicrop", image_size, globals_, locals_, mean, std, opts)


@VIEWS.register("crop")
def crop(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, *, crop_scale=(0.2, 1.0),
         flip_prob: float = 0.5) -> ViewPolicy:
    """One view of random resized crop + flip, no colour: MAE/SimMIM (He et al. 2022: scale (0.2, 1)) and supervised.

    Masked image modelling needs no colour augmentation (MAE §A.1); the mask is the augmentation.
    """
    spec = ViewSpec(size=image_size, scale=_scale("crop_scale", crop_scale), flip_p=_prob("flip_prob", flip_prob),
                    jitter_p=0.0, gray_p=0.0)
    return ViewPolicy("crop", image_size, [spec], [], mean, std, dict(crop_scale=crop_scale, flip_prob=flip_prob))


@VIEWS.register("none")
def none(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> ViewPolicy:
    """No augmentation: one view, the eval transform (resize if needed + normalize)."""
    return ViewPolicy("none", image_size, [ViewSpec(size=image_size, crop=False)], [], mean, std, {})


def _option_names(factory) -> list[str]:
    sig = inspect.signature(factory)
    return [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def build_views(name: str, image_size: int, *, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD, **options) -> ViewPolicy:
    """Build the registered view policy ``name``; unknown options raise ConfigError listing the valid ones."""
    factory = VIEWS.get(name)
    valid = _option_names(factory)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(valid) if valid else "(none)"
        raise ConfigError(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(repr(u) for u in unknown)} for view policy "
            f"'{name}'; valid options: {listed}"
        )
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ConfigError(f"image_size must be an integer >= 8, got {image_size!r}")
    for label, val in (("mean", mean), ("std", std)):
        if len(tuple(val)) != 3:
            raise ConfigError(f"view {label} must have 3 values (one per RGB channel), got {val!r}")
    if any(float(s) <= 0 for s in std):
        raise ConfigError(f"view std must be > 0, got {std!r}")
    return factory(image_size, tuple(float(m) for m in mean), tuple(float(s) for s in std), **options)
