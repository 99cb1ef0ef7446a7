"""A fast decoder for the common PNG frame: 8-bit, not interlaced, gray or RGB (with or without alpha).

Pillow takes about 7 ms for a 640x480 RGB PNG on one core, of which inflating the data is under 3 ms; the
rest is its row-by-row unfiltering and copies into and out of its own image storage. Here the data are
inflated by ISA-L's inflate (``isal``, about 1.7x faster than zlib's on such frames; zlib where it is not
installed; both release the GIL, so decoding threads run in parallel) and unfiltered by a numba loop
straight into the numpy array, giving the same pixels as Pillow's decode (the alpha channel dropped,
as ``convert("RGB")`` / ``convert("L")`` do). Anything else (palette, 16-bit, interlaced files) and any
file that does not check out (bad signature, CRC, length or filter type) returns None: the caller decodes it
with Pillow, which also reports a corrupt file.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

try:  # ISA-L: the same DEFLATE, inflated with SIMD (its own error class)
    from isal import isal_zlib as _inflate_lib
except ImportError:  # pragma: no cover - isal is in requirements.txt
    _inflate_lib = zlib

from .cpu_jit import njit

AVAILABLE = njit is not None
_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # PNG colour type -> samples per pixel (gray, RGB, gray+alpha, RGBA)


def _jit(fn):
    return njit(cache=True, nogil=True, error_model="numpy")(fn) if njit is not None else fn


@_jit
def _paeth(a, b, c):
    """The Paeth predictor: whichever of left a, above b, upper-left c is nearest to a + b - c."""
    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - c - c)  # |p - a|, |p - b|, |p - c|, p = a + b - c
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


@_jit
def _paeth3(line, prev, cur, stride):
    """Paeth for RGB rows (the filter Pillow writes): a pixel's three channels are three independent chains,
    kept in registers (through memory, each byte waited for the store of the one before)."""
    U = np.uint64
    a0, a1, a2 = np.int32(0), np.int32(0), np.int32(0)
    c0, c1, c2 = np.int32(0), np.int32(0), np.int32(0)
    for x in range(U(stride // 3)):
        i = x * U(3)
        b0, b1, b2 = np.int32(prev[i]), np.int32(prev[i + U(1)]), np.int32(prev[i + U(2)])
        a0 = (np.int32(line[i]) + _paeth(a0, b0, c0)) & 255
        a1 = (np.int32(line[i + U(1)]) + _paeth(a1, b1, c1)) & 255
        a2 = (np.int32(line[i + U(2)]) + _paeth(a2, b2, c2)) & 255
        cur[i], cur[i + U(1)], cur[i + U(2)] = a0, a1, a2
        c0, c1, c2 = b0, b1, b2


@_jit
def _unfilter_row(kind, line, prev, cur, stride, bpp):
    """One row: ``cur`` = ``line`` with PNG filter ``kind`` undone against the row above (``prev``).
    Sums wrap modulo 256, as the format says. Indices are unsigned (numba checks signed ones for wrap-around,
    which slowed this loop down 1.5x). Returns False on an unknown filter type."""
    U = np.uint64
    n, k = U(stride), U(bpp)
    if kind == 0:
        for i in range(n):
            cur[i] = line[i]
    elif kind == 1:  # Sub: the byte bpp to the left
        for i in range(k):
            cur[i] = line[i]
        for i in range(k, n):
            cur[i] = line[i] + cur[i - k]
    elif kind == 2:  # Up: the byte above
        for i in range(n):
            cur[i] = line[i] + prev[i]
    elif kind == 3:  # Average of left and above, rounded down
        for i in range(k):
            cur[i] = line[i] + (prev[i] >> 1)
        for i in range(k, n):
            cur[i] = line[i] + np.uint8((np.int32(cur[i - k]) + np.int32(prev[i])) >> 1)
    elif kind == 4 and bpp == 3:
        _paeth3(line, prev, cur, stride)
    elif kind == 4:  # Paeth: whichever of left a, above b, upper-left c is nearest to a + b - c
        for i in range(k):
            cur[i] = line[i] + prev[i]  # a = c = 0: the nearest is b
        for i in range(k, n):
            cur[i] = line[i] + np.uint8(_paeth(np.int32(cur[i - k]), np.int32(prev[i]), np.int32(prev[i - k])))
    else:
        return False
    return True


@_jit
def _unfilter(raw, height, stride, bpp, keep, out):
    """Undo the row filters of ``raw`` (a filter byte, then ``stride`` bytes, per row) into ``out`` (height,
    width, keep), keeping the first ``keep`` of every ``bpp`` samples. Returns False on an unknown filter."""
    width = stride // bpp
    flat = out.reshape(height, width * keep)
    zero = np.zeros(stride, np.uint8)
    rows = np.empty((2, stride), np.uint8)  # with alpha: the full rows, this one and the one above
    for y in range(height):
        line = raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]
        if keep == bpp:  # unfiltered straight into the output
            prev = flat[y - 1] if y else zero
            if not _unfilter_row(raw[y * (stride + 1)], line, prev, flat[y], stride, bpp):
                return False
        else:
            prev = rows[(y + 1) % 2] if y else zero
            cur = rows[y % 2]
            if not _unfilter_row(raw[y * (stride + 1)], line, prev, cur, stride, bpp):
                return False
            for x in range(width):
                for c in range(keep):
                    out[y, x, c] = cur[x * bpp + c]
    return True


def decode(path: str) -> np.ndarray | None:
    """An 8-bit non-interlaced PNG as HxW uint8 (gray) or HxWx3 uint8 (RGB); None for any other file."""
    if not AVAILABLE:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if data[:8] != _SIGNATURE:
        return None
    pos, header, parts = 8, None, []
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length or data[pos + 8 + length : pos + 12 + length] != struct.pack(
                ">I", _inflate_lib.crc32(body, _inflate_lib.crc32(kind))):
            return None
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            parts.append(body)
        elif kind == b"IEND":
            break
        elif kind == b"PLTE" or (kind[0] & 0x20) == 0:
            return None  # a palette image, or a critical chunk this decoder does not know
        pos += 12 + length
    if header is None or not parts:
        return None
    width, height, depth, colour, compression, filtering, interlace = header
    if depth != 8 or colour not in _CHANNELS or compression or filtering or interlace or not width or not height:
        return None
    bpp = _CHANNELS[colour]
    try:
        raw = np.frombuffer(_inflate_lib.decompress(parts[0] if len(parts) == 1 else b"".join(parts)), np.uint8)
    except (zlib.error, _inflate_lib.error):
        return None
    if raw.size != height * (width * bpp + 1):
        return None
    keep = 1 if colour in (0, 4) else 3
    out = np.empty((height, width, keep), np.uint8)
    if not _unfilter(raw, height, width * bpp, bpp, keep, out):
        return None
    return out[:, :, 0] if keep == 1 else out
