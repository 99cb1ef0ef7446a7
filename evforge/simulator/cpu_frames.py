"""8-bit frames to the simulator's input on the CPU (numba): luma as float32, and its 8-bit rounding.

A decoded RGB frame becomes the simulator's gray input in one pass over its bytes, instead of a float copy
of all three channels and a weighted sum as torch ops (about 8x less time at 640x480). The arithmetic is
:func:`~evforge.simulator.resample.rgb_to_gray`'s, in the same float32 order (``(r w0 + g w1) + b w2``), so
both give the same bits. The functions release the GIL, so decoding threads run them in parallel.
"""

from __future__ import annotations

import numpy as np

from .cpu_jit import njit
from .resample import LUMA_WEIGHTS

AVAILABLE = njit is not None
_W0, _W1, _W2 = (np.float32(w) for w in LUMA_WEIGHTS)


def _jit(fn):
    return njit(cache=True, nogil=True, error_model="numpy")(fn) if njit is not None else fn


@_jit
def _luma(rgb, out, out_u8, want_u8):
    h, w = out.shape
    for i in range(h):
        for j in range(w):
            v = (np.float32(rgb[i, j, 0]) * _W0 + np.float32(rgb[i, j, 1]) * _W1) + np.float32(rgb[i, j, 2]) * _W2
            out[i, j] = v
            if want_u8:  # torch's round (half to even) and clamp to [0, 255]
                out_u8[i, j] = np.uint8(min(max(np.rint(v), np.float32(0.0)), np.float32(255.0)))


def luma(frame: np.ndarray, want_u8: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(H, W, 3 or 4) uint8 RGB(A) -> (H, W) float32 luma (alpha ignored), and with ``want_u8`` its rounding
    to uint8 (what a stream file stores as the frame), else None."""
    out = np.empty(frame.shape[:2], np.float32)
    out_u8 = np.empty(frame.shape[:2] if want_u8 else (0, 0), np.uint8)
    _luma(np.ascontiguousarray(frame), out, out_u8, want_u8)
    return out, (out_u8 if want_u8 else None)
