"""Frame preparation (evforge.simulator.resample) and output-size parsing (params.parse_resolution)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from near import assert_near

from evforge.simulator.params import RESOLUTIONS, parse_resolution
from evforge.simulator.resample import (
    LUMA_WEIGHTS,
    area_matrix,
    area_resize,
    prepare_frames,
    resize_flow,
    rgb_to_gray,
    to_tensor,
)

# ------------------------------------------------------------------------------------------ rgb_to_gray


def test_luma_weights_are_bt601():
    assert LUMA_WEIGHTS == (0.299, 0.587, 0.114)


@pytest.mark.parametrize(
    "rgb, expected",
    [
        ((255, 0, 0), 76.245),  # 0.299 * 255
        ((0, 255, 0), 149.685),  # 0.587 * 255
        ((0, 0, 255), 29.07),  # 0.114 * 255
        ((255, 255, 255), 255.0),
        ((10, 20, 30), 2.99 + 11.74 + 3.42),
        ((200, 100, 50), 59.8 + 58.7 + 5.7),
        ((0, 0, 0), 0.0),
    ],
)
def test_rgb_to_gray_hand_computed(rgb, expected):
    x = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1)
    y = rgb_to_gray(x)
    assert y.shape == (1, 1, 1, 1)
    assert float(y) == pytest.approx(expected, abs=1e-4)


def test_rgb_to_gray_per_pixel_and_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 4, 5), generator=g).float()
    y = rgb_to_gray(x)
    assert y.shape == (2, 1, 4, 5)
    ref = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert_near(y[:, 0], ref, rtol=0, atol=1e-4)


def test_rgb_to_gray_passes_gray_through_and_drops_alpha():
    gray = torch.rand(2, 1, 3, 4)
    assert rgb_to_gray(gray) is gray
    rgb = torch.rand(1, 3, 3, 4) * 255
    alpha = torch.full((1, 1, 3, 4), 17.0)
    assert_near(rgb_to_gray(torch.cat([rgb, alpha], 1)), rgb_to_gray(rgb), rtol=0, atol=0)


def test_cpu_luma_kernel_equals_rgb_to_gray_bit_for_bit():
    from evforge.simulator import cpu_frames

    if not cpu_frames.AVAILABLE:
        pytest.skip("numba not available")
    rng = np.random.default_rng(5)
    for channels in (3, 4):
        f = rng.integers(0, 256, (37, 53, channels), dtype=np.uint8)
        f[0, 0, :3], f[0, 1, :3] = 255, 0  # white and black
        got, got_u8 = cpu_frames.luma(f, want_u8=True)
        want = rgb_to_gray(torch.from_numpy(f).permute(2, 0, 1)[None].float())[0, 0]
        assert torch.equal(torch.from_numpy(got), want)
        assert torch.equal(torch.from_numpy(got_u8), want.round().clamp(0, 255).to(torch.uint8))
    frames = [rng.integers(0, 256, (8, 10, 3), dtype=np.uint8) for _ in range(2)]
    fast = prepare_frames(frames, (5, 4), "cpu")
    slow = area_resize(rgb_to_gray(to_tensor(frames, "cpu")), (5, 4))
    assert torch.equal(fast, slow)


def test_to_tensor_and_prepare_frames_from_uint8_rgb():
    # HxWx3 uint8 frames (as PIL gives) -> (B, 1, H, W) float luma at the requested size.
    f0 = np.zeros((4, 6, 3), np.uint8)
    f0[..., 0] = 255  # pure red
    f1 = np.zeros((4, 6, 3), np.uint8)
    f1[..., 1] = 100  # green
    x = to_tensor([f0, f1], "cpu")
    assert x.shape == (2, 3, 4, 6) and x.dtype == torch.float32
    y = prepare_frames([f0, f1], (3, 2), "cpu")
    assert y.shape == (2, 1, 2, 3)
    assert_near(y[0], torch.full((1, 2, 3), 76.245), rtol=0, atol=1e-4)
    assert_near(y[1], torch.full((1, 2, 3), 58.7), rtol=0, atol=1e-4)
    # Gray HxW input gets a channel axis; gray=False keeps all channels.
    assert to_tensor([np.zeros((4, 6), np.uint8)], "cpu").shape == (1, 1, 4, 6)
    assert prepare_frames([f0], None, "cpu", gray=False).shape == (1, 3, 4, 6)


# ------------------------------------------------------------------------------------------ area_resize


@pytest.mark.parametrize("kh, kw", [(2, 2), (4, 4), (3, 2), (1, 5)])
def test_integer_factor_equals_average_pooling(kh, kw):
    g = torch.Generator().manual_seed(1)
    h, w = 12 * kh, 10 * kw
    x = torch.rand(2, 3, h, w, generator=g) * 255
    y = area_resize(x, (w // kw, h // kh))
    ref = F.avg_pool2d(x, kernel_size=(kh, kw))
    assert y.shape == ref.shape == (2, 3, 12, 10)
    assert_near(y, ref, rtol=0, atol=1e-5 * 255)


def test_fractional_factor_preserves_constant_and_mean():
    x = torch.full((1, 1, 480, 640), 123.25)
    y = area_resize(x, (346, 260))
    assert y.shape == (1, 1, 260, 346)
    # Every output row of the area matrices sums to 1, so a constant stays constant (to float32 rounding).
    assert (y - 123.25).abs().max().item() <= 123.25 * 1e-6

    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 1, 480, 640, generator=g) * 255
    y = area_resize(x, (346, 260))
    # Each input cell contributes total weight n_out / n_in: the global mean is preserved exactly (in exact
    # arithmetic); float32 accumulation leaves a relative error far below 1e-4.
    rel = ((y.double().mean((-2, -1)) - x.double().mean((-2, -1))).abs() / x.double().mean((-2, -1))).max()
    assert rel.item() < 1e-4


def _brute_force_area(img: np.ndarray, w_out: int, h_out: int) -> np.ndarray:
    """Output cell (r, c) = average of the piecewise-constant image over its rectangle, computed with exact
    fractions from the overlap of the rectangle with every input pixel (independent of the module's code)."""
    h_in, w_in = img.shape
    sx, sy = Fraction(w_in, w_out), Fraction(h_in, h_out)

    def overlap(a0, a1, b0, b1):
        return max(Fraction(0), min(a1, b1) - max(a0, b0))

    out = np.zeros((h_out, w_out))
    for r in range(h_out):
        y0, y1 = r * sy, (r + 1) * sy
        for c in range(w_out):
            x0, x1 = c * sx, (c + 1) * sx
            acc = Fraction(0)
            for i in range(h_in):
                oy = overlap(y0, y1, Fraction(i), Fraction(i + 1))
                if oy == 0:
                    continue
                for j in range(w_in):
                    ox = overlap(x0, x1, Fraction(j), Fraction(j + 1))
                    acc += ox * oy * Fraction(float(img[i, j]))
            out[r, c] = float(acc / (sx * sy))
    return out


@pytest.mark.parametrize("w_in, h_in, w_out, h_out", [(7, 5, 3, 2), (10, 9, 4, 7), (5, 3, 5, 2), (3, 4, 7, 6)])
def test_fractional_factor_matches_brute_force_overlap_average(w_in, h_in, w_out, h_out):
    rng = np.random.default_rng(3)
    img = rng.uniform(0, 255, (h_in, w_in)).astype(np.float32)
    ref = _brute_force_area(img, w_out, h_out)
    y = area_resize(torch.from_numpy(img).view(1, 1, h_in, w_in), (w_out, h_out))[0, 0].double().numpy()
    assert y.shape == (h_out, w_out)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-4)


def test_area_matrix_rows_sum_to_one_and_cover_the_right_cells():
    m = area_matrix(7, 3, "cpu", torch.float64).numpy()
    assert m.shape == (3, 7)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)
    # First output cell covers [0, 7/3): cells 0 and 1 fully, 1/3 of cell 2.
    np.testing.assert_allclose(m[0], np.array([1, 1, 1 / 3, 0, 0, 0, 0]) * 3 / 7, atol=1e-12)


def test_identity_when_size_is_none_or_equal():
    x = torch.rand(1, 2, 6, 8)
    assert area_resize(x, None) is x
    assert area_resize(x, (8, 6)) is x
    assert area_resize(x, (6, 8)).shape == (1, 2, 8, 6)  # (W, H) order: not the identity


def test_area_resize_keeps_device_and_dtype():
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    y = area_resize(x, (4, 4))
    assert y.dtype == torch.float64 and y.device == x.device


# ------------------------------------------------------------------------------------------ resize_flow


@pytest.mark.parametrize("size", [(160, 120), (173, 130), (480, 360)])
def test_resize_flow_scales_vectors_by_size_ratio(size):
    flow = torch.empty(1, 2, 240, 320)
    flow[:, 0] = 3.0
    flow[:, 1] = -2.0
    out = resize_flow(flow, size)
    assert out.shape == (1, 2, size[1], size[0])
    assert_near(out[:, 0], torch.full_like(out[:, 0], 3.0 * size[0] / 320), rtol=1e-5, atol=1e-5)
    assert_near(out[:, 1], torch.full_like(out[:, 1], -2.0 * size[1] / 240), rtol=1e-5, atol=1e-5)


def test_resize_flow_area_averages_then_scales():
    g = torch.Generator().manual_seed(4)
    flow = torch.randn(2, 2, 12, 16, generator=g)
    out = resize_flow(flow, (8, 4))  # x by 1/2, y by 1/3
    ref = F.avg_pool2d(flow, (3, 2)) * torch.tensor([0.5, 1 / 3]).view(1, 2, 1, 1)
    assert_near(out, ref, rtol=0, atol=1e-5)


def test_resize_flow_identity():
    flow = torch.randn(1, 2, 5, 7)
    assert resize_flow(flow, None) is flow
    assert_near(resize_flow(flow, (7, 5)), flow, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ parse_resolution


def test_parse_resolution_native():
    assert parse_resolution(None) is None
    assert parse_resolution("native") is None


def test_parse_resolution_named():
    assert parse_resolution("dvs346") == (346, 260)
    assert parse_resolution("dvs640") == (640, 480)
    for name, wh in RESOLUTIONS.items():
        assert parse_resolution(name) == wh


@pytest.mark.parametrize("spec", ["320x240", "320X240", " 320 x 240 "])
def test_parse_resolution_wxh_string(spec):
    out = parse_resolution(spec)
    assert out == (320, 240) and all(type(v) is int for v in out)


def test_parse_resolution_tuple_and_list():
    assert parse_resolution((320, 240)) == (320, 240)
    assert parse_resolution([64, 48]) == (64, 48)
    assert parse_resolution((np.int64(10), np.int64(8))) == (10, 8)


@pytest.mark.parametrize("spec", ["", "320", "320x", "x240", "320x240x3", "abc", "dvs999", "DVS346x", "1.5x2",
                                  "320*240"])
def test_parse_resolution_bad_strings(spec):
    with pytest.raises(ValueError) as err:
        parse_resolution(spec)
    msg = str(err.value)
    assert repr(spec) in msg
    assert "native" in msg and "WxH" in msg and "dvs346" in msg  # says what would have been accepted


@pytest.mark.parametrize("spec", ["0x240", "320x0", "-320x240", (0, 10), (10, -1)])
def test_parse_resolution_non_positive(spec):
    with pytest.raises(ValueError, match="positive"):
        parse_resolution(spec)
