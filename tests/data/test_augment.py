"""Event-space and tensor-space augmentations on packed batches: invariants, numpy references, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evforge.data.augment import (
    crop_events,
    crop_grid,
    crop_resize,
    flip_grid_x,
    flip_tensor_x,
    flip_x,
    flip_y,
    grid_to_pixels,
    random_resized_crop_params,
    random_window,
    select_events,
    shift,
    time_flip,
)
from evforge.data.collate import unpack
from evforge.data.representations import histogram, time_flip_voxel, voxel_grid

H, W = 12, 16
EVENT_DEFAULTS = dict(height=H, width=W, t0=5_000_000, t_step=5_000_000)  # tests/conftest.py: event_factory
EVENT_KEYS = ("x", "y", "t", "p", "batch_index")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def assert_consistent(batch):
    """The packed invariants: offsets from batch_index, samples contiguous, t relative to the first event."""
    B = len(batch["offsets"]) - 1
    bi = batch["batch_index"]
    counts = torch.bincount(bi, minlength=B)
    assert batch["offsets"][0] == 0 and torch.equal(batch["offsets"][1:], torch.cumsum(counts, 0))
    assert bool((bi[1:] >= bi[:-1]).all())
    for k in EVENT_KEYS:
        assert len(batch[k]) == len(bi)
    for b in range(B):
        a, z = int(batch["offsets"][b]), int(batch["offsets"][b + 1])
        if z > a:
            t = batch["t"][a:z]
            assert t[0] == 0 and bool((t[1:] >= t[:-1]).all())


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in EVENT_KEYS + ("offsets", "t0"))


# --------------------------------------------------------------------------------------------- flips
def test_flips_are_involutions_and_mirror_the_histogram(event_factory):
    batch, _ = event_factory.batch()
    which = torch.tensor([True, False, True, True])
    fx = flip_x(batch, W, which=which)
    assert same(flip_x(fx, W, which=which), batch)
    fy = flip_y(batch, H, which=which)
    assert same(flip_y(fy, H, which=which), batch)
    h, hx, hy = (histogram(b, height=H, width=W) for b in (batch, fx, fy))
    torch.testing.assert_close(hx[0], h[0].flip(-1))
    torch.testing.assert_close(hy[3], h[3].flip(-2))
    torch.testing.assert_close(hx[1:2], h[1:2])  # not chosen: untouched
    assert fx["x"].dtype == batch["x"].dtype and batch["x"] is not fx["x"]


def test_random_draws_are_per_sample_and_seeded(event_factory):
    batch, _ = event_factory.batch(lengths=(5,) * 64)
    a, b = flip_x(batch, W, generator=gen(1)), flip_x(batch, W, generator=gen(1))
    assert same(a, b)
    flipped = (a["x"] != batch["x"]).view(64, 5).any(1)
    assert 10 < int(flipped.sum()) < 54  # each sample its own draw
    assert not same(a, flip_x(batch, W, generator=gen(2)))
    assert same(flip_x(batch, W, p=0.0, generator=gen(1)), batch)


def test_time_flip_reverses_order_and_polarity(event_factory):
    batch, samples = event_factory.batch()
    which = torch.tensor([True, True, True, False])
    out = time_flip(batch, which=which)
    assert_consistent(out)
    for b, ev in enumerate(samples):
        got = unpack(out, b)
        if not which[b]:
            np.testing.assert_array_equal(got, ev)
            continue
        if len(ev) == 0:
            assert len(got) == 0
            continue
        rev = ev[::-1]
        t0 = int(batch["t0"][b])
        np.testing.assert_array_equal(got["x"], rev["x"])
        np.testing.assert_array_equal(got["p"], -rev["p"])
        np.testing.assert_array_equal(got["t"] - t0, ev["t"][-1] - rev["t"])  # t' = t_last - t
    assert same(time_flip(out, which=which), batch)  # an involution


def test_time_flip_matches_voxel_bin_reversal(event_factory):
    """Exact for samples with a positive time span (a single event sits in bin 0 either way)."""
    batch, _ = event_factory.batch(lengths=(120, 0, 2, 45), seed=3)
    which = torch.tensor([True, False, True, True])
    v_events = voxel_grid(time_flip(batch, which=which), bins=5, height=H, width=W)
    v_tensor = time_flip_voxel(voxel_grid(batch, bins=5, height=H, width=W), which)
    torch.testing.assert_close(v_events, v_tensor, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ dropping events
def test_shift_drops_out_of_sensor_events_and_keeps_offsets(event_factory):
    batch, samples = event_factory.batch()
    shifts = torch.tensor([[3, -2], [1, 1], [-16, 0], [-4, 5]])
    out = shift(batch, 8, H, W, shifts=shifts)
    assert_consistent(out)
    for b, ev in enumerate(samples):
        x, y = ev["x"].astype(int) + int(shifts[b, 0]), ev["y"].astype(int) + int(shifts[b, 1])
        ok = (x >= 0) & (x < W) & (y >= 0) & (y < H)
        got = unpack(out, b)
        np.testing.assert_array_equal(got["x"], x[ok])
        np.testing.assert_array_equal(got["y"], y[ok])
        np.testing.assert_array_equal(got["t"], ev["t"][ok])  # t + t0 still the absolute time
        np.testing.assert_array_equal(got["p"], ev["p"][ok])
    assert int(out["offsets"][3]) - int(out["offsets"][2]) == 0  # a 1-event sample shifted off the sensor
    assert len(out["t"]) < len(batch["t"])
    assert out["key"] == batch["key"] and torch.equal(out["label"], batch["label"])


def test_shift_random_is_bounded_and_seeded(event_factory):
    batch, _ = event_factory.batch()
    a, b = shift(batch, 2, H, W, generator=gen(5)), shift(batch, 2, H, W, generator=gen(5))
    assert same(a, b)
    assert (a["x"] >= 0).all() and (a["x"] < W).all() and (a["y"] >= 0).all() and (a["y"] < H).all()
    assert len(a["t"]) >= len(batch["t"]) - 4 * 2 * (H + W) * 4  # at most 2 rows/cols per side lost


def test_random_window_is_contiguous_and_bounded(event_factory):
    batch, samples = event_factory.batch(lengths=(120, 0, 1, 45, 30))
    n_max = 30
    for seed in range(5):
        out = random_window(batch, n_max, generator=gen(seed))
        assert_consistent(out)
        assert same(out, random_window(batch, n_max, generator=gen(seed)))
        for b, ev in enumerate(samples):
            got = unpack(out, b)
            assert len(got) == min(len(ev), n_max)
            if len(got):
                s = int(np.flatnonzero((ev["t"] == got["t"][0]) & (ev["x"] == got["x"][0]))[0])
                np.testing.assert_array_equal(got, ev[s:s + len(got)])  # one contiguous slice
    starts = torch.tensor([90, 0, 0, 15, 0])
    out = random_window(batch, n_max, starts=starts)
    np.testing.assert_array_equal(unpack(out, 0), samples[0][90:120])
    np.testing.assert_array_equal(unpack(out, 3), samples[3][15:45])
    firsts = {int(random_window(batch, n_max, generator=gen(s))["t0"][0]) for s in range(40)}
    assert len(firsts) > 10  # the start varies


def test_crop_events_moves_to_the_crop_frame(event_factory):
    batch, samples = event_factory.batch()
    boxes = torch.tensor([[2, 3, 10, 9], [0, 0, W, H], [0, 0, 1, 1], [5, 0, W, 4]])
    out = crop_events(batch, boxes)
    assert_consistent(out)
    for b, ev in enumerate(samples):
        x0, y0, x1, y1 = boxes[b].tolist()
        ok = (ev["x"] >= x0) & (ev["x"] < x1) & (ev["y"] >= y0) & (ev["y"] < y1)
        got = unpack(out, b)
        np.testing.assert_array_equal(got["x"], ev["x"][ok] - x0)
        np.testing.assert_array_equal(got["y"], ev["y"][ok] - y0)
        np.testing.assert_array_equal(got["t"], ev["t"][ok])
    h = histogram(out, height=6, width=8)
    torch.testing.assert_close(h[0], histogram(batch, height=H, width=W)[0, :, 3:9, 2:10])


def test_select_events_without_rebase_keeps_t(event_factory):
    batch, _ = event_factory.batch()
    keep = batch["t"] > 50_000
    out = select_events(batch, keep, rebase_time=False)
    assert torch.equal(out["t"], batch["t"][keep]) and torch.equal(out["t0"], batch["t0"])


# ------------------------------------------------------------------------------------------ tensor space
def test_crop_grid_maps_corners_and_pixels():
    img = torch.arange(2 * 3 * H * W, dtype=torch.float32).view(2, 3, H, W)
    boxes = torch.tensor([[0, 0, W, H], [3, 2, 11, 8]])
    full, grid = crop_resize(img[:1], boxes[:1], (H, W))
    torch.testing.assert_close(full, img[:1])  # the whole image at its own size: identity
    crop, grid = crop_resize(img, boxes, (6, 8))
    torch.testing.assert_close(crop[1], img[1, :, 2:8, 3:11])  # same-size crop: exact pixels
    px = grid_to_pixels(grid, H, W)
    torch.testing.assert_close(px[1, 0, 0], torch.tensor([3.0, 2.0]))  # corner pixels
    torch.testing.assert_close(px[1, -1, -1], torch.tensor([10.0, 7.0]))
    # downscaled 2x: output pixel centres fall between source pixels 2j, 2j+1
    g = crop_grid(torch.tensor([[0, 0, W, H]]), (H // 2, W // 2), H, W)
    p = grid_to_pixels(g, H, W)
    torch.testing.assert_close(p[0, 0, 0], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(p[0, -1, -1], torch.tensor([W - 1.5, H - 1.5]))


def test_masks_follow_crops_and_flips():
    src = torch.rand(3, 2, H, W, generator=gen(0))
    mask = (torch.rand(3, 1, H, W, generator=gen(1)) > 0.5).float()
    boxes = torch.tensor([[1, 1, 9, 7], [4, 2, 12, 8], [0, 6, 8, 12]])
    crops, grid = crop_resize(src, boxes, (6, 8))
    m = F.grid_sample(mask, grid, mode="nearest", align_corners=False)
    for b in range(3):
        x0, y0, x1, y1 = boxes[b].tolist()
        torch.testing.assert_close(m[b], mask[b, :, y0:y1, x0:x1])
    which = torch.tensor([True, False, True])
    flipped, w = flip_tensor_x(crops, which=which)
    assert torch.equal(w, which)
    torch.testing.assert_close(F.grid_sample(src, flip_grid_x(grid, which), align_corners=False), flipped)
    torch.testing.assert_close(flipped[0], crops[0].flip(-1))
    torch.testing.assert_close(flipped[1], crops[1])


def test_random_resized_crop_params():
    b1 = random_resized_crop_params(256, 48, 64, scale=(0.05, 0.32), generator=gen(4))
    assert torch.equal(b1, random_resized_crop_params(256, 48, 64, scale=(0.05, 0.32), generator=gen(4)))
    w, h = b1[:, 2] - b1[:, 0], b1[:, 3] - b1[:, 1]
    assert (b1[:, 0] >= 0).all() and (b1[:, 1] >= 0).all() and (b1[:, 2] <= 64).all() and (b1[:, 3] <= 48).all()
    area = (w * h).double() / (48 * 64)
    assert (area > 0.03).all() and (area < 0.36).all()  # scale range, up to rounding
    ar = (w.double() / h.double())
    assert (ar > 0.6).all() and (ar < 1.5).all()
    assert len(set(b1[:, 0].tolist())) > 5  # positions vary
    full = random_resized_crop_params(4, 48, 64, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), generator=gen(0))
    assert (full == torch.tensor([0, 0, 64, 48])).all()
    # nothing fits (area above the image): central fallback with the ratio clamped
    fb = random_resized_crop_params(3, 20, 80, scale=(2.0, 2.0), generator=gen(0))
    assert (fb == torch.tensor([(80 - 27) // 2, 0, (80 - 27) // 2 + 27, 20])).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: CUDA == CPU not checked")
def test_cuda_matches_cpu(event_factory):
    batch, _ = event_factory.batch(lengths=(300, 0, 1, 80))
    cuda = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in batch.items()}
    for fn, args in [(flip_x, (W,)), (time_flip, ()), (shift, (3, H, W)), (random_window, (50,))]:
        a, b = fn(batch, *args, generator=gen(7)), fn(cuda, *args, generator=gen(7))
        assert b["t"].is_cuda
        for k in EVENT_KEYS + ("offsets", "t0"):
            assert torch.equal(a[k], b[k].cpu()), (fn.__name__, k)
    boxes = random_resized_crop_params(4, H, W, generator=gen(0))
    img = torch.rand(4, 3, H, W, generator=gen(1))
    a, _ = crop_resize(img, boxes, (8, 8))
    b, _ = crop_resize(img.cuda(), boxes.cuda(), (8, 8))
    torch.testing.assert_close(b.cpu(), a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(crop_events(cuda, boxes)["x"].cpu(), crop_events(batch, boxes)["x"])


def test_crop_windows_gathers_each_samples_window_exactly():
    """Per-sample integer windows equal plain slicing (ECDDP's square crop, MEM's crop after the resize)."""
    from evforge.data.augment import crop_windows

    x = torch.arange(3 * 2 * 7 * 9, dtype=torch.float32).reshape(3, 2, 7, 9)
    tl = torch.tensor([[0, 0], [2, 5], [4, 1]])
    out = crop_windows(x, tl, (3, 4))
    assert out.shape == (3, 2, 3, 4)
    for b, (r, c) in enumerate(tl.tolist()):
        assert torch.equal(out[b], x[b, :, r:r + 3, c:c + 4])
