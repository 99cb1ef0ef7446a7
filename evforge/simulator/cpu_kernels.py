"""Fused CPU kernels (numba) for the dense part of a simulator step.

On the CPU a step of :class:`~evforge.simulator.pixel.EventSimulator` written as torch ops is dominated by
per-op overhead and by a dozen passes over every pixel. These kernels do the same arithmetic in one pass
over the pixels plus one pass over the events, in the same float32 operation order as the torch path, so
both give bit-identical events and state (``tests/simulator/test_cpu_kernels.py`` checks it). The torch
path stays the implementation on CUDA and the fallback when numba is missing or ``EVFORGE_KERNELS=torch``.

Compiled on first use (about a second per kernel) and cached next to this file when it is writable.
"""

from __future__ import annotations

import math
import os

import numpy as np

try:  # numba is a dependency; the torch path still works without it
    from numba import njit
except ImportError:  # pragma: no cover - exercised only where numba is not installed
    njit = None

F32 = np.float32
TWO_PI = np.float32(2 * math.pi)  # torch multiplies a float32 tensor by a Python float in float32
AVAILABLE = njit is not None and os.environ.get("EVFORGE_KERNELS", "auto") != "torch"


def _jit(fn):
    return njit(cache=True, nogil=True, error_model="numpy")(fn) if njit is not None else fn


# ------------------------------------------------------------------------------------------------ lin-log

@_jit
def _lin_log_prepare(x, buf, threshold):
    for i in range(x.size):
        buf[i] = max(np.float64(x[i]), threshold)


@_jit
def _lin_log_finish(x, logs, out, threshold, slope):
    # v2e: y = x * ln(thr)/thr at or below thr, ln(x) above; rounded to 1e-8 in float64, then float32
    for i in range(x.size):
        v = np.float64(x[i])
        y = v * slope if v <= threshold else logs[i]
        out[i] = np.float32(np.rint(y * 1e8) / 1e8)


def lin_log(x: np.ndarray, threshold: float) -> np.ndarray:
    """v2e's lin-log of a float32 array, bit-identical to the torch formula; numpy's SIMD float64 log in
    between (one vectorised log pass instead of torch's ten)."""
    flat = np.ascontiguousarray(x, dtype=F32).reshape(-1)
    buf = np.empty(flat.size, np.float64)
    _lin_log_prepare(flat, buf, float(threshold))
    np.log(buf, out=buf)
    out = np.empty(flat.size, F32)
    _lin_log_finish(flat, buf, out, float(threshold), math.log(threshold) / threshold)
    return out.reshape(np.shape(x))


# ------------------------------------------------------------------------------------------------ step

@_jit
def _floor_div(a, b):
    """torch.div(a, b, rounding_mode="floor") for float32 a >= 0, b > 0 (a count below 2**22).

    torch's fmod-based algorithm returns the exact floor of the real quotient there. So does float64
    division: for a >= b both are multiples of b's ulp, so a non-integer a/b is at least 2**-24 from an
    integer, while the float64 quotient errs by under 2**-28; for a < b it stays below 1 - 2**-23.
    """
    return np.floor(np.float64(a) / np.float64(b))


# The per-pixel part of a step is three branch-free loops (one per model variant) that the compiler
# vectorises, writing diff before/after and a candidate flag; a scan then visits only the flagged pixels.

@_jit
def _dense_plain(L1, lp, base, on_cand, off_cand, d0, d1, flag):
    for i in range(L1.size):
        l1, lp0, b0 = L1[i], lp[i], base[i]
        lp[i] = l1
        d0[i] = lp0 - b0
        d = l1 - b0
        d1[i] = d
        flag[i] = (d >= on_cand[i]) | (d <= off_cand[i])


@_jit
def _dense_leak(L1, lp, base, leak_speed, dt, on_cand, off_cand, d0, d1, flag):
    for i in range(L1.size):
        l1, lp0, b0 = L1[i], lp[i], base[i]
        b1 = b0 - dt * leak_speed[i]
        lp[i] = l1
        base[i] = b1
        d0[i] = lp0 - b0
        d = l1 - b1
        d1[i] = d
        flag[i] = (d >= on_cand[i]) | (d <= off_cand[i])


@_jit
def _dense_lowpass(L1, I1, lp, base, leak_speed, dt, leak_dt, cutoff, on_cand, off_cand, d0, d1, flag):
    for i in range(L1.size):
        l1, lp0, b0 = L1[i], lp[i], base[i]
        # torch: clamp(intensity01(I1) * dt * (2 pi) * cutoff, max=1), the same float32 operations in order
        eps = min(((((I1[i] + F32(20.0)) / F32(275.0)) * dt) * TWO_PI) * cutoff, F32(1.0))
        lp1 = (F32(1.0) - eps) * lp0 + eps * l1
        b1 = b0 - leak_dt * leak_speed[i]  # leak_dt = 0 without leak: b0 - 0 == b0
        lp[i] = lp1
        base[i] = b1
        d0[i] = lp0 - b0
        d = lp1 - b1
        d1[i] = d
        flag[i] = (d >= on_cand[i]) | (d <= off_cand[i])


@_jit
def signal_step(slots, L1, I1, lp, base, pos_thr, neg_thr, on_cand, off_cand, leak_speed, dt, cutoff,
                t0, dt_us, use_lowpass, use_leak, update_base, sort, want_flat):
    """Low-pass, leak, counts and per-pixel timestamps of the signal events of one step.

    ``L1``/``I1`` (S, H, W): lin-log and linear frames of the selected slots ``slots`` (S,); state arrays
    (B, H, W) are read and written in place at ``slots[s]``: ``lp`` <- low-passed response, ``base`` <-
    leaked level (+ the emitted thresholds when ``update_base``). ``dt`` (S,) seconds and ``cutoff`` (S,) Hz
    as float32, ``t0``/``dt_us`` (S,) int64 microseconds. Returns (slot among selected, y, x, t, p, flat
    index into the full state (empty unless ``want_flat``)) in generation order (pixels in (slot, y, x) order, each pixel's crossings
    in order), or with ``sort`` stably sorted by (slot, t), as :meth:`StepEvents.sorted` would.
    """
    S, H, W = L1.shape
    HW = H * W
    L1f, I1f = L1.reshape(-1), I1.reshape(-1)
    lpf, basef, lk = lp.reshape(-1), base.reshape(-1), leak_speed.reshape(-1)
    pt, nt = pos_thr.reshape(-1), neg_thr.reshape(-1)
    onc, offc = on_cand.reshape(-1), off_cand.reshape(-1)
    d0 = np.empty(HW, F32)
    d1 = np.empty(HW, F32)
    flag = np.empty(HW, np.bool_)
    cand = np.empty(HW, np.int64)
    # per pixel with events ("hit"): slot among selected, pixel within the slot, count, diff before/after
    hit_s = np.empty(S * HW, np.int64)
    hit_r = np.empty(S * HW, np.int64)
    hit_cnt = np.empty(S * HW, np.int64)
    hit_d0 = np.empty(S * HW, F32)
    hit_d1 = np.empty(S * HW, F32)
    n_hit = 0
    n_ev = 0
    for s in range(S):
        st = slice(slots[s] * HW, (slots[s] + 1) * HW)
        io = slice(s * HW, (s + 1) * HW)
        if use_lowpass and cutoff[s] > 0:
            _dense_lowpass(L1f[io], I1f[io], lpf[st], basef[st], lk[st], dt[s], dt[s] if use_leak else F32(0.0),
                           cutoff[s], onc[st], offc[st], d0, d1, flag)
        elif use_leak:
            _dense_leak(L1f[io], lpf[st], basef[st], lk[st], dt[s], onc[st], offc[st], d0, d1, flag)
        else:
            _dense_plain(L1f[io], lpf[st], basef[st], onc[st], offc[st], d0, d1, flag)
        n_cand = 0
        for i in range(HW):  # branch-free compaction of the candidates (a branch per pixel mispredicts)
            cand[n_cand] = i
            n_cand += flag[i]
        so = slots[s] * HW
        for c in range(n_cand):
            i = cand[c]
            p = so + i
            d = d1[i]
            on = d > 0
            thr = pt[p] if on else nt[p]
            n = np.int64(_floor_div(abs(d), thr))
            hit_s[n_hit] = s
            hit_r[n_hit] = i
            hit_cnt[n_hit] = n
            hit_d0[n_hit] = d0[i]
            hit_d1[n_hit] = d
            n_hit += n > 0
            n_ev += n
            if update_base:
                basef[p] = basef[p] + F32(n) * thr if on else basef[p] - F32(n) * thr

    # timestamps of the events in generation order, and a histogram of their (slot, t) buckets
    offset = np.empty(S + 1, np.int64)  # bucket of (slot s, time t) = offset[s] + t - t0[s]
    offset[0] = 0
    for q in range(S):
        offset[q + 1] = offset[q] + dt_us[q] + 1
    counting = sort and offset[S] <= 4 * n_ev + 65536
    counts = np.zeros(offset[S] + 1 if counting else 1, np.int64)
    t_gen = np.empty(n_ev, np.int64)
    j = 0
    for h in range(n_hit):
        s = hit_s[h]
        g = slots[s] * HW + hit_r[h]
        e0 = hit_d0[h]
        e1 = hit_d1[h]
        sign = F32(1.0) if e1 > 0 else F32(-1.0)
        thr = pt[g] if e1 > 0 else nt[g]
        span = np.float64(dt_us[s])
        for k in range(1, hit_cnt[h] + 1):
            # the k-th level k * thr is crossed where diff, linear over the step, reaches it
            level = (sign * F32(k)) * thr
            if sign * e0 >= sign * level:
                frac = F32(0.0)
            else:
                frac = min(max((level - e0) / (e1 - e0), F32(0.0)), F32(1.0))
            t = t0[s] + np.int64(np.rint(np.float64(frac) * span))
            t_gen[j] = t
            if counting:
                counts[offset[s] + t - t0[s] + 1] += 1
            j += 1

    # output position of each event: stably sorted by (slot, t), or generation order
    if counting:
        for v in range(offset[S]):
            counts[v + 1] += counts[v]
    elif sort:
        key = np.empty(n_ev, np.int64)
        j = 0
        for h in range(n_hit):
            s = hit_s[h]
            for _ in range(hit_cnt[h]):
                key[j] = offset[s] + t_gen[j] - t0[s]
                j += 1
        pos = np.empty(n_ev, np.int64)
        pos[np.argsort(key, kind="mergesort")] = np.arange(n_ev)

    ev_s = np.empty(n_ev, np.int64)
    ev_y = np.empty(n_ev, np.int64)
    ev_x = np.empty(n_ev, np.int64)
    ev_t = np.empty(n_ev, np.int64)
    ev_p = np.empty(n_ev, np.int8)
    ev_flat = np.empty(n_ev if want_flat else 0, np.int64)
    j = 0
    for h in range(n_hit):
        s = hit_s[h]
        r = hit_r[h]
        y = r // W
        x = r - y * W
        pol = 1 if hit_d1[h] > 0 else -1
        g = slots[s] * HW + r
        for _ in range(hit_cnt[h]):
            t = t_gen[j]
            if counting:
                k = offset[s] + t - t0[s]
                q = counts[k]
                counts[k] = q + 1
            elif sort:
                q = pos[j]
            else:
                q = j
            ev_s[q] = s
            ev_y[q] = y
            ev_x[q] = x
            ev_t[q] = t
            ev_p[q] = pol
            if want_flat:
                ev_flat[q] = g
            j += 1
    return ev_s, ev_y, ev_x, ev_t, ev_p, ev_flat


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
