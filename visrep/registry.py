"""One registry per kind of part (datasets, views, backbones, methods, objectives...).

Everything a user can name in a config is registered here, so `visrep list KIND` can show
it and a typo gives an error that lists the valid choices.
"""
from __future__ import annotations

import difflib
from typing import Callable, Dict, Iterator, Tuple

from visrep.errors import ConfigError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, Callable] = {}

    def register(self, name: str | None = None):
        """Decorator: `@BACKBONES.register("resnet18")`."""

        def deco(obj):
            key = name or obj.__name__
            if key in self._items:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._items[key] = obj
            return obj

        return deco

    def add(self, name: str, obj) -> None:
        self.register(name)(obj)

    def get(self, name: str):
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown {self.kind} '{name}'{hint}; valid choices: {', '.join(sorted(self._items))}"
            )
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> Iterator[Tuple[str, Callable]]:
        return iter(sorted(self._items.items()))

    def describe(self) -> list[tuple[str, str]]:
        """(name, first line of the docstring) for `visrep list`."""
        out = []
        for key, obj in self.items():
            doc = getattr(obj, "description", None) or (obj.__doc__ or "")
            out.append((key, doc.strip().splitlines()[0] if doc.strip() else ""))
        return out
