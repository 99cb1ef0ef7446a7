"""E-TartanAir's samples: one per source-frame interval, kept or dropped by the public ECDDP code's rule.

The public recipe cuts every simulated trajectory at the TartanAir frame times (``i * 1e6`` us: one interval
is one second of sensor time) into one file per interval, ``{i:06d}_{i+1:06d}_event.hdf5``, holding the events
with ``i * 1e6 <= t < (i + 1) * 1e6`` as four lzf-compressed columns ``x u2, y u2, p i1, t f32`` with ``t`` in
microseconds since the trajectory's first frame (``generate_data/split_event.py``, ``save_events_h5`` and
``save_events``). ``get_file_path.py`` then lists one sample per file except interval 0 and every interval
whose own file or the previous interval's file is smaller than 100 KiB (``FILESIZE = 100 * 1024``).

This module reproduces that rule on evforge's event arrays: :func:`reference_file_bytes` is the size of the
file ``save_events_h5`` would write (written with the same h5py calls and measured on disk; exact up to a few
bytes of lzf nondeterminism, see there), and :func:`select_intervals` applies the keep rule. Sizes depend on
how well lzf compresses the columns. Measured on simulated 640x480 intervals thinned to different sizes, a file
reaches 100 KiB at about 11,000 evforge events (12,300 a thousand seconds into a trajectory, where float32
times repeat), but at about 24,400 events stamped as v2e stamps them (all events of a step share a few
"pillar" times, which lzf compresses well): the byte rule on evforge's events keeps sparser intervals than
the public code would keep for the same scene. ``min_events`` replaces the byte rule by a count for that.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import h5py
import numpy as np

__all__ = ["REFERENCE_MIN_BYTES", "reference_file_bytes", "reference_times", "interval_bounds",
           "IntervalSelection", "select_intervals"]

REFERENCE_MIN_BYTES = 100 * 1024  # get_file_path.py: FILESIZE

# why an interval is not a sample (``IntervalSelection.reason``); "" = kept
FIRST, LAST, SMALL, PREVIOUS_SMALL = "first", "last", "small", "previous_small"


def reference_times(t_us: np.ndarray, t0_us: int, float32_time: bool) -> np.ndarray:
    """Event times (int64 us) as the public code holds them, ``t - t0``: the time since the trajectory's
    first frame, and with ``float32_time`` rounded to float32 as ``split_event.py`` stores them (exact up to
    2**24 us = 16.8 s, then 2, 4, ... 128 us steps: 64 us at 1000 s). float32 values of integers are
    integers, so the result is still exact int64."""
    rel = np.asarray(t_us, dtype=np.int64) - np.int64(t0_us)
    return rel.astype(np.float32).astype(np.int64) if float32_time else rel


def reference_file_bytes(x: np.ndarray, y: np.ndarray, p: np.ndarray, t_rel_us: np.ndarray) -> int:
    """Bytes of the file ``split_event.py``'s ``save_events_h5`` writes for these events.

    ``p`` is +1/-1 or 1/0 (stored as int8 1/0, v2e's polarity), ``t_rel_us`` microseconds since the
    trajectory's first frame (stored as float32). The file is written with the reference's calls
    (``create_dataset(name, data=..., dtype=..., compression="lzf")`` in the order x, y, p, t) to a temporary
    file on disk and measured there: HDF5's in-memory and file-object drivers allocate metadata differently
    and give sizes up to 2 KB off. The size is the reference's for this h5py/HDF5 (metadata may differ by a
    few hundred bytes across HDF5 versions; the event columns are the bulk). It is exact only up to a few
    bytes: h5py's lzf leaves its hash table uninitialised (liblzf's ``INIT_HTAB 0``), so stale entries from an
    earlier call can find extra matches and the same columns compress a few bytes smaller now and then, in
    the public code as here. Only an interval within a few bytes of 100 KiB can be judged differently.
    """
    fd, path = tempfile.mkstemp(suffix=".hdf5", prefix="evforge-refsize-")
    os.close(fd)
    try:
        with h5py.File(path, "w") as f:
            f.create_dataset("x", data=np.asarray(x).astype(np.uint16), dtype=np.uint16, compression="lzf")
            f.create_dataset("y", data=np.asarray(y).astype(np.uint16), dtype=np.uint16, compression="lzf")
            f.create_dataset("p", data=(np.asarray(p) > 0).astype(np.int8), dtype=np.int8, compression="lzf")
            f.create_dataset("t", data=np.asarray(t_rel_us).astype(np.float32), dtype=np.float32,
                             compression="lzf")
        return os.path.getsize(path)
    finally:
        os.unlink(path)


def interval_bounds(t_us: np.ndarray, frame_times: np.ndarray) -> np.ndarray:
    """Event index bounds of the intervals: interval ``i`` is ``bounds[i]:bounds[i+1]``, the events with
    ``frame_times[i] <= t < frame_times[i+1]`` (``np.searchsorted(..., "left")``, as ``split_event.py``)."""
    return np.searchsorted(np.asarray(t_us), np.asarray(frame_times, dtype=np.int64), "left")


@dataclass(frozen=True)
class IntervalSelection:
    """Per interval of one trajectory: its event count, its reference file size (None when not computed),
    whether it is a sample, and why not (``first``, ``last``, ``small``, ``previous_small``; ``""`` = kept)."""

    counts: np.ndarray
    sizes: np.ndarray | None
    keep: np.ndarray
    reason: list[str]

    @property
    def kept(self) -> np.ndarray:
        """Indices of the kept intervals."""
        return np.flatnonzero(self.keep)

    def dropped(self) -> dict[str, int]:
        """How many intervals were dropped, by reason."""
        out: dict[str, int] = {}
        for r in self.reason:
            if r:
                out[r] = out.get(r, 0) + 1
        return out


def select_intervals(counts, sizes=None, *, drop_first: bool = True, drop_last: bool = False,
                     min_bytes: int = REFERENCE_MIN_BYTES, min_events: int | None = None) -> IntervalSelection:
    """The keep rule of ``get_file_path.py`` over one trajectory's intervals.

    Interval ``i`` is kept iff ``i > 0`` (``drop_first``), it is not the last one (``drop_last``: the public
    code never simulates a trajectory's last TartanAir interval, see the recipe), and both its own size and
    interval ``i-1``'s are at least ``min_bytes`` (``sizes``, from :func:`reference_file_bytes`), or, when
    ``min_events`` is given, at least ``min_events`` events instead. With no previous interval (``i = 0``
    kept) only its own size counts. ``min_bytes = 0`` and no ``min_events`` keeps every size.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n = len(counts)
    if min_events is not None:
        big = counts >= int(min_events)
    elif min_bytes > 0:
        if sizes is None:
            raise ValueError("select_intervals: min_bytes > 0 needs the reference file sizes")
        big = np.asarray(sizes, dtype=np.int64) >= int(min_bytes)
    else:
        big = np.ones(n, dtype=bool)
    reason = []
    for i in range(n):
        if drop_first and i == 0:
            reason.append(FIRST)
        elif drop_last and i == n - 1:
            reason.append(LAST)
        elif not big[i]:
            reason.append(SMALL)
        elif i > 0 and not big[i - 1]:
            reason.append(PREVIOUS_SMALL)
        else:
            reason.append("")
    keep = np.array([not r for r in reason], dtype=bool)
    return IntervalSelection(counts=counts, sizes=None if sizes is None else np.asarray(sizes, np.int64),
                             keep=keep, reason=reason)
