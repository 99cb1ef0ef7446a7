"""The simulator step as Triton kernels (CUDA): the same arithmetic as the CPU kernels, bit for bit.

A step of :class:`~evforge.simulator.pixel.EventSimulator` on CUDA as torch ops is dozens of launches and
as many passes over every pixel. Here it is two passes of one kernel over the pixels of the selected slots,
one lane per pixel (lin-log, low-pass, leak with the interval's jitter, counts, per-pixel timestamps, shot
noise, refractory period, base update):

1. ``WRITE=False``: each lane counts the events its pixel emits in this step (nothing is stored but the
   count, so the state is still the step's start state afterwards);
2. ``torch.cumsum`` of the counts gives every pixel the place of its first event (the total, read back to
   the host, sizes the output);
3. ``WRITE=True``: each lane recomputes its pixel, writes its events there (in time order) and the new
   state;
4. a stable ``torch.sort`` by (slot, t) bucket, and one gather kernel for the five output columns.

Events come out in the order of the CPU kernels: by (slot, t), ties in pixel order, a pixel's own events
in the order of its merged signal/noise stream. Every float32 operation is the CPU kernel's, in the same
order, with IEEE division (``div_rn``) and no fused multiply-adds (``enable_fp_fusion=False``), so both give
the same bits. The one exception is ``log`` in float64 (lin-log, shot-noise gaps): CUDA's differs from the C
library's in the last bit for a few arguments, which moves a value only where it lies within that bit of a
rounding boundary. The lin-log kernel is separate (its frame is the engine's too).

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (slowly): ``tests/simulator/test_triton_kernels.py``
checks them against the CPU path that way, on small frames.

Bytes moved per pixel and step (float32 state, int64 times; noisy model): lin-log 4 in + 4 out; pass 1
reads the log and linear frames (8), lp, base, leak factor, both thresholds and both candidate levels (28)
and the next shot time (8), writes a count (4); the scan reads 4 and writes 8; pass 2 reads the same 44
plus its count and running total (12), writes lp and base (8): 124 bytes in all (ideal model: 68, without
the linear frame, leak factor and shot times), plus 32 + 2x41 bytes per event (row, sort key and
permutation, the gather). The refractory state (8) is read only where a pixel has events.
"""

from __future__ import annotations

import math

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    triton = tl = None

from .params import SHOT_NOISE_INTEN_FACTOR

BLOCK = 256  # pixels per program


_CHECKED: dict[str, bool] = {}  # CUDA device name -> whether the kernels passed their first-use check


def available(device: torch.device | None = None) -> bool:
    """Triton is importable and can run on ``device``: CUDA (checked once per device model, see
    :func:`_self_check`), or the CPU under ``TRITON_INTERPRET=1``."""
    if triton is None:
        return False
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda":
        return interpreting()
    if not torch.cuda.is_available() or interpreting():
        return False
    name = torch.cuda.get_device_name(device)
    if name not in _CHECKED:
        _CHECKED[name] = True  # the check itself builds a simulator on these kernels
        _CHECKED[name] = _self_check(device)
    return _CHECKED[name]


def _self_check(device: torch.device) -> bool:
    """First use on a GPU model: a few noisy steps of two small sequences on these kernels and on torch ops
    must give the same events; else (or on any error) warn and let the simulator use torch ops."""
    import warnings

    from .params import get_preset
    from .pixel import EventSimulator, lin_log_torch

    try:
        g = torch.Generator().manual_seed(0)
        frames = (torch.rand(4, 2, 12, 10, generator=g) * 200 + 20).round().to(device)
        params = [get_preset("noisy", shot_noise_rate_hz=400.0), get_preset("ideal")]
        runs = []
        for kernels in ("triton", "torch"):
            sim = EventSimulator(params, [1, 2], 12, 10, device=device, kernels=kernels)
            for b in range(2):
                sim.reset(b, lin_log_torch(frames[0, b]), 0)
            out = []
            for i in range(1, 4):
                ev = sim.step(lin_log_torch(frames[i]), [i * 5000] * 2, intensity=frames[i])
                out.append(torch.stack([ev.b, ev.x, ev.y, ev.t, ev.p.long()]).cpu())
            runs.append(torch.cat(out, 1))
        if torch.equal(*runs):
            return True
        warnings.warn(f"evforge: the Triton kernels differ from torch ops on {torch.cuda.get_device_name(device)}; "
                      "the simulator uses torch ops there", RuntimeWarning)
    except Exception as e:  # a compiler or driver problem: torch ops still work
        warnings.warn(f"evforge: the Triton kernels failed on {torch.cuda.get_device_name(device)} "
                      f"({type(e).__name__}: {e}); the simulator uses torch ops there", RuntimeWarning)
    return False


def interpreting() -> bool:
    """Whether the kernels were made for Triton's interpreter (numpy on CPU tensors)."""
    return triton is not None and isinstance(_step_kernel, triton.runtime.interpreter.InterpretedFunction)


if triton is not None:
    # kernel constants (a kernel reads only constexpr globals)
    _NEVER = tl.constexpr(1 << 62)  # "no further event" (later than any step), the CPU kernel's _NEVER_AGAIN
    TWO_PI = tl.constexpr(float(np.float32(2 * math.pi)))  # torch multiplies float32 by 2 pi in float32
    _SHOT_SLOPE = tl.constexpr(SHOT_NOISE_INTEN_FACTOR - 1.0)  # -0.75, exact in float32

    @triton.jit
    def _mix(x):
        """lowbias32 on uint32 (rng._mix)."""
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _event_uniform(k1, k2, idx, t):
        """rng.event_uniform: U(0, 1) float32 of (uint32 stream key, element index, int64 time)."""
        h = _mix(_mix(idx.to(tl.uint32) + k1) ^ t.to(tl.uint32))
        b = _mix(h ^ (t >> 32).to(tl.uint32) ^ k2)
        return ((b >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)

    @triton.jit
    def _rint(x):
        """Round half to even (float64), as np.rint / torch.round, for |x| < 2**52."""
        r = tl.floor(x + 0.5)
        odd = (r.to(tl.int64) & 1) == 1
        return tl.where(((r - x) == 0.5) & odd, r - 1.0, r)

    @triton.jit
    def _crossing(k, sign, thr, e0, e1, span):
        """Microseconds after the step's start at which diff, linear over the step, crosses level k * thr."""
        level = (sign * k.to(tl.float32)) * thr
        den = e1 - e0
        frac = tl.math.div_rn(level - e0, tl.where(den == 0, 1.0, den))
        frac = tl.minimum(tl.maximum(frac, 0.0), 1.0)
        frac = tl.where(sign * e0 >= sign * level, 0.0, frac)
        return _rint(frac.to(tl.float64) * span).to(tl.int64)

    @triton.jit
    def _lin_log_kernel(x_ptr, out_ptr, n, param_ptr, BLOCK: tl.constexpr):
        """v2e's lin-log as lin_log_torch: float64, linear at or below the threshold, rounded to 1e-8.
        ``param_ptr``: float64 threshold and slope (a float argument would arrive as float32)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        threshold = tl.load(param_ptr)
        slope = tl.load(param_ptr + 1)
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float64)
        y = tl.where(x <= threshold, x * slope, tl.log(tl.maximum(x, threshold)))
        tl.store(out_ptr + offs, (_rint(y * 1e8) / 1e8).to(tl.float32), mask=m)

    @triton.jit
    def _step_kernel(L1_ptr, I1_ptr, lp_ptr, base_ptr, pt_ptr, nt_ptr, onc_ptr, offc_ptr, lk_ptr,
                     last_ptr, next_ptr, step_ptr, slot_f32_ptr, slot_f64_ptr, keys_ptr, table_ptr, count_ptr,
                     incl_ptr, ev_ptr, key_ptr, N, HW, W,
                     GENERAL: tl.constexpr, USE_LOWPASS: tl.constexpr, USE_LEAK: tl.constexpr,
                     USE_SHOT: tl.constexpr, WRITE: tl.constexpr, BLOCK: tl.constexpr):
        """One lane per pixel of the selected slots (see the module docstring). ``step_ptr``: per selected
        slot, int64 t0, t1, dt_us, the leak-jitter key words, the first sort bucket, the bits of dt as float32
        seconds, and the slot's index in the batch. ``ev_ptr``: (events, 5) int64 rows slot, y, x, t, p;
        ``key_ptr``: each event's sort bucket (int32 or int64)."""
        q = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = q < N
        s = q // HW
        r = q - s * HW
        gs = tl.load(step_ptr + s * 8 + 7, mask=m, other=0)
        p = gs * HW + r
        t0 = tl.load(step_ptr + s * 8, mask=m, other=0)
        t1 = tl.load(step_ptr + s * 8 + 1, mask=m, other=0)
        dt_us = tl.load(step_ptr + s * 8 + 2, mask=m, other=1)
        dt = tl.load(step_ptr + s * 8 + 6, mask=m, other=0).to(tl.int32).to(tl.float32, bitcast=True)
        span = dt_us.to(tl.float64)
        l1 = tl.load(L1_ptr + q, mask=m, other=0.0)
        lp0 = tl.load(lp_ptr + p, mask=m, other=0.0)
        b0 = tl.load(base_ptr + p, mask=m, other=0.0)
        lp1 = l1
        b1 = b0
        i1 = l1
        if GENERAL:
            i1 = tl.load(I1_ptr + q, mask=m, other=0.0)
            cutoff = tl.load(slot_f32_ptr + gs * 4, mask=m, other=0.0)
            if USE_LOWPASS:
                # clamp(intensity01(I1) * dt * (2 pi) * cutoff, max=1), the same float32 operations in order
                eps = tl.minimum(((tl.math.div_rn(i1 + 20.0, 275.0) * dt) * TWO_PI) * cutoff, 1.0)
                lp1 = tl.where(cutoff > 0, (1.0 - eps) * lp0 + eps * l1, l1)
            if USE_LEAK:
                # leak speed leak_k (1 - jitter z), z a normal drawn per interval by table lookup
                jk1 = tl.load(step_ptr + s * 8 + 3, mask=m, other=0).to(tl.uint32)
                jk2 = tl.load(step_ptr + s * 8 + 4, mask=m, other=0).to(tl.uint32)
                z = tl.load(table_ptr + (_mix(_mix(r.to(tl.uint32) + jk1) ^ jk2) >> 20).to(tl.int32), mask=m,
                            other=0.0)
                jitter = tl.load(slot_f32_ptr + gs * 4 + 1, mask=m, other=0.0)
                b1 = b0 - dt * (tl.load(lk_ptr + p, mask=m, other=0.0) * (1.0 - jitter * z))
        d0 = lp0 - b0
        d1 = lp1 - b1
        tp = tl.load(pt_ptr + p, mask=m, other=1.0)
        tn = tl.load(nt_ptr + p, mask=m, other=1.0)
        thr = tl.where(d1 > 0, tp, tn)
        # the count as torch's floor division: exact in float64 (cpu_kernels._floor_div)
        n = tl.floor(tl.abs(d1).to(tl.float64) / thr.to(tl.float64)).to(tl.int64)
        n = tl.where(m, n, 0)

        # 5.-7. the pixel's signal crossings merged with its kept shot noise, through the refractory filter;
        # vectorised over the lanes: every iteration resolves one shot candidate and/or takes one event
        last = tl.zeros([BLOCK], tl.int64)
        nxt = tl.full([BLOCK], _NEVER, tl.int64)
        ref = tl.zeros([BLOCK], tl.float64)
        if GENERAL:
            ref = tl.load(slot_f64_ptr + gs * 2 + 1, mask=m, other=0.0)
            if USE_SHOT:
                nxt = tl.load(next_ptr + p, mask=m, other=_NEVER)
            # the refractory state only where the pixel has events or noise due (a few lanes: few bytes)
            last = tl.load(last_ptr + p, mask=m & ((n > 0) | (nxt <= t1)), other=0)
        sign = tl.where(d1 > 0, 1.0, -1.0)
        sig_p = tl.where(d1 > 0, 1, -1).to(tl.int64)
        walk = n > 0
        f_acc = tl.zeros([BLOCK], tl.float32)
        p_on = tl.zeros([BLOCK], tl.float64)
        rate = tl.full([BLOCK], 1.0, tl.float64)
        ke1 = tl.zeros([BLOCK], tl.uint32)
        ke2 = tl.zeros([BLOCK], tl.uint32)
        kg1 = tl.zeros([BLOCK], tl.uint32)
        kg2 = tl.zeros([BLOCK], tl.uint32)
        pending = walk & False  # a shot candidate still to be resolved
        if USE_SHOT:
            # v2e: the dark rate falls by (1 - 0.75 inten01); per polarity rate/2 * nominal / actual threshold
            f_acc = _SHOT_SLOPE * tl.math.div_rn(i1 + 20.0, 275.0) + 1.0
            half = tl.load(slot_f64_ptr + gs * 2, mask=m, other=0.0)
            r_on = half * tl.load(slot_f32_ptr + gs * 4 + 2, mask=m, other=0.0).to(tl.float64) / tp.to(tl.float64)
            r_off = half * tl.load(slot_f32_ptr + gs * 4 + 3, mask=m, other=0.0).to(tl.float64) / tn.to(tl.float64)
            rate = r_on + r_off
            rate = tl.where(rate > 0, rate, 1.0)  # slots without shot noise never have a candidate due
            p_on = r_on / rate
            ke1 = tl.load(keys_ptr + gs * 4, mask=m, other=0).to(tl.uint32)
            ke2 = tl.load(keys_ptr + gs * 4 + 1, mask=m, other=0).to(tl.uint32)
            kg1 = tl.load(keys_ptr + gs * 4 + 2, mask=m, other=0).to(tl.uint32)
            kg2 = tl.load(keys_ptr + gs * 4 + 3, mask=m, other=0).to(tl.uint32)
            pending = m & (nxt <= t1)
            walk = walk | pending
        k = tl.full([BLOCK], 1, tl.int64)
        ts = tl.where(n >= 1, t0 + _crossing(k, sign, thr, d0, d1, span), _NEVER)
        tsh = tl.full([BLOCK], _NEVER, tl.int64)
        pol = tl.zeros([BLOCK], tl.int64)
        c = nxt
        n_emit = tl.zeros([BLOCK], tl.int64)
        n_sig = tl.zeros([BLOCK], tl.int64)
        start = tl.zeros([BLOCK], tl.int64)
        if WRITE:
            start = tl.load(incl_ptr + q, mask=m, other=0) - tl.load(count_ptr + q, mask=m, other=0)
            bucket0 = tl.load(step_ptr + s * 8 + 5, mask=m, other=0)
            y = r // W
            x = r - y * W
        if WRITE or GENERAL:
            # (the loop runs on a scalar carried through it: a reduction in the loop condition trips a
            # layout pass of Triton's compiler)
            more = tl.max(walk.to(tl.int32), axis=0)
            while more > 0:
                # the pending shot candidate at c: kept with probability f_acc, ON with probability p_on
                look = pending & (c <= t1)
                u = _event_uniform(ke1, ke2, r, c)
                gap = tl.math.ceil(-tl.log(_event_uniform(kg1, kg2, r, c).to(tl.float64)) / rate * 1e6)  # us
                after = c + tl.minimum(tl.maximum(gap, 1.0), 2305843009213693952.0).to(tl.int64)
                kept = look & (u < f_acc)
                tsh = tl.where(kept, c, tsh)
                pol = tl.where(kept, tl.where(u.to(tl.float64) < f_acc.to(tl.float64) * p_on, 1, -1), pol)
                c = tl.where(look, after, c)
                pending = pending & ~kept & (c <= t1)  # resolved: kept, or no candidate left in the step
                # the next event of the merged stream, where the shot stream is resolved
                go = walk & ~pending & ((ts != _NEVER) | (tsh != _NEVER))
                is_sig = ts <= tsh
                t = tl.where(is_sig, ts, tsh)
                emit = go & ((ref <= 0) | ((t - last).to(tl.float64) > ref))
                last = tl.where(emit & (ref > 0), t, last)
                if WRITE:
                    row = (start + n_emit) * 5
                    tl.store(ev_ptr + row, gs, mask=emit)
                    tl.store(ev_ptr + row + 1, y, mask=emit)
                    tl.store(ev_ptr + row + 2, x, mask=emit)
                    tl.store(ev_ptr + row + 3, t, mask=emit)
                    tl.store(ev_ptr + row + 4, tl.where(is_sig, sig_p, pol), mask=emit)
                    tl.store(key_ptr + start + n_emit, bucket0 + t - t0, mask=emit)
                n_emit += emit.to(tl.int64)
                n_sig += (emit & is_sig).to(tl.int64)
                k = tl.where(go & is_sig, k + 1, k)
                ts = tl.where(go & is_sig, tl.where(k <= n, t0 + _crossing(k, sign, thr, d0, d1, span), _NEVER), ts)
                tsh = tl.where(go & ~is_sig, _NEVER, tsh)
                pending = pending | (go & ~is_sig & (c <= t1))  # the next shot candidate, if one is in the step
                more = tl.max((pending | (walk & ((ts != _NEVER) | (tsh != _NEVER)))).to(tl.int32), axis=0)
        else:  # the ideal model's count is n: nothing to walk
            n_emit = n
        if WRITE:
            # the new state: lp, leaked base + the emitted signal thresholds, last event, next shot candidate
            step = n_sig.to(tl.float32) * thr
            b_new = tl.where(n_sig > 0, b1 + tl.where(d1 > 0, step, -step), b1)
            tl.store(lp_ptr + p, lp1, mask=m)
            tl.store(base_ptr + p, b_new, mask=m)
            if GENERAL:
                tl.store(last_ptr + p, last, mask=m & walk)
                if USE_SHOT:
                    tl.store(next_ptr + p, c, mask=m & walk)
        else:
            tl.store(count_ptr + q, n_emit.to(tl.int32), mask=m)

    @triton.jit
    def _gather_kernel(ev_ptr, order_ptr, b_ptr, x_ptr, y_ptr, t_ptr, p_ptr, n, BLOCK: tl.constexpr):
        """The output columns in sorted order: row ``order[i]`` of the event rows at position i."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        row = tl.load(order_ptr + i, mask=m, other=0) * 5
        tl.store(b_ptr + i, tl.load(ev_ptr + row, mask=m, other=0), mask=m)
        tl.store(y_ptr + i, tl.load(ev_ptr + row + 1, mask=m, other=0), mask=m)
        tl.store(x_ptr + i, tl.load(ev_ptr + row + 2, mask=m, other=0), mask=m)
        tl.store(t_ptr + i, tl.load(ev_ptr + row + 3, mask=m, other=0), mask=m)
        tl.store(p_ptr + i, tl.load(ev_ptr + row + 4, mask=m, other=0).to(tl.int8), mask=m)

else:  # pragma: no cover
    _step_kernel = None


_OPTS = {"enable_fp_fusion": False}  # no FMA contraction: the CPU kernels multiply and add separately


_PARAMS: dict = {}


def _lin_log_params(threshold: float, device) -> torch.Tensor:
    """float64 (threshold, slope) on the device, made once (an upload per call would cost a copy per step)."""
    key = (threshold, str(device))
    if key not in _PARAMS:
        _PARAMS[key] = torch.tensor([threshold, math.log(threshold) / threshold], dtype=torch.float64, device=device)
    return _PARAMS[key]


def lin_log(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """v2e's lin-log of a float32 tensor (any shape), one kernel launch."""
    flat = x.contiguous().view(-1).float()
    out = torch.empty_like(flat)
    n = flat.numel()
    if n:
        params = _lin_log_params(float(threshold), x.device)
        _lin_log_kernel[(triton.cdiv(n, 1024),)](flat, out, n, params, BLOCK=1024, **_OPTS)
    return out.view(x.shape)


class _SlotTables:
    """Per-slot parameters of a simulator on its device, rebuilt when they change (at reset)."""

    def __init__(self, sim, device):
        self.f32 = torch.from_numpy(sim._slot_f32).to(device)
        self.f64 = torch.from_numpy(sim._slot_f64).to(device)
        self.keys = torch.from_numpy(sim._slot_keys.astype(np.int64)).to(device)
        self.source = (sim._slot_f32, sim._slot_f64, sim._slot_keys)


_TABLES: dict = {}


def _normal_table(device) -> torch.Tensor:
    table = _TABLES.get(device)
    if table is None:
        from .hashing import normal_quantiles

        table = _TABLES[device] = torch.from_numpy(normal_quantiles()).to(device)
    return table


def step(sim, slots: np.ndarray, L1: torch.Tensor, I1: torch.Tensor | None, t0: np.ndarray, t1: np.ndarray,
         dt_us: np.ndarray, dt: np.ndarray, jkeys: np.ndarray):
    """One step of ``sim`` (an EventSimulator) for the selected ``slots``: the state is updated in place and
    the events are returned as a StepEvents sorted by (slot, t). Arguments as the CPU kernel's."""
    from .pixel import StepEvents

    dev = sim.device
    tables = getattr(sim, "_triton_tables", None)
    if tables is None or tables.source[0] is not sim._slot_f32:
        tables = sim._triton_tables = _SlotTables(sim, dev)
    S, H, W = L1.shape
    HW = H * W
    N = S * HW
    bucket0 = np.concatenate([[0], np.cumsum(dt_us + 1)[:-1]]).astype(np.int64)
    per_step = np.stack([t0, t1, dt_us, jkeys[:, 0].astype(np.int64), jkeys[:, 1].astype(np.int64), bucket0,
                         dt.astype(np.float32).view(np.int32).astype(np.int64), slots], 1)
    step_t = torch.from_numpy(np.ascontiguousarray(per_step, np.int64)).to(dev)  # the step's one upload
    L1 = L1.contiguous()
    I1 = L1 if I1 is None else I1.contiguous()
    counts = torch.empty(N, dtype=torch.int32, device=dev)
    flags = dict(GENERAL=sim.general, USE_LOWPASS=sim.any_lowpass, USE_LEAK=sim.any_leak, USE_SHOT=sim.any_shot)
    state = (sim.lp, sim.base, sim.pos_thres, sim.neg_thres, sim.on_candidate, sim.off_candidate, sim.leak_k,
             sim.last_t, sim.next_shot)
    grid = (triton.cdiv(N, BLOCK),)
    common = (L1, I1, *state, step_t, tables.f32, tables.f64, tables.keys, _normal_table(dev))
    _step_kernel[grid](*common, counts, counts, counts, counts, N, HW, W, **flags, WRITE=False, BLOCK=BLOCK,
                       **_OPTS)
    incl = torch.cumsum(counts, 0, dtype=torch.int64)
    total = int(incl[-1]) if N else 0  # the one device -> host read of a step: the output's size
    rows = torch.empty((total, 5), dtype=torch.int64, device=dev)
    # 32-bit sort keys when the buckets fit: a radix sort makes half the passes
    narrow = int(bucket0[-1] + dt_us[-1] + 1) < 2**31
    keys = torch.empty(total, dtype=torch.int32 if narrow else torch.int64, device=dev)
    _step_kernel[grid](*common, counts, incl, rows, keys, N, HW, W, **flags, WRITE=True, BLOCK=BLOCK, **_OPTS)
    sim.t_prev.index_copy_(0, step_t[:, 7], step_t[:, 1])
    order = torch.sort(keys, stable=True).indices
    cols = [torch.empty(total, dtype=torch.int64, device=dev) for _ in range(4)]
    p = torch.empty(total, dtype=torch.int8, device=dev)
    if total:
        _gather_kernel[(triton.cdiv(total, 1024),)](rows, order, *cols, p, total, BLOCK=1024)
    b, x, y, t = cols
    return StepEvents(b, x, y, t, p)


__all__ = ["available", "interpreting", "lin_log", "step", "BLOCK"]
