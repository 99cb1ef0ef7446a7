"""Registries: a name -> an object, or a ``"module:attribute"`` imported only when asked for.

One mechanism for pretraining methods, finetuning tasks, converters and representations: adding an entry is
one line, and listing the names imports nothing heavy (timm, Lightning, video decoders).
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Iterator

__all__ = ["Registry", "lazy_exports"]


class Registry:
    """Named entries of one kind (``what``: e.g. "converter"), each an object or a lazy ``"module:attr"``."""

    def __init__(self, what: str, entries: dict[str, Any] | None = None):
        self.what = what
        self._entries: dict[str, Any] = dict(entries or {})

    def register(self, name: str, entry: Any) -> None:
        """Add (or replace) ``name`` in this process: an object or a ``"module:attr"`` string. Worker processes
        resolve names themselves, so an entry used by workers must be registered where they import it."""
        self._entries[name] = entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Any:
        """The entry ``name`` (imported on first use); a ValueError naming the known ones (and the closest)."""
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), self.names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown {self.what} {name!r}{hint}; known: {self.names()}")
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            try:
                entry = getattr(importlib.import_module(module), attr)
            except ModuleNotFoundError as err:
                if err.name != module:  # the module exists but one of its own imports is missing: a real error
                    raise
                raise ValueError(f"{self.what} {name!r} is not available in this installation ({module} "
                                 f"not found)") from None
            self._entries[name] = entry
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {self.names()})"


def lazy_exports(package: str, exports: dict[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """A package's ``__getattr__`` and ``__dir__`` for names defined in its submodules (``exports``: name ->
    module), imported on first access (PEP 562) so that importing the package stays cheap."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # the next access skips this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
