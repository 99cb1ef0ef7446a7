"""Streaming numpy decoders of Prophesee's raw formats: EVT 2.0 and EVT 3.0 (``.raw``) and DAT (``.dat``).

Why our own: ``expelliarmus==1.1.12`` (the PyPI decoder of these formats) decodes DAT and EVT2 correctly but
EVT3 timestamps wrongly (it adds 4096 us at every EVT_TIME_HIGH word: an event at t = 9000 us after one at
5000 us comes out at 13096 us; checked on exactly encoded files, see tests/recordings), reads only files named
``*.raw``, and does not expose the header's sensor size. These decoders work on blocks of words (numpy, vectorised;
EVT3 as one numba pass, numpy without numba) and carry the decoder state (time high, time low, row, vector
base) from block to block, so memory is bounded by the block size whatever the recording length.

Formats (Prophesee's documentation, "EVT 2.0 / EVT 3.0 format"):

* RAW header: ``% key value`` lines ending with ``% end``; the sensor size comes from ``% format
  EVT3;height=H;width=W`` or ``% geometry WxH``; the encoding from ``% format`` or ``% evt 2.0|3.0``.
* EVT 2.0: 32-bit LE words, type = bits 31..28. CD_OFF 0x0 / CD_ON 0x1: t[5:0] in 27..22, x in 21..11,
  y in 10..0; EVT_TIME_HIGH 0x8: t[33:6] in 27..0; EXT_TRIGGER 0xA: t[5:0] in 27..22, id in 12..8, value bit 0;
  OTHERS 0xE and CONTINUED 0xF are skipped.
* EVT 3.0: 16-bit LE words, type = bits 15..12. EVT_ADDR_Y 0x0 (y in 10..0), EVT_ADDR_X 0x2 (pol in 11, x in
  10..0: one event), VECT_BASE_X 0x3 (pol in 11, x in 10..0), VECT_12 0x4 / VECT_8 0x5 (a 12- / 8-bit mask of
  events at base + bit; base += 12 / 8), EVT_TIME_LOW 0x6 (t[11:0]), EVT_TIME_HIGH 0x8 (t[23:12]), EXT_TRIGGER
  0xA (id in 11..8, value bit 0); 0x7, 0xE, 0xF are skipped. t is 24 bits: a TIME_HIGH smaller than the
  previous one is a wrap and adds 2**24 us to all later events.
* DAT: ``%`` header lines (``% Height``/``% Width`` when present), 1 byte event type, 1 byte event size (8),
  then ``u32 t, u32 w`` with x = w[13:0], y = w[27:14], p = w[28].
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from evforge.errors import InputError
from evforge.formats.events import EVENT_DTYPE

__all__ = ["RawHeader", "Block", "read_header_lines", "read_raw_header", "iter_evt2", "iter_evt3", "iter_dat",
           "TRIGGER_DTYPE"]

TRIGGER_DTYPE = np.dtype([("t", "<i8"), ("id", "u1"), ("value", "u1")])
BLOCK_BYTES = 1 << 22  # bytes decoded at once (4 MiB: ~1M EVT2 events, up to ~24M EVT3 vector events)
_MAX_HEADER = 1 << 20


@dataclass
class Block:
    """One decoded block: events (file order, absolute us), triggers, and ``resume``: the byte offset and decoder
    state before the block, which restarts decoding here (``resume=`` of the ``iter_*`` functions), so a reader
    of a long recording's later part need not decode what comes before it."""

    events: np.ndarray
    triggers: np.ndarray
    resume: tuple


@dataclass
class RawHeader:
    """A parsed ``%`` header: its lines, the encoding (evt2 | evt3 | dat), sensor size and data offset."""

    lines: list[str]
    encoding: str | None
    width: int | None
    height: int | None
    data_offset: int
    fields: dict = field(default_factory=dict)


def read_header_lines(path, max_line: int = _MAX_HEADER, stop_at_end: bool = True) -> tuple[list[str], int]:
    """The ``%`` lines that open a Prophesee RAW or DAT file, without the ``%`` and surrounding blanks, and the
    byte offset after them (a RAW header ends at ``% end`` when ``stop_at_end``; a DAT's 2 type/size bytes
    follow its lines)."""
    lines: list[str] = []
    try:
        with open(path, "rb") as f:
            while f.peek(1)[:1] == b"%":
                raw = f.readline(max_line)
                if not raw.endswith(b"\n"):
                    raise InputError(path, f"garbled header: line {len(lines) + 1} is not terminated by a newline")
                lines.append(raw[1:].decode("latin-1").strip())
                if stop_at_end and lines[-1] == "end":
                    break
            return lines, f.tell()
    except OSError as err:
        raise InputError(path, f"cannot read file ({err.strerror or err})") from None


def read_raw_header(path, *, stop_at_end: bool = True) -> RawHeader:
    """The ``%`` header of a RAW or DAT file (RAW ends it with ``% end``; DAT, read with ``stop_at_end=False``,
    with its 2 type/size bytes)."""
    lines, offset = read_header_lines(path, stop_at_end=stop_at_end)
    fields: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(" ")
        fields.setdefault(key.lower(), value.strip())
    encoding = width = height = None
    fmt = fields.get("format", "")
    if fmt:
        parts = fmt.split(";")
        encoding = {"EVT2": "evt2", "EVT21": "evt21", "EVT3": "evt3"}.get(parts[0].strip().upper(), parts[0].lower())
        kv = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
        width, height = _int(kv.get("width")), _int(kv.get("height"))
    if encoding is None and "evt" in fields:
        encoding = {"2.0": "evt2", "2.1": "evt21", "3.0": "evt3"}.get(fields["evt"])
    if width is None and (m := re.fullmatch(r"(\d+)x(\d+)", fields.get("geometry", ""))):
        width, height = int(m.group(1)), int(m.group(2))
    if width is None and "width" in fields:  # DAT: % Width / % Height
        width, height = _int(fields.get("width")), _int(fields.get("height"))
    return RawHeader(lines=lines, encoding=encoding, width=width, height=height, data_offset=offset, fields=fields)


def _int(v):
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def _blocks(path, offset: int, word_bytes: int, block_bytes: int):
    """``(offset, bytes)`` of the payload from ``offset`` in blocks of whole words; a trailing partial word is an
    error."""
    block_bytes -= block_bytes % word_bytes
    with open(path, "rb") as f:
        f.seek(offset)
        pos = offset
        while True:
            data = f.read(block_bytes)
            if not data:
                return
            if len(data) % word_bytes:
                raise InputError(path, f"truncated: {len(data) % word_bytes} trailing bytes at offset "
                                       f"{pos + len(data) - len(data) % word_bytes} (words are {word_bytes} bytes)")
            yield pos, data
            pos += len(data)


def _ffill(mask: np.ndarray, values: np.ndarray, initial):
    """Per position, the value at the last position <= it where ``mask`` holds (``initial`` before the first)."""
    idx = np.where(mask, np.arange(len(mask)), -1)
    np.maximum.accumulate(idx, out=idx)
    out = values[np.maximum(idx, 0)]
    if len(out) and initial is not None:
        out = np.where(idx >= 0, out, initial)
    return out, idx


def _events(x, y, t, p) -> np.ndarray:
    ev = np.empty(len(t), dtype=EVENT_DTYPE)
    ev["x"], ev["y"], ev["t"] = x, y, t
    ev["p"] = np.where(p > 0, 1, -1)
    return ev


def iter_evt2(path, header: RawHeader | None = None, *, block_bytes: int = BLOCK_BYTES, resume: tuple | None = None):
    """Yield a :class:`Block` per block of an EVT 2.0 file; ``resume``: a block's ``resume`` to start there."""
    header = header or read_raw_header(path)
    start, high = resume if resume is not None else (header.data_offset, None)  # high: last TIME_HIGH (None: none)
    for pos, data in _blocks(path, start, 4, block_bytes):
        checkpoint = (pos, high)
        w = np.frombuffer(data, dtype="<u4")
        typ = w >> 28
        is_high = typ == 0x8
        highs, seen = _ffill(is_high, (w & 0x0FFFFFFF).astype(np.int64), -1 if high is None else high)
        if is_high.any():
            high = int(highs[-1])
        cd = typ <= 1
        trig = typ == 0xA
        if (cd | trig).any() and (highs[cd | trig] < 0).any():
            raise InputError(path, "EVT2 event before the first EVT_TIME_HIGH word (corrupt or not EVT2)")
        t = (highs << 6) | ((w >> 22) & 63).astype(np.int64)
        wc = w[cd]
        ev = _events((wc >> 11) & 0x7FF, wc & 0x7FF, t[cd], typ[cd].astype(np.int8))
        wt = w[trig]
        tr = np.empty(len(wt), dtype=TRIGGER_DTYPE)
        tr["t"], tr["id"], tr["value"] = t[trig], (wt >> 8) & 0x1F, wt & 1
        yield Block(ev, tr, checkpoint)


class _Evt3State:
    def __init__(self):
        self.high = -1  # last TIME_HIGH value (12 bits), -1: none yet
        self.wraps = 0  # 2**24 wraps so far
        self.low = 0
        self.y = 0
        self.base = 0  # next vector's x (VECT_BASE_X plus the widths of the vectors since)
        self.pol = 0


def iter_evt3(path, header: RawHeader | None = None, *, block_bytes: int = BLOCK_BYTES, resume: tuple | None = None,
              kernel: str = "auto"):
    """Yield a :class:`Block` per block of an EVT 3.0 file; ``resume``: a block's ``resume`` to start there.
    ``kernel``: "numba" (one pass over the words), "numpy" (vectorised; the fallback without numba) or "auto"."""
    header = header or read_raw_header(path)
    if kernel not in ("auto", "numba", "numpy"):
        raise ValueError(f"kernel must be auto, numba or numpy, got {kernel!r}")
    use_numba = kernel == "numba" or (kernel == "auto" and _evt3_numba is not None)
    if use_numba and _evt3_numba is None:
        raise RuntimeError("kernel='numba' needs numba")
    s = _Evt3State()
    start = header.data_offset
    if resume is not None:
        start, (s.high, s.wraps, s.low, s.y, s.base, s.pol) = resume[0], resume[1:]
    for pos, data in _blocks(path, start, 2, block_bytes):
        checkpoint = (pos, s.high, s.wraps, s.low, s.y, s.base, s.pol)
        w = np.frombuffer(data, dtype="<u2")
        ev, tr = (_evt3_block_numba if use_numba else _evt3_block_numpy)(path, w, s)
        yield Block(ev, tr, checkpoint)


def _evt3_block_numba(path, w: np.ndarray, s: "_Evt3State"):
    state = np.array([s.high, s.wraps, s.low, s.y, s.base, s.pol], dtype=np.int64)
    n, nt = _evt3_numba(w, state.copy(), None, None, None, None, None, None, None)  # count
    _evt3_problem(path, n)
    x, y, t, p = (np.empty(n, dt) for dt in (np.int64, np.int64, np.int64, np.int8))
    tt, tid, tv = np.empty(nt, np.int64), np.empty(nt, np.uint8), np.empty(nt, np.uint8)
    _evt3_numba(w, state, x, y, t, p, tt, tid, tv)
    s.high, s.wraps, s.low, s.y, s.base, s.pol = (int(v) for v in state)
    ev = np.empty(n, dtype=EVENT_DTYPE)
    ev["x"], ev["y"], ev["t"], ev["p"] = x, y, t, p
    tr = np.empty(nt, dtype=TRIGGER_DTYPE)
    tr["t"], tr["id"], tr["value"] = tt, tid, tv
    return ev, tr


def _evt3_problem(path, code: int) -> None:
    if code == -1:
        raise InputError(path, "EVT3 event before the first EVT_TIME_HIGH word (corrupt or not EVT3)")
    if code == -2:
        raise InputError(path, "EVT3 vector runs past x = 2047 (corrupt VECT_BASE_X/VECT words)")


def _evt3_kernel(w, state, x, y, t, p, tt, tid, tv):
    """One pass over EVT3 words with the state (high, wraps, low, y, base, pol) in ``state`` (updated); with
    ``x is None`` it only counts. Returns (events, triggers), or (-1 | -2, 0) for corrupt input."""
    high, wraps, low, row, base, pol = state[0], state[1], state[2], state[3], state[4], state[5]
    n = 0
    nt = 0
    for i in range(w.shape[0]):
        v = np.int64(w[i])
        typ = v >> 12
        pl = v & 0xFFF
        if typ == 0x8:
            if high >= 0 and pl < high:
                wraps += 1
            high = pl
        elif typ == 0x6:
            low = pl
        elif typ == 0x0:
            row = pl & 0x7FF
        elif typ == 0x2:
            if high < 0:
                return -1, 0
            if x is not None:
                x[n] = pl & 0x7FF
                y[n] = row
                t[n] = (((wraps << 12) | high) << 12) | low
                p[n] = 1 if (pl >> 11) & 1 else -1
            n += 1
        elif typ == 0x3:
            base = pl & 0x7FF
            pol = (pl >> 11) & 1
        elif typ == 0x4 or typ == 0x5:
            width = 12 if typ == 0x4 else 8
            mask = pl if typ == 0x4 else pl & 0xFF
            if mask and high < 0:
                return -1, 0
            for k in range(width):
                if (mask >> k) & 1:
                    if base + k >= 2048:
                        return -2, 0
                    if x is not None:
                        x[n] = base + k
                        y[n] = row
                        t[n] = (((wraps << 12) | high) << 12) | low
                        p[n] = 1 if pol else -1
                    n += 1
            base += width
        elif typ == 0xA:
            if tt is not None:
                tt[nt] = (((wraps << 12) | high) << 12) | low
                tid[nt] = (pl >> 8) & 0xF
                tv[nt] = pl & 1
            nt += 1
    state[0], state[1], state[2], state[3], state[4], state[5] = high, wraps, low, row, base, pol
    return n, nt


try:  # numba is a dependency; without it the vectorised numpy decoder is used
    from numba import njit

    _evt3_numba = njit(cache=True, nogil=True)(_evt3_kernel)
except ImportError:  # pragma: no cover
    _evt3_numba = None


def _evt3_block_numpy(path, w16: np.ndarray, s: "_Evt3State"):
    w = w16.astype(np.int64)
    typ = w >> 12
    payload = w & 0xFFF
    # time high with wraps: a value below the previous one adds 2**24
    is_high = typ == 0x8
    hv = payload[is_high]
    prev = np.concatenate(([s.high], hv[:-1]))
    wraps = s.wraps + np.cumsum((hv < prev) & (prev >= 0))
    full_high = np.zeros(len(w), np.int64)
    full_high[is_high] = (wraps << 12) | hv  # high in units of 4096 us, wraps included
    init_high = (s.wraps << 12) | s.high if s.high >= 0 else -1
    high, _ = _ffill(is_high, full_high, init_high)
    if hv.size:
        s.high, s.wraps = int(hv[-1]), int(wraps[-1])
    low, _ = _ffill(typ == 0x6, payload, s.low)
    y, _ = _ffill(typ == 0x0, payload & 0x7FF, s.y)
    t = (high << 12) | low
    # single events
    single = typ == 0x2
    # vectors: base x and polarity from the last VECT_BASE_X, advanced by the widths since
    is_base = typ == 0x3
    width = np.where(typ == 0x4, 12, np.where(typ == 0x5, 8, 0))
    before = np.cumsum(width) - width  # widths of the vector words before each word (this block)
    base_val = np.where(is_base, (payload & 0x7FF) - before, 0)  # base minus the widths before it
    bx, bidx = _ffill(is_base, base_val, None)
    bx = np.where(bidx >= 0, bx, s.base)
    x0 = bx + before  # a vector word's first x
    pol_b, _ = _ffill(is_base, (payload >> 11) & 1, s.pol)
    vec = width > 0
    parts_i, parts_x, parts_p = [np.flatnonzero(single)], [payload[single] & 0x7FF], [(payload[single] >> 11) & 1]
    order_key = [np.flatnonzero(single) * 16]
    vi = np.flatnonzero(vec)
    if vi.size:
        bits = (payload[vi, None] >> np.arange(12)) & 1
        bits[width[vi] == 8, 8:] = 0
        r, k = np.nonzero(bits)
        parts_i.append(vi[r])
        parts_x.append(x0[vi[r]] + k)
        parts_p.append(pol_b[vi[r]])
        order_key.append(vi[r] * 16 + k)
    idx = np.concatenate(parts_i)
    key = np.concatenate(order_key)
    o = np.argsort(key, kind="stable")
    idx = idx[o]
    xs, ps = np.concatenate(parts_x)[o], np.concatenate(parts_p)[o]
    if idx.size and (high[idx] < 0).any():
        raise InputError(path, "EVT3 event before the first EVT_TIME_HIGH word (corrupt or not EVT3)")
    if idx.size and xs.max(initial=0) >= 1 << 11:
        raise InputError(path, "EVT3 vector runs past x = 2047 (corrupt VECT_BASE_X/VECT words)")
    ev = _events(xs, y[idx], t[idx], ps)
    trig = typ == 0xA
    tr = np.empty(int(trig.sum()), dtype=TRIGGER_DTYPE)
    tr["t"], tr["id"], tr["value"] = t[trig], (payload[trig] >> 8) & 0xF, payload[trig] & 1
    # carry the state into the next block
    s.low, s.y = int(low[-1]), int(y[-1])
    s.base = int(bx[-1] + before[-1] + width[-1])
    s.pol = int(pol_b[-1])
    return ev, tr


DAT_RAW = np.dtype([("t", "<u4"), ("w", "<u4")])  # one DAT v2 event: t (us), x bits 0-13, y 14-27, p bit 28
DAT_EVENT_SIZE = DAT_RAW.itemsize


def read_dat_type_size(path, offset: int) -> tuple[int, int]:
    """The event type and size bytes that follow a DAT file's header lines (at ``offset``)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            type_size = f.read(2)
    except OSError as err:
        raise InputError(path, f"cannot read file ({err.strerror or err})") from None
    if len(type_size) < 2:
        raise InputError(path, "garbled header: no event type/size bytes after the header lines")
    return type_size[0], type_size[1]


def decode_dat(raw: np.ndarray) -> np.ndarray:
    """DAT v2 records (:data:`DAT_RAW`) as events, in file order."""
    w = raw["w"]
    return _events(w & 0x3FFF, (w >> 14) & 0x3FFF, raw["t"].astype(np.int64), (w >> 28) & 1)


def iter_dat(path, header: RawHeader | None = None, *, block_bytes: int = BLOCK_BYTES, resume: tuple | None = None):
    """Yield a :class:`Block` per block of a DAT file (no triggers; 2 type/size bytes follow the header lines);
    ``resume``: a block's ``resume`` (its byte offset) to start there."""
    header = header or read_raw_header(path, stop_at_end=False)
    size = read_dat_type_size(path, header.data_offset)[1]
    if size != DAT_EVENT_SIZE:
        raise InputError(path, f"unsupported DAT event size {size} (expected {DAT_EVENT_SIZE})")
    no_triggers = np.empty(0, dtype=TRIGGER_DTYPE)
    start = header.data_offset + 2 if resume is None else resume[0]
    for pos, data in _blocks(path, start, DAT_EVENT_SIZE, block_bytes):
        yield Block(decode_dat(np.frombuffer(data, dtype=DAT_RAW)), no_triggers, (pos,))
