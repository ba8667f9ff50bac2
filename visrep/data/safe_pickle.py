"""A pickle reader that can only rebuild numpy arrays and plain Python values.

    obj = load_arrays_pickle(path)   # dicts, lists, str/bytes/numbers, numpy arrays; nothing else

Pickle runs whatever callable a file names, so a crafted file runs code on `pickle.load`. This reader
(like `torch.load(weights_only=True)`) resolves only the globals that numpy array pickles use; any other
global raises `ForbiddenGlobal` before it is called, so nothing from the file executes. It exists for
the CIFAR python batches, which are only distributed as pickles.
"""
from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import numpy as np

__all__ = ["ForbiddenGlobal", "RestrictedUnpickler", "load_arrays_pickle"]


class ForbiddenGlobal(pickle.UnpicklingError):
    """The file asks for a global (a function or class) outside the allowed set."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _numpy(module: str, name: str):
    """`name` from numpy's `_core` (numpy >= 2) or `core` (1.x) without touching the deprecated alias."""
    for prefix in ("numpy._core.", "numpy.core."):
        try:
            return getattr(importlib.import_module(prefix + module), name)
        except (ImportError, AttributeError):
            continue
    raise ForbiddenGlobal(f"numpy.{module}.{name}")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes: latin-1 only, no other codec."""
    if encoding not in ("latin1", "latin-1", "iso-8859-1"):
        raise ForbiddenGlobal(f"_codecs.encode(..., {encoding!r})")
    return text.encode("latin1")


def _allowed() -> dict[tuple[str, str], object]:
    rebuild = _numpy("multiarray", "_reconstruct")  # ndarray.__reduce__ (protocols 0-4)
    scalar = _numpy("multiarray", "scalar")  # numpy scalars, e.g. labels written as list(np_array)
    frombuffer = _numpy("numeric", "_frombuffer")  # ndarray.__reduce_ex__(5)
    out = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode}
    for core in ("numpy.core", "numpy._core"):  # files written by numpy 1.x and 2.x
        out[(f"{core}.multiarray", "_reconstruct")] = rebuild
        out[(f"{core}.multiarray", "scalar")] = scalar
        out[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return out


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose globals are limited to numpy arrays, dtypes and scalars."""

    _ALLOWED: dict | None = None

    def find_class(self, module: str, name: str):
        allowed = type(self)._ALLOWED
        if allowed is None:
            allowed = type(self)._ALLOWED = _allowed()
        try:
            return allowed[(module, name)]
        except KeyError:
            raise ForbiddenGlobal(f"{module}.{name}") from None


def load_arrays_pickle(path: str | Path, encoding: str = "latin1"):
    """Unpickle `path` with `RestrictedUnpickler`. `encoding="latin1"` reads Python 2 pickles (the
    official CIFAR files) as numpy documents; bytes written by Python 3 stay bytes."""
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, encoding=encoding).load()
