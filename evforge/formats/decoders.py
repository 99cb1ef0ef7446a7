"""Vectorised decoders (and tiny encoders) for the raw formats of the real event datasets.

Every reader returns an :data:`~evforge.formats.events.EVENT_DTYPE` array (``x u2, y u2, t i8 us, p i1 +1/-1``) sorted
by ``t`` (stable sort, so a file that is already in time order keeps its event order) and raises
:class:`~evforge.errors.InputError` ``"<path>: <problem>"`` on bad input. An empty sample is an error.

Formats
-------
ATIS 40-bit ``.bin`` (N-MNIST, N-Caltech101), 5 bytes an event::

    byte0 = x   byte1 = y   byte2 = p<<7 | t[22:16]   byte3 = t[15:8]   byte4 = t[7:0]      (t in us)

  ``p`` bit set = ON. An event with ``y == 240`` is a timestamp-overflow marker: it is dropped and every
  later event gets ``+2**13`` us (cumulative), exactly as tonic's ``read_mnist_file`` does.

Prophesee DAT v2 ``.dat`` (N-Cars): ASCII header lines that start with ``%`` (``% Version 2``,
  ``% Height 240``, ``% Width 304``, ``% Date ...``), then 1 byte event type and 1 byte event size (8), then
  little-endian events ``u32 t (us), u32 w`` with ``x = w[13:0]``, ``y = w[27:14]``, ``p = w[28]`` (1 = ON),
  the layout of Prophesee's own ``dat_events_tools``.

N-ImageNet ``.npz``: key ``event_data``, a structured array with fields ``x, y, t, p`` (t in us, p 0/1, -1/+1
  or bool); the legacy release names the fields ``x_pos, y_pos, timestamp, polarity``, and the oldest
  (uncompressed) files store those four as top-level arrays instead of ``event_data``: all three are read.
  Time rule: an integer ``t`` is microseconds; a float ``t`` is seconds when its maximum is below 1e3
  (a recording shorter than 1000 s, as all N-ImageNet samples are) and is then multiplied by 1e6, otherwise
  it is microseconds; floats are rounded to the nearest microsecond. Loaded with ``allow_pickle=False``.

The ``write_*`` encoders exist for tests; they raise ``ValueError`` for events their format cannot hold.
"""

from __future__ import annotations

import re
import zipfile

import numpy as np

from evforge.errors import InputError
from evforge.formats.events import EVENT_DTYPE, EventFormatError, event_problem, validate_events
from evforge.formats.prophesee import DAT_EVENT_SIZE, DAT_RAW, decode_dat, read_dat_type_size, read_header_lines

__all__ = [
    "read_atis_bin",
    "read_prophesee_dat",
    "read_prophesee_dat_header",
    "read_nimagenet_npz",
    "check_events",
    "write_atis_bin",
    "write_prophesee_dat",
    "write_nimagenet_npz",
]

ATIS_OVERFLOW_Y = 240  # y value that marks a timestamp-overflow record
ATIS_OVERFLOW_STEP = 2**13  # us added to all later events per overflow record
ATIS_T_BITS = 23

_DAT_MAX_HEADER_LINE = 1 << 16

NIMAGENET_FIELDS = ("x", "y", "t", "p")
NIMAGENET_LEGACY_FIELDS = ("x_pos", "y_pos", "timestamp", "polarity")
_SECONDS_IF_BELOW = 1e3  # float t with max below this is seconds (see module docstring)


# ----------------------------------------------------------------------------------------------- helpers
def _read_bytes(path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise InputError(path, f"cannot read file: {e.strerror or e}") from None


def _sorted_by_t(ev: np.ndarray, t: np.ndarray | None = None) -> np.ndarray:
    """``ev`` stably sorted by ``t`` (``ev`` itself when already sorted: one vectorised comparison).

    ``t`` may be given as a contiguous copy of ``ev["t"]`` (or any array ordered the same way) to make the
    check cheaper than on the strided field."""
    if t is None:
        t = ev["t"]
    if len(t) > 1 and np.any(t[1:] < t[:-1]):
        ev = ev[np.argsort(ev["t"], kind="stable")]
    return ev


# ------------------------------------------------------------------------------------------------ ATIS
_ATIS_T_MASK = (1 << ATIS_T_BITS) - 1


def read_atis_bin(path, *, sort: bool = True) -> np.ndarray:
    """Decode an N-MNIST / N-Caltech101 ATIS ``.bin`` file (5 bytes an event, see the module docstring).

    With ``sort=False`` the events come in file order (overflow markers still applied and dropped), unsorted
    if the file is: for callers that check the file order themselves instead of decoding twice.
    """
    data = _read_bytes(path)
    if len(data) == 0:
        raise InputError(path, "no events")
    if len(data) % 5:
        raise InputError(path, f"truncated: {len(data)} bytes is not a multiple of 5")
    n = len(data) // 5
    b = np.frombuffer(data, dtype=np.uint8)
    x, y = b[0::5], b[1::5]
    # bytes 1..4 of every record as one big-endian u4: y << 24 | p << 23 | t (23 bits), one strided read
    w = np.ndarray((n,), dtype=">u4", buffer=data, offset=1, strides=(5,)).astype(np.uint32)
    if w.max() >= ATIS_OVERFLOW_Y << 24 and np.any(y == ATIS_OVERFLOW_Y):  # overflow markers (rare)
        rows = np.flatnonzero(y != ATIS_OVERFLOW_Y)  # the real events
        if len(rows) == 0:
            raise InputError(path, "no events (only overflow markers)")
        x, y, w = x[rows], y[rows], w[rows]
        t = (w & _ATIS_T_MASK).astype(np.int64)
        # the rows before event j that are not events are markers: tonic's cumulative +2**13 per marker
        t += ATIS_OVERFLOW_STEP * (rows - np.arange(len(rows)))
    else:
        t = None

    ev = np.empty(len(w), dtype=EVENT_DTYPE)
    ev["x"] = x
    ev["y"] = y
    p = (w >> (ATIS_T_BITS)).astype(np.uint8)  # y << 1 | p, wrapped to its low byte: bit 0 is p
    p &= 1
    p = p.view(np.int8)
    p += p
    p -= 1  # 1 = ON -> +1, 0 -> -1
    ev["p"] = p
    if t is None:
        w &= _ATIS_T_MASK  # now the timestamps (no markers: nothing to add)
        t = w
    ev["t"] = t
    return _sorted_by_t(ev, t) if sort else ev


def write_atis_bin(path, events: np.ndarray, overflow: bool = True) -> None:
    """Encode events as an ATIS ``.bin`` file so that ``read_atis_bin`` returns them bit for bit.

    The timestamp field holds 23 bits, so overflow markers are needed only for ``t >= 2**23``: before each
    event the writer places the fewest markers (each worth ``2**13`` us) that bring its stored timestamp
    below ``2**23``. With ``overflow=False`` such timestamps are a ``ValueError``. Events must be sorted by t,
    with ``x < 256`` and ``y < 240`` (240 is the marker row).
    """
    _check_writable(events)
    t = events["t"]
    if len(t) and t[0] < 0:
        raise ValueError(f"ATIS timestamps must be >= 0, got {t[0]}")
    if np.any(events["x"] > 255) or np.any(events["y"] >= ATIS_OVERFLOW_Y):
        raise ValueError("ATIS events need x < 256 and y < 240")
    limit = 1 << ATIS_T_BITS
    # fewest markers k_i with t_i - k_i * 2**13 < 2**23 (non-decreasing because t is sorted)
    k = np.where(t >= limit, (t - limit) // ATIS_OVERFLOW_STEP + 1, 0)
    if not overflow and len(k) and k[-1] > 0:
        raise ValueError(f"timestamp {t[-1]} needs overflow markers (>= 2**23) but overflow=False")
    raw_t = t - k * ATIS_OVERFLOW_STEP
    n_markers = int(k[-1]) if len(k) else 0

    out = np.zeros((len(t) + n_markers, 5), dtype=np.uint8)
    out[:, 1] = ATIS_OVERFLOW_Y  # every row is a marker (x = 0, t = 0) until an event is written over it
    rows = np.arange(len(t)) + k  # event i comes after the k_i markers that precede it
    out[rows, 0] = events["x"]
    out[rows, 1] = events["y"]
    out[rows, 2] = ((events["p"] > 0).astype(np.uint8) << 7) | (raw_t >> 16).astype(np.uint8)
    out[rows, 3] = ((raw_t >> 8) & 0xFF).astype(np.uint8)
    out[rows, 4] = (raw_t & 0xFF).astype(np.uint8)
    with open(path, "wb") as f:
        f.write(out.tobytes())


# --------------------------------------------------------------------------------------- Prophesee DAT
def read_prophesee_dat_header(path) -> dict:
    """Parse the header of a Prophesee DAT file.

    Returns ``{"lines": [...], "version", "width", "height", "date", "event_class", "event_type",
    "event_size", "data_offset"}``; header keys absent from the file are ``None``. ``lines`` holds the header
    lines without the leading ``%`` and surrounding blanks; ``data_offset`` is the byte offset of the first event.
    """
    lines, offset = read_header_lines(path, _DAT_MAX_HEADER_LINE, stop_at_end=False)
    if not lines:
        raise InputError(path, "missing header: a DAT file starts with '%' header lines")
    type_size = read_dat_type_size(path, offset)
    offset += 2

    header = {"lines": lines, "version": None, "width": None, "height": None, "date": None, "event_class": None}
    for line in lines:
        key, _, value = line.partition(" ")
        key, value = key.lower(), value.strip()
        if key in ("version", "width", "height"):
            try:
                header[key] = int(value)
            except ValueError:
                raise InputError(path, f"garbled header: bad line '% {line}'") from None
        elif key == "date":
            header["date"] = value
        elif m := re.match(r"Data file containing (\S+) events", line):
            header["event_class"] = m.group(1)
    header["event_type"], header["event_size"] = type_size[0], type_size[1]
    header["data_offset"] = offset
    return header


def read_prophesee_dat(path, *, sort: bool = True) -> np.ndarray:
    """Decode a Prophesee DAT v2 file (N-Cars); see :func:`read_prophesee_dat_header` for its header.

    With ``sort=False`` the events come in file order (unsorted if the file is)."""
    header = read_prophesee_dat_header(path)
    if header["event_size"] != DAT_EVENT_SIZE:
        raise InputError(path, f"unsupported event size {header['event_size']} (expected {DAT_EVENT_SIZE})")
    data = _read_bytes(path)[header["data_offset"] :]
    if len(data) == 0:
        raise InputError(path, "no events")
    if len(data) % DAT_EVENT_SIZE:
        raise InputError(path, f"truncated: payload of {len(data)} bytes is not a multiple of {DAT_EVENT_SIZE}")
    raw = np.frombuffer(data, dtype=DAT_RAW)
    ev = decode_dat(raw)  # the same decoding as the recordings reader's (formats.prophesee.iter_dat)
    return _sorted_by_t(ev, raw["t"]) if sort else ev


def write_prophesee_dat(path, events: np.ndarray, width: int, height: int, date: str | None = None) -> None:
    """Encode events as a DAT v2 file (event type 0, size 8) with ``% Width``/``% Height`` header lines."""
    if not (0 < width <= 1 << 14 and 0 < height <= 1 << 14):
        raise ValueError(f"DAT sensor size must fit 14 bits, got {width}x{height}")
    _check_writable(events, (width, height))
    t = events["t"]
    if len(t) and (t[0] < 0 or t[-1] >= 1 << 32):
        raise ValueError("DAT timestamps must fit an unsigned 32-bit integer")
    lines = ["Data file containing N9Chronocam7Event2dE events.", "Version 2"]
    if date is not None:
        lines.append(f"Date {date}")
    lines += [f"Height {height}", f"Width {width}"]
    raw = np.empty(len(events), dtype=DAT_RAW)
    raw["t"] = t
    raw["w"] = (
        events["x"].astype(np.uint32)
        | (events["y"].astype(np.uint32) << 14)
        | ((events["p"] > 0).astype(np.uint32) << 28)
    )
    with open(path, "wb") as f:
        f.write("".join(f"% {line}\n" for line in lines).encode("ascii"))
        f.write(bytes([0, DAT_EVENT_SIZE]))
        f.write(raw.tobytes())


# ------------------------------------------------------------------------------------------- N-ImageNet
def read_nimagenet_npz(path, *, sort: bool = True) -> np.ndarray:
    """Decode an N-ImageNet ``.npz`` sample (see the module docstring for field names and the time rule).

    With ``sort=False`` the events come in file order (unsorted if the file is; ``t`` already converted to
    microseconds)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise InputError(path, f"cannot read file: {e.strerror or e}") from None
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise InputError(path, "not an .npz (zip) file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.files)
            if "event_data" in keys:
                data = npz["event_data"]
                if data.dtype.names is None:
                    raise InputError(path, f"'event_data' is not a structured array (dtype {data.dtype})")
                names = data.dtype.names
                cols = _pick_fields(path, names, lambda k: data[k], "'event_data' fields")
            elif all(k in keys for k in NIMAGENET_LEGACY_FIELDS):  # oldest release: four top-level arrays
                cols = [npz[k] for k in NIMAGENET_LEGACY_FIELDS]
            else:
                raise InputError(path, f"no 'event_data' array (keys: {', '.join(keys) or 'none'})")
    except InputError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise InputError(path, "object array refused: event data must not need pickle") from None
        raise InputError(path, f"cannot read npz: {e}") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise InputError(path, f"cannot read npz: {e}") from None

    x, y, t, p = (np.asarray(c).reshape(-1) for c in cols)
    if not (len(x) == len(y) == len(t) == len(p)):
        raise InputError(path, f"columns differ in length: x {len(x)}, y {len(y)}, t {len(t)}, p {len(p)}")
    if len(t) == 0:
        raise InputError(path, "no events")
    ev = np.empty(len(t), dtype=EVENT_DTYPE)
    ev["x"] = _coordinate(path, "x", x)
    ev["y"] = _coordinate(path, "y", y)
    t = _microseconds(path, t)
    ev["t"] = t
    ev["p"] = _polarity(path, p)
    return _sorted_by_t(ev, t) if sort else ev


def _pick_fields(path, names, get, what):
    for convention in (NIMAGENET_FIELDS, NIMAGENET_LEGACY_FIELDS):
        if all(n in names for n in convention):
            return [get(n) for n in convention]
    raise InputError(
        path, f"{what} {', '.join(names)} lack x, y, t, p (or x_pos, y_pos, timestamp, polarity)"
    )


def _coordinate(path, name, a):
    if a.dtype.kind not in "iu":
        raise InputError(path, f"field {name} has non-integer dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() > np.iinfo(np.uint16).max):
        raise InputError(path, f"field {name} has values outside 0..65535 ({a.min()}..{a.max()})")
    return a


def _microseconds(path, t):
    if t.dtype.kind in "iu":
        if t.dtype == np.uint64 and t.max() > np.iinfo(np.int64).max:
            raise InputError(path, "timestamps overflow int64")
        return t
    if t.dtype.kind != "f":
        raise InputError(path, f"timestamps have unsupported dtype {t.dtype}")
    if not np.all(np.isfinite(t)):
        raise InputError(path, "timestamps contain NaN or infinity")
    scale = 1e6 if t.max() < _SECONDS_IF_BELOW else 1.0  # float seconds -> us
    return np.rint(t.astype(np.float64) * scale).astype(np.int64)


def _polarity(path, p):
    if p.dtype == np.bool_:
        return np.where(p, 1, -1)
    if p.dtype.kind not in "iuf":
        raise InputError(path, f"polarity has unsupported dtype {p.dtype}")
    bad = ~np.isin(p, (-1, 0, 1))
    if bad.any():
        raise InputError(path, f"polarity must be 0/1 or -1/+1, found {p[bad][0]}")
    return np.where(p > 0, 1, -1)


def write_nimagenet_npz(path, events: np.ndarray, legacy: bool = False) -> None:
    """Write an N-ImageNet sample: ``event_data`` with fields x u2, y u2, t i8 (us), p bool (compressed npz),
    or with ``legacy=True`` the oldest layout, top-level arrays ``x_pos, y_pos, timestamp, polarity`` (plain npz).
    """
    _check_writable(events)
    x, y, t, on = events["x"], events["y"], events["t"], events["p"] > 0
    if legacy:
        np.savez(path, x_pos=x, y_pos=y, timestamp=t, polarity=on.astype(np.uint8))
        return
    data = np.empty(len(events), dtype=[("x", "<u2"), ("y", "<u2"), ("t", "<i8"), ("p", "?")])
    data["x"], data["y"], data["t"], data["p"] = x, y, t, on
    np.savez_compressed(path, event_data=data)


# ------------------------------------------------------------------------------------------ validation
def check_events(events: np.ndarray, sensor_size: tuple[int, int] | None, path) -> np.ndarray:
    """Return ``events`` unchanged if they are fit for a dataset sample, else raise :class:`InputError`.

    Checks: at least one event, and :func:`~evforge.formats.events.event_problem` (EVENT_DTYPE, non-decreasing
    timestamps, polarity +1/-1, coordinates inside ``sensor_size = (width, height)`` unless ``None``); no
    sorting here: the caller decides what an unsorted file means.
    """
    problem = event_problem(events, sensor_size)
    if problem:
        raise InputError(path, problem)
    if len(events) == 0:
        raise InputError(path, "no events")
    return events


def _check_writable(events, sensor_size=None) -> None:
    """Encoders take valid EVENT_DTYPE arrays sorted by t (ValueError otherwise)."""
    try:
        validate_events(events, sensor_size)
    except EventFormatError as e:
        raise ValueError(str(e)) from None
