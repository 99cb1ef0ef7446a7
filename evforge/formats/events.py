"""The one event representation used across evforge.

Events are a structured numpy array with tonic-compatible field names::

    x u2, y u2, t i8 (microseconds), p i1 (+1 ON / -1 OFF)

sorted by ``t`` (non-decreasing). For training, samples are packed into flat tensors plus offsets
(:class:`evforge.data.collate.EventBatch`). File formats with other conventions (DSEC's ``p`` in {0, 1},
``t`` as ``u4`` relative to a ``t_offset``) are converted at the reader/writer boundary, never inside the
library.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

EVENT_DTYPE = np.dtype([("x", "<u2"), ("y", "<u2"), ("t", "<i8"), ("p", "i1")])


class EventFormatError(ValueError):
    """An event array breaks an invariant (dtype, sort order, coordinates, polarity)."""


def make_events(x, y, t, p) -> np.ndarray:
    """Build an event array from four equal-length columns (polarity given as +1/-1, or 1/0 with 0 -> -1)."""
    x, y, t, p = (np.asarray(a) for a in (x, y, t, p))
    n = len(t)
    if not (len(x) == len(y) == len(p) == n):
        raise EventFormatError(f"columns differ in length: x {len(x)}, y {len(y)}, t {n}, p {len(p)}")
    ev = np.empty(n, dtype=EVENT_DTYPE)
    ev["x"], ev["y"], ev["t"] = x, y, t
    ev["p"] = np.where(p > 0, 1, -1)
    return ev


def empty_events(n: int = 0) -> np.ndarray:
    return np.zeros(n, dtype=EVENT_DTYPE)


def concatenate(chunks: Iterable[np.ndarray]) -> np.ndarray:
    chunks = [c for c in chunks if len(c)]
    return np.concatenate(chunks) if chunks else empty_events()


def event_problem(events, sensor_size: tuple[int, int] | None = None) -> str | None:
    """The first broken invariant of an event array, in words, or None, checked in this order: EVENT_DTYPE,
    ``x < width`` and ``y < height`` for ``sensor_size = (width, height)``, timestamps in order, polarity
    +1/-1."""
    if not isinstance(events, np.ndarray) or events.dtype != EVENT_DTYPE:
        return f"expected dtype {EVENT_DTYPE.descr}, got {getattr(events, 'dtype', type(events).__name__)}"
    if len(events) == 0 or _events_ok(events, sensor_size):  # the common case: whole-array checks only
        return None
    if sensor_size is not None:
        width, height = sensor_size
        for name, limit in (("x", width), ("y", height)):
            over = np.flatnonzero(events[name] >= limit)
            if over.size:
                i = int(over[0])
                return f"{name}={events[name][i]} at index {i} is outside the {width}x{height} sensor"
    t = events["t"]
    bad = np.flatnonzero(t[1:] < t[:-1])
    if bad.size:
        i = int(bad[0]) + 1
        return f"timestamps not sorted at index {i} ({t[i - 1]} > {t[i]})"
    p = events["p"]
    bad = np.flatnonzero((p != 1) & (p != -1))
    if bad.size:
        return f"polarity {p[bad[0]]} at index {int(bad[0])} is not +1 or -1"
    return None


def _events_ok(events: np.ndarray, sensor_size) -> bool:
    """True when :func:`event_problem` would find nothing wrong (a non-empty EVENT_DTYPE array)."""
    if events.ndim != 1:
        return False
    if sensor_size is not None:
        width, height = sensor_size
        if not (events["x"].max() < width and events["y"].max() < height):
            return False
    t = np.ascontiguousarray(events["t"])
    if np.any(t[1:] < t[:-1]):
        return False
    p = np.ascontiguousarray(events["p"])
    return bool(p.min() >= -1 and p.max() <= 1 and not np.any(p == 0))


def validate_events(events: np.ndarray, sensor_size: tuple[int, int] | None = None, *, what: str = "events") -> None:
    """Raise :class:`EventFormatError` naming ``what`` and the first broken invariant (:func:`event_problem`).

    ``sensor_size`` is ``(width, height)``; coordinates must satisfy ``x < width`` and ``y < height``.
    """
    problem = event_problem(events, sensor_size)
    if problem:
        raise EventFormatError(f"{what}: {problem}")


def time_index(events: np.ndarray, t_start: int, t_end: int) -> tuple[int, int]:
    """Index range ``[i0, i1)`` of the events with ``t_start <= t < t_end`` (binary search; ``t`` sorted)."""
    t = events["t"]
    return int(np.searchsorted(t, t_start, "left")), int(np.searchsorted(t, t_end, "left"))


def slice_by_time(events: np.ndarray, t_start: int, t_end: int) -> np.ndarray:
    """Events with ``t_start <= t < t_end``, as a view (no copy)."""
    i0, i1 = time_index(events, t_start, t_end)
    return events[i0:i1]


def slice_by_count(events: np.ndarray, n: int, *, end: int | None = None) -> np.ndarray:
    """The ``n`` events that end at index ``end`` (default: the last ``n``), as a view."""
    end = len(events) if end is None else end
    return events[max(0, end - n) : end]
