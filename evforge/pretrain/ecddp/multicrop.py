"""ECDDP multi-crop: a 224 view, 2 global 192 crops and 8 local 96 crops, with the grids that made them.

Public code (``Transform`` in model/pretrain_model.py, kornia): ``RandomCrop(224)`` of the 320 voxel crop, then
per crop ``RandomResizedCrop`` (global scale 0.32-1, local 0.05-0.32, aspect 3/4-4/3) and a horizontal flip with
p = 0.5. It pushes a pixel-coordinate image through the same kornia ops to learn where each crop pixel came
from, and grid-samples the one-hot context masks of the 224 view's token grid with it (threshold 0.25).

Two modes (``MultiCrop(mode=...)``, ECDDP option ``crop_mode``):

* ``"exact"`` (evforge): every crop is *made* by ``grid_sample`` from an explicit box + flip, so the same geometry
  gives the sampling grid at any resolution (pixels for the image, tokens for masks) with exact pixel-centre
  alignment (``align_corners=False`` convention: the view spans [-1, 1] edge to edge). Boxes are continuous.
* ``"reference"`` (the public code with kornia 0.7.1, the version its README pins): integer boxes drawn as kornia's
  ``ResizedCropGenerator`` draws them (a side must be strictly smaller than the view; the first of 10 draws that
  fits, else a 224 x 168 centre-sized fallback; kornia swaps the drawn width and height), the box sliced and
  resized with ``F.interpolate(bilinear, align_corners=True)``, and the context-mask grid made exactly as the
  public ``Transform`` makes it: a pixel-index image pushed through the same crop and flip, normalised by
  ``V - 1``, resized to the token grid with ``align_corners=True``, then read with ``grid_sample(align_corners=
  True)``. That maps pixel centre p to token coordinate p * (T_view - 1) / (V - 1) (pixel 0 onto token 0's
  centre), a misalignment of up to half a token against the exact mode's p-centre geometry.

Layout: crops are crop-major, row ``c * B + b`` is crop c of sample b (as the public ``img.repeat(n, ...)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _rand(shape, generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device if generator is not None else "cpu")


def crop_grid(boxes: torch.Tensor, flips: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Sampling grid (N, h, w, 2) of (x, y) view coordinates in [-1, 1] for the centres of an (h, w) grid laid
    over each box; ``boxes`` (N, 4) = x0, y0, x1, y1 in view coordinates, ``flips`` (N,) mirrors x."""
    h, w = out_hw
    dev, dt = boxes.device, boxes.dtype
    u = (torch.arange(w, device=dev, dtype=dt) + 0.5) / w  # cell centres as fractions of the box
    v = (torch.arange(h, device=dev, dtype=dt) + 0.5) / h
    u = torch.where(flips.view(-1, 1), 1.0 - u, u)  # (N, w): a flipped crop reads the box right to left
    x0, y0, x1, y1 = boxes.unbind(-1)
    gx = x0[:, None] + u * (x1 - x0)[:, None]  # (N, w)
    gy = y0[:, None] + v[None] * (y1 - y0)[:, None]  # (N, h)
    n = boxes.shape[0]
    return torch.stack((gx[:, None, :].expand(n, h, w), gy[:, :, None].expand(n, h, w)), dim=-1)


def resample_mask(mask: torch.Tensor, grid: torch.Tensor, threshold: float | None = None,
                  align_corners: bool = False) -> torch.Tensor:
    """Carry masks from the view's token grid into crops.

    mask: (Bm, h, w) or (Bm, K, h, w), defined on the view; grid: (Bg, h', w', 2) from :func:`crop_grid` (or
    ``Crops.grid``), Bg a multiple of Bm (crop-major: the masks are repeated for each crop). Returns the soft
    coverage (bilinear, float) of shape (Bg, [K,] h', w'), or ``coverage > threshold`` (bool) when a threshold
    is given (ECDDP: 0.25). Border padding: the view's edge tokens reach the view's edge. ``align_corners=True``
    reads a :func:`public_crop_grid` (the public code's convention, zero padding).
    """
    squeeze = mask.dim() == 3
    m = mask.unsqueeze(1) if squeeze else mask
    reps, rem = divmod(grid.shape[0], m.shape[0])
    if rem:
        raise ValueError(f"grid batch {grid.shape[0]} is not a multiple of mask batch {m.shape[0]}")
    m = m.to(grid.dtype).repeat(reps, 1, 1, 1)
    cov = F.grid_sample(m, grid.to(m.dtype), mode="bilinear", padding_mode="zeros" if align_corners else "border",
                        align_corners=align_corners)
    cov = cov.squeeze(1) if squeeze else cov
    return cov > threshold if threshold is not None else cov


CROP_MODES = ("exact", "reference")


def public_crop_grid(boxes: torch.Tensor, flips: torch.Tensor, view_size: int, crop_size: int,
                     out_hw: tuple[int, int]) -> torch.Tensor:
    """The public ``Transform``'s grid (N, h, w, 2) for integer pixel ``boxes`` (N, 4) = x0, y0, x1, y1 inclusive:
    a (pixel index + 1) image cropped and resized to ``crop_size`` (align_corners=True), flipped, minus 1,
    normalised by ``view_size - 1``, then resized to ``out_hw`` (align_corners=True). The same ops in the same
    order, so the values are the public code's bit for bit."""
    v = view_size
    ys, xs = torch.meshgrid(torch.arange(v, dtype=torch.float32), torch.arange(v, dtype=torch.float32),
                            indexing="ij")
    coords = torch.stack((xs, ys)).unsqueeze(0) + 1  # (1, 2, V, V): channel 0 is x, as the public grid
    out = []
    for (x0, y0, x1, y1), flip in zip(boxes.long().tolist(), flips.tolist()):
        g = F.interpolate(coords[..., y0 : y1 + 1, x0 : x1 + 1], size=(crop_size, crop_size), mode="bilinear",
                          align_corners=True)
        out.append(torch.flip(g, dims=(-1,)) if flip else g)
    g = torch.cat(out) - 1
    g = 2.0 * g / max(v - 1, 1) - 1.0
    g = F.interpolate(g, size=tuple(out_hw), mode="bilinear", align_corners=True)
    return g.permute(0, 2, 3, 1).to(boxes.device)


@dataclass
class Crops:
    """n crops of each of B samples: ``images`` (n*B, C, S, S), ``boxes`` (n*B, 4), ``flips`` (n*B,) bool.

    ``mode`` ``"exact"``: boxes x0, y0, x1, y1 in view coordinates [-1, 1]; ``"reference"``: integer pixel boxes
    x0, y0, x1, y1 (inclusive) of a ``view_size`` view, as kornia's ``src`` boxes."""

    images: torch.Tensor
    boxes: torch.Tensor
    flips: torch.Tensor
    n: int
    mode: str = "exact"
    view_size: int = 0

    def grid(self, out_hw: tuple[int, int] | int) -> torch.Tensor:
        """Sampling grid from the view into these crops at resolution ``out_hw`` (e.g. the token grid)."""
        hw = (out_hw, out_hw) if isinstance(out_hw, int) else tuple(out_hw)
        if self.mode == "reference":
            return public_crop_grid(self.boxes, self.flips, self.view_size, self.images.shape[-1], hw)
        return crop_grid(self.boxes, self.flips, hw)

    def resample(self, mask: torch.Tensor, out_hw: tuple[int, int] | int) -> torch.Tensor:
        """Soft coverage of the view-grid ``mask`` (see :func:`resample_mask`) on an ``out_hw`` grid of each crop,
        with this mode's sampling convention."""
        return resample_mask(mask, self.grid(out_hw), align_corners=self.mode == "reference")


@dataclass
class MultiCropOutput:
    view: torch.Tensor  # (B, C, V, V)
    global_crops: Crops
    local_crops: Crops


def sample_boxes(
    n: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> torch.Tensor:
    """``RandomResizedCrop`` boxes on a square view: area fraction ~ U(scale), aspect w/h log-uniform in
    ``ratio``, first of ``attempts`` draws that fits (else the whole view); position uniform. (n, 4) in [-1, 1].
    """
    area = scale[0] + (scale[1] - scale[0]) * _rand((n, attempts), generator)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _rand((n, attempts), generator)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r)  # as fractions of the view side
    h = torch.sqrt(area / r)
    ok = (w <= 1.0) & (h <= 1.0)
    dev = area.device  # the generator's: everything below stays there
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1, device=dev))
    idx = first.clamp(min=0).unsqueeze(1)
    w = torch.where(first >= 0, w.gather(1, idx).squeeze(1), torch.ones(n, device=dev))
    h = torch.where(first >= 0, h.gather(1, idx).squeeze(1), torch.ones(n, device=dev))
    pos = _rand((n, 2), generator)
    x0 = pos[:, 0] * (1.0 - w)
    y0 = pos[:, 1] * (1.0 - h)
    return torch.stack((x0, y0, x0 + w, y0 + h), -1) * 2.0 - 1.0  # fractions [0, 1] -> [-1, 1]


def sample_boxes_public(
    n: int,
    view_size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Integer pixel boxes (n, 4) = x0, y0, x1, y1 (inclusive) as kornia 0.7.1's ``ResizedCropGenerator`` and
    ``CropGenerator`` draw them on a square ``view_size`` view (the public code's ``RandomResizedCrop``):
    area ~ U(scale) * V^2, log-aspect ~ U(log ratio), sides rounded; the first of 10 draws with both sides in
    (0, V) (strictly: the whole view is never drawn), else kornia's fallback (V wide, round(V * min(ratio))
    high); kornia then uses the drawn width as the height and vice versa; the corner is floor(U * (V - side + 1))."""
    v = view_size
    area = (_rand((n, 10), generator) * (scale[1] - scale[0]) + scale[0]) * v * v
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(_rand((n, 10), generator) * (hi - lo) + lo)
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    ok = (w > 0) & (w < v) & (h > 0) & (h < v)
    first = ((ok.int().cumsum(1) == 1) & ok).int().argmax(1)
    rows = torch.arange(n, device=area.device)
    found = ok.any(1)
    h_out = torch.where(found, w[rows, first], torch.full_like(w[:, 0], float(round(v * min(ratio)))))  # swapped
    w_out = torch.where(found, h[rows, first], torch.full_like(w[:, 0], float(v)))
    x0 = (_rand((n,), generator) * (v - w_out + 1)).floor()
    y0 = (_rand((n,), generator) * (v - h_out + 1)).floor()
    return torch.stack((x0, y0, x0 + w_out - 1, y0 + h_out - 1), -1)


class MultiCrop:
    """View + global + local crops of a voxel batch (B, C, H, W); see the module doc for the public setup.

    Defaults are the paper's: view 224, 2 global 192 (scale 0.32-1), 8 local 96 (0.05-0.32), flip p 0.5.
    ``mode``: ``"exact"`` or ``"reference"`` (module doc).
    """

    def __init__(
        self,
        view_size: int = 224,
        global_size: int = 192,
        n_global: int = 2,
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_size: int = 96,
        n_local: int = 8,
        local_scale: tuple[float, float] = (0.05, 0.32),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        mode: str = "exact",
    ):
        if mode not in CROP_MODES:
            raise ValueError(f"crop mode must be one of {CROP_MODES}, not {mode!r}")
        self.mode = mode
        self.view_size, self.global_size, self.n_global = view_size, global_size, n_global
        self.global_scale, self.local_size, self.n_local = tuple(global_scale), local_size, n_local
        self.local_scale, self.ratio, self.flip_p = tuple(local_scale), tuple(ratio), flip_p

    def random_view(self, voxels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random (integer-offset, unresized) ``view_size`` square of each sample."""
        b, _, hh, ww = voxels.shape
        v = self.view_size
        if hh < v or ww < v:
            raise ValueError(f"voxel grid {hh}x{ww} is smaller than the view size {v}")
        if hh == v and ww == v:
            return voxels
        pos = _rand((b, 2), generator)
        ys = (pos[:, 0] * (hh - v + 1)).long().clamp(max=hh - v).tolist()
        xs = (pos[:, 1] * (ww - v + 1)).long().clamp(max=ww - v).tolist()
        return torch.stack([voxels[i, :, y : y + v, x : x + v] for i, (y, x) in enumerate(zip(ys, xs))])

    def make_crops(self, view, n, size, scale, generator=None) -> Crops:
        """n crops of ``size`` per sample of ``view`` (B, C, V, V) by bilinear ``grid_sample`` (exact mode) or
        slice + resize (reference mode)."""
        b = view.shape[0]
        if self.mode == "reference":
            boxes = sample_boxes_public(n * b, view.shape[-1], scale, self.ratio, generator)
            flips = _rand((n * b,), generator) < self.flip_p
            return self.crops_from_boxes(view, n, size, boxes, flips)
        boxes = sample_boxes(n * b, scale, self.ratio, generator).to(view.device, view.dtype)
        flips = (_rand((n * b,), generator) < self.flip_p).to(view.device)
        grid = crop_grid(boxes, flips, (size, size))
        src = view.repeat(n, 1, 1, 1)  # crop-major rows: c * B + b
        images = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return Crops(images=images, boxes=boxes, flips=flips, n=n)

    def crops_from_boxes(self, view, n: int, size: int, boxes: torch.Tensor, flips: torch.Tensor) -> Crops:
        """Reference-mode crops for given integer pixel ``boxes`` (n*B, 4) and ``flips`` (n*B,): each box sliced
        from its sample's view (crop-major rows), resized with ``align_corners=True`` and flipped, as kornia's
        slice mode does (also how the reference fixtures replay the public code's draws)."""
        b = view.shape[0]
        out = []
        for i, ((x0, y0, x1, y1), flip) in enumerate(zip(boxes.long().tolist(), flips.tolist())):
            c = F.interpolate(view[i % b : i % b + 1, :, y0 : y1 + 1, x0 : x1 + 1], size=(size, size),
                              mode="bilinear", align_corners=True)
            out.append(torch.flip(c, dims=(-1,)) if flip else c)
        return Crops(images=torch.cat(out), boxes=boxes.to(view.device, torch.float32), flips=flips.to(view.device),
                     n=n, mode="reference", view_size=view.shape[-1])

    @torch.no_grad()
    def __call__(self, voxels: torch.Tensor, generator: torch.Generator | None = None) -> MultiCropOutput:
        view = self.random_view(voxels, generator)
        g = self.make_crops(view, self.n_global, self.global_size, self.global_scale, generator)
        loc = self.make_crops(view, self.n_local, self.local_size, self.local_scale, generator)
        return MultiCropOutput(view=view, global_crops=g, local_crops=loc)
