"""The fused numba kernel of one simulator step on the CPU (:func:`evforge.simulator.cpu_kernels.signal_step`
launches it): the dense pass over the pixels, the per-pixel walk of crossings, shot noise and refractory
period, and the two passes that lay the events out sorted by time. Same float32 operation order as the torch
path of :mod:`evforge.simulator.pixel_torch`, so both give bit-identical events and state.
"""

from __future__ import annotations

import math

import numpy as np

from .cpu_jit import F32, TWO_PI, U, prange
from .cpu_jit import jit as _jit
from .cpu_jit import pjit as _pjit
from .hashing import NORMAL_TABLE_BITS
from .params import SHOT_NOISE_INTEN_FACTOR

# ------------------------------------------------------------------------------------------------ hashing
# rng's counter hash on uint64 values that hold 32 bits (numba's uint32 arithmetic widens anyway): the same
# bits as the torch version's wrapping int32 arithmetic.

M32 = np.uint64(0xFFFFFFFF)
_C1 = np.uint64(0x7FEB352D)
_C2 = np.uint64(0x846CA68B)
_S9, _S15, _S16, _S32 = np.uint64(9), np.uint64(15), np.uint64(16), np.uint64(32)
_TABLE_SHIFT = np.uint64(32 - NORMAL_TABLE_BITS)


@_jit
def _mix(x):
    """lowbias32 (rng._mix)."""
    x = x ^ (x >> _S16)
    x = (x * _C1) & M32
    x = x ^ (x >> _S15)
    x = (x * _C2) & M32
    return x ^ (x >> _S16)


@_jit
def _event_uniform(k1, k2, idx, t):
    """rng.event_uniform: U(0, 1) float32 of (stream key, element index, int64 time)."""
    tt = np.uint64(t)
    h = _mix(_mix((np.uint64(idx) + k1) & M32) ^ (tt & M32))
    return (F32(_mix(h ^ (tt >> _S32) ^ k2) >> _S9) + F32(0.5)) * F32(1.0 / 8388608.0)


# ------------------------------------------------------------------------------------------------ step

@_jit
def _floor_div(a, b):
    """torch.div(a, b, rounding_mode="floor") for float32 a >= 0, b > 0 (a count below 2**22).

    torch's fmod-based algorithm returns the exact floor of the real quotient there. So does float64
    division: for a >= b both are multiples of b's ulp, so a non-integer a/b is at least 2**-24 from an
    integer, while the float64 quotient errs by under 2**-28; for a < b it stays below 1 - 2**-23.
    """
    return np.floor(np.float64(a) / np.float64(b))


# The per-pixel part of a step is two branch-free loops that the compiler vectorises, writing diff before
# and after and a candidate flag; a scan then visits only the flagged pixels. The ideal model (no low-pass,
# leak or noise) has its own loop; every other model runs the general one, whose options are selects.

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
def _dense_general(L1, I1, lp, base, leak_k, next_shot, pix0, dt, leak_dt, cutoff, lowpass, jitter, jk1, jk2,
                   table, t1, on_cand, off_cand, d0, d1, flag, zi, z):
    """Low-pass (when ``lowpass``), leak with this interval's jitter, and the shot-noise due test; the same
    float32 operations in the same order as the torch path. ``pix0``: pixel index (in its slot) of
    element 0; ``leak_dt`` = 0 without leak (``b0 - 0 * speed == b0``). ``zi``/``z``: int64/float32 scratch.

    The jitter's normal draw z (rng.table_normal: a hash indexing a table) is made in two passes of its own:
    a lookup at a hashed index inside the main loop keeps the compiler from vectorising that loop, and the
    step at 640x480 cost 1.6 ms on one core that way against 1.2 ms in three passes (same values)."""
    m = L1.size
    for i in range(m):
        zi[i] = np.int64(_mix(_mix((np.uint64(pix0 + i) + jk1) & M32) ^ jk2) >> _TABLE_SHIFT)
    for i in range(m):
        z[i] = table[U(zi[i])]
    for i in range(m):
        l1, lp0, b0 = L1[i], lp[i], base[i]
        # torch: clamp(intensity01(I1) * dt * (2 pi) * cutoff, max=1), the same float32 operations in order
        eps = min(((((I1[i] + F32(20.0)) / F32(275.0)) * dt) * TWO_PI) * cutoff, F32(1.0))
        lp1 = (F32(1.0) - eps) * lp0 + eps * l1 if lowpass else l1
        # leak speed: leak_k (1 - jitter z), z a normal drawn per interval by table lookup (rng.table_normal)
        b1 = b0 - leak_dt * (leak_k[i] * (F32(1.0) - jitter * z[i]))
        lp[i] = lp1
        base[i] = b1
        d0[i] = lp0 - b0
        d = lp1 - b1
        d1[i] = d
        flag[i] = (d >= on_cand[i]) | (d <= off_cand[i]) | (next_shot[i] <= t1)


BLOCK = 4096  # pixels per block of the dense pass: its diffs and flags stay in the L1/L2 cache
_NEVER_AGAIN = 1 << 62  # "no further event" in the merge of a pixel's event streams (later than any step)


@_jit
def _crossing(k, sign, thr, e0, e1, span):
    """Microseconds after the step's start at which diff, linear over the step, crosses level k * thr."""
    level = (sign * F32(k)) * thr
    if sign * e0 >= sign * level:
        frac = F32(0.0)
    else:
        frac = min(max((level - e0) / (e1 - e0), F32(0.0)), F32(1.0))
    return np.int64(np.rint(np.float64(frac) * span))


@_jit
def _next_shot(c, t1, pix, f_acc, p_on, rate, keys):
    """From candidate time ``c`` on: the first kept shot-noise event up to ``t1`` as (time or _NEVER_AGAIN,
    polarity bit, the candidate after it). A candidate is kept with probability ``f_acc`` and is ON with
    probability ``p_on`` (one uniform for both); the gap to the next is exponential at ``rate`` Hz."""
    while c <= t1:
        u = _event_uniform(keys[0], keys[1], pix, c)
        # -log(u) / rate s, rounded up to whole microseconds (at least 1), as the torch path
        gap = np.ceil(-math.log(np.float64(_event_uniform(keys[2], keys[3], pix, c))) / rate * 1e6)
        nxt = c + np.int64(min(max(gap, 1.0), 2.0 ** 61))
        if u < f_acc:
            return c, np.int64(np.float64(u) < np.float64(f_acc) * p_on), nxt
        c = nxt
    return _NEVER_AGAIN, np.int64(0), c


@_jit
def _walk(n, e0, e1, thr, span, t0, t1, last, nxt, ref, use_shot, I1, pt, nt, gs, pix, slot_f32, slot_f64,
          keys, write, j, packed, first, ev, counts, counting):
    """One pixel's events of a step in time order: its ``n`` signal crossings merged with its kept shot noise
    (a crossing first at equal times), through the refractory filter when ``ref`` > 0 (emit only more than
    ``ref`` us after the previous emitted event). With ``write``, rows from ``j`` on (as _event_keys).
    Returns (events emitted, signal events emitted, last event time, next shot candidate)."""
    sign = F32(1.0) if e1 > 0 else F32(-1.0)
    sig_bit = np.int64(e1 > 0)
    spanf = np.float64(span)
    f_acc = F32(0.0)
    p_on = rate = 0.0
    if use_shot:
        # v2e: the dark rate falls by (1 - 0.75 inten01); per polarity rate/2 * nominal / actual threshold
        f_acc = (F32(SHOT_NOISE_INTEN_FACTOR) - F32(1.0)) * ((I1 + F32(20.0)) / F32(275.0)) + F32(1.0)
        half = slot_f64[gs, 0]
        r_on = half * np.float64(slot_f32[gs, 2]) / np.float64(pt)
        r_off = half * np.float64(slot_f32[gs, 3]) / np.float64(nt)
        rate = r_on + r_off
        p_on = r_on / rate
    k = 1
    ts = t0 + _crossing(1, sign, thr, e0, e1, spanf) if n >= 1 else _NEVER_AGAIN
    tsh, pol, c = _next_shot(nxt, t1, pix, f_acc, p_on, rate, keys[gs]) if use_shot else (
        np.int64(_NEVER_AGAIN), np.int64(0), nxt)
    n_emit = 0
    n_sig = 0
    while ts != _NEVER_AGAIN or tsh != _NEVER_AGAIN:
        is_sig = ts <= tsh
        t = ts if is_sig else tsh
        emit = True
        if ref > 0:
            emit = np.float64(t - last) > ref
            if emit:
                last = t
        if emit:
            n_emit += 1
            n_sig += is_sig
            if write:
                kk = first + t - t0
                ev[np.uint64(j), 0] = packed | (sig_bit if is_sig else pol)
                ev[np.uint64(j), 1] = kk
                if counting:
                    counts[np.uint64(kk)] += 1
                j += 1
        if is_sig:
            k += 1
            ts = t0 + _crossing(k, sign, thr, e0, e1, spanf) if k <= n else _NEVER_AGAIN
        else:
            tsh, pol, c = _next_shot(c, t1, pix, f_acc, p_on, rate, keys[gs])
    return n_emit, n_sig, last, c


@_jit
def _hits(lo, hi, slots, HW, W, L1f, I1f, lpf, basef, lk, pt, nt, onc, offc, last_t, next_shot, dt, t0, t1,
          dt_us, general, use_lowpass, use_leak, use_shot, slot_f32, slot_f64, keys, jkeys, table,
          d0, d1, flag, cand, zs, hit_s, hit_r, hit_cnt, hit_d0, hit_d1, hit_thr, hit_last, hit_next):
    """Pixels ``lo:hi`` of the selected slots flattened: update lp/base (and the noise state), store the
    pixels with events or noise candidates ("hits": slot, pixel in slot, count, diff before/after, and the
    refractory/noise state before the step) from index ``lo`` on. Returns (hits, events).
    ``d0``, ``d1``, ``flag``, ``cand``, ``zs``: scratch of ``BLOCK`` entries."""
    n_hit = 0
    n_ev = 0
    no_rows = np.empty((0, 2), np.int64)  # the walk only counts here
    for s in range(lo // HW, (hi - 1) // HW + 1):
        gs = slots[s]
        so = (gs - s) * HW  # state index = input index + so
        lowpass = use_lowpass and slot_f32[gs, 0] > 0
        ref = slot_f64[gs, 1]
        for a in range(max(lo, s * HW), min(hi, (s + 1) * HW), BLOCK):
            b = min(a + BLOCK, hi, (s + 1) * HW)
            m = b - a
            io, st = slice(a, b), slice(a + so, b + so)
            if general:
                _dense_general(L1f[io], I1f[io], lpf[st], basef[st], lk[st], next_shot[st], a - s * HW, dt[s],
                               dt[s] if use_leak else F32(0.0), slot_f32[gs, 0], lowpass, slot_f32[gs, 1],
                               jkeys[s, 0], jkeys[s, 1], table, t1[s] if use_shot else np.int64(-1),
                               onc[st], offc[st], d0[:m], d1[:m], flag[:m], cand[:m], zs[:m])
            else:
                _dense_plain(L1f[io], lpf[st], basef[st], onc[st], offc[st], d0[:m], d1[:m], flag[:m])
            n_cand = 0
            for i in range(m):  # branch-free compaction of the candidates (a branch per pixel mispredicts)
                cand[U(n_cand)] = i
                n_cand += flag[i]
            for c in range(n_cand):
                i = cand[U(c)]
                p = U(a + i + so)
                d = d1[U(i)]
                # both thresholds loaded and selected: a branch on the polarity would mispredict half the time
                tp, tn = pt[p], nt[p]
                thr = tp if d > 0 else tn
                n = np.int64(_floor_div(abs(d), thr))
                h = U(lo + n_hit)
                r = a + i - s * HW
                hit_s[h] = s
                hit_r[h] = r
                hit_cnt[h] = n
                hit_d0[h] = d0[U(i)]
                hit_d1[h] = d
                hit_thr[h] = thr
                n_hit += 1  # a candidate below one threshold is a hit with no events (no dependency on n)
                n_sig = n
                n_e = n
                if general:
                    last, nxt = last_t[p], next_shot[p]
                    hit_last[h] = last
                    hit_next[h] = nxt
                    if (use_shot and nxt <= t1[s]) or (ref > 0 and n > 0):
                        n_e, n_sig, last, nxt = _walk(n, d0[U(i)], d, thr, dt_us[s], t0[s], t1[s], last, nxt,
                                                      ref, use_shot, I1f[U(a + i)], tp, tn, gs, r, slot_f32,
                                                      slot_f64, keys, False, np.int64(0), np.int64(0),
                                                      np.int64(0), no_rows, hit_cnt[:0], False)
                        last_t[p] = last
                        next_shot[p] = nxt
                n_ev += n_e
                if n_sig:  # base +- n * thr (negating the product is exact)
                    step = F32(n_sig) * thr
                    basef[p] = basef[p] + (step if d > 0 else -step)
    return n_hit, n_ev


@_jit
def _event_keys(h_lo, h_hi, j, W, hit_s, hit_r, hit_cnt, hit_d0, hit_d1, hit_thr, hit_last, hit_next, slots, t0,
                t1, dt_us, offset, general, use_shot, I1f, HW, pt, nt, slot_f32, slot_f64, keys, counts, counting,
                ev):
    """Events of hits ``h_lo:h_hi`` from index ``j`` on, as rows of ``ev``: the pixel's slot, row, column and
    polarity packed in one int64, and the event's (slot, t) bucket; a histogram of the buckets in ``counts``.
    Hits whose events went through the noise/refractory walk in ``_hits`` replay it from their stored state."""
    inv_w = 1.0 / W
    for h in range(U(h_lo), U(h_hi)):
        s = hit_s[h]
        r = hit_r[h]
        y = np.int64((np.float64(r) + 0.5) * inv_w)  # = r // W: the quotient is >= 0.5 / W from an integer
        e0 = hit_d0[h]
        e1 = hit_d1[h]
        n = hit_cnt[h]
        packed = (((s << 21) | y) << 21 | (r - y * W)) << 1
        thr = hit_thr[h]
        span = np.float64(dt_us[U(s)])
        first = offset[U(s)]
        if general:
            gs = slots[s]
            ref = slot_f64[gs, 1]
            if (use_shot and hit_next[h] <= t1[s]) or (ref > 0 and n > 0):
                p = U(gs * HW + r)
                j = _walk(n, e0, e1, thr, dt_us[s], t0[s], t1[s], hit_last[h], hit_next[h], ref, use_shot,
                          I1f[U(s * HW + r)], pt[p], nt[p], gs, r, slot_f32, slot_f64, keys, True, j, packed,
                          first, ev, counts, counting)[0] + j
                continue
        packed |= e1 > 0
        sign = F32(1.0) if e1 > 0 else F32(-1.0)
        for k in range(1, n + 1):
            # the k-th level k * thr is crossed where diff, linear over the step, reaches it
            level = (sign * F32(k)) * thr
            if sign * e0 >= sign * level:
                frac = F32(0.0)
            else:
                frac = min(max((level - e0) / (e1 - e0), F32(0.0)), F32(1.0))
            kk = first + np.int64(np.rint(np.float64(frac) * span))
            ev[U(j), 0] = packed  # one row per event: the gather reads one cache line per event
            ev[U(j), 1] = kk
            if counting:
                counts[U(kk)] += 1
            j += 1


@_jit
def _place(j_lo, j_hi, ev, starts, order):
    """Counting-sort placement of events ``j_lo:j_hi`` (their buckets start at ``starts``)."""
    for j in range(j_lo, j_hi):
        kk = U(ev[U(j), 1])
        order[U(starts[kk])] = j
        starts[kk] += 1


@_jit
def _gather(q_lo, q_hi, order, ev, t0, offset, ev_s, ev_y, ev_x, ev_t, ev_p):
    """Output columns at positions ``q_lo:q_hi``, written in order (reads are cheaper to scatter than writes)."""
    mask21 = (1 << 21) - 1
    for q in range(U(q_lo), U(q_hi)):
        j = U(order[q])
        v = ev[j, 0]
        s = v >> 43
        ev_s[q] = s
        ev_y[q] = (v >> 22) & mask21
        ev_x[q] = (v >> 1) & mask21
        ev_t[q] = t0[U(s)] + ev[j, 1] - offset[U(s)]
        ev_p[q] = 1 if v & 1 else -1


@_pjit
def _signal_step(slots, L1, I1, lp, base, pos_thr, neg_thr, on_cand, off_cand, leak_k, last_t, next_shot, dt, t0,
                 t1, dt_us, general, use_lowpass, use_leak, use_shot, slot_f32, slot_f64, keys, jkeys, table,
                 work_f32, work_i64, work_t, block_f32, block_i64, block_flag, n_chunks):
    S, H, W = L1.shape
    HW = H * W
    P = S * HW
    L1f, I1f = L1.reshape(-1), I1.reshape(-1)
    lpf, basef, lk = lp.reshape(-1), base.reshape(-1), leak_k.reshape(-1)
    pt, nt = pos_thr.reshape(-1), neg_thr.reshape(-1)
    onc, offc = on_cand.reshape(-1), off_cand.reshape(-1)
    lt, ns = last_t.reshape(-1), next_shot.reshape(-1)
    hit_d0, hit_d1, hit_thr = work_f32[0, :P], work_f32[1, :P], work_f32[2, :P]
    hit_s, hit_r, hit_cnt = work_i64[0, :P], work_i64[1, :P], work_i64[2, :P]
    hit_last = work_i64[3, :P] if general else work_i64[0, :0]
    hit_next = work_i64[4, :P] if general else work_i64[0, :0]

    # 1. per chunk of pixels: state, candidates, hits (stored from the chunk's first pixel index)
    edges = np.empty(n_chunks + 1, np.int64)
    for c in range(n_chunks + 1):
        edges[c] = P * c // n_chunks
    n_hit = np.zeros(n_chunks, np.int64)
    n_ev = np.zeros(n_chunks + 1, np.int64)
    for c in prange(n_chunks):
        blk = slice(c * BLOCK, (c + 1) * BLOCK)  # per-chunk block scratch
        n_hit[c], n_ev[c + 1] = _hits(edges[c], edges[c + 1], slots, HW, W, L1f, I1f, lpf, basef, lk, pt, nt, onc,
                                      offc, lt, ns, dt, t0, t1, dt_us, general, use_lowpass, use_leak, use_shot,
                                      slot_f32, slot_f64, keys, jkeys, table, block_f32[0, blk], block_f32[1, blk],
                                      block_flag[blk], block_i64[blk], block_f32[2, blk], hit_s, hit_r, hit_cnt,
                                      hit_d0, hit_d1, hit_thr, hit_last, hit_next)
    for c in range(n_chunks):
        n_ev[c + 1] += n_ev[c]  # first event of each chunk
    total = n_ev[n_chunks]

    # 2. per chunk: event buckets (slot, t) with per-chunk histograms
    offset = np.empty(S + 1, np.int64)  # bucket of (slot s, time t) = offset[s] + t - t0[s]
    offset[0] = 0
    for s in range(S):
        offset[s + 1] = offset[s] + dt_us[s] + 1
    counting = offset[S] <= 4 * total + 65536
    counts = np.zeros((n_chunks, offset[S] if counting else 1), np.int64)
    ev = work_t[:total] if total <= work_t.shape[0] else np.empty((total, 2), np.int64)
    for c in prange(n_chunks):
        _event_keys(edges[c], edges[c] + n_hit[c], n_ev[c], W, hit_s, hit_r, hit_cnt, hit_d0, hit_d1, hit_thr,
                    hit_last, hit_next, slots, t0, t1, dt_us, offset, general, use_shot, I1f, HW, pt, nt,
                    slot_f32, slot_f64, keys, counts[c], counting, ev)

    # 3. the event at each output position: stably sorted by (slot, t) (within a bucket chunk 0 first, each
    # chunk in generation order, i.e. pixel order)
    if counting:
        run = 0
        for v in range(offset[S]):
            for c in range(n_chunks):
                k = counts[c, v]
                counts[c, v] = run
                run += k
        order = np.empty(total, np.int32)
        for c in prange(n_chunks):
            _place(n_ev[c], n_ev[c + 1], ev, counts[c], order)
    else:
        order = np.argsort(ev[:, 1], kind="mergesort").astype(np.int32)

    # 4. the output columns, written in order
    ev_s = np.empty(total, np.int64)
    ev_y = np.empty(total, np.int64)
    ev_x = np.empty(total, np.int64)
    ev_t = np.empty(total, np.int64)
    ev_p = np.empty(total, np.int8)
    for c in prange(n_chunks):
        _gather(total * c // n_chunks, total * (c + 1) // n_chunks, order, ev, t0, offset,
                ev_s, ev_y, ev_x, ev_t, ev_p)
    return ev_s, ev_y, ev_x, ev_t, ev_p
