"""Augmentations on packed event batches and on image-like tensors, vectorised over the batch.

Event space (a packed batch: :class:`~evforge.data.collate.EventBatch`, or a dict with its keys): :func:`flip_x`,
:func:`flip_y`, :func:`time_flip`, :func:`shift`, :func:`random_window`, :func:`crop_events`. Each sample gets
its own random draw from the ``generator`` passed in (draws are made on the generator's device, CPU by
default, so a seed gives the same augmentation whether the events sit on CPU or CUDA). Every function returns
a new batch of the same kind; the input is not modified. Functions that drop events keep the packed structure
consistent: ``offsets`` are recomputed from ``batch_index``, and ``t`` is re-based on each sample's new first event (the
amount is added to ``t0``, so ``t + t0`` stays the absolute time).

Tensor space (``(B, C, H, W)`` representations): :func:`random_resized_crop_params` draws per-sample boxes,
:func:`crop_grid` / :func:`crop_resize` resample them with ``grid_sample`` and return the sampling grid, so
masks (or any per-pixel map in the source frame) follow the crop with the same grid — the building blocks of
ECDDP's multi-crop. :func:`flip_tensor_x` flips per sample and :func:`flip_grid_x` flips a grid to match.

Boxes are ``(B, 4)`` int64 ``(x0, y0, x1, y1)`` in pixels, ``x1``/``y1`` exclusive: the crop covers pixels
``x0 <= x < x1``, ``y0 <= y < y1``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .collate import EVENT_COLUMNS, EventBatch

__all__ = ["flip_x", "flip_y", "time_flip", "shift", "random_window", "crop_events", "select_events", "crop_windows",
           "random_resized_crop_params", "crop_grid", "crop_resize", "flip_tensor_x", "flip_grid_x",
           "grid_to_pixels"]

# ---------------------------------------------------------------------------------------------- helpers
def _num_samples(batch: dict) -> int:
    return int(batch["offsets"].shape[0]) - 1


def _rand(n: int, generator: torch.Generator | None, device) -> Tensor:
    """``n`` uniform [0, 1) float64 draws from ``generator`` (on its device), moved to ``device``."""
    gdev = generator.device if generator is not None else "cpu"
    return torch.rand(n, generator=generator, device=gdev, dtype=torch.float64).to(device)


def _randint(low: int, high: int, size: tuple, generator: torch.Generator | None, device) -> Tensor:
    """int64 draws in ``[low, high)`` from ``generator`` (on its device), moved to ``device``."""
    gdev = generator.device if generator is not None else "cpu"
    return torch.randint(low, high, size, generator=generator, device=gdev).to(device)


def _bernoulli(batch: dict, p: float, generator, which: Tensor | None) -> Tensor:
    """Per-sample bool decisions on the events' device: ``which`` when given, else ``rand < p``."""
    dev = batch["t"].device
    if which is not None:
        return which.to(dev, torch.bool)
    return _rand(_num_samples(batch), generator, dev) < p


def _offsets(batch: dict) -> Tensor:
    return batch["offsets"].to(batch["t"].device, torch.int64)


def _with(batch, **fields):
    """A shallow copy of ``batch`` (an EventBatch stays one) with ``fields`` replaced."""
    if isinstance(batch, EventBatch):
        return batch.replace(**fields)
    return {**batch, **fields}


def select_events(batch: dict, keep: Tensor, *, rebase_time: bool = True) -> dict:
    """The batch restricted to the events where ``keep`` holds (order kept), with ``offsets`` recomputed.

    With ``rebase_time`` each sample's ``t`` is shifted so its (new) first event is at 0 and the shift is
    added to ``t0``: ``t`` stays relative to the sample's first event and ``t + t0`` absolute.
    """
    B = _num_samples(batch)
    fields = {k: batch[k][keep] for k in EVENT_COLUMNS}
    bi = fields["batch_index"]
    counts = torch.bincount(bi, minlength=B)
    offsets = torch.zeros(B + 1, dtype=torch.int64, device=bi.device)
    offsets[1:] = torch.cumsum(counts, 0)
    out = _with(batch, **fields, offsets=offsets.to(batch["offsets"].device))
    if rebase_time and "t0" in batch:
        t = fields["t"]
        n = t.shape[0]
        first = t[offsets[:-1].clamp(max=max(n - 1, 0))] if n else torch.zeros(B, dtype=t.dtype, device=t.device)
        first = first.masked_fill(counts == 0, 0)  # empty samples keep their t0
        out["t"] = t - first[bi]
        out["t0"] = batch["t0"] + first.to(batch["t0"].device)
    return out


# ------------------------------------------------------------------------------------ event-space flips
def _per_event(batch: dict, value) -> Tensor | int:
    """``value`` (a number, or a tensor with one value per sample) for every event of ``batch``."""
    if torch.is_tensor(value):
        return value.to(batch["t"].device)[batch["batch_index"]]
    return value


def flip_x(batch: dict, width, p: float = 0.5, *, generator: torch.Generator | None = None,
           which: Tensor | None = None) -> dict:
    """Mirror ``x -> width - 1 - x`` in each sample with probability ``p`` (or the samples where ``which``).
    ``width`` is one number or one per sample (MEM's per-sample extent, ``mem/datasets.py:513-521``)."""
    flip = _bernoulli(batch, p, generator, which)[batch["batch_index"]]
    x = batch["x"]
    w = _per_event(batch, width)
    return _with(batch, x=torch.where(flip, (w - 1) - x, x).to(x.dtype))


def flip_y(batch: dict, height: int, p: float = 0.5, *, generator: torch.Generator | None = None,
           which: Tensor | None = None) -> dict:
    """Mirror ``y -> height - 1 - y`` in each sample with probability ``p`` (or the samples where ``which``)."""
    flip = _bernoulli(batch, p, generator, which)[batch["batch_index"]]
    y = batch["y"]
    return _with(batch, y=torch.where(flip, (height - 1) - y, y))


def time_flip(batch: dict, p: float = 0.5, *, generator: torch.Generator | None = None,
              which: Tensor | None = None) -> dict:
    """Play each chosen sample backwards: ``t' = t_last - t``, ``p' = -p``, event order reversed.

    As MEM's ``RandomTimeFlip`` (``np.flip`` then ``t = t[0] - t``, ``p = -p``; reversing time turns a
    brightness increase into a decrease). The reversed sample is sorted in ``t'`` and starts at 0; ``t0`` is
    kept, so ``t + t0`` of a flipped sample is no longer a physical time.
    """
    dev = batch["t"].device
    flip = _bernoulli(batch, p, generator, which)
    bi = batch["batch_index"]
    offsets = _offsets(batch)
    n = batch["t"].shape[0]
    i = torch.arange(n, device=dev)
    a, z = offsets[:-1][bi], offsets[1:][bi]
    fe = flip[bi]
    src = torch.where(fe, a + z - 1 - i, i)  # reversal within the sample: a <-> z - 1
    t_last = batch["t"][(z - 1).clamp(min=0)]
    fields = {k: batch[k][src] for k in ("x", "y", "t", "p")}
    fields["t"] = torch.where(fe, t_last - fields["t"], fields["t"])
    fields["p"] = torch.where(fe, -fields["p"], fields["p"])
    return _with(batch, **fields)


# --------------------------------------------------------------------------------- dropping events
def shift(batch: dict, max_shift: int, height, width, *, generator: torch.Generator | None = None,
          shifts: Tensor | None = None) -> dict:
    """Shift each sample by a random integer ``(dx, dy)`` in ``[-max_shift, max_shift]`` (MEM's
    ``Aug_RandomShiftEvs``); events leaving the ``height x width`` sensor are dropped (``height`` and ``width``:
    numbers, or one per sample). ``shifts`` (B, 2) gives the ``(dx, dy)`` explicitly."""
    dev = batch["t"].device
    if shifts is None:
        shifts = _randint(-max_shift, max_shift + 1, (_num_samples(batch), 2), generator, dev)
    d = shifts.to(dev)[batch["batch_index"]]
    x = batch["x"] + d[:, 0].to(batch["x"].dtype)
    y = batch["y"] + d[:, 1].to(batch["y"].dtype)
    keep = (x >= 0) & (x < _per_event(batch, width)) & (y >= 0) & (y < _per_event(batch, height))
    return select_events(_with(batch, x=x, y=y), keep)


def random_window(batch: dict, max_events: int, *, generator: torch.Generator | None = None,
                  starts: Tensor | None = None) -> dict:
    """MEM's ``SliceRandomMaxEvs``: a sample with more than ``max_events`` events keeps a contiguous window of
    ``max_events`` starting uniformly in ``[0, n - max_events]``; shorter samples are kept whole. ``starts``
    (B) gives the window starts explicitly (within each sample)."""
    dev = batch["t"].device
    offsets = _offsets(batch)
    n = offsets[1:] - offsets[:-1]
    room = (n - max_events).clamp(min=0) + 1  # number of possible starts
    if starts is None:
        starts = (_rand(_num_samples(batch), generator, dev) * room).long().clamp(max=room - 1)
    starts = starts.to(dev)
    bi = batch["batch_index"]
    j = torch.arange(batch["t"].shape[0], device=dev) - offsets[:-1][bi] - starts[bi]  # index in the window
    return select_events(batch, (j >= 0) & (j < max_events))


def crop_events(batch: dict, boxes: Tensor) -> dict:
    """Keep each sample's events inside its box ``(x0, y0, x1, y1)`` (exclusive ends) and move them to the
    crop's frame (``x - x0``, ``y - y0``), as ECDDP's pretraining crop does before the voxel grid."""
    dev = batch["t"].device
    bx = boxes.to(dev, torch.int64)[batch["batch_index"]]
    x, y = batch["x"].to(torch.int64), batch["y"].to(torch.int64)
    keep = (x >= bx[:, 0]) & (x < bx[:, 2]) & (y >= bx[:, 1]) & (y < bx[:, 3])
    moved = _with(batch, x=(x - bx[:, 0]).to(batch["x"].dtype), y=(y - bx[:, 1]).to(batch["y"].dtype))
    return select_events(moved, keep)


# ---------------------------------------------------------------------------------------- tensor space
def random_resized_crop_params(batch_size: int, height: int, width: int, *, scale=(0.08, 1.0),
                               ratio=(3 / 4, 4 / 3), generator: torch.Generator | None = None, device=None,
                               attempts: int = 10) -> Tensor:
    """Per-sample ``RandomResizedCrop`` boxes ``(B, 4)`` int64 ``(x0, y0, x1, y1)``.

    torchvision's rule, vectorised: ``attempts`` candidates per sample (area ``U(scale) * H * W``, log-uniform
    aspect ratio ``w / h``), the first that fits is used, placed uniformly; when none fits, the central crop
    with the aspect ratio clamped into ``ratio``.
    """
    B, A = batch_size, attempts
    area = height * width
    u = _rand(B * A * 4, generator, "cpu").view(B, A, 4)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
    ar = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * ar)).long()
    h = torch.round(torch.sqrt(target / ar)).long()
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.argmax(ok.long(), 1)  # first fitting attempt (0 when none: handled below)
    pick = lambda v: v.gather(1, first[:, None])[:, 0]
    w, h = pick(w), pick(h)
    y0 = (pick(u[..., 2]) * (height - h + 1)).long().clamp(max=height - h)  # uniform in [0, H - h]
    x0 = (pick(u[..., 3]) * (width - w + 1)).long().clamp(max=width - w)
    # fallback: central crop, aspect ratio clamped into the range
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    none = ~ok.any(1)
    w, h = torch.where(none, fw, w), torch.where(none, fh, h)
    x0 = torch.where(none, (width - fw) // 2, x0)
    y0 = torch.where(none, (height - fh) // 2, y0)
    boxes = torch.stack([x0, y0, x0 + w, y0 + h], 1)
    return boxes if device is None else boxes.to(device)


def crop_windows(tensor: Tensor, top_left: Tensor, size: tuple[int, int]) -> Tensor:
    """Per-sample windows ``(B, C, h, w)`` of ``tensor`` (B, C, H, W) at integer ``top_left`` (B, 2: row, column),
    gathered exactly (no interpolation); the windows must lie inside the tensor."""
    B, C = tensor.shape[:2]
    dev = tensor.device
    tl = top_left.to(dev)
    rows = (tl[:, 0:1] + torch.arange(size[0], device=dev))[:, None, :, None]
    cols = (tl[:, 1:2] + torch.arange(size[1], device=dev))[:, None, None, :]
    b = torch.arange(B, device=dev)[:, None, None, None]
    c = torch.arange(C, device=dev)[None, :, None, None]
    return tensor[b, c, rows, cols]


def crop_grid(boxes: Tensor, size: tuple[int, int], height: int, width: int) -> Tensor:
    """The ``grid_sample`` grid ``(B, h, w, 2)`` (``align_corners=False`` convention) that resamples each box
    of a ``height x width`` source to ``size = (h, w)``.

    Output pixel ``(i, j)`` samples the source at pixel-edge coordinates ``x = x0 + (j + 0.5) * bw / w``,
    ``y = y0 + (i + 0.5) * bh / h`` (centres map to centres; the crop's outer edges to the box edges),
    normalised as ``2 * x / width - 1``. Apply it to any map in the source frame (e.g. masks, with
    ``mode="nearest"``) to make it follow the crop; :func:`grid_to_pixels` maps it back to source pixels.
    """
    oh, ow = size
    b = boxes.to(torch.float32)
    dev = b.device
    jj = (torch.arange(ow, device=dev, dtype=torch.float32) + 0.5) / ow  # fraction across the crop
    ii = (torch.arange(oh, device=dev, dtype=torch.float32) + 0.5) / oh
    xs = b[:, 0:1] + jj[None] * (b[:, 2:3] - b[:, 0:1])  # (B, w) source x (pixel edges)
    ys = b[:, 1:2] + ii[None] * (b[:, 3:4] - b[:, 1:2])  # (B, h)
    gx = (2 * xs / width - 1)[:, None, :].expand(-1, oh, -1)
    gy = (2 * ys / height - 1)[:, :, None].expand(-1, -1, ow)
    return torch.stack([gx, gy], -1)


def grid_to_pixels(grid: Tensor, height: int, width: int) -> Tensor:
    """Source pixel-centre coordinates ``(x, y)`` of a :func:`crop_grid` (inverse of its normalisation)."""
    x = (grid[..., 0] + 1) * width / 2 - 0.5
    y = (grid[..., 1] + 1) * height / 2 - 0.5
    return torch.stack([x, y], -1)


def crop_resize(tensor: Tensor, boxes: Tensor, size: tuple[int, int], *, mode: str = "bilinear",
                padding_mode: str = "zeros") -> tuple[Tensor, Tensor]:
    """Crop each sample of ``tensor`` (B, C, H, W) to its box and resize to ``size``; returns
    ``(crops, grid)`` with the :func:`crop_grid` used, so masks can follow with ``grid_sample(mask, grid)``.
    (Bilinear, no antialiasing: strong downscales alias, as kornia's crops do.)"""
    H, W = tensor.shape[-2:]
    grid = crop_grid(boxes.to(tensor.device), size, H, W).to(tensor.dtype)
    out = F.grid_sample(tensor, grid, mode=mode, padding_mode=padding_mode, align_corners=False)
    return out, grid


def flip_tensor_x(tensor: Tensor, p: float = 0.5, *, generator: torch.Generator | None = None,
                  which: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mirror the last axis of the chosen samples of ``tensor`` (B, ...); returns ``(out, which)``."""
    if which is None:
        which = _rand(tensor.shape[0], generator, tensor.device) < p
    which = which.to(tensor.device, torch.bool)
    shape = (-1,) + (1,) * (tensor.dim() - 1)
    return torch.where(which.view(shape), tensor.flip(-1), tensor), which


def flip_grid_x(grid: Tensor, which: Tensor) -> Tensor:
    """The grid of a crop followed by a horizontal flip of the chosen samples (the flip applied to the
    output of ``grid_sample(src, grid)``), so masks can follow the flip too."""
    return torch.where(which.to(grid.device, torch.bool).view(-1, 1, 1, 1), grid.flip(2), grid)
