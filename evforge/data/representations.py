"""Event representations computed on the device, batched from packed events.

Every function takes a packed batch (:class:`~evforge.data.collate.EventBatch`, or a dict with its ``x, y, t,
p, batch_index, offsets``; tensors on any device, CPU or CUDA) and returns a ``(B, C, H, W)`` float32 tensor
on the events' device. Events are scattered with one ``index_add_`` into the flat index
``((b * C + c) * H + y) * W + x``: no padding and no Python loop over samples or events (only over the two
bilinear time neighbours). Events outside the ``height x width`` sensor (e.g. after a shift) are dropped,
never wrapped (unless :func:`stacked_histograms` is asked to reproduce the public DSEC loader's row wrap).

Representations (each also by name in :data:`REPRESENTATIONS`, for configs: :func:`represent`, :func:`channels`):

* :func:`voxel_grid` — ECDDP's input (B bins, bilinear in time, with or without polarity split);
* :func:`histogram` — 2-channel count image (ON, OFF);
* :func:`mem_counts`, :func:`mem_image` — MEM's 3-channel image (pos, 0, neg), hot pixels removed,
  max-normalised;
* :func:`stacked_histograms` — ECDDP's DSEC input (the last ``chunks * events_per_chunk`` events as
  ``chunks`` 2-channel histograms).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from evforge.registry import Registry

__all__ = ["REPRESENTATIONS", "represent", "channels", "voxel_grid", "histogram", "mem_counts", "mem_image",
           "stacked_histograms", "remove_hot_pixels", "normalize_max", "normalize_nonzero_std", "time_flip_voxel"]


# ---------------------------------------------------------------------------------------------- helpers
def _columns(batch: dict) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``x, y`` (int64), ``t`` (int64), ``p`` (int8), ``batch_index`` (int64), ``offsets`` (int64), all on
    the events' device (the collate leaves ``offsets`` on the CPU; the events may have moved to CUDA)."""
    t = batch["t"]
    dev = t.device
    x = batch["x"].to(dev, torch.int64)
    y = batch["y"].to(dev, torch.int64)
    bi = batch["batch_index"].to(dev, torch.int64)
    offsets = batch["offsets"].to(dev, torch.int64)
    return x, y, t.to(torch.int64), batch["p"].to(dev), bi, offsets


def _num_samples(batch: dict) -> int:
    return int(batch["offsets"].shape[0]) - 1


def _in_sensor(x: Tensor, y: Tensor, height: int, width: int) -> Tensor:
    """Events whose pixel lies on the ``height x width`` sensor (the others are dropped, not wrapped)."""
    return (x >= 0) & (x < width) & (y >= 0) & (y < height)


def _scatter(shape: tuple[int, int, int, int], b: Tensor, c: Tensor, y: Tensor, x: Tensor, w: Tensor | None,
             keep: Tensor, out: Tensor | None = None) -> Tensor:
    """Sum weights ``w`` (1 when None) at ``(b, c, y, x)`` into ``out`` (a new zero ``(B, C, H, W)`` float32
    tensor when None), for the events where ``keep`` holds: one ``index_add_`` on the flat view."""
    B, C, H, W = shape
    if out is None:
        out = torch.zeros(shape, dtype=torch.float32, device=b.device)
    flat = (((b * C + c) * H + y) * W + x)[keep]  # row-major index of (b, c, y, x)
    w = torch.ones(flat.shape[0], dtype=out.dtype, device=out.device) if w is None else w[keep].to(out.dtype)
    out.view(-1).index_add_(0, flat, w)
    return out


def _first_last(t: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Per sample, the time of its first and last event (0 for an empty sample). Events are sorted in time
    within each sample, so these are its minimum and maximum."""
    n = t.shape[0]
    if n == 0:
        z = torch.zeros(offsets.shape[0] - 1, dtype=t.dtype, device=t.device)
        return z, z
    first = t[offsets[:-1].clamp(max=n - 1)]
    last = t[(offsets[1:] - 1).clamp(min=0)]
    empty = offsets[1:] == offsets[:-1]
    return first.masked_fill(empty, 0), last.masked_fill(empty, 0)


# ------------------------------------------------------------------------------------------- voxel grid
def voxel_grid(batch: dict, *, bins: int, height: int, width: int, polarity_split: bool = False,
               off_weight: float = -1.0, normalize: str | None = None) -> Tensor:
    """Voxel grid ``(B, bins, H, W)`` (or ``(B, 2 * bins, H, W)`` with ``polarity_split``), bilinear in time.

    Time is normalised per sample to ``[0, bins - 1]`` with that sample's first and last event:
    ``t_norm = (bins - 1) * (t - t_first) / (t_last - t_first)``; a sample with a single event or a zero time
    span puts all its events at ``t_norm = 0`` (bin 0). Each event splits its weight between bins
    ``floor(t_norm)`` and ``floor(t_norm) + 1`` with weights ``1 - frac`` and ``frac`` (the ECDDP / E2VID
    ``max(0, 1 - |t_norm - bin|)`` kernel).

    * Without ``polarity_split`` the weight is the polarity: ``+1`` for ON, ``off_weight`` for OFF (default
      ``-1``). ECDDP's pretraining code kept v2e's ``p in {0, 1}`` (the remap to -1 is commented out), so its
      OFF events weighed 0: ``off_weight=0.0`` reproduces that quirk.
    * With ``polarity_split`` ON events fill channels ``[0, bins)`` and OFF events ``[bins, 2 * bins)``, each
      with weight 1 (``off_weight`` is ignored), as in ECDDP's ``events_to_neg_pos_voxel_torch`` concat.

    ``normalize``: None (raw sums) or ``"nonzero_std"``: per sample, the non-zero cells are standardised with
    the mean and (population) std of the non-zero cells, zero cells stay 0, a zero std only subtracts the
    mean (E2VID's / ECDDP-DSEC's ``normalize_voxel_grid``); see :func:`normalize_nonzero_std`.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if normalize not in (None, "nonzero_std"):
        raise ValueError(f"normalize must be None or 'nonzero_std', got {normalize!r}")
    x, y, t, p, bi, offsets = _columns(batch)
    B, C = _num_samples(batch), (2 * bins if polarity_split else bins)
    first, last = _first_last(t, offsets)
    span = (last - first)[bi]
    # t_norm in float64: exact for microsecond spans far beyond float32's 2**24; zero span -> 0.
    dt = (t - first[bi]).double()
    t_norm = torch.where(span > 0, dt * (bins - 1) / span.clamp(min=1).double(), torch.zeros_like(dt))
    t_norm = t_norm.clamp(0, bins - 1)
    lo = t_norm.floor()
    frac = (t_norm - lo).float()
    lo = lo.long()
    on = p > 0
    if polarity_split:
        weight = torch.ones_like(frac)
        c_off = torch.where(on, 0, bins)  # OFF bins follow the ON bins
    else:
        weight = torch.where(on, 1.0, float(off_weight)).float()
        c_off = torch.zeros_like(lo)
    keep_xy = _in_sensor(x, y, height, width)
    out = torch.zeros(B, C, height, width, dtype=torch.float32, device=t.device)
    for k, w_k in ((0, 1.0 - frac), (1, frac)):  # the two time neighbours floor and floor + 1
        tb = lo + k
        _scatter(out.shape, bi, tb + c_off, y, x, weight * w_k, keep_xy & (tb < bins), out)
    if normalize == "nonzero_std":
        out = normalize_nonzero_std(out)
    return out


def normalize_nonzero_std(v: Tensor) -> Tensor:
    """Per sample (dim 0): non-zero cells -> ``(v - mean) / std`` over the non-zero cells (population std);
    zero cells stay 0; std 0 -> only the mean is subtracted; an all-zero sample is unchanged."""
    flat = v.reshape(v.shape[0], -1)
    nz = flat != 0
    n = nz.sum(1, keepdim=True).clamp(min=1).to(flat.dtype)
    mean = flat.sum(1, keepdim=True) / n  # zeros add nothing to the sum
    var = (torch.where(nz, flat - mean, 0) ** 2).sum(1, keepdim=True) / n  # two-pass: no cancellation
    std = var.sqrt()
    scaled = (flat - mean) / torch.where(std > 0, std, torch.ones_like(std))
    return torch.where(nz, scaled, 0).view_as(v)


def time_flip_voxel(v: Tensor, which: Tensor | None = None, *, polarity_split: bool = False) -> Tensor:
    """The voxel grid of the time-flipped events (``t' = t_last - t``, ``p' = -p``) from the grid itself:
    bins reversed and, without split, negated (exact for ``off_weight=-1``); with split, the ON and OFF
    stacks swap. ``which`` (bool, B) flips only those samples (default all). Exact for samples with a
    positive time span; a single-event / zero-span sample has its events in bin 0 both ways."""
    if polarity_split:
        bins = v.shape[1] // 2
        flipped = torch.cat([v[:, bins:].flip(1), v[:, :bins].flip(1)], 1)
    else:
        flipped = -v.flip(1)
    if which is None:
        return flipped
    return torch.where(which.to(v.device).view(-1, 1, 1, 1), flipped, v)


# ------------------------------------------------------------------------------------------- histograms
def histogram(batch: dict, *, height: int, width: int, normalize: str | None = None) -> Tensor:
    """Event counts ``(B, 2, H, W)``: ON events in channel 0, OFF events in channel 1. ``normalize="max"``
    divides each sample by its largest count (an empty sample stays zero)."""
    if normalize not in (None, "max"):
        raise ValueError(f"normalize must be None or 'max', got {normalize!r}")
    x, y, t, p, bi, _ = _columns(batch)
    c = (p < 0).long()  # 0 = ON, 1 = OFF
    out = _scatter((_num_samples(batch), 2, height, width), bi, c, y, x, None, _in_sensor(x, y, height, width))
    if normalize == "max":
        m = out.amax(dim=(1, 2, 3), keepdim=True)
        out = out / torch.where(m > 0, m, torch.ones_like(m))
    return out


def stacked_histograms(batch: dict, *, chunks: int, events_per_chunk: int, height: int, width: int,
                       neg_first: bool = False, wrap_negative_rows: bool = False) -> Tensor:
    """ECDDP's DSEC input: ``(B, 2 * chunks, H, W)``, chunk ``j`` in channels ``2j, 2j + 1`` (oldest first).

    Per sample, the last ``n = min(count, chunks * events_per_chunk)`` events are loaded and split into
    ``chunks`` consecutive chunks of ``k = n // chunks`` events: chunk ``j`` is loaded events
    ``[j * k, (j + 1) * k)``. When the sample is shorter than ``chunks * events_per_chunk`` this is ECDDP's
    rule (``nr_events_loaded // nr_events_data``): the ``n % chunks`` newest events fall in no chunk, and a
    sample with fewer than ``chunks`` events is all zeros. Each chunk is a 2-channel count histogram, ON then
    OFF; ``neg_first=True`` gives ECDDP's ``generate_event_histogram`` order (OFF, ON). Events outside the
    sensor are dropped after the chunks are formed (they count towards ``n``, as in the public loader when
    the coordinates come from an in-loader rectification, :mod:`evforge.finetune.rectify`).

    ``wrap_negative_rows=True`` reproduces a quirk of the public ``generate_event_histogram``
    (data/seg_utils.py:324): its bounds check reads ``height >= 0`` where ``y >= 0`` was meant, so an event
    with ``-H <= y < 0`` (and x on the sensor) reaches ``np.add.at`` with the negative flat index
    ``x + W * y``, which numpy wraps to row ``H + y``. Rows below ``-H`` (an IndexError there) are dropped.
    """
    if chunks < 1 or events_per_chunk < 1:
        raise ValueError(f"chunks and events_per_chunk must be >= 1, got {chunks}, {events_per_chunk}")
    x, y, t, p, bi, offsets = _columns(batch)
    counts = offsets[1:] - offsets[:-1]
    n_used = counts.clamp(max=chunks * events_per_chunk)
    k = n_used // chunks  # events per chunk of each sample (events_per_chunk unless the sample is short)
    start = offsets[1:] - n_used  # index of the first loaded event of each sample
    j = torch.arange(t.shape[0], device=t.device) - start[bi]  # position within the loaded window
    k_e = k[bi]
    if wrap_negative_rows:
        y = torch.where((y < 0) & (y >= -height), y + height, y)
    keep = (j >= 0) & (j < chunks * k_e) & _in_sensor(x, y, height, width)
    chunk = torch.div(j.clamp(min=0), k_e.clamp(min=1), rounding_mode="floor")
    c = 2 * chunk + ((p > 0) if neg_first else (p < 0)).long()
    return _scatter((_num_samples(batch), 2 * chunks, height, width), bi, c, y, x, None, keep)


# -------------------------------------------------------------------------------------------------- MEM
def mem_counts(batch: dict, *, height: int, width: int, wrap_uint8: bool = False) -> Tensor:
    """MEM's 3-channel count image ``(B, 3, H, W)``: (ON count, zeros, OFF count), as ``EventArrToImg``
    (``mem/datasets.py:566-595``) builds it: events with ``p > 0`` count as ON, ``p < 0`` as OFF and ``p == 0``
    in neither (MEM counts ``p == 1`` and ``p == -1`` only; its N-Cars files store OFF as 0, see
    :mod:`evforge.pretrain.mem.inputs`). MEM counts into ``uint8``, so a pixel with 256 events reads 0:
    ``wrap_uint8=True`` reproduces that (counts mod 256); the default keeps exact counts."""
    x, y, t, p, bi, _ = _columns(batch)
    B = _num_samples(batch)
    keep = _in_sensor(x, y, height, width) & (p != 0)
    c = torch.where(p < 0, 2, 0)  # channel 1 is MEM's (unused) time-surface slot
    counts = _scatter((B, 3, height, width), bi, c, y, x, None, keep)
    return torch.remainder(counts, 256) if wrap_uint8 else counts


def mem_image(batch: dict, *, height: int, width: int, hot_pixel_std: float | None = 10.0,
              normalize: bool = True, wrap_uint8: bool = False) -> Tensor:
    """MEM's event image at the sensor size, ``(B, 3, H, W)``: :func:`mem_counts`, then
    :func:`remove_hot_pixels` (``hot_pixel_std`` std, None to skip) and :func:`normalize_max` (``normalize``),
    as ``mem/datasets.py:635-653`` without the resize (and without MEM's ``ToTensor`` division by 255, which
    the max normalisation cancels). MEM resizes before the two filters:
    :func:`evforge.pretrain.mem.inputs.mem_inputs` is the whole pipeline (canvas, resize, augmentations) that
    MEM's pretraining and finetuning share."""
    img = mem_counts(batch, height=height, width=width, wrap_uint8=wrap_uint8)
    if hot_pixel_std is not None:
        img = remove_hot_pixels(img, hot_pixel_std)
    if normalize:
        img = normalize_max(img)
    return img


def remove_hot_pixels(img: Tensor, num_stds: float = 10.0) -> Tensor:
    """MEM's hot-pixel filter on ``(B, 3, H, W)`` images (polarity channels 0 and 2), per sample.

    As MEM's ``RemoveHotPixels`` (``mem/transforms.py:249-275``): the threshold is ``mean + num_stds * std``
    over all ``2 * H * W`` values of the two polarity channels (zeros included, unbiased std as ``torch.std``);
    a pixel is hot when either polarity value exceeds it, and then both polarity channels are zeroed there.
    """
    pol = img[:, 0::2]
    flat = pol.reshape(pol.shape[0], -1)
    thr = flat.mean(1) + num_stds * flat.std(1)  # torch.std: unbiased, like MEM's
    hot = (pol > thr.view(-1, 1, 1, 1)).any(1, keepdim=True)  # (B, 1, H, W)
    # channel 1 (MEM's time-surface slot) is left alone
    return img.masked_fill(torch.cat([hot, torch.zeros_like(hot), hot], 1), 0)


def normalize_max(img: Tensor) -> Tensor:
    """MEM's ``NormalizeEvent`` (``mem/transforms.py:225-237``): per sample, the polarity channels (0 and 2)
    times ``1 / max`` of both (one factor; multiplying by the float32 reciprocal, as MEM does, not dividing,
    so results match to the bit); an all-zero sample is unchanged."""
    m = img[:, 0::2].amax(dim=(1, 2, 3), keepdim=True)
    out = img.clone()
    out[:, 0::2] = img[:, 0::2] * torch.where(m > 0, 1.0 / m, torch.ones_like(m))
    return out


# --------------------------------------------------------------------------------------------- registry
REPRESENTATIONS = Registry("representation", {
    "voxel_grid": voxel_grid,
    "histogram": histogram,
    "stacked_histograms": stacked_histograms,
    "mem_image": mem_image,
})


def represent(batch, name: str, *, height: int, width: int, **options) -> Tensor:
    """Representation ``name`` of a packed batch, from a config section: ``options`` may hold other
    representations' settings too (a task's one ``representation`` section); only the keyword arguments
    that ``name``'s function takes are passed, and a missing required one is a ValueError naming it."""
    fn = REPRESENTATIONS.get(name)
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in options.items() if k in params and k not in ("batch", "height", "width")}
    missing = [k for k, q in params.items() if q.kind is q.KEYWORD_ONLY and q.default is q.empty
               and k not in kwargs and k not in ("height", "width")]
    if missing:
        raise ValueError(f"representation {name!r} needs the option(s) {missing}")
    return fn(batch, height=height, width=width, **kwargs)


def channels(name: str, **options) -> int:
    """Channels of representation ``name`` with ``options`` (read off a 1x1 representation of one empty
    sample, so a new representation needs no channel rule of its own)."""
    z = torch.zeros(0, dtype=torch.int64)
    empty = {"x": z, "y": z, "t": z, "p": z.to(torch.int8), "batch_index": z,
             "offsets": torch.zeros(2, dtype=torch.int64)}
    return int(represent(empty, name, height=1, width=1, **options).shape[1])
