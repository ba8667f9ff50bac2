"""Checkpoints: one safetensors file per checkpoint, tensors + JSON metadata, written atomically.

No pickle anywhere: model, objective buffers (queues, centers), optimizer state and the RNG state are
tensors in the file; config, epoch/step, optimizer hyper-parameters and metrics are JSON in its header.
A checkpoint is written to `NAME.tmp` and moved over `NAME` with `os.replace`, so a run killed
mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from visrep.errors import VisrepError

FORMAT = "visrep-checkpoint-v1"


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # safetensors refuses shared/non-contiguous storage: store independent contiguous copies.
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(clean, str(tmp), metadata={"visrep": json.dumps({"format": FORMAT, **meta})})
    os.replace(tmp, path)
    return path


def find_checkpoint(source: str | Path) -> Path:
    """A checkpoint file, or a run directory (-> its checkpoints/last.safetensors)."""
    p = Path(source)
    if p.is_dir():
        p = p / "checkpoints" / "last.safetensors"
    if not p.is_file():
        raise VisrepError(f"no checkpoint at '{source}' (expected a .safetensors file or a run directory)")
    return p


def load_checkpoint(source: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = find_checkpoint(source)
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise VisrepError(f"checkpoint '{path}' is unreadable or truncated ({e})") from None
    if "visrep" not in header:
        return tensors, {}  # a plain safetensors state dict (e.g. exported timm weights)
    meta = json.loads(header["visrep"])
    return tensors, meta


def strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def add_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict (used to key feature caches by checkpoint content)."""
    h = hashlib.sha1()
    for k in sorted(state):
        t = state[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------- optimizer state <-> tensors
def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if not key.startswith("optim."):
            continue
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
