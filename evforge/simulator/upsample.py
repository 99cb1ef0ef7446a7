"""Temporal upsampling between source frames, with an adaptive number of steps per frame pair.

The simulator already interpolates log intensity linearly inside a step when it stamps events, so extra
steps matter where the path between frames is not a straight line in log space (motion, via optical flow
or a learned interpolator) and for the time-dependent parts of the model (photoreceptor low-pass, noise,
refractory period). :func:`choose_steps` picks the count per frame pair from the brightness change, the
motion and the low-pass time constant; an interpolator then produces the intermediate frames.

Plugging in a learned interpolator: any object with a ``channels`` attribute (1 for gray, 3 for RGB input)
and ``__call__(frame0, frame1, fractions, flow=None, flow_valid=None)`` returning the frames at
``fractions`` works; see :class:`FrameInterpolator`. Nothing is downloaded: bring your own weights.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from .pixel import intensity01, inverse_lin_log, lin_log
from .settings import UpsampleConfig  # noqa: F401  (defined without torch; re-exported here)


@runtime_checkable
class FrameInterpolator(Protocol):
    """Makes frames between two frames (B, C, H, W) at ``fractions`` (B, K) in (0, 1].

    Returns (K, B, C, H, W). ``flow`` (B, 2, H, W) is the optical flow frame0 -> frame1 in pixels when the
    source has it, ``flow_valid`` (B, 1, H, W) where it is trustworthy; both may be None.
    """

    channels: int

    def __call__(self, frame0: torch.Tensor, frame1: torch.Tensor, fractions: torch.Tensor,
                 flow: torch.Tensor | None = None, flow_valid: torch.Tensor | None = None) -> torch.Tensor: ...


class LogLinearInterpolator:
    """Linear interpolation of the lin-log response (straight lines in log intensity, as ESIM assumes)."""

    channels = 1
    needs_flow = False

    def interpolate_log(self, l0, l1, fractions, flow=None, flow_valid=None):
        """Same as ``__call__`` but on lin-log frames, returning lin-log frames (no conversions)."""
        s = fractions.T.reshape(fractions.shape[1], -1, 1, 1, 1)
        return (1 - s) * l0 + s * l1

    def __call__(self, frame0, frame1, fractions, flow=None, flow_valid=None):
        return inverse_lin_log(self.interpolate_log(lin_log(frame0), lin_log(frame1), fractions))


def _warp(img: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample ``img`` at ``x + flow(x)`` (bilinear, border clamped); img (B, C, H, W), flow (B, 2, H, W)."""
    B, _, H, W = img.shape
    ys, xs = torch.meshgrid(torch.arange(H, device=img.device, dtype=img.dtype),
                            torch.arange(W, device=img.device, dtype=img.dtype), indexing="ij")
    gx = (xs + flow[:, 0]) * (2.0 / max(W - 1, 1)) - 1
    gy = (ys + flow[:, 1]) * (2.0 / max(H - 1, 1)) - 1
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=True)


class FlowInterpolator:
    """Flow-guided interpolation: frame at fraction s blends frame0 warped back by ``s F`` and frame1
    warped forward by ``(1 - s) F`` (in log space, weights 1-s and s); where the flow is invalid
    (occlusion, out of view) it falls back to log-linear."""

    channels = 1
    needs_flow = True

    def interpolate_log(self, l0, l1, fractions, flow=None, flow_valid=None):
        if flow is None:
            return LogLinearInterpolator().interpolate_log(l0, l1, fractions)
        out = []
        for k in range(fractions.shape[1]):
            s = fractions[:, k].view(-1, 1, 1, 1)
            warped = (1 - s) * _warp(l0, -s * flow) + s * _warp(l1, (1 - s) * flow)
            if flow_valid is not None:
                warped = torch.where(flow_valid, warped, (1 - s) * l0 + s * l1)
            out.append(warped)
        return torch.stack(out)

    def __call__(self, frame0, frame1, fractions, flow=None, flow_valid=None):
        return inverse_lin_log(self.interpolate_log(lin_log(frame0), lin_log(frame1), fractions, flow, flow_valid))


def choose_steps(cfg: UpsampleConfig, l0: torch.Tensor, l1: torch.Tensor, dt_s: list[float],
                 cutoff_hz: list[float], flow: torch.Tensor | None = None,
                 lowpass_state: torch.Tensor | None = None) -> list[int]:
    """Step count per sequence for the lin-log frame pair (B, 1, H, W) -> (B, 1, H, W) lasting ``dt_s``.

    ``lowpass_state`` (B, H, W) is the photoreceptor's current log output: while it has not settled on
    the new frame, the low-pass needs short steps even if the frames themselves do not change.
    """
    if cfg.mode == "none":
        return [1] * l0.shape[0]
    need = (l1 - l0).abs().flatten(1).amax(1) / cfg.max_log_step
    if cfg.mode == "flow" and flow is not None:
        need = torch.maximum(need, flow.norm(dim=1).flatten(1).amax(1) / cfg.max_px_step)
    if cfg.max_lowpass_eps > 0 and any(c > 0 for c in cutoff_hz):
        unsettled = (l1 - l0).abs() > 1e-3
        if lowpass_state is not None:
            unsettled |= (l1[:, 0] - lowpass_state).abs().unsqueeze(1) > 1e-3
        inten = torch.where(unsettled, intensity01(inverse_lin_log(l1)), torch.zeros_like(l1)).flatten(1).amax(1)
        rate = torch.tensor([dt * 2 * math.pi * c for dt, c in zip(dt_s, cutoff_hz)], device=inten.device)
        need = torch.maximum(need, inten * rate / cfg.max_lowpass_eps)
    out = []
    for v in need.cpu():
        n = max(cfg.min_steps, math.ceil(float(v) - 1e-9), 1)
        n = -(-n // cfg.step_multiple) * cfg.step_multiple  # round up to a multiple
        out.append(int(min(n, cfg.max_steps)))
    return out


def substep_fractions(steps: list[int], device) -> tuple[torch.Tensor, list[list[bool]]]:
    """Fractions (B, K) of the frame interval at the end of each sub-step (K = max steps; a sequence with
    fewer steps repeats 1.0) and the per-sub-step active mask (K lists of B bools)."""
    K = max(steps)
    frac = torch.ones(len(steps), K, device=device)
    for b, n in enumerate(steps):
        frac[b, :n] = torch.arange(1, n + 1, device=device, dtype=torch.float32) / n
    active = [[k < n for n in steps] for k in range(K)]
    return frac, active
