"""Fused CPU kernels (numba) for a simulator step: the lin-log response, the launch of the step kernel
(:mod:`evforge.simulator.cpu_step`) on the kernel threads with its reusable workspace, and the event sort.

On the CPU a step of :class:`~evforge.simulator.pixel.EventSimulator` written as torch ops is dominated by
per-op overhead and by a dozen passes over every pixel. These kernels do the same arithmetic in one pass
over the pixels (in cache-sized blocks, split over threads) plus two passes over the events, which come
out already sorted by time, in the same float32 operation order as the torch path, so both give
bit-identical events and state (``tests/simulator/test_cpu_kernels.py`` checks it). The torch path stays
the implementation on CUDA and the fallback when numba is missing or ``EVFORGE_KERNELS=torch``.

Compiled on first use (about 10 s in all on 2 cores) and cached next to this file when it is writable.
"""

from __future__ import annotations

import math
import os
import threading

import numpy as np

from .cpu_jit import AVAILABLE, F32, njit, numba, prange  # noqa: F401  (AVAILABLE, njit: re-exported)
from .cpu_jit import jit as _jit
from .cpu_jit import pjit as _pjit
from .cpu_step import BLOCK, _signal_step
from .hashing import normal_quantiles

# ------------------------------------------------------------------------------------------------ lin-log
# v2e's lin-log is y = x * ln(thr)/thr at or below thr and ln(x) above, then rint(y * 1e8) / 1e8 in float64,
# then float32. The kernel computes ln(x) with its own vectorisable float64 log, accurate to a few ulp, and
# flags every value whose y * 1e8 lies within DANGER of a rounding boundary (k + 1/2): only there could a
# few ulp change rint's result. Flagged values (a few per million) are redone with the C library's log, as
# the torch formula's. So the result equals the torch formula bit for bit (checked for every float32 >= 0).

LN2_HI = 6.93147180369123816490e-01  # fdlibm's split of ln 2: e * LN2_HI is exact for |e| < 2**20
LN2_LO = 1.90821492927058770002e-10
SQRT2 = math.sqrt(2.0)
DANGER = 3e-5  # in units of 1e-8: > 4 ulp of ln(x) * 1e8 for every float32 x, plus the products' rounding


@_jit
def _lin_log_block(x, bits, out, danger, threshold, slope):
    """lin-log of a block (vectorised, branch-free); ``danger[i]`` flags values to redo. Returns their count."""
    n_danger = 0
    for i in range(x.size):
        v = np.float64(x[i])
        b = bits[i]
        # ln(x) = e ln 2 + ln(m), m in [sqrt(1/2), sqrt(2)); ln(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172
        m = np.float64(b & 0x7FFFFF) * (1.0 / 8388608.0) + 1.0
        big = m > SQRT2
        m = m * 0.5 if big else m
        e = np.float64(((b >> 23) & 0xFF) - (126 if big else 127))
        f = m - 1.0
        s = f / (2.0 + f)
        z = s * s
        # 2 atanh(s) = 2s + 2s^3/3 + ... + 2s^17/17; the next term is below 4e-16
        r = z * (2.0 / 3 + z * (2.0 / 5 + z * (2.0 / 7 + z * (2.0 / 9 + z * (2.0 / 11 + z * (2.0 / 13 + z * (
            2.0 / 15 + z * (2.0 / 17))))))))
        y = (e * LN2_HI + 2.0 * s) + (s * r + e * LN2_LO)
        y = v * slope if v <= threshold else y
        u = y * 1e8
        bad = (abs(u - np.floor(u) - 0.5) < DANGER) | (((b >> 23) & 0xFF) == 0xFF)  # near k + 1/2, or inf/NaN
        out[i] = np.float32(np.rint(u) / 1e8)
        danger[i] = bad
        n_danger += bad
    return n_danger


@_jit
def _lin_log_redo(x, bits, out, out_bits, danger, threshold, slope):
    for i in range(x.size):
        if danger[i]:
            v = np.float64(x[i])
            if v != v:
                out_bits[i] = bits[i] | 0x400000  # NaN stays NaN, quieted, as through torch's log
            else:
                y = v * slope if v <= threshold else math.log(v)
                out[i] = np.float32(np.rint(y * 1e8) / 1e8)


@_pjit
def _lin_log(x, bits, out, out_bits, threshold, slope, n_chunks):
    n = x.size
    for c in prange(n_chunks):
        danger = np.empty(BLOCK, np.bool_)
        for a in range(n * c // n_chunks, n * (c + 1) // n_chunks, BLOCK):
            b = min(a + BLOCK, n * (c + 1) // n_chunks)
            if _lin_log_block(x[a:b], bits[a:b], out[a:b], danger[:b - a], threshold, slope):
                _lin_log_redo(x[a:b], bits[a:b], out[a:b], out_bits[a:b], danger[:b - a], threshold, slope)


def lin_log(x: np.ndarray, threshold: float) -> np.ndarray:
    """v2e's lin-log of a float32 array, bit-identical to the torch formula, on the kernel threads."""
    flat = np.ascontiguousarray(x, dtype=F32).reshape(-1)
    out = np.empty(flat.size, F32)
    threshold = float(threshold)
    _launch_parallel(_lin_log, (flat, flat.view(np.int32), out, out.view(np.int32), threshold,
                                math.log(threshold) / threshold), _chunks(flat.size))
    return out.reshape(np.shape(x))


_MIN_PIXELS_PER_CHUNK = 32_768  # a smaller share is not worth waking another thread for
_launch = threading.Lock()  # numba's "workqueue" threading layer (used where OpenMP is missing) is not thread-safe
_launched_in = None  # pid of the process that started numba's thread pool
_TABLE = None


def normal_table() -> np.ndarray:
    """The normal quantile table of the leak jitter (:func:`~evforge.simulator.hashing.normal_quantiles`)."""
    global _TABLE
    if _TABLE is None:
        _TABLE = normal_quantiles()
    return _TABLE


def signal_step(slots, L1, I1, state, dt, t0, t1, dt_us, flags, slot_f32, slot_f64, keys, jkeys, workspace,
                chunks=None):
    """One step of the pixel model for the selected slots: low-pass, leak, counts, per-pixel timestamps,
    shot noise, refractory period, base update; the events sorted by (slot, t).

    ``L1``/``I1`` (S, H, W) float32: lin-log and linear frames of the selected slots ``slots`` (S,) int64.
    ``state``: the (B, H, W) arrays lp, base, pos_thr, neg_thr, on_cand, off_cand, leak_k (float32),
    last_t, next_shot (int64), read and written in place at ``slots[s]``. ``dt`` (S,) float32 seconds,
    ``t0``/``t1``/``dt_us`` (S,) int64 microseconds. ``flags``: (general, lowpass, leak, shot) bools; general
    = any non-ideal part (the ideal model skips the noise state). Per slot b of the batch: ``slot_f32`` (B, 4)
    cutoff Hz, leak jitter fraction, nominal ON and OFF thresholds; ``slot_f64`` (B, 2) shot-noise rate / 2,
    refractory period in us; ``keys`` (B, 4) uint64 the shot-noise streams (event, gap). ``jkeys`` (S, 2)
    uint64: the leak-jitter stream of each selected slot's current source interval.
    Returns (slot among selected, y, x, t, p), stably sorted by (slot, t), ties in pixel order, then signal
    before noise. The pixels are split into ``chunks`` ranges run on parallel threads (default:
    :func:`threads`, fewer for small frames); the result does not depend on it.
    """
    chunks = min(_chunks(L1.size) if chunks is None else chunks, workspace.chunks)
    general, use_lowpass, use_leak, use_shot = flags
    args = (slots, L1, I1, *state, dt, t0, t1, dt_us, general, use_lowpass, use_leak, use_shot, slot_f32, slot_f64,
            keys, jkeys, normal_table(), *workspace.args(general))
    return _launch_parallel(_signal_step, args, chunks)


_serial = {}  # parallel kernel -> the same function compiled without threads, for forked children


def _launch_parallel(kernel, args, chunks):
    """``kernel(*args, chunks)`` on ``chunks`` numba threads, one launch at a time."""
    global _launched_in
    if _launched_in not in (None, os.getpid()):
        # a child forked after this process started numba's thread pool: the pool's threads are not in the
        # child, and an OpenMP pool may hang there, so run the same function compiled without threads
        if kernel not in _serial:
            _serial[kernel] = njit(nogil=True, error_model="numpy")(kernel.py_func)
        return _serial[kernel](*args, 1)
    with _launch:
        _launched_in = os.getpid()
        numba.set_num_threads(max(1, min(chunks, numba.config.NUMBA_NUM_THREADS)))
        return kernel(*args, chunks)


def _chunks(n: int) -> int:
    """Threads worth waking for ``n`` pixels: :func:`threads`, fewer for small frames."""
    return max(1, min(threads(), n // _MIN_PIXELS_PER_CHUNK))


def threads() -> int:
    """Threads for the kernels: torch's intra-op thread count, so ``torch.set_num_threads`` governs both."""
    import torch

    return max(1, torch.get_num_threads())


class Workspace:
    """Scratch arrays of :func:`signal_step` for up to ``n_pixels`` (B * H * W) and ``chunks`` threads,
    reused across steps: fresh buffers would be page-faulted in on every step, which costs more than the
    step's arithmetic."""

    def __init__(self, n_pixels: int, chunks: int = 8):
        self.n_pixels = n_pixels
        self.f32 = np.empty((3, n_pixels), F32)  # per hit: diff before and after, threshold
        self.i64 = np.empty((3, n_pixels), np.int64)  # per hit: slot, pixel, count (+ last event, next shot)
        self.t = np.empty((n_pixels, 2), np.int64)  # per event: packed pixel, bucket; more get a fresh array
        self.chunks = chunks
        self.block_f32 = np.empty((3, chunks * BLOCK), F32)  # diffs before and after, the jitter's z
        self.block_i64 = np.empty(chunks * BLOCK, np.int64)
        self.block_flag = np.empty(chunks * BLOCK, np.bool_)

    def args(self, general: bool = False) -> tuple:
        if general and self.i64.shape[0] < 5:  # the noise state of each hit, only for non-ideal models
            self.i64 = np.empty((5, self.n_pixels), np.int64)
        return self.f32, self.i64, self.t, self.block_f32, self.block_i64, self.block_flag


# ------------------------------------------------------------------------------------------------ sorting

@_jit
def _sort_events(b, x, y, t, p):
    n = t.size
    order = np.empty(n, np.int64)
    if n:
        t_min, t_max, b_max = t.min(), t.max(), b.max()
        span = t_max - t_min + 1
        n_buckets = (b_max + 1) * span
        if n_buckets <= 4 * n + 65536:  # counting sort, O(n + buckets)
            counts = np.zeros(n_buckets + 1, np.int64)
            for i in range(n):
                counts[b[i] * span + (t[i] - t_min) + 1] += 1
            for v in range(n_buckets):
                counts[v + 1] += counts[v]
            for i in range(n):
                k = b[i] * span + (t[i] - t_min)
                order[counts[k]] = i
                counts[k] += 1
        else:
            order[:] = np.argsort(b * span + (t - t_min), kind="mergesort")
    ob, ox, oy, ot, op = np.empty_like(b), np.empty_like(x), np.empty_like(y), np.empty_like(t), np.empty_like(p)
    for j in range(n):
        i = order[j]
        ob[j], ox[j], oy[j], ot[j], op[j] = b[i], x[i], y[i], t[i], p[i]
    return ob, ox, oy, ot, op


def sort_events(b, x, y, t, p):
    """Events (int64 b, x, y, t; int8 p) stably sorted by (b, t), so ties keep generation order."""
    return _sort_events(b, x, y, t, p)
