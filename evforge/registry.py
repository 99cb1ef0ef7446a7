"""Name -> ``"module:attribute"`` registries (pretraining methods, finetuning tasks), imported only when asked
for: adding an entry is one line, and listing the names imports nothing heavy (timm, Lightning)."""

from __future__ import annotations

import importlib

__all__ = ["lookup"]


def lookup(registry: dict[str, str], name: str, what: str):
    """The object ``registry[name]`` names, imported on demand; a ValueError naming the known ones otherwise
    (``what``: e.g. "pretraining task")."""
    try:
        module, attr = registry[name].split(":")
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; known: {sorted(registry)}") from None
    return getattr(importlib.import_module(module), attr)
