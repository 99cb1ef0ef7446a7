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

import numpy as np
import torch

from . import cpu_kernels, rng
from .linlog import intensity01, inverse_lin_log, lin_log, lin_log_torch  # noqa: F401  (re-exported)
from .params import LIN_LOG_THRESHOLD, SHOT_NOISE_INTEN_FACTOR, DVSParams  # noqa: F401  (re-exported)
from .pixel_torch import TorchStep
from .stepevents import StepEvents, empty_events, stable_argsort  # noqa: F401  (re-exported)

_NEVER = -(2**62)  # "no previous event" time for the refractory state
_FOREVER = 2**62  # "no next shot-noise event"
_ALMOST = 1 - 1e-6  # candidate test slightly below the threshold; exact floor division decides


def _per_seq(values: list[float], device, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device).view(-1, 1, 1)


BACKENDS = ("auto", "torch", "triton")


class EventSimulator(TorchStep):
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
            return empty_events(self.device)
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
