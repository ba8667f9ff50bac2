"""LoRA adapters through HF peft (Hu et al., ICLR 2022, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen weight W ∈ R^{out×in} gets a trainable low-rank update; the adapted layer computes

    h = W x + (α / r) · B A x,     A ∈ R^{r×in} (Kaiming init), B ∈ R^{out×r} (zeros, so h = Wx at start)

On ViT and iLLaMA the adapters go on every block's attention and MLP linears (timm ViT: attn.qkv,
attn.proj, mlp.fc1, mlp.fc2; iLLaMA: attn.qkv, attn.proj, mlp.fc1_g, mlp.fc1_x, mlp.fc2). For export
`merge_lora` folds B A into W (W ← W + (α/r)·B A) and returns the plain backbone with its original (timm)
keys, so the result loads anywhere the base model does.

    model = apply_lora(backbone, {"r": 8, "alpha": 16})
    trainable, total = count_parameters(model)
    plain = merge_lora(model)
"""
from __future__ import annotations

from torch import nn

from visrep.errors import ConfigError

# Attention and MLP linears inside transformer blocks (not the patch embedding or a classifier).
DEFAULT_TARGETS = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2|fc1_g|fc1_x))$"
_KEYS = ("r", "alpha", "dropout", "target_modules")


def check_lora_spec(spec: dict) -> dict:
    """Validate `finetune.lora`; returns it with defaults filled in."""
    if not isinstance(spec, dict):
        raise ConfigError(f"finetune.lora must be a mapping such as {{r: 8, alpha: 16}}, got {spec!r}")
    bad = [k for k in spec if k not in _KEYS]
    if bad:
        raise ConfigError(f"unknown option 'finetune.lora.{bad[0]}'; valid options: {', '.join(_KEYS)}")
    out = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": DEFAULT_TARGETS, **spec}
    if isinstance(out["r"], bool) or not isinstance(out["r"], int) or out["r"] < 1:
        raise ConfigError(f"finetune.lora.r must be an integer >= 1, got {out['r']!r}")
    if not isinstance(out["alpha"], (int, float)) or out["alpha"] <= 0:
        raise ConfigError(f"finetune.lora.alpha must be > 0, got {out['alpha']!r}")
    if not isinstance(out["dropout"], (int, float)) or not 0 <= out["dropout"] < 1:
        raise ConfigError(f"finetune.lora.dropout must be in [0, 1), got {out['dropout']!r}")
    if not isinstance(out["target_modules"], (str, list)):
        raise ConfigError("finetune.lora.target_modules must be a regex or a list of module names")
    return out


def apply_lora(backbone: nn.Module, spec: dict) -> nn.Module:
    """Wrap `backbone` in a peft model with LoRA adapters; every other backbone weight is frozen."""
    from peft import LoraConfig, get_peft_model

    spec = check_lora_spec(spec)
    names = [n for n, m in backbone.named_modules() if isinstance(m, nn.Linear)]
    config = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=float(spec["dropout"]),
                        target_modules=spec["target_modules"], bias="none")
    try:
        model = get_peft_model(backbone, config)
    except ValueError as e:  # no module matched
        raise ConfigError(f"finetune.lora.target_modules matched no layer of the backbone ({str(e).splitlines()[0]}); "
                          f"its linear layers are e.g. {', '.join(names[:4])}") from None
    model.num_features = getattr(backbone, "num_features", None)
    return model


def is_lora(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merge_lora(model: nn.Module) -> nn.Module:
    """W ← W + (α/r)·BA for every adapter; returns the plain backbone (original keys). The input is changed."""
    return model.merge_and_unload() if is_lora(model) else model


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in module.parameters())
