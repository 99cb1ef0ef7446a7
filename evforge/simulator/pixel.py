"""The batched DVS pixel model: v2e's non-idealities with ESIM-style per-pixel timestamps.

State per sequence and pixel: memorised log intensity ``base``, photoreceptor output ``lp``, ON/OFF
thresholds (mismatch), a leak-rate factor, and the time of the last event (refractory period).
Each call of :meth:`EventSimulator.step` advances all B sequences by one (sub-)frame:

1. ``L1 = lin_log(I1)``: linear below 20 DN, natural log above, rounded to 1e-8 (v2e's ``lin_log``).
2. Low-pass: ``lp1 = (1 - eps) lp0 + eps L1`` with ``eps = min(inten01 * dt / tau, 1)``,
   ``tau = 1 / (2 pi cutoff_hz)``, ``inten01 = (I1 + 20) / 275`` (brighter pixels are faster).
3. Leak: ``base`` drifts down by ``dt * leak_rate_hz * R * pos_thres * (1 - jitter * N(0,1))``, ``R`` a
   per-pixel log-normal factor, so every pixel emits ON leak events at about ``leak_rate_hz``. The jitter
   is drawn once per source-frame interval (v2e draws it once per frame), as a table lookup of the normal
   quantiles (:func:`~evforge.simulator.hashing.normal_quantiles`; v2e calls ``randn``).
4. Counts as v2e: ``n_on = floor(relu(diff1) / pos_thres)``, ``n_off = floor(relu(-diff1) / neg_thres)``,
   ``diff1 = lp1 - base1``.
5. Timestamps: within the step ``diff(t) = lp(t) - base(t)`` is linear in t (both ends interpolate
   linearly), so the k-th ON event is stamped where it crosses ``k * pos_thres``:
   ``t_k = t0 + dt (k pos_thres - diff0) / (diff1 - diff0)`` (at ``t0`` when already crossed).
6. Shot noise: ON events form a Poisson process of rate ``rate/2 * f(I) * pos_nominal / pos_thres`` per
   pixel (OFF likewise), ``f = 1 - 0.75 inten01`` (less noise on bright pixels, as v2e). v2e draws a
   Bernoulli per frame with that expected rate and stamps it at the frame time; here each pixel keeps the
   time of its next candidate event, drawn with exponential gaps at the summed dark rate of both
   polarities; a candidate is an ON event with probability ``r_on / (r_on + r_off)`` and is kept with
   probability ``f(I)`` (thinning). The result is the same pair of Poisson processes, stamped in continuous
   time, and it costs one comparison per pixel on steps without any noise.
   A shot-noise event is a transient of the photoreceptor: it is subject to the refractory period but does
   not move the memorised level (in v2e it does, which makes every noise event drag a spurious opposite
   event behind it one frame later and doubles the observed noise rate).
7. Refractory period: an event closer than ``refractory_period_s`` to the pixel's previous event is not
   emitted and its threshold is not added to ``base``, so it is deferred, as in v2e. A pixel's signal
   crossings and noise events are taken in time order (a crossing first at equal times).
8. ``base += (emitted ON) * pos_thres - (emitted OFF) * neg_thres`` over the signal events.

The low-pass and the shot noise see the linear frame ``I1`` (for interpolated sub-steps, the inverse
lin-log of the interpolated log frame). The events of a step come sorted by (sequence, t), ties in pixel
order (y, x), then signal before noise.

In ideal mode (no mismatch, low-pass, leak, shot noise or refractory period) the per-pixel per-polarity
counts are exactly v2e's. All randomness comes from :mod:`evforge.simulator.rng`, keyed by each sequence's
seed and step count, so a sequence gives the same events alone or in any batch, on CPU or CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import cpu_kernels, rng
from .params import LIN_LOG_THRESHOLD, SHOT_NOISE_INTEN_FACTOR, DVSParams  # noqa: F401  (re-exported)

_NEVER = -(2**62)  # "no previous event" time for the refractory state
_FOREVER = 2**62  # "no next shot-noise event"
_ALMOST = 1 - 1e-6  # candidate test slightly below the threshold; exact floor division decides


def lin_log(x: torch.Tensor, threshold: float = LIN_LOG_THRESHOLD) -> torch.Tensor:
    """v2e's lin-log response: ``x * ln(thr)/thr`` for ``x <= thr`` (no log of 0), ``ln(x)`` above.

    Rounded to 1e-8 in float64 so that adding and removing thresholds cancels exactly. On the CPU a float32
    or uint8 frame goes through :func:`cpu_kernels.lin_log` (a vectorised log on the kernel threads); its
    results equal :func:`lin_log_torch` bit for bit (a slow test checks every non-negative float32).
    """
    if (cpu_kernels.AVAILABLE and x.device.type == "cpu" and x.dtype in (torch.float32, torch.uint8)
            and not x.requires_grad):
        return torch.from_numpy(cpu_kernels.lin_log(x.float().numpy(), threshold))
    return lin_log_torch(x, threshold)


def lin_log_torch(x: torch.Tensor, threshold: float = LIN_LOG_THRESHOLD) -> torch.Tensor:
    """v2e's ``lin_log`` exactly as v2e writes it, in torch (any device)."""
    x = x.double()
    f = math.log(threshold) / threshold
    y = torch.where(x <= threshold, x * f, torch.log(x.clamp_min(threshold)))
    return y.mul_(1e8).round_().div_(1e8).float()


def inverse_lin_log(y: torch.Tensor, threshold: float = LIN_LOG_THRESHOLD) -> torch.Tensor:
    """Intensity whose lin-log response is ``y`` (used to hand interpolated log frames to the model)."""
    f = math.log(threshold) / threshold
    y = y.float()
    return torch.where(y <= math.log(threshold), y * (1.0 / f), torch.exp(y))


def intensity01(x: torch.Tensor) -> torch.Tensor:
    """v2e's ``rescale_intensity_frame``: (I + 20) / 275, so no time constant is zero at I = 0."""
    return (x + 20.0) / 275.0


@dataclass
class StepEvents:
    """Events of one step for the whole batch, sorted by (batch index, t): ``b`` says which sequence."""

    b: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor  # int64 microseconds
    p: torch.Tensor  # int8, +1 / -1

    def __len__(self) -> int:
        return int(self.t.shape[0])

    def to_host(self) -> tuple[np.ndarray, ...]:
        """Columns (b, x, y, t, p) as numpy arrays (int64, p int8): views on the CPU, elsewhere one
        device->host copy of 15 bytes per event (b, x and y travel as int16: the copy is what limits a GPU)."""
        if self.t.device.type == "cpu":
            return tuple(getattr(self, f).numpy() for f in "bxytp")
        return self._packed_to_host()

    def _packed_to_host(self) -> tuple[np.ndarray, ...]:
        """to_host through one packed buffer: t (8 bytes), b, x, y (int16) and p (1 byte) per event."""
        n = len(self)
        bxy = torch.stack([self.b, self.x, self.y], 1).to(torch.int16)
        buf = torch.cat([self.t.contiguous().view(torch.uint8), bxy.view(-1).view(torch.uint8),
                         self.p.contiguous().view(torch.uint8)]).cpu().numpy()
        t = buf[: 8 * n].view(np.int64)
        b, x, y = (c.astype(np.int64) for c in buf[8 * n : 14 * n].view(np.int16).reshape(n, 3).T)
        return b, x, y, t, buf[14 * n :].view(np.int8)

    def sorted(self) -> "StepEvents":
        """Sorted by (b, t); stable, so equal times keep generation order (pixel order y, x)."""
        if len(self) == 0:
            return self
        if cpu_kernels.AVAILABLE and self.t.device.type == "cpu":
            cols = (getattr(self, f).contiguous().numpy() for f in "bxytp")
            return StepEvents(*(torch.from_numpy(c) for c in cpu_kernels.sort_events(*cols)))
        t_rel = self.t - self.t.min()
        order = stable_argsort(self.b * (int(t_rel.max()) + 1) + t_rel)
        return StepEvents(*(getattr(self, f).index_select(0, order) for f in "bxytp"))

    @staticmethod
    def cat(items: list["StepEvents"]) -> "StepEvents":
        """Concatenate steps in time order; a stable sort by ``b`` keeps each sequence time-ordered."""
        b = torch.cat([e.b for e in items])
        order = torch.sort(b, stable=True).indices
        return StepEvents(b[order], *(torch.cat([getattr(e, f) for e in items])[order] for f in "xytp"))


def _per_seq(values: list[float], device, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device).view(-1, 1, 1)


BACKENDS = ("auto", "torch", "triton")


class EventSimulator:
    """Simulates B independent sequences at once on one device.

    Each batch slot ``b`` has its own parameters (``params[b]``, already resolved for its seed) and seed.
    Start a slot with :meth:`reset` on its first frame, then feed log frames with :meth:`step`.
    ``kernels``: "auto" runs a step as fused numba kernels on the CPU (:mod:`evforge.simulator.cpu_kernels`)
    and as Triton kernels on CUDA when Triton is installed (:mod:`evforge.simulator.triton_kernels`), else as
    torch ops; "torch" forces torch ops, "triton" the Triton kernels (on CPU tensors too, under
    ``TRITON_INTERPRET=1``). All give identical events.
    """

    def __init__(self, params: list[DVSParams], seeds: list[int], height: int, width: int, device="cpu",
                 kernels: str = "auto"):
        if len(params) != len(seeds):
            raise ValueError("one DVSParams per seed")
        if kernels not in BACKENDS:
            raise ValueError(f"kernels must be one of {', '.join(BACKENDS)}, not {kernels!r}")
        self.B, self.H, self.W = len(seeds), height, width
        self.device = torch.device(device)
        self.backend = _backend(kernels, self.device)
        self.fused = self.backend == "numba"
        self.params = [p.validate() for p in params]
        self.seeds = list(seeds)
        self.steps = [0] * self.B  # per-slot step counter
        self.intervals = [0] * self.B  # per-slot source-interval counter (leak jitter stream)
        self.started = [False] * self.B
        shape = (self.B, height, width)
        z = lambda dtype=torch.float32: torch.zeros(shape, dtype=dtype, device=self.device)  # noqa: E731
        self.base, self.lp = z(), z()
        self.pos_thres, self.neg_thres = z(), z()
        self.on_candidate, self.off_candidate = z(), z()  # diff >= / <= these may fire (see _ALMOST)
        self.leak_k = z()  # leak_rate_hz * R * pos_thres: the leak speed (log units per s) before the jitter
        self.leak_speed = z()  # torch path: leak_k * (1 - jitter N) of the current interval
        self.last_t = torch.full(shape, _NEVER, dtype=torch.int64, device=self.device)
        self.next_shot = torch.full(shape, _FOREVER, dtype=torch.int64, device=self.device)  # next candidate
        self.t_prev = torch.zeros(self.B, dtype=torch.int64, device=self.device)
        # its copy on the host (the same memory on the CPU): read every step without a device sync
        self._t_prev_host = self.t_prev.numpy() if self.device.type == "cpu" else np.zeros(self.B, np.int64)
        self._pixel_index = torch.arange(height * width, dtype=torch.int32, device=self.device).view(height, width)
        self._jitter_keys: dict[int, tuple[int, int]] = {}  # slot -> leak-jitter key of its current interval
        if self.fused:  # numpy views of the state tensors the kernels update in place, and their scratch
            self._work = cpu_kernels.Workspace(self.B * height * width)
            self._state_np = tuple(t.numpy() for t in (self.lp, self.base, self.pos_thres, self.neg_thres,
                                                       self.on_candidate, self.off_candidate, self.leak_k,
                                                       self.last_t, self.next_shot))
        self._refresh_param_tensors()

    # -- set-up -------------------------------------------------------------------------------------------

    def _refresh_param_tensors(self) -> None:
        P, dev = self.params, self.device
        self.pos_nominal = _per_seq([p.pos_thres for p in P], dev)
        self.neg_nominal = _per_seq([p.neg_thres for p in P], dev)
        self.cutoff = _per_seq([p.cutoff_hz for p in P], dev)
        self.jitter = _per_seq([p.leak_jitter_fraction for p in P], dev)
        self.shot_half = torch.tensor([float(p.shot_noise_rate_hz) / 2 for p in P], dtype=torch.float64, device=dev)
        self.refractory_us = torch.tensor([p.refractory_period_s * 1e6 for p in P], dtype=torch.float64,
                                          device=dev)
        self.any_lowpass = any(p.cutoff_hz > 0 for p in P)
        self.any_leak = any(p.leak_rate_hz > 0 for p in P)
        self.any_shot = any(float(p.shot_noise_rate_hz) > 0 for p in P)
        self.any_refractory = any(p.refractory_period_s > 0 for p in P)
        self.general = self.any_lowpass or self.any_leak or self.any_shot or self.any_refractory
        shot_keys = [[rng.stream_key(s, name) for s in self.seeds] for name in ("shot_event", "shot_gap")]
        self._keys_shot = [rng.keys_per_slot(k, dev) for k in shot_keys]
        # per slot, for the kernels: cutoff, jitter, nominal thresholds; rate / 2, refractory us; stream keys
        self._slot_f32 = np.array([[p.cutoff_hz, p.leak_jitter_fraction, p.pos_thres, p.neg_thres] for p in P],
                                  np.float32)
        self._slot_f64 = np.array([[float(p.shot_noise_rate_hz) / 2, p.refractory_period_s * 1e6] for p in P],
                                  np.float64)
        self._slot_keys = np.array([[*shot_keys[0][b], *shot_keys[1][b]] for b in range(self.B)], np.uint64)

    def lin_log(self, x: torch.Tensor) -> torch.Tensor:
        """v2e's lin-log on this simulator's backend (the same values on each: see :func:`lin_log`)."""
        if self.backend == "triton":
            from . import triton_kernels

            return triton_kernels.lin_log(x.to(self.device), LIN_LOG_THRESHOLD)
        if self.backend == "torch":
            return lin_log_torch(x)
        return lin_log(x)

    @property
    def needs_intensity(self) -> bool:
        """Whether :meth:`step` uses the linear frame (low-pass, shot noise): else it may be left out."""
        return self.any_lowpass or self.any_shot

    def _keys(self, slots: list[int], purpose: str, counters: list[int] | None = None) -> list[tuple[int, int]]:
        counters = self.steps if counters is None else counters
        return [rng.stream_key(self.seeds[b], purpose, counters[b]) for b in slots]

    def reset(self, b: int, log_frame: torch.Tensor, t_us: int, params: DVSParams | None = None,
              seed: int | None = None) -> None:
        """(Re)start slot ``b`` from the lin-log response (H, W) of its first frame at ``t_us``."""
        if params is not None:
            self.params[b] = params.validate()
        if seed is not None:
            self.seeds[b] = seed
        self._refresh_param_tensors()
        p, idx = self.params[b], self._pixel_index
        self.steps[b] = self.intervals[b] = 0
        self._jitter_keys.pop(b, None)
        self.started[b] = True
        log0 = log_frame.to(self.device, torch.float32)
        self.base[b] = log0
        self.lp[b] = log0
        if p.sigma_thres > 0:
            self.pos_thres[b] = (p.pos_thres + p.sigma_thres * rng.normal(self._keys([b], "thres_pos"), idx)[0]
                                 ).clamp_min(0.01)
            self.neg_thres[b] = (p.neg_thres + p.sigma_thres * rng.normal(self._keys([b], "thres_neg"), idx)[0]
                                 ).clamp_min(0.01)
        else:
            self.pos_thres[b] = p.pos_thres
            self.neg_thres[b] = p.neg_thres
        self.on_candidate[b] = self.pos_thres[b] * _ALMOST
        self.off_candidate[b] = -self.neg_thres[b] * _ALMOST
        self.leak_k[b] = 0.0
        self.leak_speed[b] = 0.0
        if p.leak_rate_hz > 0:
            # log-normal leak-rate factor per pixel, and a random start phase so leak events are
            # stationary from the first frame instead of all arriving together after 1/leak_rate.
            r = rng.normal(self._keys([b], "leak_factor"), idx)[0]
            factor = torch.exp(math.log(10) * p.noise_rate_cov_decades * r)
            self.leak_k[b] = p.leak_rate_hz * factor * self.pos_thres[b]
            self.base[b] -= rng.uniform(self._keys([b], "leak_phase"), idx)[0] * self.pos_thres[b]
        self.last_t[b] = _NEVER
        self.t_prev[b] = int(t_us)
        self._t_prev_host[b] = int(t_us)
        self.next_shot[b] = _FOREVER
        if float(p.shot_noise_rate_hz) > 0:
            flat = torch.arange(self.H * self.W, device=self.device) + b * self.H * self.W
            t0 = torch.full_like(flat, int(t_us))
            self.next_shot.view(-1)[flat] = self._next_shot_time(flat, t0)

    def _shot_rates(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate (dark) shot-noise rates per pixel (flat state index), Hz: (ON, ON + OFF), where each
        polarity's is rate/2 * nominal / actual threshold."""
        b = torch.div(flat, self.H * self.W, rounding_mode="floor")
        half = self.shot_half[b]
        r_on = half * self.pos_nominal.view(-1)[b].double() / self.pos_thres.view(-1)[flat].double()
        r_off = half * self.neg_nominal.view(-1)[b].double() / self.neg_thres.view(-1)[flat].double()
        return r_on, r_on + r_off

    def _next_shot_time(self, flat: torch.Tensor, t_from: torch.Tensor, rate: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """Exponential gap after ``t_from`` (us) at the candidate rate, drawn from (pixel, t_from)."""
        hw = self.H * self.W
        b = torch.div(flat, hw, rounding_mode="floor")
        if rate is None:
            rate = self._shot_rates(flat)[1]
        k1, k2 = self._keys_shot[1]
        u = rng.event_uniform(k1[b], k2[b], flat % hw, t_from).double()
        gap = -torch.log(u) / rate * 1e6
        return t_from + torch.clamp(torch.ceil(gap), min=1, max=float(2**61)).long()

    # -- one step -----------------------------------------------------------------------------------------

    def step(self, log_frames: torch.Tensor, t_us, active: list[bool] | None = None,
             intensity: torch.Tensor | None = None, new_interval: list[bool] | None = None) -> StepEvents:
        """Advance the active slots to lin-log frames (B, H, W) at times ``t_us`` (B,) microseconds.

        ``intensity`` (B, H, W) is the linear frame (needed by the low-pass and shot noise; derived from
        the log frame when omitted). ``new_interval[b]`` marks the first step of a source-frame interval
        (default: every step is one). Returns the events of the step (slot index ``b``), sorted by (b, t).
        """
        t_list = [int(v) for v in (t_us.tolist() if isinstance(t_us, torch.Tensor) else t_us)]
        active = [True] * self.B if active is None else list(active)
        slots = [b for b in range(self.B) if active[b]]
        if not slots:
            return _empty_events(self.device)
        t0_host = self._t_prev_host
        for b in slots:
            if not self.started[b]:
                raise RuntimeError(f"slot {b} stepped before reset()")
            if t_list[b] <= t0_host[b]:
                raise ValueError(f"slot {b}: frame time {t_list[b]} us must be later than {t0_host[b]} us")
        new_interval = [True] * self.B if new_interval is None else new_interval
        for b in slots:
            if new_interval[b]:
                self.intervals[b] += 1
                self._jitter_keys.pop(b, None)
        if self.backend == "torch" and self.any_leak:
            fresh = [b for b in slots if new_interval[b]]
            if fresh:
                self._draw_leak(fresh)
        all_slots = len(slots) == self.B
        L1 = log_frames.to(self.device, torch.float32)
        I1 = None
        if self.needs_intensity:
            I1 = inverse_lin_log(L1) if intensity is None else intensity.to(self.device, torch.float32)
        if not all_slots:
            sel = torch.tensor(slots, device=self.device)
            L1 = L1.index_select(0, sel)
            I1 = None if I1 is None else I1.index_select(0, sel)
        t1 = [t_list[b] for b in slots]
        if self.backend == "numba":
            ev = self._step_fused(slots, L1, I1, t1)
        elif self.backend == "triton":
            ev = self._step_triton(slots, L1, I1, t1)
        else:
            ev = self._step_torch(slots, L1, I1, torch.tensor(t1, dtype=torch.int64, device=self.device))
            if self.device.type != "cpu":
                self._t_prev_host[np.asarray(slots)] = t1
        for b in slots:
            self.steps[b] += 1
        return ev

    def _jitter_key(self, b: int) -> tuple[int, int]:
        """The leak-jitter stream of slot ``b``'s current source interval."""
        key = self._jitter_keys.get(b)
        if key is None:
            key = self._jitter_keys[b] = rng.stream_key(self.seeds[b], "leak_jitter", self.intervals[b])
        return key

    def _kernel_inputs(self, slots, t1):
        """Host-side per-step arrays of the fused kernels: slots, t0, t1, dt_us (int64), dt (float32 s),
        and the leak-jitter keys (S, 2) uint64."""
        idx = np.asarray(slots, np.int64)
        t1 = np.asarray(t1, np.int64)
        t0 = self._t_prev_host[idx]
        dt_us = t1 - t0
        dt = (dt_us * 1e-6).astype(np.float32)  # as torch's (dt_us.double() * 1e-6).float()
        jkeys = np.array([self._jitter_key(b) if self.params[b].leak_rate_hz > 0 else (0, 0) for b in slots],
                         np.uint64).reshape(-1, 2)
        return idx, t0, t1, dt_us, dt, jkeys

    def _step_fused(self, slots, L1, I1, t1) -> StepEvents:
        """The whole step in :func:`cpu_kernels.signal_step` (CPU): same results as the torch path."""
        idx, t0, t1, dt_us, dt, jkeys = self._kernel_inputs(slots, t1)
        L1 = L1.contiguous().numpy()
        out = cpu_kernels.signal_step(
            idx, L1, L1 if I1 is None else I1.contiguous().numpy(), self._state_np, dt, t0, t1, dt_us,
            (self.general, self.any_lowpass, self.any_leak, self.any_shot), self._slot_f32, self._slot_f64,
            self._slot_keys, jkeys, self._work)
        self._t_prev_host[idx] = t1  # the same memory as t_prev
        ev_s, y, x, t, p = (torch.from_numpy(a) for a in out)
        return StepEvents(ev_s if len(slots) == self.B else torch.from_numpy(idx)[ev_s], x, y, t, p)

    def _step_triton(self, slots, L1, I1, t1) -> StepEvents:
        """The whole step as Triton kernels (:mod:`evforge.simulator.triton_kernels`)."""
        from . import triton_kernels

        idx, t0, t1, dt_us, dt, jkeys = self._kernel_inputs(slots, t1)
        ev = triton_kernels.step(self, idx, L1, I1, t0, t1, dt_us, dt, jkeys)  # updates t_prev on the device
        self._t_prev_host[idx] = t1
        return ev

    # -- the torch path -----------------------------------------------------------------------------------

    def _draw_leak(self, slots: list[int]) -> None:
        """Leak drift speed (log units per second) for a new source interval, with v2e's per-frame jitter."""
        z = rng.table_normal([self._jitter_key(b) for b in slots], self._pixel_index)
        for i, b in enumerate(slots):
            self.leak_speed[b] = self.leak_k[b] * (1 - self.jitter[b] * z[i])

    def _step_torch(self, slots, L1, I1, t1) -> StepEvents:
        all_slots = len(slots) == self.B
        sel = None if all_slots else torch.tensor(slots, device=self.device)
        pick = (lambda x: x) if all_slots else (lambda x: x.index_select(0, sel))  # noqa: E731

        # 2.-5. (and 8. when nothing can be dropped) for the signal events; lp and base are stored
        update_base = not self.any_refractory
        cols, ev_gflat = self._signal_torch(slots, sel, pick, L1, I1, t1, update_base)
        n_signal = cols[0].numel()

        # 6. shot noise (sparse: only pixels whose next candidate falls in this step)
        n_shot = 0
        if self.any_shot:
            shot = self._shot_events(slots, pick, t1, I1)
            n_shot = shot[0].numel()
            if n_shot:
                cols = [torch.cat([a, b]) for a, b in zip(cols, shot)]

        # 7. refractory period: drop (defer) events too close to the pixel's previous one, then
        # 8. memorise what was emitted: base += n_on * pos_thres - n_off * neg_thres (signal events only)
        if self.any_refractory and cols[0].numel():
            keep = self._refractory(slots, *cols[:4])
            emitted = keep[:n_signal]
            on = cols[4][:n_signal] > 0
            n_on = torch.zeros(self.base.numel(), dtype=torch.float32, device=self.device)
            n_off = torch.zeros_like(n_on)
            n_on.index_add_(0, ev_gflat, (emitted & on).float())
            n_off.index_add_(0, ev_gflat, (emitted & ~on).float())
            self.base.add_(n_on.view_as(self.base) * self.pos_thres)
            self.base.sub_(n_off.view_as(self.base) * self.neg_thres)
            idx = torch.nonzero(keep).squeeze(1)
            cols = [_take(c, idx) for c in cols]
        self._store(slots, sel, t_prev=t1)

        ev_sb, y, x, t_ev, p_ev = cols
        slot_ids = ev_sb if all_slots else _take(sel, ev_sb)
        events = StepEvents(slot_ids, x, y, t_ev, p_ev)
        if not n_shot or not len(events):
            return events.sorted()  # generation order is pixel order already
        # noise events were appended: sort by (slot, t, pixel), stably (a crossing before noise at equal times)
        t_rel = t_ev - t_ev.min()
        key = (ev_sb * (int(t_rel.max()) + 1) + t_rel) * (self.H * self.W) + y * self.W + x
        order = stable_argsort(key)
        return StepEvents(*(getattr(events, f).index_select(0, order) for f in "bxytp"))

    def _signal_torch(self, slots, sel, pick, L1, I1, t1, update_base):
        """Steps 2-5 (+8) as torch ops (any device): the signal events as (slot among the selected, y, x, t,
        p) and each event's index into the full state; stores lp and base."""
        base0, lp0 = pick(self.base), pick(self.lp)
        pos_thr, neg_thr = pick(self.pos_thres), pick(self.neg_thres)
        t0 = pick(self.t_prev)
        dt_us = t1 - t0
        dt = (dt_us.double() * 1e-6).float().view(-1, 1, 1)

        # 2. intensity-dependent first-order low-pass (v2e's form)
        lp1 = L1
        if self.any_lowpass:
            cutoff = pick(self.cutoff)
            eps = torch.clamp(intensity01(I1) * dt * (2 * math.pi) * cutoff, max=1.0)
            lp1 = torch.where(cutoff > 0, (1 - eps) * lp0 + eps * L1, L1)

        # 3. leak: base drifts linearly down over the step
        base1 = base0 - dt * pick(self.leak_speed) if self.any_leak else base0
        diff1 = lp1 - base1

        # 4. counts as v2e (floor of |diff| / threshold), computed only where a threshold may be crossed
        maybe = (diff1 >= pick(self.on_candidate)) | (diff1 <= pick(self.off_candidate))
        sb, y, x = torch.nonzero(maybe).unbind(1)  # slot among the selected, row, column (no divisions)
        flat = (sb * self.H + y) * self.W + x
        d1 = _take(diff1, flat)
        is_on_px = d1 > 0
        thr_px = torch.where(is_on_px, _take(pos_thr, flat), _take(neg_thr, flat))
        cnt = torch.div(d1.abs(), thr_px, rounding_mode="floor").to(torch.int64)
        hit = torch.nonzero(cnt > 0).squeeze(1)
        flat, sb, y, x, cnt, d1, is_on_px, thr_px = (_take(v, hit) for v in (flat, sb, y, x, cnt, d1, is_on_px,
                                                                             thr_px))
        d0 = _take(lp0, flat) - _take(base0, flat)

        # 5. per-pixel interpolated timestamps: diff(t) is linear, the k-th level is crossed at t_k
        owner = torch.repeat_interleave(torch.arange(flat.numel(), device=flat.device), cnt)
        start = torch.cumsum(cnt, 0) - cnt
        k = (torch.arange(owner.numel(), device=flat.device) - _take(start, owner) + 1).float()
        sign = _take(torch.where(is_on_px, 1.0, -1.0), owner)
        level = sign * k * _take(thr_px, owner)
        e0, e1 = _take(d0, owner), _take(d1, owner)
        crossed = sign * e0 >= sign * level
        frac = torch.where(crossed, torch.zeros_like(e0), (level - e0) / (e1 - e0)).clamp(0.0, 1.0)
        ev_sb = _take(sb, owner)
        t_ev = _take(t0, ev_sb) + torch.round(frac.double() * _take(dt_us, ev_sb).double()).long()
        p_ev = _take(torch.where(is_on_px, 1, -1).to(torch.int8), owner)
        ev_y, ev_x = _take(y, owner), _take(x, owner)
        hw = self.H * self.W
        gslot = ev_sb if sel is None else _take(sel, ev_sb)
        ev_gflat = gslot * hw + ev_y * self.W + ev_x

        # 8. without a refractory period every event is emitted: base += n_on * pos_thres - n_off * neg_thres
        if update_base:
            # in place when base1 is the state itself (no leak, all slots): d0 was read above
            base_flat = base1.reshape(-1)
            old = _take(base_flat, flat)
            base_flat.index_copy_(0, flat, torch.where(is_on_px, old + cnt * thr_px, old - cnt * thr_px))
            base1 = base_flat.view_as(base0)
        self._store(slots, sel, base=base1, lp=lp1)
        return [ev_sb, ev_y, ev_x, t_ev, p_ev], ev_gflat

    def _shot_events(self, slots, pick, t1, I1):
        """Shot-noise events of this step for the selected slots: (slot among them, y, x, t, p).

        Each due pixel's candidate at ``t_c`` draws one uniform u: kept if u < f(I), ON if u < f(I) p_on
        (so kept candidates are ON with probability p_on); then the next candidate after an exponential gap.
        """
        hw = self.H * self.W
        slot_t = torch.tensor(slots, device=self.device)
        nxt = pick(self.next_shot)
        due = torch.nonzero(nxt <= t1.view(-1, 1, 1))
        k1, k2 = self._keys_shot[0]
        out = []
        while due.numel():
            sb, y, x = due.unbind(1)
            pix = y * self.W + x
            flat = sb * hw + pix  # among the selected slots
            gb = _take(slot_t, sb)
            gflat = gb * hw + pix  # in the full state
            t_c = _take(nxt, flat)
            u = rng.event_uniform(_take(k1, gb), _take(k2, gb), pix, t_c)
            f = (SHOT_NOISE_INTEN_FACTOR - 1) * intensity01(_take(I1, flat)) + 1
            r_on, rate = self._shot_rates(gflat)
            a = torch.nonzero(u < f).squeeze(1)
            on = u.double() < f.double() * (r_on / rate)
            out.append([_take(v, a) for v in (sb, y, x, t_c)]
                       + [_take(torch.where(on, 1, -1).to(torch.int8), a)])
            new_t = self._next_shot_time(gflat, t_c, rate)
            nxt.view(-1).index_copy_(0, flat, new_t)
            if nxt.data_ptr() != self.next_shot.data_ptr():
                self.next_shot.view(-1).index_copy_(0, gflat, new_t)
            again = torch.nonzero(new_t <= _take(t1, sb)).squeeze(1)
            due = due.index_select(0, again)
        if not out:
            e = torch.zeros(0, dtype=torch.int64, device=self.device)
            return [e, e, e, e, e.to(torch.int8)]
        return [torch.cat(c) for c in zip(*out)]

    def _refractory(self, slots, sb, y, x, t_ev) -> torch.Tensor:
        """Greedy per-pixel refractory filter: which candidate events are emitted (bool per candidate).

        Slots without a refractory period emit everything. For the others, in rounds: each round emits, for
        every pixel, its earliest remaining candidate later than ``last + refractory`` and moves ``last``
        there. A candidate that fails the test now can never pass later (``last`` only grows), so it is
        dropped; the loop runs as many rounds as the most events any pixel emits in this step (one, when the
        refractory period is longer than the step). Candidates are taken in (pixel, t) order, ties in the
        order given (signal before noise).
        """
        hw = self.H * self.W
        sel = torch.tensor(slots, device=sb.device)
        gslot = _take(sel, sb)
        gpix = gslot * hw + y * self.W + x  # index into the full state
        filtered = _take(self.refractory_us, gslot) > 0
        keep = ~filtered
        cand = torch.nonzero(filtered).squeeze(1)
        if not cand.numel():
            return keep
        t_min = t_ev.min()
        cand = _take(cand, stable_argsort(_take(gpix, cand) * (int(t_ev.max() - t_min) + 1)
                                          + (_take(t_ev, cand) - t_min)))  # by (pixel, t)
        last_flat = self.last_t.view(-1)
        while cand.numel():
            gp, tt = _take(gpix, cand), _take(t_ev, cand)
            ref = _take(self.refractory_us, torch.div(gp, hw, rounding_mode="floor"))
            ok = torch.nonzero((tt - _take(last_flat, gp)).double() > ref).squeeze(1)
            cand, gp, tt = _take(cand, ok), _take(gp, ok), _take(tt, ok)
            first = torch.ones_like(gp, dtype=torch.bool)
            first[1:] = gp[1:] != gp[:-1]
            emit = torch.nonzero(first).squeeze(1)
            keep[_take(cand, emit)] = True
            last_flat.index_copy_(0, _take(gp, emit), _take(tt, emit))
            cand = _take(cand, torch.nonzero(~first).squeeze(1))
        return keep

    def _store(self, slots, sel, **state) -> None:
        """Write the new state of the selected slots into the state tensors (copying, never aliasing inputs)."""
        for name, value in state.items():
            target = getattr(self, name)
            if sel is None:
                if value.data_ptr() != target.data_ptr():
                    target.copy_(value)
            else:
                target.index_copy_(0, sel, value)


def _backend(kernels: str, device: torch.device) -> str:
    """numba (CPU), triton (CUDA, or asked for) or torch: what runs a step."""
    if kernels == "torch":
        return "torch"
    if kernels == "triton":
        from . import triton_kernels

        if not triton_kernels.available(device):
            raise ValueError(f"kernels='triton' on {device}: needs Triton and a CUDA device, or TRITON_INTERPRET=1 "
                             "(Triton's interpreter) for CPU tensors")
        return "triton"
    if device.type == "cpu":
        return "numba" if cpu_kernels.AVAILABLE else "torch"
    if device.type == "cuda":
        try:
            from . import triton_kernels
        except ImportError:  # no Triton (or no triton_kernels yet): torch ops
            return "torch"
        return "triton" if triton_kernels.available(device) else "torch"
    return "torch"


def stable_argsort(key: torch.Tensor) -> torch.Tensor:
    """Stable argsort of non-negative int64 keys.

    On CPU an LSD radix sort over 16-bit digits with numpy (its stable sort of uint16 is a radix sort,
    ~10x faster than a comparison sort for the few-thousand-to-million keys of a step); elsewhere torch.sort.
    """
    if key.device.type != "cpu" or key.numel() < 2:
        return torch.sort(key, stable=True).indices
    k = key.numpy()
    top = int(k.max())
    order = None
    shift = 0
    while True:
        digit = ((k >> shift) & 0xFFFF).astype(np.uint16)
        if order is None:
            order = np.argsort(digit, kind="stable")
        else:
            order = order[np.argsort(digit[order], kind="stable")]
        shift += 16
        if top >> shift == 0:
            break
    return torch.from_numpy(order.astype(np.int64))


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.view(-1)[index]`` via index_select, several times faster than advanced indexing on CPU."""
    return x.reshape(-1).index_select(0, index)


def _empty_events(device) -> StepEvents:
    e = torch.zeros(0, dtype=torch.int64, device=device)
    return StepEvents(e, e, e, e, e.to(torch.int8))
