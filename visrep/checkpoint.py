"""Checkpoints: one safetensors file per checkpoint, tensors + JSON metadata, written atomically, self-verifying.

No pickle anywhere: model, objective buffers (queues, centers), optimizer state and the RNG state are
tensors in the file; config, epoch/step, optimizer hyper-parameters and metrics are JSON in its header.

What a checkpoint guarantees about itself:
- **Atomic**: it is written to `NAME.tmp` in the same folder, flushed to disk, and moved over `NAME` with
  `os.replace`, so a run killed mid-write leaves the previous checkpoint intact (stray `.tmp` files of
  killed writes are removed by `clean_stale_temps` when the run starts again).
- **Integrity**: the header records `sha256`, a SHA-256 over every tensor's name, dtype, shape and bytes
  and over the rest of the metadata as canonical JSON (`checkpoint_sha256`). `load_checkpoint` recomputes
  it and refuses a file whose tensors or header changed (a flipped byte, an edited field, a bad copy),
  unless `force=True`.
- **Consistent counters**: the step is stored twice, in the JSON header and as the tensor `state.step`
  (covered by the hash), so an edited header cannot silently resume from the wrong step.
- **Finite**: `first_non_finite` is the guard the loop runs before a write: no NaN/Inf weight is saved.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from visrep.errors import VisrepError

FORMAT = "visrep-checkpoint-v2"  # v2: tensors_sha256 + state.step; v1 files (no hash) still load, with a warning
STEP_KEY = "state.step"


class CheckpointError(VisrepError):
    """A checkpoint that is unreadable, corrupted or inconsistent."""


def checkpoint_sha256(tensors: dict[str, torch.Tensor], meta: dict | None = None) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor in sorted name order (what safetensors stores in
    its data section, independent of the file layout), then over `meta` as canonical JSON (sorted keys)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(f"{k}\0{str(t.dtype)}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # zero-copy view of the bytes
    if meta is not None:
        h.update(b"\0meta\0" + _canonical(meta))
    return h.hexdigest()


def _canonical(meta: dict) -> bytes:
    # Through a JSON round trip first, so what is hashed at write time is exactly what a reader parses.
    return json.dumps(json.loads(json.dumps(meta)), sort_keys=True, separators=(",", ":")).encode()


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor (in dict order) holding a NaN or an Inf, else None.

    One fused reduction (`torch._foreach_norm` with ord=inf, NaN-propagating) per device and one host sync,
    not one sync per tensor, so the check is cheap enough to run before every checkpoint.
    """
    floats = [(k, t.detach()) for k, t in tensors.items() if t.is_floating_point() and t.numel()]
    if not floats:
        return None
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(floats):
        by_device.setdefault(t.device, []).append(i)
    bad = torch.zeros(len(floats), dtype=torch.bool)
    for dev, idx in by_device.items():
        norms = torch._foreach_norm([floats[i][1] for i in idx], math.inf)
        flags = ~torch.isfinite(torch.stack([n.float() for n in norms]))
        bad[torch.tensor(idx)] = flags.cpu()  # the one sync per device
    if not bool(bad.any()):
        return None
    return floats[int(bad.nonzero()[0])][0]


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write `tensors` (+ the step as `state.step` when meta has one) and `meta` atomically, with a content hash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # a fixed name: a killed write leaves at most one stray file
    # safetensors refuses shared/non-contiguous storage: store independent contiguous copies.
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    if "step" in meta:
        clean[STEP_KEY] = torch.tensor(int(meta["step"]), dtype=torch.int64)
    header = {"format": FORMAT, **meta}
    header["sha256"] = checkpoint_sha256(clean, header)
    save_file(clean, str(tmp), metadata={"visrep": json.dumps(header)})
    with open(tmp, "rb+") as f:  # on disk before it replaces the last good file
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def clean_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temporary files that killed checkpoint writes left in `folder`; returns what was removed."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.is_file() and (p.name.endswith(".tmp") or p.name.startswith(".tmp")):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def find_checkpoint(source: str | Path) -> Path:
    """A checkpoint file, or a run directory (-> its checkpoints/last.safetensors)."""
    p = Path(source).expanduser()
    if p.is_dir():
        p = p / "checkpoints" / "last.safetensors"
    if not p.is_file():
        raise VisrepError(f"no checkpoint at '{source}' (expected a .safetensors file or a run directory)")
    return p


def load_checkpoint(source: str | Path, *, force: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a checkpoint, verified: its content hash, its metadata schema, its step.

    force=True loads a file whose content hash does not match (with a warning) instead of refusing it.
    A plain safetensors state dict (no visrep header, e.g. exported timm weights) loads with meta {}.
    """
    path = find_checkpoint(source)
    meta = read_checkpoint_meta(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint '{path}' is unreadable or truncated ({e})") from None
    if not meta:
        return tensors, {}
    recorded = meta.pop("sha256", None)
    intact = recorded is not None and checkpoint_sha256(tensors, meta) == recorded
    if recorded is None:
        warnings.warn(f"checkpoint '{path}' records no content hash (written by an older visrep); its integrity "
                      "is not verified", stacklevel=2)
    if STEP_KEY in tensors and int(tensors[STEP_KEY]) != meta.get("step") and not force:
        raise CheckpointError(f"checkpoint '{path}' says step {meta.get('step')} in its metadata but its tensors were "
                              f"saved at step {int(tensors[STEP_KEY])}; the header was edited or damaged; nothing "
                              "was loaded or overwritten")
    if recorded is not None and not intact:
        if not force:
            raise CheckpointError(
                f"checkpoint '{path}' fails its integrity check (its tensors or metadata do not match the SHA-256 "
                "recorded when it was written), so it is corrupted; nothing was loaded or overwritten; restore a "
                "copy, or pass --force to load it anyway")
        warnings.warn(f"loading '{path}' despite a failed integrity check (--force)", stacklevel=2)
    tensors.pop(STEP_KEY, None)
    return tensors, meta


def read_checkpoint_meta(source: str | Path) -> dict:
    """The checkpoint's visrep metadata, schema-checked, without reading its tensors ({} for a plain file)."""
    path = find_checkpoint(source)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint '{path}' is unreadable or truncated ({e})") from None
    if "visrep" not in header:
        return {}
    try:
        meta = json.loads(header["visrep"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint '{path}' has a corrupted metadata header (not JSON: {e.msg} at "
                              f"character {e.pos})") from None
    check_meta(meta, path)
    return meta


# The metadata schema: key -> (type, required). Training checkpoints carry the resume keys too.
_META_SCHEMA = {"config": (dict, True), "step": (int, False), "image_size": ((int, type(None)), False),
                "classes": ((list, type(None)), False), "epoch": ((int, float), False)}
_RESUME_SCHEMA = {"step": (int, True), "steps_per_epoch": (int, True), "total_steps": (int, True), "optimizer": (dict, True),
                  "probe_optimizer": (dict, True), "history": (list, True)}


def _check_keys(meta: dict, schema: dict, path, what: str) -> None:
    for key, (tp, required) in schema.items():
        if key not in meta:
            if required:
                raise CheckpointError(f"checkpoint '{path}' is not {what}: its metadata has no '{key}'")
            continue
        v = meta[key]
        if isinstance(v, bool) or not isinstance(v, tp):
            names = " or ".join(t.__name__ for t in (tp if isinstance(tp, tuple) else (tp,)))
            raise CheckpointError(f"checkpoint '{path}' has an invalid metadata field '{key}': expected {names}, "
                                  f"got {v!r:.60}")


def check_meta(meta: dict, path) -> None:
    """The schema every visrep checkpoint's metadata follows (one sentence per violation)."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint '{path}' has metadata that is not a mapping")
    _check_keys(meta, _META_SCHEMA, path, "a visrep checkpoint")
    if meta.get("step", 0) < 0:
        raise CheckpointError(f"checkpoint '{path}' has a negative step ({meta['step']}) in its metadata")


def check_resume_meta(meta: dict, path) -> None:
    """The extra schema of a training checkpoint that a run can resume from."""
    _check_keys(meta, _RESUME_SCHEMA, path, "a resumable training checkpoint")
    for key in ("optimizer", "probe_optimizer", "manifold_optimizer"):
        sub = meta.get(key)
        if sub is not None and (not isinstance(sub, dict) or not isinstance(sub.get("param_groups"), list)
                                or not isinstance(sub.get("scalars", {}), dict)):
            raise CheckpointError(f"checkpoint '{path}' has an invalid metadata field '{key}' (expected "
                                  "param_groups and scalars)")
    if meta["steps_per_epoch"] < 1 or meta["total_steps"] < 1:
        raise CheckpointError(f"checkpoint '{path}' has invalid step counts in its metadata")
    if not all(isinstance(h, dict) for h in meta["history"]):
        raise CheckpointError(f"checkpoint '{path}' has an invalid metadata field 'history' (expected records)")
    if meta["step"] > meta["total_steps"]:
        raise CheckpointError(f"checkpoint '{path}' says step {meta['step']}, beyond the run's "
                              f"{meta['total_steps']} total steps; the header was edited or damaged")


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


# --------------------------------------------------------------------- training state <-> tensors
def state_to_tensors(stateful: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and JSON metadata of a {prefix: module or optimizer} mapping: a module's state dict under its
    prefix ("model.", "probe."), an optimizer's tensors under its prefix and its hyper-parameters in the
    metadata as `<prefix>optimizer` ("" → "optimizer", "probe_" → "probe_optimizer")."""
    tensors, meta = {}, {}
    for prefix, obj in stateful.items():
        if isinstance(obj, torch.optim.Optimizer):
            t, m = optimizer_to_tensors(obj)
            tensors.update(add_prefix(t, prefix))
            meta[f"{prefix}optimizer"] = m
        else:
            tensors.update(add_prefix(obj.state_dict(), prefix))
    return tensors, meta


def state_from_tensors(stateful: dict, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Load what `state_to_tensors` wrote back into the same mapping (modules strictly)."""
    for prefix, obj in stateful.items():
        if isinstance(obj, torch.optim.Optimizer):
            optimizer_from_tensors(obj, strip_prefix(tensors, prefix), meta[f"{prefix}optimizer"])
        else:
            obj.load_state_dict(strip_prefix(tensors, prefix))


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
    try:
        for key, v in tensors.items():
            if not key.startswith("optim."):
                continue
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
        for key, v in meta.get("scalars", {}).items():
            pid, k = key.split(".", 1)
            state.setdefault(int(pid), {})[k] = v
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"the checkpoint's optimizer state does not fit this run's optimizer ({e})") from None
