"""Any event source as one time-ordered event array: :func:`load_source`.

* a recording or stream file (:func:`evforge.formats.open_recording`: ``.aedat4 .raw .dat .h5``);
* an ATIS ``.bin`` (N-MNIST / N-Caltech101 sample);
* a shard (``.h5`` with ``evforge_format = "shard"``) or a dataset folder / ``manifest.json`` (its ``split``):
  the samples are laid end to end, each shifted so that it starts where the previous one ended
  (``t_end``), so rates and intervals are those inside the samples (gaps between them are not counted).

At most ``max_events`` events are taken (the first ones in time); the sensor size is the source's, or
``sensor_size`` when given, or, when the file states none (DAT without a size, ATIS), the largest x/y + 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from evforge.errors import InputError
from evforge.formats.events import EVENT_DTYPE

__all__ = ["EventSource", "load_source"]

DEFAULT_MAX_EVENTS = 5_000_000


@dataclass
class EventSource:
    """Events (EVENT_DTYPE, t non-decreasing), sensor size (W, H), a name and the kind of source."""

    name: str
    kind: str
    events: np.ndarray
    sensor_size: tuple[int, int]
    truncated: bool = False  # max_events cut it short

    @property
    def duration_us(self) -> int:
        return int(self.events["t"][-1] - self.events["t"][0]) + 1 if len(self.events) else 0


def load_source(path, *, max_events: int = DEFAULT_MAX_EVENTS, sensor_size=None, split: str = "train") -> EventSource:
    """Load ``path`` (see the module docstring); InputError naming it when it is unusable or empty."""
    path = Path(path)
    if path.is_dir() or path.name == "manifest.json":
        ev, size, kind = _dataset(path, split, max_events)
    elif path.suffix.lower() == ".bin":
        from evforge.formats.decoders import read_atis_bin

        ev, size, kind = read_atis_bin(path)[:max_events], None, "atis"
    elif path.suffix.lower() in (".h5", ".hdf5") and _is_shard(path):
        ev, size, kind = _shards([path], max_events)
        kind = "shard"
    else:
        from evforge.formats import open_recording

        rec = open_recording(path)
        parts, n = [], 0
        for chunk in rec.chunks():
            parts.append(chunk.events[: max_events - n])
            n += len(parts[-1])
            if n >= max_events:
                break
        ev = np.concatenate(parts) if parts else np.empty(0, EVENT_DTYPE)
        size, kind = rec.sensor_size, rec.format
    if not len(ev):
        raise InputError(path, "no events")
    if (np.diff(ev["t"]) < 0).any():
        raise InputError(path, "timestamps go back: the statistics need a time-ordered source")
    truncated = len(ev) >= max_events
    if sensor_size is not None:
        size = tuple(int(v) for v in sensor_size)
    elif size is None:
        size = (int(ev["x"].max()) + 1, int(ev["y"].max()) + 1)
    if ev["x"].max() >= size[0] or ev["y"].max() >= size[1]:
        raise InputError(path, f"events outside the {size[0]}x{size[1]} sensor")
    return EventSource(name=path.name, kind=kind, events=ev, sensor_size=(int(size[0]), int(size[1])),
                       truncated=truncated)


def _is_shard(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("evforge_format") == "shard"
    except OSError as err:
        raise InputError(path, f"not a readable HDF5 file ({err})") from None


def _shards(paths, max_events: int):
    from evforge.formats.shards import ShardReader

    parts, n, clock, size = [], 0, 0, None
    for p in paths:
        with ShardReader(p) as r:
            size = r.sensor_size
            for i in range(len(r)):
                ev = r.events(i)[: max_events - n].copy()
                row = r.index[i]
                ev["t"] += clock - int(row["t_start"])
                clock += int(row["t_end"]) - int(row["t_start"])
                parts.append(ev)
                n += len(ev)
                if n >= max_events:
                    return np.concatenate(parts), size, "shards"
    return (np.concatenate(parts) if parts else np.empty(0, EVENT_DTYPE)), size, "shards"


def _dataset(path: Path, split: str, max_events: int):
    from evforge.data.dataset import resolve_manifest
    from evforge.formats.manifest import Manifest

    manifest_path = resolve_manifest(path)
    manifest = Manifest.load(manifest_path)  # refuses an incomplete dataset
    shards = manifest.shard_paths(manifest_path.parent, split)
    if not shards:
        raise InputError(manifest_path, f"no shards in split {split!r}")
    ev, size, _ = _shards(shards, max_events)
    return ev, size, "dataset"
