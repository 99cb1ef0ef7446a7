"""Converter registry: ``get_converter(name)`` returns a fresh converter (see :mod:`.base` for the protocol).

``CONVERTERS`` maps names to classes imported here. Converters whose modules are costly to import (torch,
video decoders) are listed in ``_LAZY`` as ``"module:Class"`` and imported on first request; other code can
add converters at run time with :func:`register`. Workers resolve converters by name, so a converter must be
importable in every worker process (``register`` only affects the process that calls it).
"""

from __future__ import annotations

import importlib

from .base import Converter, DatasetPlan, Sample, SourceItem
from .ncaltech101 import NCaltech101Converter
from .ncars import NCarsConverter
from .nimagenet import NImageNetConverter

__all__ = ["CONVERTERS", "get_converter", "register", "available", "Converter", "DatasetPlan", "Sample",
           "SourceItem"]

CONVERTERS: dict[str, type] = {
    "ncaltech101": NCaltech101Converter,
    "ncars": NCarsConverter,
    "nimagenet": NImageNetConverter,
}

# ---- other converters: add "name": "module:Class" here (imported only when asked for) ----
_LAZY: dict[str, str] = {
    "dsec": "evforge.dataset_builder.converters.dsec:DSECConverter",
    "tartanair": "evforge.dataset_builder.converters.tartanair:TartanAirConverter",
    "recordings": "evforge.dataset_builder.converters.recordings:RecordingsConverter",
}


def register(name: str, cls: type) -> None:
    """Add (or replace) converter ``name`` in this process."""
    CONVERTERS[name] = cls


def available() -> list[str]:
    """Names of all converters, registered or lazy (a lazy one may still fail to import)."""
    return sorted(set(CONVERTERS) | set(_LAZY))


def get_converter(name: str):
    """A new instance of converter ``name``; ValueError names the known converters for an unknown one."""
    if name not in CONVERTERS and name in _LAZY:
        module, _, attr = _LAZY[name].partition(":")
        try:
            CONVERTERS[name] = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as err:
            if err.name != module:  # the module exists but one of its own imports is missing: a real error
                raise
            raise ValueError(f"converter {name!r} is not available in this installation ({module} "
                             f"not found)") from None
    if name not in CONVERTERS:
        raise ValueError(f"unknown converter {name!r}; known: {', '.join(available())}")
    return CONVERTERS[name]()
