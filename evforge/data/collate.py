"""Packed event batches: variable-length samples in flat columns plus offsets (no padding).

:func:`collate_events` packs a list of dataset items into an :class:`EventBatch`, the form every
representation (voxel grids, histograms, ...) and augmentation scatters from on the CPU or the GPU.
:class:`EventBatch` also reads and writes like a dict (``batch["x"]``, ``"t0" in batch``, ``dict(batch)``), so
functions that take a packed batch accept a plain dict with the same keys too (tests build them by hand).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from evforge.formats.events import EVENT_DTYPE

__all__ = ["EventBatch", "EVENT_COLUMNS", "collate_events", "unpack", "to_device"]

EVENT_COLUMNS = ("x", "y", "t", "p", "batch_index")  # one entry per event; the other fields one per sample


@dataclass
class EventBatch:
    """A batch of B samples' events packed into flat columns.

    ``x``, ``y`` (int32), ``t`` (int64 us, **relative to each sample's first event**, so it fits any
    representation's time normalisation and float32 without losing precision), ``p`` (int8, +1/-1),
    ``batch_index`` (int64, the sample of each event); ``offsets`` (int64, B+1: sample ``b`` is
    ``offsets[b]:offsets[b+1]``), ``t0`` (int64, B: the absolute time subtracted: the first event's t, or
    ``t_start`` / 0 for an empty sample), ``label`` (int64, B), ``key`` (B str); ``t_start`` / ``t_end``
    (int64, B, absolute us) for stream windows, else None; ``extra``: a task's own per-sample columns
    (e.g. segmentation's ``mask``), also reachable as ``batch["mask"]``.
    """

    x: Tensor
    y: Tensor
    t: Tensor
    p: Tensor
    batch_index: Tensor
    offsets: Tensor
    t0: Tensor
    label: Tensor
    key: list[str]
    t_start: Tensor | None = None
    t_end: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(self.offsets.numel()) - 1

    @property
    def num_events(self) -> int:
        return int(self.t.numel())

    def sample(self, b: int) -> np.ndarray:
        """Sample ``b`` as an EVENT_DTYPE array with absolute ``t`` (the inverse of the collate)."""
        return unpack(self, b)

    def replace(self, **fields) -> "EventBatch":
        """A shallow copy with ``fields`` replaced (names outside the dataclass go to ``extra``)."""
        own = {k: v for k, v in fields.items() if k in _FIELDS}
        out = dataclasses.replace(self, **own, extra=dict(self.extra))
        out.extra.update((k, v) for k, v in fields.items() if k not in _FIELDS)
        return out

    def to(self, device, non_blocking: bool = False) -> "EventBatch":
        """Every tensor moved to ``device`` (``key`` and other non-tensors kept)."""
        return self._map(lambda v: v.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "EventBatch":
        """Called by DataLoader(pin_memory=True) on the batches of :func:`collate_events`."""
        return self._map(lambda v: v.pin_memory())

    def _map(self, fn) -> "EventBatch":
        moved = {k: fn(v) for k, v in self.items() if torch.is_tensor(v)}
        return self.replace(**moved)

    # ---- dict-style access: the field names with a value, then the extra columns
    def keys(self) -> list[str]:
        return [f for f in _FIELDS if getattr(self, f) is not None] + list(self.extra)

    def items(self) -> list[tuple[str, Any]]:
        return [(k, self[k]) for k in self.keys()]

    def values(self) -> list[Any]:
        return [self[k] for k in self.keys()]

    def get(self, name: str, default=None):
        return self[name] if name in self else default

    def __getitem__(self, name: str):
        if name in _FIELDS:
            value = getattr(self, name)
            if value is not None:
                return value
        elif name in self.extra:
            return self.extra[name]
        raise KeyError(name)

    def __setitem__(self, name: str, value) -> None:
        if name in _FIELDS:
            setattr(self, name, value)
        else:
            self.extra[name] = value

    def __contains__(self, name: object) -> bool:
        return (name in _FIELDS and getattr(self, name) is not None) or name in self.extra

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())


_FIELDS = tuple(f.name for f in dataclasses.fields(EventBatch) if f.name != "extra")


def _empty(n: int, dtype: torch.dtype) -> Tensor:
    """An uninitialised 1-D tensor; in a DataLoader worker it is allocated in shared memory (as torch's
    default_collate does), so sending the batch to the main process does not copy it again."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(n, dtype=dtype)
    try:
        storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(n, device="cpu")
    except AttributeError:  # private torch API (what default_collate uses); fall back to a copy
        return torch.empty(n, dtype=dtype).share_memory_()
    return torch.empty(0, dtype=dtype).set_(storage)


def collate_events(items: list[dict]) -> EventBatch:
    """Dataset items (``events``, ``label``, ``key``, optionally ``t_start``/``t_end``) -> one :class:`EventBatch`."""
    counts = np.array([len(item["events"]) for item in items], dtype=np.int64)
    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    n = int(offsets[-1])
    x, y, t, p, batch_index = (_empty(n, dtype) for dtype in (torch.int32, torch.int32, torch.int64,
                                                               torch.int8, torch.int64))
    xn, yn, tn, pn, bn = x.numpy(), y.numpy(), t.numpy(), p.numpy(), batch_index.numpy()
    t0 = np.zeros(len(items), dtype=np.int64)
    for b, item in enumerate(items):  # one strided copy per field into the packed columns
        ev, a, z = item["events"], offsets[b], offsets[b + 1]
        t0[b] = ev["t"][0] if len(ev) else int(item.get("t_start", 0))
        xn[a:z], yn[a:z], pn[a:z] = ev["x"], ev["y"], ev["p"]
        np.subtract(ev["t"], t0[b], out=tn[a:z])
        bn[a:z] = b  # a fill: much faster than repeat / repeat_interleave
    windows = bool(items) and all("t_start" in item and "t_end" in item for item in items)
    return EventBatch(
        x=x, y=y, t=t, p=p, batch_index=batch_index,
        offsets=torch.from_numpy(offsets),
        t0=torch.from_numpy(t0),
        label=torch.tensor([int(item["label"]) for item in items], dtype=torch.int64),
        key=[item["key"] for item in items],
        t_start=torch.tensor([int(item["t_start"]) for item in items], dtype=torch.int64) if windows else None,
        t_end=torch.tensor([int(item["t_end"]) for item in items], dtype=torch.int64) if windows else None,
    )


def unpack(packed, b: int) -> np.ndarray:
    """Sample ``b`` of a packed batch (an :class:`EventBatch` or a dict with its keys) as an EVENT_DTYPE array
    with absolute ``t``."""
    a, z = int(packed["offsets"][b]), int(packed["offsets"][b + 1])
    ev = np.empty(z - a, dtype=EVENT_DTYPE)
    ev["x"] = packed["x"][a:z].cpu().numpy()
    ev["y"] = packed["y"][a:z].cpu().numpy()
    ev["t"] = packed["t"][a:z].cpu().numpy() + int(packed["t0"][b])
    ev["p"] = packed["p"][a:z].cpu().numpy()
    return ev


def to_device(batch, device, non_blocking: bool = False):
    """A packed batch (EventBatch or dict) with its tensors on ``device``."""
    if isinstance(batch, EventBatch):
        return batch.to(device, non_blocking=non_blocking)
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}
