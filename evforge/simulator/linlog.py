"""v2e's lin-log response and its inverse, and v2e's intensity rescaling: the pixel model's input transforms."""

from __future__ import annotations

import math

import torch

from . import cpu_kernels
from .params import LIN_LOG_THRESHOLD


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
