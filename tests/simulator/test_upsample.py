"""Temporal upsampling (evforge.simulator.upsample): interpolators, adaptive step counts, sub-step fractions."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from near import assert_near

from evforge.simulator import scenes
from evforge.simulator.pixel import intensity01, inverse_lin_log, lin_log
from evforge.simulator.resample import prepare_frames
from evforge.simulator.upsample import (
    FlowInterpolator,
    FrameInterpolator,
    LogLinearInterpolator,
    UpsampleConfig,
    choose_steps,
    substep_fractions,
)

H, W = 48, 64


def _frames(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    f0 = torch.rand(b, 1, 6, 7, generator=g) * 255
    f1 = torch.rand(b, 1, 6, 7, generator=g) * 255
    return f0, f1


def _const_flow(dx, dy, b=1):
    flow = torch.empty(b, 2, H, W)
    flow[:, 0] = dx
    flow[:, 1] = dy
    return flow


def _sinusoid(sx: float, sy: float) -> torch.Tensor:
    """(1, 1, H, W) smooth texture translated by (sx, sy) pixels, intensities in [5, 175] (both lin-log ranges)."""
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    xs, ys = x - sx, y - sy
    img = (90 + 60 * torch.sin(2 * math.pi * (xs / 13.0 + ys / 29.0))
           + 25 * torch.cos(2 * math.pi * (ys / 9.0 - xs / 31.0)))
    return img.float().view(1, 1, H, W)


def _mae(a, b, valid):
    return (a - b)[valid.expand_as(a)].abs().mean().item()


# ------------------------------------------------------------------------------------ LogLinearInterpolator


def test_log_linear_midpoint_is_exact_mean_of_lin_log():
    f0, f1 = _frames()
    l0, l1 = lin_log(f0), lin_log(f1)
    fr = torch.tensor([[0.5], [0.5]])
    out = LogLinearInterpolator().interpolate_log(l0, l1, fr)
    assert out.shape == (1, 2, 1, 6, 7)
    assert_near(out[0], (l0 + l1) / 2, rtol=0, atol=0)


def test_log_linear_is_linear_in_the_fraction():
    f0, f1 = _frames(b=2, seed=1)
    l0, l1 = lin_log(f0), lin_log(f1)
    fr = torch.tensor([[0.25, 0.5, 0.75, 1.0], [0.1, 0.2, 0.9, 1.0]])
    out = LogLinearInterpolator().interpolate_log(l0, l1, fr)
    assert out.shape == (4, 2, 1, 6, 7)
    for k in range(4):
        for b in range(2):
            s = float(fr[b, k])
            assert_near(out[k, b], (1 - s) * l0[b] + s * l1[b], rtol=0, atol=1e-6)
    # Equal steps in s give equal steps in lin-log: second differences vanish.
    assert_near(out[0, 0] - 2 * out[1, 0] + out[2, 0], torch.zeros_like(l0[0]), rtol=0, atol=1e-5)


def test_log_linear_endpoints_reproduce_inputs():
    f0, f1 = _frames(seed=2)
    l0, l1 = lin_log(f0), lin_log(f1)
    fr = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    out = LogLinearInterpolator().interpolate_log(l0, l1, fr)
    assert torch.equal(out[0], l0) and torch.equal(out[1], l1)
    # In intensity, through inverse_lin_log (lin_log rounds to 1e-8: relative 1e-6 is ample).
    frames = LogLinearInterpolator()(f0, f1, fr)
    assert_near(frames[0], f0, rtol=1e-5, atol=1e-4)
    assert_near(frames[1], f1, rtol=1e-5, atol=1e-4)


def test_log_linear_call_is_geometric_mean_in_the_log_range():
    f0 = torch.full((1, 1, 2, 2), 25.0)
    f1 = torch.full((1, 1, 2, 2), 100.0)
    mid = LogLinearInterpolator()(f0, f1, torch.tensor([[0.5]]))[0]
    assert_near(mid, torch.full_like(f0, 50.0), rtol=1e-5, atol=0)


def test_interpolators_satisfy_the_protocol():
    assert isinstance(LogLinearInterpolator(), FrameInterpolator)
    assert isinstance(FlowInterpolator(), FrameInterpolator)
    assert UpsampleConfig(mode="flow").interpolator().needs_flow
    assert isinstance(UpsampleConfig(mode="linear").interpolator(), LogLinearInterpolator)


# ------------------------------------------------------------------------------------------ FlowInterpolator


@pytest.mark.parametrize("dx, dy, max_ratio", [(2.6, -1.3, 0.4), (4.3, 2.2, 0.1)])
def test_flow_interpolation_beats_log_linear_on_translating_sinusoid(dx, dy, max_ratio):
    # Frame 1 is frame 0 moved by (dx, dy): the flow 0 -> 1 is that constant vector everywhere, and the true
    # frame at s is frame 0 moved by s (dx, dy). Compare in lin-log space away from the clamped borders.
    l0, l1 = lin_log(_sinusoid(0, 0)), lin_log(_sinusoid(dx, dy))
    flow = _const_flow(dx, dy)
    valid = torch.zeros(1, 1, H, W, dtype=torch.bool)
    valid[..., 6:-6, 6:-6] = True
    fr = torch.tensor([[0.25, 0.5]])
    fl = FlowInterpolator().interpolate_log(l0, l1, fr, flow)
    ll = LogLinearInterpolator().interpolate_log(l0, l1, fr)
    for k, s in enumerate((0.25, 0.5)):
        truth = lin_log(_sinusoid(s * dx, s * dy))
        e_flow, e_lin = _mae(fl[k], truth, valid), _mae(ll[k], truth, valid)
        # Measured at s = 0.5: 0.035 vs 0.147 (ratio 0.24) for (2.6, -1.3); 0.018 vs 0.50 (0.036) for (4.3, 2.2).
        assert e_flow < max_ratio * e_lin, (s, e_flow, e_lin)
        assert e_flow < 0.05
    # The flow's sign matters: warping the wrong way is much worse than the right way.
    wrong = FlowInterpolator().interpolate_log(l0, l1, fr, -flow)[1]
    mid = lin_log(_sinusoid(dx / 2, dy / 2))
    assert _mae(wrong, mid, valid) > 3 * _mae(fl[1], mid, valid)


def test_flow_interpolation_beats_log_linear_on_procedural_scene():
    # A two-plane scene with exact flow (motion up to 4.5 px, parallax); the true middle frame is rendered with
    # the camera half-way between frames 0 and 1. Error in lin-log units over the pixels with valid flow.
    spec = scenes.SceneSpec(width=W, height=H, frames=3, planes=2, speed_px=3.0, seed=1)
    scene = scenes.build_scene(spec)
    half = replace(scene, positions=(scene.positions[:-1] + scene.positions[1:]) / 2,
                   rolls=(scene.rolls[:-1] + scene.rolls[1:]) / 2)
    rgb0, _ = scenes.render_frame(scene, 0)
    rgb1, _ = scenes.render_frame(scene, 1)
    rgb_mid, _ = scenes.render_frame(half, 0)
    flow_np, mask = scenes.flow_and_mask(scene, 0)
    g = prepare_frames([rgb0, rgb_mid, rgb1], None, "cpu")
    l0, lm, l1 = lin_log(g[0:1]), lin_log(g[1:2]), lin_log(g[2:3])
    flow = torch.from_numpy(flow_np).permute(2, 0, 1)[None]
    valid = torch.from_numpy(mask == scenes.MASK_VALID)[None, None]
    assert valid.float().mean() > 0.8 and flow.norm(dim=1).max() > 3
    fr = torch.tensor([[0.5]])
    e_flow = _mae(FlowInterpolator().interpolate_log(l0, l1, fr, flow, valid)[0], lm, valid)
    e_lin = _mae(LogLinearInterpolator().interpolate_log(l0, l1, fr)[0], lm, valid)
    # Measured: 0.032 vs 0.102 (ratio 0.31); over seeds 0-9 with 1-2 planes the ratio stays <= 0.38.
    assert e_flow < 0.5 * e_lin, (e_flow, e_lin)


def test_invalid_flow_pixels_fall_back_to_log_linear_exactly():
    l0, l1 = lin_log(_sinusoid(0, 0)), lin_log(_sinusoid(2.6, -1.3))
    flow = _const_flow(2.6, -1.3)
    g = torch.Generator().manual_seed(5)
    valid = torch.rand(1, 1, H, W, generator=g) > 0.3
    fr = torch.tensor([[0.3, 0.5, 1.0]])
    fl = FlowInterpolator().interpolate_log(l0, l1, fr, flow, valid)
    ll = LogLinearInterpolator().interpolate_log(l0, l1, fr)
    warped = FlowInterpolator().interpolate_log(l0, l1, fr, flow)
    inv = (~valid).expand_as(fl[0])
    for k in range(3):
        assert torch.equal(fl[k][inv], ll[k][inv])
        assert torch.equal(fl[k][~inv], warped[k][~inv])
    assert not torch.equal(fl[1], ll[1])  # the valid part really is warped


def test_flow_interpolator_without_flow_equals_log_linear():
    f0, f1 = _frames(b=2, seed=6)
    l0, l1 = lin_log(f0), lin_log(f1)
    fr = torch.tensor([[0.25, 0.5, 1.0], [0.5, 1.0, 1.0]])
    assert torch.equal(FlowInterpolator().interpolate_log(l0, l1, fr),
                       LogLinearInterpolator().interpolate_log(l0, l1, fr))
    assert torch.equal(FlowInterpolator()(f0, f1, fr), LogLinearInterpolator()(f0, f1, fr))


def test_flow_interpolator_zero_flow_equals_log_linear():
    f0, f1 = _frames(b=1, seed=7)
    l0, l1 = lin_log(f0), lin_log(f1)
    fr = torch.tensor([[0.5]])
    out = FlowInterpolator().interpolate_log(l0, l1, fr, torch.zeros(1, 2, 6, 7))
    assert_near(out, LogLinearInterpolator().interpolate_log(l0, l1, fr), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- choose_steps


def _log_pair(v0, v1, b=1, h=4, w=5):
    return torch.full((b, 1, h, w), float(v0)), torch.full((b, 1, h, w), float(v1))


def test_choose_steps_mode_none_is_always_one():
    l0, l1 = _log_pair(0.0, 5.0, b=3)
    flow = torch.full((3, 2, 4, 5), 50.0)
    assert choose_steps(UpsampleConfig(mode="none"), l0, l1, [0.1] * 3, [100.0] * 3, flow) == [1, 1, 1]


def test_choose_steps_static_pair_without_lowpass_is_one():
    l0, l1 = _log_pair(3.0, 3.0, b=2)
    assert choose_steps(UpsampleConfig(), l0, l1, [0.1, 0.1], [0.0, 0.0]) == [1, 1]
    # A settled static pair needs no low-pass sub-steps either.
    assert choose_steps(UpsampleConfig(), l0, l1, [0.1, 0.1], [30.0, 30.0]) == [1, 1]


def test_choose_steps_brightness_change():
    cfg = UpsampleConfig(max_log_step=0.25)
    l0, l1 = _log_pair(3.0, 3.0)
    l1[0, 0, 1, 2] = 4.0  # one pixel changes by 1.0 log units
    assert choose_steps(cfg, l0, l1, [0.1], [0.0]) == [4]
    assert choose_steps(cfg, l1, l0, [0.1], [0.0]) == [4]  # darkening counts the same
    l1[0, 0, 1, 2] = 4.01
    assert choose_steps(cfg, l0, l1, [0.1], [0.0]) == [5]


def test_choose_steps_flow_only_in_flow_mode():
    l0, l1 = _log_pair(3.0, 3.0)
    flow = torch.zeros(1, 2, 4, 5)
    flow[0, 0, 2, 3], flow[0, 1, 2, 3] = 3.3, 4.4  # |flow| = 5.5 px at one pixel
    flow[0, 0, 0, 0] = -5.0
    assert choose_steps(UpsampleConfig(mode="flow", max_px_step=1.0), l0, l1, [0.1], [0.0], flow) == [6]
    assert choose_steps(UpsampleConfig(mode="flow", max_px_step=2.0), l0, l1, [0.1], [0.0], flow) == [3]
    assert choose_steps(UpsampleConfig(mode="linear", max_px_step=1.0), l0, l1, [0.1], [0.0], flow) == [1]
    assert choose_steps(UpsampleConfig(mode="flow"), l0, l1, [0.1], [0.0], None) == [1]


def test_choose_steps_max_of_terms_and_clipping():
    l0, l1 = _log_pair(3.0, 4.0)  # 1.0 log units -> 4 steps at 0.25
    flow = torch.full((1, 2, 4, 5), 0.0)
    flow[:, 0] = 2.5  # 3 steps at 1 px
    assert choose_steps(UpsampleConfig(mode="flow", max_log_step=0.25), l0, l1, [0.1], [0.0], flow) == [4]
    flow[:, 0] = 7.2  # 8 steps
    assert choose_steps(UpsampleConfig(mode="flow", max_log_step=0.25), l0, l1, [0.1], [0.0], flow) == [8]
    assert choose_steps(UpsampleConfig(mode="flow", max_log_step=0.25, max_steps=5), l0, l1, [0.1], [0.0],
                        flow) == [5]


@pytest.mark.parametrize("max_steps", [16, 64])
def test_choose_steps_lowpass_term(max_steps):
    cfg = UpsampleConfig(max_log_step=0.4, max_lowpass_eps=0.5, max_steps=max_steps)
    l0 = lin_log(torch.full((1, 1, 4, 5), 100.0))
    l1 = l0.clone()
    l1[0, 0, 0, 0] = lin_log(torch.tensor(255.0))  # a bright pixel changes (1.0 log units < 3 steps by itself)
    dt, cutoff = 0.1, 30.0
    inten = float(intensity01(inverse_lin_log(l1)).max())
    assert inten == pytest.approx(1.0, abs=1e-5)
    expected = min(math.ceil(dt * 2 * math.pi * cutoff * inten / 0.5), max_steps)  # ceil(37.70) = 38
    assert expected == min(38, max_steps)
    assert choose_steps(cfg, l0, l1, [dt], [cutoff]) == [expected]


def test_choose_steps_lowpass_uses_changing_pixels_and_state():
    cfg = UpsampleConfig(max_log_step=10.0, max_lowpass_eps=0.5, max_steps=1000)
    l0 = lin_log(torch.full((1, 1, 4, 5), 255.0))
    l1 = l0.clone()
    l1[0, 0, 3, 4] = lin_log(torch.tensor(35.0))  # only a dim pixel changes: inten01 = 55 / 275 = 0.2
    expected = math.ceil(0.1 * 2 * math.pi * 30 * 0.2 / 0.5)  # ceil(7.54) = 8, not the 38 of the bright pixels
    assert choose_steps(cfg, l0, l1, [0.1], [30.0]) == [expected]
    # Static frames, but the photoreceptor has not settled on them: the bright pixels count again.
    state = l0[:, 0].clone()
    state[0, 0, 0] -= 0.5
    assert choose_steps(cfg, l0, l0, [0.1], [30.0], lowpass_state=state) == [38]
    assert choose_steps(cfg, l0, l0, [0.1], [30.0], lowpass_state=l0[:, 0].clone()) == [1]


def test_choose_steps_differ_per_sequence_in_a_batch():
    cfg = UpsampleConfig(mode="flow", max_log_step=0.25, max_px_step=1.0, max_lowpass_eps=0.5, max_steps=64)
    l0 = torch.full((4, 1, 4, 5), 3.0)
    l1 = l0.clone()
    l1[1] += 1.0  # 4 steps from brightness
    l1[3] = lin_log(torch.full((1, 4, 5), 255.0))  # bright change with a low-pass: 38 steps
    flow = torch.zeros(4, 2, 4, 5)
    flow[2, 0] = 5.5  # 6 steps from motion
    flow[3, 0] = 1.0
    steps = choose_steps(cfg, l0, l1, [0.1] * 4, [0.0, 0.0, 0.0, 30.0], flow)
    assert steps == [1, 4, 6, 38]
    # Each sequence's count is what it gets alone.
    for b in range(4):
        alone = choose_steps(cfg, l0[b:b + 1], l1[b:b + 1], [0.1], [[0.0, 0.0, 0.0, 30.0][b]], flow[b:b + 1])
        assert alone == [steps[b]]


def test_choose_steps_min_steps_and_multiple_model_fixed_frames_times_an_adaptive_factor():
    # The ECDDP recipe: 30 interpolated frames per interval, each pair upsampled by the same factor >= 2
    # so that nothing moves more than 1 px per step: 30 * max(2, ceil(flow / 30)).
    cfg = UpsampleConfig(mode="flow", max_px_step=1.0, max_lowpass_eps=0.0, min_steps=60, step_multiple=30,
                         max_steps=600)
    l0, l1 = _log_pair(3.0, 3.0)
    flow = torch.zeros(1, 2, 4, 5)
    assert choose_steps(cfg, l0, l1, [1.0], [30.0], flow) == [60]  # static: the minimum
    for px, expected in ((59.0, 60), (60.0, 60), (60.5, 90), (75.0, 90), (200.0, 210), (5000.0, 600)):
        flow[0, 0, 1, 1] = px
        assert choose_steps(cfg, l0, l1, [1.0], [30.0], flow) == [expected], px
        assert expected == min(30 * max(2, math.ceil(px / 30)), 600)


def test_choose_steps_lowpass_term_can_be_left_out():
    l0 = lin_log(torch.full((1, 1, 4, 5), 100.0))
    l1 = l0.clone()
    l1[0, 0, 0, 0] = lin_log(torch.tensor(255.0))
    with_lp = choose_steps(UpsampleConfig(max_lowpass_eps=0.5, max_steps=1000), l0, l1, [1.0], [30.0])
    without = choose_steps(UpsampleConfig(max_lowpass_eps=0.0, max_steps=1000), l0, l1, [1.0], [30.0])
    assert with_lp == [377] and without == [3]  # ceil(2 pi 30 / 0.5) vs ceil(1.0 log units / 0.4)


# ------------------------------------------------------------------------------------------ substep_fractions


def test_substep_fractions():
    frac, active = substep_fractions([1, 3, 2], "cpu")
    expected = torch.tensor([[1.0, 1.0, 1.0], [1 / 3, 2 / 3, 1.0], [0.5, 1.0, 1.0]])
    assert frac.shape == (3, 3)
    assert_near(frac, expected, rtol=0, atol=1e-7)
    assert (frac[:, -1] == 1.0).all()  # every sequence ends exactly on the next source frame
    assert active == [[True, True, True], [False, True, True], [False, True, False]]


def test_substep_fractions_all_single_steps():
    frac, active = substep_fractions([1, 1], "cpu")
    assert torch.equal(frac, torch.ones(2, 1)) and active == [[True, True]]


# ----------------------------------------------------------------------------------------------- UpsampleConfig


@pytest.mark.parametrize("mode", ["cubic", "", "Linear", "rife"])
def test_config_rejects_unknown_mode(mode):
    with pytest.raises(ValueError, match="unknown upsampling mode"):
        UpsampleConfig(mode=mode)


@pytest.mark.parametrize("max_steps", [0, -3])
def test_config_rejects_max_steps_below_one(max_steps):
    with pytest.raises(ValueError, match="max_steps"):
        UpsampleConfig(max_steps=max_steps)


def test_config_accepts_valid_modes():
    for mode in ("none", "linear", "flow"):
        assert UpsampleConfig(mode=mode, max_steps=1).mode == mode


@pytest.mark.parametrize("bad", [dict(min_steps=0), dict(step_multiple=0), dict(min_steps=20, max_steps=16),
                                 dict(mode="none", min_steps=2), dict(mode="none", step_multiple=30),
                                 dict(max_lowpass_eps=-1.0), dict(max_px_step=0.0)])
def test_config_rejects_inconsistent_step_options(bad):
    with pytest.raises(ValueError):
        UpsampleConfig(**bad)
