"""The converter protocol: what every dataset converter provides to the build runner.

A converter *scans* a source tree into a :class:`DatasetPlan` (classes, sensor size, one
:class:`SourceItem` per sample with its split) and *reads* one item into :class:`Sample` objects. The
runner (``evforge.dataset_builder.build``) groups items into work units, one shard each, and runs them
locally or on Ray; converters never write files themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class SourceItem:
    """One source sample: ``key`` is unique in the dataset (e.g. ``"airplanes/image_0001"``)."""

    key: str
    path: str  # the source file (named in error reports)
    label: int = -1  # -1: unlabelled
    split: str = "train"
    extra: tuple = ()  # converter-specific, hashable (e.g. a label-image folder)


@dataclass
class Sample:
    """One converted sample, as the shard writer takes it."""

    key: str
    events: np.ndarray  # evforge.formats.events.EVENT_DTYPE, absolute t in us
    label: int = -1
    frame_times: np.ndarray | None = None  # stream samples: source-frame (or label) times, us
    attrs: dict = field(default_factory=dict)
    frame_images: np.ndarray | None = None  # stream samples: optional (F, H, W) uint8 per frame (e.g. labels)


@dataclass
class DatasetPlan:
    name: str
    kind: str  # "samples" or "streams"
    sensor_size: tuple[int, int]  # (width, height)
    classes: list[str]
    items: list[SourceItem]
    params: dict = field(default_factory=dict)  # converter parameters, recorded in the manifest provenance


class Converter(Protocol):
    name: str

    def scan(self, src: Path, **options) -> DatasetPlan:
        """List the samples of ``src`` with labels and splits; raise InputError if ``src`` is unusable."""

    def read(self, item: SourceItem, plan: DatasetPlan) -> list[Sample]:
        """Decode one item (may yield several samples); raise InputError naming the file on bad input."""
