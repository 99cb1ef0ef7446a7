"""Test-side encoders of the raw camera formats, written from the format specifications (not from the decoders).

* Prophesee EVT 2.0: 32-bit little-endian words, type in bits 31..28: CD_OFF 0x0 / CD_ON 0x1 (t low 6 bits in
  27..22, x in 21..11, y in 10..0), EVT_TIME_HIGH 0x8 (t >> 6 in 27..0), EXT_TRIGGER 0xA (t low in 27..22, id in
  12..8, value in bit 0).
* Prophesee EVT 3.0: 16-bit little-endian words, type in bits 15..12: EVT_ADDR_Y 0x0 (y in 10..0), EVT_ADDR_X 0x2
  (pol in 11, x in 10..0), VECT_BASE_X 0x3 (pol in 11, x in 10..0), VECT_12 0x4 (12-bit mask), VECT_8 0x5 (8-bit
  mask), EVT_TIME_LOW 0x6 (t bits 11..0), EVT_TIME_HIGH 0x8 (t bits 23..12), EXT_TRIGGER 0xA; t wraps at 2**24.
* Prophesee DAT: ``% `` header lines, then bytes (event type 0, event size 8), then (u32 t, u32 x|y<<14|p<<28).
* iniVation AEDAT 4.0 with uncompressed packets (``NONE``; LZ4/Zstd are what cameras write, covered by the real
  sample): ``#!AER-DAT4.0\r\n``, an i32 size and the IOHeader FlatBuffer (``IOHE``: compression, data-table
  position -1, the XML info node naming stream 0 ``EVTS`` with sizeX/sizeY), then per packet i32 stream id,
  i32 size and a size-prefixed ``EVTS`` FlatBuffer (an EventPacket: a vector of 16-byte structs i64 t, i16 x,
  i16 y, bool on), hand-built here (vector data 8-byte aligned, as FlatBuffers' verifier requires).

Importable by name from the tests in this folder (pytest puts it on sys.path).
"""

from __future__ import annotations

import struct

import numpy as np


def raw_header(fmt: str, width: int, height: int, extra: tuple[str, ...] = ()) -> bytes:
    lines = ["% camera_integrator_name Prophesee", "% date 2024-05-01 10:00:00",
             f"% evt {'2.0' if fmt == 'evt2' else '3.0'}",
             f"% format {fmt.upper()};height={height};width={width}", f"% geometry {width}x{height}", *extra,
             "% end"]
    return ("\n".join(lines) + "\n").encode()


def encode_evt2(x, y, t, p, *, width: int = 640, height: int = 480, triggers=()) -> bytes:
    """EVT 2.0 bytes (header included) for sorted events; a TIME_HIGH word whenever t >> 6 changes.
    ``triggers``: (t, id, value) tuples merged in time order (decoders must skip them as events)."""
    items = [(int(tt), 0, int(xx), int(yy), int(pp)) for xx, yy, tt, pp in zip(x, y, t, p)]
    items += [(int(tt), 1, int(i), int(v), 0) for tt, i, v in triggers]
    items.sort(key=lambda r: (r[0], r[1]))
    words, high = [], None
    for tt, kind, a, b, pp in items:
        if tt >> 6 != high:
            high = tt >> 6
            words.append((0x8 << 28) | (high & 0x0FFFFFFF))
        if kind == 0:
            words.append(((1 if pp > 0 else 0) << 28) | ((tt & 63) << 22) | (a << 11) | b)
        else:
            words.append((0xA << 28) | ((tt & 63) << 22) | (a << 8) | (b & 1))
    return raw_header("evt2", width, height) + np.asarray(words, dtype="<u4").tobytes()


def encode_evt3(x, y, t, p, *, width: int = 640, height: int = 480, vectorize: bool = True) -> bytes:
    """EVT 3.0 bytes for sorted events. Events sharing (t, y, polarity) with x runs are written as VECT_BASE_X +
    VECT_12 / VECT_8 masks when ``vectorize`` (as Prophesee sensors do), single ones as EVT_ADDR_X; TIME_HIGH,
    TIME_LOW and ADDR_Y words only when their value changes, so decoders must carry state; t above 2**24 wraps."""
    x, y, t, p = (np.asarray(a).astype(np.int64) for a in (x, y, t, p))
    words: list[int] = []
    state = {"high": None, "low": None, "y": None}
    i, n = 0, len(t)
    while i < n:
        j = i
        while j + 1 < n and t[j + 1] == t[i] and y[j + 1] == y[i] and p[j + 1] == p[i]:
            j += 1
        tt, yy, pol = int(t[i]), int(y[i]), 1 if p[i] > 0 else 0
        high, low = (tt >> 12) & 0xFFF, tt & 0xFFF
        if high != state["high"]:
            words.append((0x8 << 12) | high)
            state["high"] = high
            state["low"] = None
        if low != state["low"]:
            words.append((0x6 << 12) | low)
            state["low"] = low
        if yy != state["y"]:
            words.append((0x0 << 12) | yy)
            state["y"] = yy
        xs = sorted(set(int(v) for v in x[i : j + 1]))
        if vectorize and len(xs) > 1:
            base = xs[0]
            words.append((0x3 << 12) | (pol << 11) | base)
            remaining = set(xs)
            while remaining:
                span = max(remaining) - base + 1
                if span > 8:
                    mask = sum(1 << k for k in range(12) if base + k in remaining)
                    words.append((0x4 << 12) | mask)
                    remaining -= {base + k for k in range(12)}
                    base += 12
                else:
                    mask = sum(1 << k for k in range(8) if base + k in remaining)
                    words.append((0x5 << 12) | mask)
                    remaining -= {base + k for k in range(8)}
                    base += 8
        else:
            words.extend((0x2 << 12) | (pol << 11) | xv for xv in xs)
        i = j + 1
    return raw_header("evt3", width, height) + np.asarray(words, dtype="<u2").tobytes()


def encode_dat(x, y, t, p, *, width: int | None = None, height: int | None = None) -> bytes:
    """Prophesee DAT (v2, as N-Cars): header, (type 0, size 8), u32 t and u32 x | y << 14 | p << 28 per event."""
    head = "% Data file containing Event2D events.\n% Version 2\n"
    if width is not None:
        head += f"% Height {height}\n% Width {width}\n"
    rec = np.empty(len(t), dtype=[("t", "<u4"), ("w", "<u4")])
    rec["t"] = np.asarray(t, dtype=np.uint32)
    rec["w"] = (np.asarray(x, np.uint32) | (np.asarray(y, np.uint32) << 14)
                | ((np.asarray(p) > 0).astype(np.uint32) << 28))
    return head.encode() + bytes([0, 8]) + rec.tobytes()


def random_events(n: int, width: int, height: int, *, seed: int = 0, t0: int = 0, span_us: int = 100_000,
                  runs: bool = True) -> tuple[np.ndarray, ...]:
    """Sorted random events (x, y, t, p); with ``runs`` part of them in same-(t, y, p) x runs (EVT3 vectors)."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(t0, t0 + span_us, n))
    x = rng.integers(0, width, n)
    y = rng.integers(0, height, n)
    p = rng.integers(0, 2, n) * 2 - 1
    if runs:  # every 10th timestamp group: a run of 20 neighbouring pixels
        for k in range(0, n - 20, 200):
            t[k : k + 20] = t[k]
            y[k : k + 20] = y[k]
            p[k : k + 20] = p[k]
            x[k : k + 20] = (x[k] % max(1, width - 40)) + np.arange(20) + (np.arange(20) >= 10) * 3
    order = np.lexsort((x, p, y, t))
    return x[order], y[order], t[order], p[order]


_AEDAT4_XML = """<dv version="2.0">
    <node name="outInfo" path="/mainloop/Recorder/outInfo/">
        <node name="0" path="/mainloop/Recorder/outInfo/0/">
            <attr key="compression" type="string">NONE</attr>
            <attr key="typeIdentifier" type="string">EVTS</attr>
            <node name="info" path="/mainloop/Recorder/outInfo/0/info/">
                <attr key="sizeX" type="int">{width}</attr>
                <attr key="sizeY" type="int">{height}</attr>
            </node>
        </node>
    </node>
</dv>
"""


def _aedat4_header(xml: str) -> bytes:
    text = xml.encode() + b"\0"
    buf = struct.pack("<I4s", 20, b"IOHE")  # root table at 20, file identifier
    buf += struct.pack("<HHHHH", 10, 20, 4, 12, 8) + b"\0\0"  # vtable: compression +4, data table +12, info +8
    buf += struct.pack("<iiIq", 12, 0, 12, -1)  # table: vtable 12 back, NONE, string 12 ahead, no data table
    buf += struct.pack("<I", len(text) - 1) + text
    return buf + b"\0" * (-len(buf) % 4)


def _aedat4_events(t, x, y, on) -> bytes:
    ev = np.zeros(len(t), dtype=[("t", "<i8"), ("x", "<i2"), ("y", "<i2"), ("on", "u1"), ("pad", "V3")])
    ev["t"], ev["x"], ev["y"], ev["on"] = t, x, y, on
    buf = struct.pack("<I4s", 16, b"EVTS")  # root table at 16
    buf += struct.pack("<HHH", 6, 8, 4) + b"\0\0"  # vtable: elements at +4
    buf += struct.pack("<iI", 8, 12) + b"\0" * 8  # table: vtable 8 back, vector 12 ahead (at 32)
    buf += struct.pack("<I", len(t)) + ev.tobytes()  # data at 36: 40 after the size prefix, 8-aligned
    return struct.pack("<I", len(buf)) + buf


def encode_aedat4(x, y, t, p, *, width: int, height: int, packet_events: int = 500) -> bytes:
    """AEDAT 4.0 bytes: the events in packets of ``packet_events`` on stream 0 (uncompressed)."""
    head = _aedat4_header(_AEDAT4_XML.format(width=width, height=height))
    out = b"#!AER-DAT4.0\r\n" + struct.pack("<i", len(head)) + head
    for a in range(0, len(t), packet_events):
        s = slice(a, a + packet_events)
        body = _aedat4_events(np.asarray(t)[s], np.asarray(x)[s], np.asarray(y)[s], np.asarray(p)[s] > 0)
        out += struct.pack("<ii", 0, len(body)) + body
    return out
