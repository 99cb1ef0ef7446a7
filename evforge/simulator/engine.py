"""Frame pairs in, events out: upsampling + the pixel model for a batch of sequences in lockstep.

:class:`BatchEngine` owns an :class:`~evforge.simulator.pixel.EventSimulator` and, per slot, the last
source frame and its time. :func:`simulate_frames` is the one-call version for one in-memory sequence.
"""

from __future__ import annotations

import numpy as np
import torch

from evforge.formats.events import make_events

from .params import DVSParams, parse_resolution
from .pixel import EventSimulator, StepEvents, inverse_lin_log
from .resample import area_resize, prepare_frames, resize_flow, rgb_to_gray
from .upsample import FrameInterpolator, UpsampleConfig, choose_steps, substep_fractions


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA device")
    return device


SUBSTEP_CHUNK = 32  # interpolated frames made at once (memory: SUBSTEP_CHUNK x B x H x W floats)


class BatchEngine:
    """Simulates B slots in lockstep; each slot is one sequence at a time (restart a slot with :meth:`start`).

    Frames go in as float (B, C, H, W) at the output size: C = 1 (gray) for the built-in interpolators,
    C = 3 when a plugged-in interpolator declares ``channels = 3`` (it then sees RGB; gray comes after).
    ``kernels`` as in :class:`~evforge.simulator.pixel.EventSimulator`.
    """

    def __init__(self, batch: int, height: int, width: int, device="cpu",
                 upsample: UpsampleConfig = UpsampleConfig(), interpolator: FrameInterpolator | None = None,
                 kernels: str = "auto"):
        self.device = resolve_device(device)
        self.upsample = upsample
        self.interp = interpolator or upsample.interpolator()
        self.sim = EventSimulator([DVSParams()] * batch, [0] * batch, height, width, self.device, kernels)
        self.prev = torch.zeros(batch, self.channels, height, width, device=self.device)
        # the linear frames are only needed by an interpolator that does not work on lin-log frames
        self._keeps_linear = not hasattr(self.interp, "interpolate_log")
        self.prev_log = torch.zeros(batch, 1, height, width, device=self.device)
        self.prev_t = [0] * batch
        self.substeps = [0] * batch  # simulated steps per slot, for reporting

    def _between(self, frames, log1, fractions, flow, flow_valid) -> torch.Tensor:
        """Interpolated lin-log frames (K, B, 1, H, W) at ``fractions`` (B, K)."""
        if not self._keeps_linear:
            return self.interp.interpolate_log(self.prev_log, log1, fractions, flow, flow_valid)
        made = self.interp(self.prev, frames, fractions, flow=flow, flow_valid=flow_valid)
        return torch.stack([self.sim.lin_log(rgb_to_gray(f)) for f in made])

    def _substeps(self, frames, gray1, log1, steps, t_us, dt_us, active, flow, flow_valid) -> list[StepEvents]:
        """Several simulated steps per frame pair, through the interpolator; the last one is the real frame.

        The interpolated frames are made ``SUBSTEP_CHUNK`` sub-steps at a time, so memory stays bounded when
        a recipe asks for hundreds of steps per frame pair (each interpolator treats fractions independently).
        """
        fractions, sub_active = substep_fractions(steps, self.device)
        K = fractions.shape[1]
        out = []
        for k in range(K):
            if k % SUBSTEP_CHUNK == 0:
                between = self._between(frames, log1, fractions[:, k : k + SUBSTEP_CHUNK], flow, flow_valid)
            mask = [a and active[b] for b, a in enumerate(sub_active[k])]
            # the last sub-step of a slot is its real frame, not an interpolated one
            last = torch.tensor([steps[b] == k + 1 for b in range(len(steps))], device=self.device)
            log_k = torch.where(last.view(-1, 1, 1, 1), log1, between[k % SUBSTEP_CHUNK])
            inten_k = None
            if self.sim.needs_intensity:  # the real frame where it is one, else the interpolated one's
                inten_k = torch.where(last.view(-1, 1, 1, 1), gray1, inverse_lin_log(between[k % SUBSTEP_CHUNK]))
                inten_k = inten_k[:, 0]
            t_k = [self.prev_t[b] + int(round(float(fractions[b, k]) * dt_us[b])) if mask[b] else self.prev_t[b] + 1
                   for b in range(len(mask))]
            out.append(self.sim.step(log_k[:, 0], t_k, mask, intensity=inten_k, new_interval=[k == 0] * len(mask)))
        return out

    @property
    def channels(self) -> int:
        return getattr(self.interp, "channels", 1)

    def start(self, b: int, frame: torch.Tensor, t_us: int, params: DVSParams, seed: int) -> None:
        """Begin a sequence in slot ``b`` with its first frame (C, H, W); it produces no events."""
        self.prev[b] = frame
        self.prev_log[b] = self.sim.lin_log(rgb_to_gray(frame[None]))[0]
        self.prev_t[b] = int(t_us)
        self.substeps[b] = 0
        self.sim.reset(b, self.prev_log[b, 0], int(t_us), params.resolve(seed), seed)

    def advance(self, frames: torch.Tensor, t_us: list[int], active: list[bool],
                flow: torch.Tensor | None = None, flow_valid: torch.Tensor | None = None) -> StepEvents:
        """Simulate every active slot from its previous frame to ``frames[b]`` at ``t_us[b]``."""
        slots = [b for b in range(len(active)) if active[b]]
        if not slots:
            return self.sim.step(self.prev_log[:, 0], self.prev_t, [False] * len(active))
        gray1 = rgb_to_gray(frames)
        log1 = self.sim.lin_log(gray1)
        dt_us = [t_us[b] - self.prev_t[b] if active[b] else 1 for b in range(len(active))]
        steps = choose_steps(self.upsample, self.prev_log, log1, [d * 1e-6 for d in dt_us],
                             [p.cutoff_hz for p in self.sim.params], flow, self.sim.lp)
        # never more sub-steps than microseconds, so sub-step times stay strictly increasing
        steps = [max(1, min(n, d)) if active[b] else 1 for b, (n, d) in enumerate(zip(steps, dt_us))]
        if max(steps) == 1:  # one step per frame pair (upsampling off, or nothing moved): no sub-steps
            t_step = [t_us[b] if active[b] else self.prev_t[b] + 1 for b in range(len(active))]
            # the low-pass and the shot noise see the frame itself, not the inverse of its lin-log
            out = [self.sim.step(log1[:, 0], t_step, active,
                                 intensity=gray1[:, 0] if self.sim.needs_intensity else None)]
        else:
            out = self._substeps(frames, gray1, log1, steps, t_us, dt_us, active, flow, flow_valid)
        if len(slots) == len(active):
            if self._keeps_linear:
                self.prev.copy_(frames)
            self.prev_log = log1  # a new tensor each call: kept, not copied
        else:
            idx = torch.tensor(slots, device=self.device)
            if self._keeps_linear:
                self.prev.index_copy_(0, idx, frames.index_select(0, idx))
            self.prev_log.index_copy_(0, idx, log1.index_select(0, idx))
        for b in slots:
            self.prev_t[b] = int(t_us[b])
            self.substeps[b] += steps[b]
        return StepEvents.cat(out) if len(out) > 1 else out[0]


def simulate_frames(frames, timestamps_us, params: DVSParams, *, seed: int = 0, resolution=None,
                    upsample: UpsampleConfig = UpsampleConfig(), flows=None, device="cpu") -> np.ndarray:
    """Simulate one in-memory sequence: ``frames`` (N, H, W) or (N, H, W, 3) at ``timestamps_us`` (N,).

    ``resolution``: None/"native", a name such as "dvs346", "WxH" or (W, H).
    ``flows`` (N-1, H, W, 2) optional optical flow between consecutive frames (native resolution).
    Returns an event array (:data:`evforge.formats.events.EVENT_DTYPE`).
    """
    frames = np.asarray(frames)
    ts = np.asarray(timestamps_us, dtype=np.int64)
    if len(frames) != len(ts):
        raise ValueError(f"{len(frames)} frames but {len(ts)} timestamps")
    dev = resolve_device(device)
    resolution = parse_resolution(resolution)
    first = prepare_frames([frames[0]], resolution, dev)
    H, W = first.shape[-2:]
    eng = BatchEngine(1, H, W, dev, upsample)
    eng.start(0, first[0], int(ts[0]), params, seed)
    chunks = []
    for i in range(1, len(frames)):
        flow = None
        if flows is not None:
            flow = resize_flow(torch.from_numpy(np.asarray(flows[i - 1], np.float32)).permute(2, 0, 1)[None].to(dev),
                               None if resolution is None else (W, H))
        ev = eng.advance(prepare_frames([frames[i]], resolution, dev), [int(ts[i])], [True], flow=flow)
        if len(ev):
            chunks.append(make_events(ev.x.cpu().numpy(), ev.y.cpu().numpy(), ev.t.cpu().numpy(),
                                      ev.p.cpu().numpy()))
    return np.concatenate(chunks) if chunks else make_events([], [], [], [])


__all__ = ["BatchEngine", "simulate_frames", "resolve_device", "area_resize"]
