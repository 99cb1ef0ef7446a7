"""Converter registry: ``get_converter(name)`` returns a fresh converter (see :mod:`.base` for the protocol).

``CONVERTERS`` (an :class:`evforge.registry.Registry`) maps names to classes; converters whose modules are costly
to import (torch, video decoders) are entered as ``"module:Class"`` and imported on first request. Other code
can add converters at run time with :func:`register`. Workers resolve converters by name, so a converter must
be importable in every worker process (``register`` only affects the process that calls it).
"""

from __future__ import annotations

from evforge.registry import Registry

from .base import Converter, DatasetPlan, Sample, SourceItem
from .ncaltech101 import NCaltech101Converter
from .ncars import NCarsConverter
from .nimagenet import NImageNetConverter

__all__ = ["CONVERTERS", "get_converter", "register", "available", "Converter", "DatasetPlan", "Sample",
           "SourceItem"]

CONVERTERS = Registry("converter", {
    "ncaltech101": NCaltech101Converter,
    "ncars": NCarsConverter,
    "nimagenet": NImageNetConverter,
    "dsec": "evforge.dataset_builder.converters.dsec:DSECConverter",
    "tartanair": "evforge.dataset_builder.converters.tartanair:TartanAirConverter",
    "recordings": "evforge.dataset_builder.converters.recordings:RecordingsConverter",
})


def register(name: str, cls: type) -> None:
    """Add (or replace) converter ``name`` in this process."""
    CONVERTERS.register(name, cls)


def available() -> list[str]:
    """Names of all converters (a lazy one may still fail to import)."""
    return CONVERTERS.names()


def get_converter(name: str):
    """A new instance of converter ``name``; ValueError names the known converters for an unknown one."""
    return CONVERTERS.get(name)()
