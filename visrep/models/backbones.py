"""Backbones: one registry by name, built on timm so state dicts load into timm unchanged.

    build_backbone("resnet18", cifar_stem=True)          # timm ResNet-18, 3x3 stem, no max-pool
    build_backbone("vit_tiny", image_size=32, patch_size=4)
    build_backbone("convnext_atto")                       # any timm model name passes through

Every backbone returns pooled features [B, D] from `forward` and exposes `num_features`.
Our models *are* timm models (created with `num_classes=0`), so their keys are timm's keys:
`timm.create_model("resnet18", num_classes=0).load_state_dict(ours.state_dict())` works
for the ImageNet stem, and for the CIFAR stem after the same two-line stem change.
"""
from __future__ import annotations

from torch import nn

from visrep.errors import ConfigError
from visrep.registry import Registry

BACKBONES = Registry("backbone")


def _timm():
    import timm  # imported lazily: timm import costs ~1 s

    return timm


def apply_cifar_stem(model: nn.Module) -> nn.Module:
    """3x3 stride-1 first conv and no max-pool, the usual stem for 32x32 inputs (He et al. 2016, CIFAR)."""
    out_ch = model.conv1.out_channels
    model.conv1 = nn.Conv2d(3, out_ch, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _resnet(timm_name: str, doc: str):
    def build(*, cifar_stem: bool = False, width: int = 64, image_size: int | None = None, **kwargs):
        if width <= 0:
            raise ConfigError(f"backbone width must be positive, got {width}")
        extra = {}
        if width != 64:  # narrower/wider ResNets for small CPU budgets; timm keeps the same keys
            # The four stages get width, 2·width, 4·width, 8·width channels. The stem keeps timm's 64: timm reads
            # stem_width only for its "deep" stems, and every result so far (B2, B9, B12) was measured this way.
            extra = dict(channels=(width, 2 * width, 4 * width, 8 * width), stem_width=width)
        model = _timm().create_model(timm_name, pretrained=False, num_classes=0, **extra, **kwargs)
        return apply_cifar_stem(model) if cifar_stem else model

    build.__doc__ = doc
    return build


BACKBONES.add("resnet18", _resnet("resnet18", "ResNet-18 (timm keys); options: cifar_stem, width (64: the stages' "
                                               "base width; the stem keeps 64 channels)."))
BACKBONES.add("resnet50", _resnet("resnet50", "ResNet-50 (timm keys); options: cifar_stem, width (64: the stages' "
                                               "base width; the stem keeps 64 channels)."))


def default_patch_size(image_size: int, patch_size: int | None) -> int:
    """16 px patches from 128 px up (ViT), else an 8x8 grid (32 px -> 4, the usual CIFAR ViT patch)."""
    if patch_size is not None:
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise ConfigError(f"patch_size must be a positive integer, got {patch_size!r}")
        return patch_size
    return 16 if image_size >= 128 else max(1, image_size // 8)


def mae_init(model: nn.Module) -> None:
    """The official MAE / HPM encoder initialisation: every Linear xavier-uniform with zero bias, the patch
    projection xavier-uniform on its flattened [D, 3·p·p] weight (like a Linear), class token N(0, 0.02²)
    (timm's ViT keeps LayerNorm ε = 1e-6, as MAE does)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    w = model.patch_embed.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    if getattr(model, "cls_token", None) is not None:
        nn.init.normal_(model.cls_token, std=0.02)


def _vit(timm_name: str, doc: str):
    def build(*, image_size: int = 224, patch_size: int | None = None, pos_embed: str = "learn", init: str = "timm",
              **kwargs):
        patch_size = default_patch_size(image_size, patch_size)
        if image_size % patch_size:
            raise ConfigError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if pos_embed not in ("learn", "sincos"):
            raise ConfigError(f"vit option pos_embed must be learn or sincos, got {pos_embed!r}")
        if init not in ("timm", "mae"):
            raise ConfigError(f"vit option init must be timm or mae, got {init!r}")
        # dynamic_img_size: multi-crop feeds smaller local crops; timm interpolates the position embeddings.
        kwargs.setdefault("dynamic_img_size", True)
        model = _timm().create_model(
            timm_name, pretrained=False, num_classes=0, img_size=image_size, patch_size=patch_size, **kwargs
        )
        if pos_embed == "sincos":  # MAE's fixed 2-D sin-cos embedding (class token position: zeros), frozen
            from visrep.models.masked import sincos_2d

            h, w = model.patch_embed.grid_size
            table = sincos_2d(model.embed_dim, h, w)
            prefix = model.pos_embed.shape[1] - h * w
            model.pos_embed.data.zero_()
            model.pos_embed.data[0, prefix:] = table
            model.pos_embed.requires_grad_(False)
        if init == "mae":
            mae_init(model)
        return model

    build.__doc__ = doc
    return build


_VIT_OPTS = ("options: image_size, patch_size (default 16, or image_size/8 below 128 px), pos_embed (learn | sincos), "
             "init (timm | mae).")
BACKBONES.add("vit_tiny", _vit("vit_tiny_patch16_224", f"ViT-Tiny 192/12/3 (timm keys); {_VIT_OPTS}"))
BACKBONES.add("vit_small", _vit("vit_small_patch16_224", f"ViT-Small 384/12/6 (timm keys); {_VIT_OPTS}"))
BACKBONES.add("vit_base", _vit("vit_base_patch16_224", f"ViT-Base 768/12/12 (timm keys); {_VIT_OPTS}"))


def _illama(size: str):
    def build(**options):
        from visrep.models.illama import build_illama

        options["patch_size"] = default_patch_size(options.get("image_size", 224), options.get("patch_size"))
        return build_illama(size, **options)

    from visrep.models.illama import ILLAMA_SIZES

    dim, depth, heads = ILLAMA_SIZES[size]
    build.__doc__ = (f"iLLaMA-{size.capitalize()} {dim}/{depth}/{heads} (Wang et al. 2024, causal LLaMA blocks); "
                     "options: image_size, patch_size, rope (1d | 2d), soft_mask (none | constant | linear), "
                     "soft_mask_ratio, soft_mask_epochs, soft_mask_form (official | renormalised), pos_embed "
                     "(learned | none), qkv_bias, drop_path; defaults: the official recipe of this size.")
    return build


for _size in ("tiny", "small", "base"):
    BACKBONES.add(f"illama_{_size}", _illama(_size))


def build_backbone(name: str, **options) -> nn.Module:
    """Build a registered backbone, or any timm model by name (`timm:NAME` or plain `NAME`).

    `image_size` is accepted by every backbone (ViTs need it; CNNs ignore it).
    Weights are never downloaded here: pretraining starts from random init.
    """
    if name.startswith("timm:"):
        name = name[5:]
    elif name in BACKBONES:
        builder = BACKBONES.get(name)
        try:
            model = builder(**options)
        except TypeError as e:  # an option this backbone does not take
            raise ConfigError(f"bad option for backbone '{name}': {e}") from None
        return model
    timm = _timm()
    if not timm.is_model(name):
        BACKBONES.get(name)  # raises ConfigError listing our names
    options = dict(options)
    options.pop("image_size", None)  # timm CNNs take any size; timm ViTs take img_size
    cifar_stem = options.pop("cifar_stem", False)
    if options.pop("width", 64) != 64:
        raise ConfigError(f"option width is only for visrep's resnet18/resnet50, not timm model '{name}'")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **options)
    except TypeError as e:
        raise ConfigError(f"bad option for timm model '{name}': {e}") from None
    if cifar_stem:
        if not hasattr(model, "conv1"):
            raise ConfigError(f"cifar_stem needs a ResNet-like timm model with conv1, '{name}' has none")
        apply_cifar_stem(model)
    return model


def feature_dim(model: nn.Module) -> int:
    return int(getattr(model, "num_features"))

