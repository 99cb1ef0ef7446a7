"""Frame times of a sequence: timestamps files (any unit, exact to the microsecond), fixed frame rates, and the
checks that refuse a time base the simulator should not run on (a wrong unit, an hour-long step).

Frame times are checked when a sequence is found, before any simulation (:func:`check_time_base`): a median
frame interval over 10 s is taken for timestamps in another unit (microseconds read as seconds made each
interval 10**6 times too long and filled gigabytes with noise events before anything failed), and one
interval over an hour, or a span over 2**63-1 us, is refused too. Epoch timestamps are fine: stream files
keep times relative to their first frame, and its absolute time as ``t_offset``.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

import numpy as np

from evforge.errors import InputError

from .frame_files import why

TIMESTAMPS_FILE = "timestamps.txt"
# Microseconds per unit; Decimal keeps ns epoch timestamps (~1.7e18) exact.
TIMESTAMP_UNITS = {"s": Decimal(1_000_000), "ms": Decimal(1000), "us": Decimal(1), "ns": Decimal("0.001")}
MAX_MEDIAN_INTERVAL_US = 10_000_000  # a longer median frame interval means timestamps in another unit
MAX_INTERVAL_US = 3_600_000_000  # one simulation step holds the events (noise) of its whole interval in memory
MAX_SPAN_US = 2**63 - 1  # what a stream file holds after its t_offset (/events/t u8)
_UNIT_FIX = "pass --timestamps-unit with the file's unit (s, ms, us or ns; read as {unit!r})"


def read_timestamps(path: str, n_frames: int, unit: str = "s") -> np.ndarray:
    """Int64 microseconds from a text file: one number per line (last column), ``#`` comments skipped."""
    scale = TIMESTAMP_UNITS[unit]
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read timestamps: {why(exc, path)}") from None
    values, line_numbers = [], []
    for number, line in enumerate(lines, 1):
        columns = [c for c in re.split(r"[\s,]+", line.split("#", 1)[0]) if c]
        if not columns:
            continue
        try:
            value = Decimal(columns[-1])
        except InvalidOperation:
            value = Decimal("nan")
        us = (value * scale).to_integral_value(ROUND_HALF_EVEN) if value.is_finite() else None
        if us is None:
            raise InputError(path, f"line {number}: {columns[-1]!r} is not a valid timestamp")
        if abs(us) >= 2**63:
            raise InputError(path, f"line {number}: {columns[-1]} {unit} is {float(us):.3g} us, beyond the 2**63 us "
                                   f"of a timestamp: {_UNIT_FIX.format(unit=unit)}")
        values.append(int(us))
        line_numbers.append(number)
    if len(values) != n_frames:
        raise InputError(path, f"has {len(values)} timestamps for {n_frames} frames")
    t = np.array(values, dtype=np.int64)
    bad = np.flatnonzero(np.diff(t) <= 0)
    if bad.size:
        k = int(bad[0]) + 1
        raise InputError(path, f"timestamps must strictly increase: line {line_numbers[k]} ({t[k]} us) "
                               f"is not after line {line_numbers[k - 1]} ({t[k - 1]} us)")
    check_time_base(t, path, _UNIT_FIX.format(unit=unit), lines=line_numbers)
    return t


def check_time_base(t_us: np.ndarray, where: str, fix: str, lines: list[int] | None = None) -> None:
    """Refuse frame times (int64 us, strictly increasing) that the simulator should not run on, in one line
    naming ``where`` and ending with ``fix``: a median interval over 10 s (a wrong unit), one interval over an
    hour (its events would fill memory in one step), or a span a stream file cannot hold. ``lines``: the
    file's line number of each time, for the message. Costs one pass over the times, nothing is simulated."""
    if len(t_us) < 2:
        return
    span = int(t_us[-1]) - int(t_us[0])  # Python ints: no int64 overflow
    if span > MAX_SPAN_US:
        raise InputError(where, f"frame times span {span} us, more than the {MAX_SPAN_US} us a stream file holds: "
                                f"{fix}")
    gaps = np.diff(t_us)
    median = float(np.median(gaps))
    if median > MAX_MEDIAN_INTERVAL_US:
        raise InputError(where, f"median frame interval is {median / 1e6:.6g} s, more than "
                                f"{MAX_MEDIAN_INTERVAL_US / 1e6:g} s: timestamps in another unit? {fix}")
    i = int(np.argmax(gaps))
    if gaps[i] > MAX_INTERVAL_US:
        at = f"lines {lines[i]} and {lines[i + 1]}" if lines else f"frames {i} and {i + 1}"
        raise InputError(where, f"{at} are {gaps[i] / 1e6:.6g} s apart, more than {MAX_INTERVAL_US / 3.6e9:g} h "
                                f"(one simulation step would hold that long's events in memory): split the "
                                f"sequence there, or {fix}")


def rate_timestamps(n: int, fps: float) -> np.ndarray:
    """``round(i * 1e6 / fps)`` for ``i < n``."""
    return np.round(np.arange(n, dtype=np.float64) * 1e6 / fps).astype(np.int64)
