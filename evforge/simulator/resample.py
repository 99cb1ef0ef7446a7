"""Frame preparation on the device: RGB -> gray as v2e does, and exact area resampling."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

# ITU-R BT.601 luma, what v2e gets from OpenCV's cvtColor(..., COLOR_BGR2GRAY).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def to_tensor(frames: list[np.ndarray], device) -> torch.Tensor:
    """Stack HxW or HxWxC frames (uint8/uint16/float) into a float32 (B, C, H, W) tensor on ``device``."""
    arrays = [f[..., None] if f.ndim == 2 else f for f in frames]
    x = torch.from_numpy(np.stack(arrays)).to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).float()


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 1, H, W) luma; 1-channel input passes through, RGBA drops alpha.

    Computed as ``(r w0 + g w1) + b w2`` in the input's precision, an order that the CPU frame kernel
    (:mod:`evforge.simulator.cpu_frames`) repeats exactly."""
    if x.shape[1] == 1:
        return x
    w0, w1, w2 = LUMA_WEIGHTS
    return x[:, 0:1] * w0 + x[:, 1:2] * w1 + x[:, 2:3] * w2


@lru_cache(maxsize=32)
def _area_matrix_np(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights: output cell j averages input cells by their overlap with [j*s, (j+1)*s)."""
    scale = n_in / n_out
    edges = np.arange(n_out + 1) * scale
    lo, hi = edges[:-1, None], edges[1:, None]
    cells = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, cells + 1) - np.maximum(lo, cells), 0, None)
    return overlap / overlap.sum(1, keepdims=True)


def area_matrix(n_in: int, n_out: int, device, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(_area_matrix_np(n_in, n_out)).to(device=device, dtype=dtype)


def area_resize(x: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Resize (B, C, H, W) to ``size = (width, height)`` by area averaging (OpenCV's INTER_AREA when
    shrinking, exact for fractional factors); computed as two small matrix products, cheap on a GPU."""
    if size is None:
        return x
    w_out, h_out = size
    h_in, w_in = x.shape[-2:]
    if (w_in, h_in) == (w_out, h_out):
        return x
    rh = area_matrix(h_in, h_out, x.device, x.dtype)
    rw = area_matrix(w_in, w_out, x.device, x.dtype)
    return rh @ x @ rw.T


def resize_flow(flow: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Resize a (B, 2, H, W) flow field to ``size`` and rescale its vectors to the new pixel units."""
    if size is None:
        return flow
    h_in, w_in = flow.shape[-2:]
    out = area_resize(flow, size)
    scale = torch.tensor([size[0] / w_in, size[1] / h_in], dtype=flow.dtype, device=flow.device)
    return out * scale.view(1, 2, 1, 1)


def prepare_frames(frames: list[np.ndarray], size: tuple[int, int] | None, device, *,
                   gray: bool = True) -> torch.Tensor:
    """Raw frames -> float (B, C, H, W) at the output size; C = 1 when ``gray`` (the simulator's input).

    On the CPU, 8-bit frames go to gray through :func:`evforge.simulator.cpu_frames.luma` (same values)."""
    if gray and torch.device(device).type == "cpu" and all(f.dtype == np.uint8 for f in frames):
        from . import cpu_frames

        if cpu_frames.AVAILABLE:
            x = torch.from_numpy(np.stack([f if f.ndim == 2 else cpu_frames.luma(f)[0] for f in frames]))
            return area_resize(x.float()[:, None], size)
    x = to_tensor(frames, device)
    if gray:
        x = rgb_to_gray(x)
    return area_resize(x, size)
