"""Device representations against direct numpy references (loops over events), plus the MEM / ECDDP rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evforge.data.collate import collate_events
from evforge.data.representations import (
    histogram,
    mem_image,
    normalize_max,
    remove_hot_pixels,
    stacked_histograms,
    time_flip_voxel,
    voxel_grid,
)
from evforge.formats.events import make_events

H, W = 12, 16
EVENT_DEFAULTS = dict(height=H, width=W, margin=3, t_max=200_000, t0=1_000_000, tie=True)  # tests/conftest.py
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: CUDA == CPU not checked")


BATCHES = [(137, 0, 1), (1, 311, 0), (0, 2, 57)]  # B=3: an empty and a single-event sample in each


# ------------------------------------------------------------------------------------ numpy references
def ref_voxel(samples, bins, *, split=False, off_weight=-1.0, height=H, width=W):
    out = np.zeros((len(samples), 2 * bins if split else bins, height, width), np.float64)
    for b, ev in enumerate(samples):
        if len(ev) == 0:
            continue
        t = ev["t"].astype(np.float64)
        span = t[-1] - t[0]
        for e in ev:
            x, y, p = int(e["x"]), int(e["y"]), int(e["p"])
            if not (x < width and y < height):
                continue
            tn = (bins - 1) * (float(e["t"]) - t[0]) / span if span > 0 else 0.0
            lo = int(np.floor(tn))
            fr = tn - lo
            if split:
                c, w = lo + (0 if p > 0 else bins), 1.0
            else:
                c, w = lo, (1.0 if p > 0 else off_weight)
            out[b, c, y, x] += w * (1 - fr)
            if lo + 1 < bins:
                out[b, c + 1, y, x] += w * fr
    return out


def ref_nonzero_std(v):
    v = v.copy()
    for b in range(len(v)):
        m = v[b] != 0
        if m.any():
            mean, std = v[b][m].mean(), v[b][m].std()
            v[b][m] = (v[b][m] - mean) / std if std > 0 else v[b][m] - mean
    return v


def ref_histogram(samples, height=H, width=W):
    out = np.zeros((len(samples), 2, height, width))
    for b, ev in enumerate(samples):
        for e in ev:
            if e["x"] < width and e["y"] < height:
                out[b, 0 if e["p"] > 0 else 1, e["y"], e["x"]] += 1
    return out


def ref_mem(ev, height, width, num_stds=10.0, wrap=False, hot=True, normalize=True):
    """MEM's code path (EventArrToImg -> RemoveHotPixels -> NormalizeEvent), literally, for one sample."""
    ev = ev[(ev["x"] < width) & (ev["y"] < height)]
    xs, ys, ps = ev["x"].astype(np.int64), ev["y"].astype(np.int64), ev["p"]
    dtype = np.uint8 if wrap else np.int64
    img_pos, img_neg = np.zeros(height * width, dtype), np.zeros(height * width, dtype)
    np.add.at(img_pos, xs[ps == 1] + width * ys[ps == 1], 1)
    np.add.at(img_neg, xs[ps == -1] + width * ys[ps == -1], 1)
    x = np.stack([img_pos, np.zeros(height * width, dtype), img_neg]).reshape(3, height, width).astype(np.float64)
    if hot:
        flat = x[0::2].flatten()
        thr = x[0::2].mean() + num_stds * x[0::2].std(ddof=1)  # torch.std: unbiased
        inds = np.flatnonzero(flat > thr)
        c, yy, xx = np.unravel_index(inds, x.shape)  # MEM unravels (2HW) indices with the (3, H, W) shape
        x[0::2, yy, xx] = 0
    if normalize and x[0::2].max() != 0:
        x[0::2] = x[0::2] / x[0::2].max()
    return x


def ref_stacked(samples, chunks, per_chunk, height=H, width=W, neg_first=False):
    out = np.zeros((len(samples), 2 * chunks, height, width))
    for b, ev in enumerate(samples):
        loaded = ev[max(0, len(ev) - chunks * per_chunk):]
        k = len(loaded) // chunks
        for j in range(chunks):
            for e in loaded[j * k:(j + 1) * k]:
                if e["x"] < width and e["y"] < height:
                    c = int(e["p"] > 0) if neg_first else int(e["p"] < 0)
                    out[b, 2 * j + c, e["y"], e["x"]] += 1
    return out


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("lengths", BATCHES)
@pytest.mark.parametrize("split", [False, True])
def test_voxel_grid_matches_numpy(lengths, split, event_factory):
    batch, samples = event_factory.batch(lengths, seed=sum(lengths))
    got = voxel_grid(batch, bins=5, height=H, width=W, polarity_split=split)
    assert got.shape == (3, 10 if split else 5, H, W) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ref_voxel(samples, 5, split=split), atol=1e-5)


def test_voxel_grid_single_bin_and_single_event(event_factory):
    batch, samples = event_factory.batch((1, 40, 0), seed=3)
    np.testing.assert_allclose(voxel_grid(batch, bins=1, height=H, width=W).numpy(), ref_voxel(samples, 1),
                               atol=1e-5)
    # the single-event sample: all of its weight in bin 0
    ev = samples[0][0]
    v = voxel_grid(batch, bins=4, height=H, width=W + 3, off_weight=-1.0)
    assert v[0].abs().sum() == 1 and v[0, 0, ev["y"], ev["x"]] == ev["p"]


def test_voxel_grid_ecddp_quirk_off_weight_zero(event_factory):
    """off_weight=0 (ECDDP's p in {0, 1} quirk) == the ON stack of the split grid; default -1 == ON - OFF."""
    batch, samples = event_factory.batch((200, 1, 0), seed=5)
    quirk = voxel_grid(batch, bins=6, height=H, width=W, off_weight=0.0)
    split = voxel_grid(batch, bins=6, height=H, width=W, polarity_split=True)
    signed = voxel_grid(batch, bins=6, height=H, width=W)
    np.testing.assert_allclose(quirk.numpy(), ref_voxel(samples, 6, off_weight=0.0), atol=1e-5)
    torch.testing.assert_close(quirk, split[:, :6])
    torch.testing.assert_close(signed, split[:, :6] - split[:, 6:], atol=1e-5, rtol=0)
    assert (quirk >= 0).all() and (signed < 0).any()


def test_voxel_grid_nonzero_std_normalisation(event_factory):
    batch, samples = event_factory.batch((150, 0, 1), seed=7)
    got = voxel_grid(batch, bins=3, height=H, width=W, polarity_split=True, normalize="nonzero_std")
    want = ref_nonzero_std(ref_voxel(samples, 3, split=True))
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    nz = got[0][got[0] != 0]
    assert abs(float(nz.mean())) < 1e-5 and abs(float(nz.std(correction=0)) - 1) < 1e-5
    assert got[1].abs().sum() == 0  # empty sample stays zero
    assert got[2].abs().sum() == 0  # one non-zero cell: std 0 -> value - mean = 0
    with pytest.raises(ValueError):
        voxel_grid(batch, bins=3, height=H, width=W, normalize="minmax")


def test_time_flip_voxel_matches_reversed_bins(event_factory):
    batch, _ = event_factory.batch((90, 0, 30), seed=11)
    v = voxel_grid(batch, bins=4, height=H, width=W)
    which = torch.tensor([True, True, False])
    out = time_flip_voxel(v, which)
    torch.testing.assert_close(out[0], -v[0].flip(0))
    torch.testing.assert_close(out[2], v[2])
    vs = voxel_grid(batch, bins=4, height=H, width=W, polarity_split=True)
    fs = time_flip_voxel(vs, polarity_split=True)
    torch.testing.assert_close(fs[:, :4], vs[:, 4:].flip(1))


@pytest.mark.parametrize("lengths", BATCHES)
def test_histogram_matches_numpy(lengths, event_factory):
    batch, samples = event_factory.batch(lengths, seed=1 + sum(lengths))
    got = histogram(batch, height=H, width=W)
    assert got.shape == (3, 2, H, W)
    np.testing.assert_array_equal(got.numpy(), ref_histogram(samples))


def test_out_of_sensor_events_are_dropped_not_wrapped(event_factory):
    batch, samples = event_factory.batch((60, 1, 0), seed=2, margin=0)
    moved = dict(batch, x=batch["x"] - 5, y=batch["y"] + 3)  # some negative x, some y >= H
    got = histogram(moved, height=H, width=W)
    ev = samples[0].copy()
    x, y = ev["x"].astype(int) - 5, ev["y"].astype(int) + 3
    ok = (x >= 0) & (y < H)
    assert got[0].sum() == ok.sum() and got[0].sum() < len(ev)
    want = np.zeros((2, H, W))
    np.add.at(want, ((ev["p"][ok] < 0).astype(int), y[ok], x[ok]), 1)
    np.testing.assert_array_equal(got[0].numpy(), want)
    v = voxel_grid(moved, bins=3, height=H, width=W, polarity_split=True)
    assert abs(float(v[0].sum()) - ok.sum()) < 1e-4


@pytest.mark.parametrize("lengths", BATCHES)
@pytest.mark.parametrize("wrap", [False, True])
def test_mem_image_matches_mem_code(lengths, wrap, event_factory):
    hh, ww = 10, 12  # 240 values: a single outlier can pass mean + 10 std
    rng = np.random.default_rng(sum(lengths))
    samples = []
    for n in lengths:
        ev = event_factory.sample(rng, n, height=hh, width=ww, margin=2)
        if n > 100:  # a hot pixel, with events of both polarities
            hot = make_events(np.full(300, 4), np.full(300, 6), np.full(300, ev["t"][-1]),
                              np.where(np.arange(300) < 290, 1, -1))
            ev = np.concatenate([ev, hot])
        samples.append(ev)
    batch = collate_events([{"events": e, "label": 0, "key": str(i)} for i, e in enumerate(samples)])
    got = mem_image(batch, height=hh, width=ww, wrap_uint8=wrap)
    assert got.shape == (3, 3, hh, ww)
    want = np.stack([ref_mem(e, hh, ww, wrap=wrap) for e in samples])
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    assert (got[:, 1] == 0).all()


def test_mem_hot_pixel_removal_and_normalisation_by_hand():
    hh = ww = 16  # 512 values
    xs = [5] * 500 + [5] * 2 + [1] * 3 + [7] * 4 + [0]
    ys = [3] * 500 + [3] * 2 + [1] * 3 + [2] * 4 + [0]
    ps = [1] * 500 + [-1] * 2 + [1] * 3 + [-1] * 4 + [1]
    ev = make_events(xs, ys, np.arange(len(xs)), ps)
    batch = collate_events([{"events": ev, "label": 0, "key": "a"}])
    img = mem_image(batch, height=hh, width=ww)[0]
    want = np.zeros((3, hh, ww), np.float32)
    want[0, 1, 1], want[0, 0, 0], want[2, 2, 7] = 3 / 4, 1 / 4, 1.0  # hot (3, 5) gone in both channels
    np.testing.assert_allclose(img.numpy(), want, atol=1e-7)
    raw = mem_image(batch, height=hh, width=ww, hot_pixel_std=None, normalize=False)[0]
    assert raw[0, 3, 5] == 500 and raw[2, 3, 5] == 2 and raw.sum() == len(xs)
    kept = remove_hot_pixels(raw[None], 10.0)[0]
    assert kept[0, 3, 5] == 0 and kept[2, 3, 5] == 0 and kept[2, 2, 7] == 4
    only_max = mem_image(batch, height=hh, width=ww, hot_pixel_std=None)[0]
    assert only_max.max() == 1 and abs(float(only_max[2, 2, 7]) - 4 / 500) < 1e-7
    zero = normalize_max(torch.zeros(1, 3, 2, 2))
    assert (zero == 0).all()


def test_mem_wrap_uint8():
    ev = make_events([2] * 257 + [1] * 3, [1] * 257 + [0] * 3, np.arange(260), [1] * 257 + [-1] * 3)
    batch = collate_events([{"events": ev, "label": 0, "key": "a"}])
    fixed = mem_image(batch, height=4, width=4, hot_pixel_std=None, normalize=False)[0]
    wrapped = mem_image(batch, height=4, width=4, hot_pixel_std=None, normalize=False, wrap_uint8=True)[0]
    assert fixed[0, 1, 2] == 257 and wrapped[0, 1, 2] == 1 and wrapped[2, 0, 1] == 3
    np.testing.assert_allclose(wrapped.numpy(), ref_mem(ev, 4, 4, wrap=True, hot=False, normalize=False))


@pytest.mark.parametrize("lengths", [(137, 0, 1), (1, 311, 0), (7, 23, 40)])
@pytest.mark.parametrize("neg_first", [False, True])
def test_stacked_histograms_match_numpy(lengths, neg_first, event_factory):
    batch, samples = event_factory.batch(lengths, seed=4 + sum(lengths))
    got = stacked_histograms(batch, chunks=4, events_per_chunk=10, height=H, width=W, neg_first=neg_first)
    assert got.shape == (3, 8, H, W)
    np.testing.assert_array_equal(got.numpy(), ref_stacked(samples, 4, 10, neg_first=neg_first))


def test_stacked_histograms_chunk_boundaries_exact():
    """Each event at its own pixel: every chunk holds exactly its events, oldest chunk first."""
    n, chunks, per = 50, 3, 12  # the last 36 events: indices 14..49, chunks [14,26), [26,38), [38,50)
    idx = np.arange(n)
    ev = make_events(idx % W, idx // W, idx * 10, np.where(idx % 2 == 0, 1, -1))
    short = ev[:8]  # 8 events: k = 2, chunks [0,2), [2,4), [4,6); events 6, 7 in no chunk
    batch = collate_events([{"events": e, "label": 0, "key": str(i)} for i, e in enumerate([ev, short])])
    got = stacked_histograms(batch, chunks=chunks, events_per_chunk=per, height=H, width=W)
    for b, (sizes_start, k) in enumerate([(14, 12), (0, 2)]):
        for j in range(chunks):
            chunk = got[b, 2 * j:2 * j + 2].sum(0)
            members = set(np.flatnonzero(chunk.flatten().numpy()))
            assert members == set(range(sizes_start + j * k, sizes_start + (j + 1) * k)), (b, j)
    assert got[1].sum() == 6


@needs_cuda
def test_cuda_matches_cpu(event_factory):
    batch, _ = event_factory.batch((500, 0, 1), seed=9)
    cuda = {k: (v.cuda() if torch.is_tensor(v) and k != "offsets" else v) for k, v in batch.items()}
    for fn, kw in [(voxel_grid, dict(bins=5)), (voxel_grid, dict(bins=5, polarity_split=True,
                                                                 normalize="nonzero_std")),
                   (histogram, {}), (mem_image, {}), (mem_image, dict(wrap_uint8=True)),
                   (stacked_histograms, dict(chunks=3, events_per_chunk=40))]:
        a, b = fn(batch, height=H, width=W, **kw), fn(cuda, height=H, width=W, **kw)
        assert b.is_cuda
        torch.testing.assert_close(b.cpu(), a, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- registry
def test_registry_representations_by_name_equal_the_functions_and_know_their_channels(event_factory):
    from evforge.data.representations import REPRESENTATIONS, channels, represent

    batch, _ = event_factory.batch((137, 0, 9), seed=5)
    section = {"bins": 3, "polarity_split": True, "normalize": None, "hot_pixel_std": 10.0}  # one config section
    assert torch.equal(represent(batch, "voxel_grid", height=H, width=W, **section),
                       voxel_grid(batch, bins=3, polarity_split=True, height=H, width=W))
    plain = histogram(batch, height=H, width=W)
    assert torch.equal(represent(batch, "histogram", height=H, width=W, **section), plain)
    assert channels("voxel_grid", **section) == 6 and channels("histogram") == 2 and channels("mem_image") == 3
    assert channels("stacked_histograms", chunks=4, events_per_chunk=8) == 8
    with pytest.raises(ValueError, match=r"'stacked_histograms' needs the option\(s\) \['chunks', 'events_per_chunk"):
        represent(batch, "stacked_histograms", height=H, width=W)
    with pytest.raises(ValueError, match="unknown representation 'voxelgrid' \\(did you mean 'voxel_grid'\\?\\)"):
        represent(batch, "voxelgrid", height=H, width=W)
    # max-normalised histogram: each sample's largest count is 1, an empty sample stays zero
    h = represent(batch, "histogram", height=H, width=W, normalize="max")
    assert h[0].max() == 1 and h[1].abs().sum() == 0 and torch.allclose(h[0] * plain[0].max(), plain[0])
    # a new representation is one function and one registry line; a classification task then uses it
    def on_count(b, *, height, width, scale: float = 1.0):
        return histogram(b, height=height, width=width)[:, :1] * scale

    REPRESENTATIONS.register("on_count", on_count)
    try:
        from evforge.finetune.classification import ClassificationTask

        task = ClassificationTask()
        o = task.options({"task": {"name": "classification", "representation": {"name": "on_count"}}})
        assert task.in_chans(o) == 1
        assert torch.equal(task.represent(batch, o["representation"], H, W), plain[:, :1])
    finally:
        REPRESENTATIONS._entries.pop("on_count")
