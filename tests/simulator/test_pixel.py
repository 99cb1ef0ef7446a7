"""The pixel model on analytic inputs: exact counts and timestamps, noise rates, mismatch, refractory."""

import math

import numpy as np
import pytest
import torch

from evforge.simulator.engine import simulate_frames
from evforge.simulator.params import DVSParams, get_preset
from evforge.simulator.pixel import EventSimulator, intensity01, inverse_lin_log, lin_log
from evforge.simulator.upsample import UpsampleConfig
from evforge.simulator.v2e_reference import V2EReference

NONE = UpsampleConfig(mode="none")
IDEAL = get_preset("ideal")


def _counts(ev, shape):
    """Per-pixel ON and OFF counts (H, W) of an event array."""
    on = np.zeros(shape, np.int64)
    off = np.zeros(shape, np.int64)
    np.add.at(on, (ev["y"][ev["p"] > 0], ev["x"][ev["p"] > 0]), 1)
    np.add.at(off, (ev["y"][ev["p"] < 0], ev["x"][ev["p"] < 0]), 1)
    return on, off


def test_lin_log_is_linear_below_20_and_log_above():
    x = torch.tensor([0.0, 10.0, 20.0, 21.0, 255.0])
    y = lin_log(x)
    f = math.log(20) / 20
    assert y[0] == 0 and y[1] == pytest.approx(10 * f) and y[2] == pytest.approx(math.log(20))
    assert y[3] == pytest.approx(math.log(21)) and y[4] == pytest.approx(math.log(255))
    assert torch.allclose(inverse_lin_log(y), x, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", ["none", "linear"])
@pytest.mark.parametrize("rate", [0.7, -0.9])
def test_exponential_ramp_counts_and_interpolated_timestamps(mode, rate):
    # I(t) = 50 exp(rate t) sampled at 10 Hz for 1 s: log changes linearly, so the k-th event of every
    # pixel is at exactly t_k = k * 0.2 / |rate| (not at a frame time), floor(|rate| / 0.2) events in all.
    ts = np.arange(11) * 100_000
    frames = np.stack([np.full((3, 4), 50 * math.exp(rate * i / 10)) for i in range(11)]).astype(np.float32)
    ev = simulate_frames(frames, ts, IDEAL, upsample=UpsampleConfig(mode=mode))
    n = math.floor(abs(rate) / 0.2)
    assert len(ev) == n * 12
    assert np.all(ev["p"] == (1 if rate > 0 else -1))
    expected = np.array([k * 0.2 / abs(rate) * 1e6 for k in range(1, n + 1)])
    for y in range(3):
        for x in range(4):
            t = ev["t"][(ev["x"] == x) & (ev["y"] == y)]
            np.testing.assert_allclose(t, expected, atol=2)
    assert np.all(np.diff(ev["t"]) >= 0)


def test_moving_edge_counts_by_hand():
    # A dark (40) / bright (160) edge moving right one pixel per frame: every pixel the edge passes over
    # sees a log step of ln(4) = 1.386 -> floor(1.386 / 0.2) = 6 ON events; nothing else fires.
    H, W, F = 5, 12, 8
    frames = np.full((F, H, W), 40.0, np.float32)
    for i in range(F):
        frames[i, :, : 2 + i] = 160.0
    ts = np.arange(F) * 10_000
    ev = simulate_frames(frames, ts, IDEAL, upsample=NONE)
    on, off = _counts(ev, (H, W))
    expected = np.zeros((H, W), np.int64)
    expected[:, 2 : 2 + F - 1] = 6
    np.testing.assert_array_equal(on, expected)
    assert off.sum() == 0
    # with log-linear interpolation the 6 events of a pixel are spread at k * 0.2 / ln 4 of its interval
    x = 5
    t = np.sort(ev["t"][(ev["x"] == x) & (ev["y"] == 0)])
    t0 = ts[x - 2]
    np.testing.assert_allclose(t - t0, [k * 0.2 / math.log(4) * 10_000 for k in range(1, 7)], atol=1)
    # ...and back: the edge retreating gives the same counts as OFF events
    ev_back = simulate_frames(frames[::-1].copy(), ts, IDEAL, upsample=NONE)
    on_b, off_b = _counts(ev_back, (H, W))
    assert on_b.sum() == 0
    np.testing.assert_array_equal(off_b, expected)


def _smooth_frames(n=12, h=24, w=32, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    phase = rng.random(4) * 6
    for i in range(n):
        img = 110 + 90 * np.sin(xx / 3.1 + phase[0] + 0.7 * i) * np.cos(yy / 4.3 + phase[1] + 0.3 * i)
        img += 20 * np.sin(i / 2 + phase[2])
        out.append(np.clip(img, 0, 255))
    return np.stack(out).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ideal_counts_equal_v2e_per_frame_model(seed):
    frames = _smooth_frames(seed=seed)
    ts = np.arange(len(frames)) * 5_000
    ev = simulate_frames(frames, ts, IDEAL, upsample=NONE)
    ref = V2EReference(IDEAL)
    rows = np.concatenate([ref.generate_events(f, t * 1e-6) for f, t in zip(frames, ts)])
    shape = frames.shape[1:]
    on, off = _counts(ev, shape)
    r_on = np.zeros(shape, np.int64)
    r_off = np.zeros(shape, np.int64)
    np.add.at(r_on, (rows[rows[:, 3] > 0, 2].astype(int), rows[rows[:, 3] > 0, 1].astype(int)), 1)
    np.add.at(r_off, (rows[rows[:, 3] < 0, 2].astype(int), rows[rows[:, 3] < 0, 1].astype(int)), 1)
    assert on.sum() > 1000
    np.testing.assert_array_equal(on, r_on)
    np.testing.assert_array_equal(off, r_off)


def test_log_linear_upsampling_keeps_ideal_counts():
    frames = _smooth_frames(seed=3)
    ts = np.arange(len(frames)) * 5_000
    a = simulate_frames(frames, ts, IDEAL, upsample=NONE)
    b = simulate_frames(frames, ts, IDEAL, upsample=UpsampleConfig(mode="linear", max_log_step=0.05))
    ca, cb = _counts(a, frames.shape[1:]), _counts(b, frames.shape[1:])
    # identical up to float rounding at exact threshold multiples
    assert np.abs(ca[0] - cb[0]).sum() + np.abs(ca[1] - cb[1]).sum() <= 0.001 * len(a)


def _static_run(params, seconds=20.0, fps=50, shape=(48, 48), value=0.0, seed=0):
    frames = np.full((int(seconds * fps) + 1,) + shape, value, np.float32)
    ts = (np.arange(len(frames)) * 1e6 / fps).astype(np.int64)
    return simulate_frames(frames, ts, params, seed=seed, upsample=NONE)


def test_leak_event_rate_matches_configured_rate():
    p = DVSParams(sigma_thres=0.0, cutoff_hz=0.0, leak_rate_hz=0.5, shot_noise_rate_hz=0.0,
                  refractory_period_s=0.0, leak_jitter_fraction=0.1, noise_rate_cov_decades=0.0)
    ev = _static_run(p, value=100.0)
    rate = len(ev) / (48 * 48 * 20.0)
    assert rate == pytest.approx(0.5, rel=0.1)
    assert np.all(ev["p"] == 1)  # leak only ever produces ON events


def test_shot_noise_rate_matches_configured_rate():
    p = DVSParams(sigma_thres=0.0, cutoff_hz=0.0, leak_rate_hz=0.0, shot_noise_rate_hz=2.0,
                  refractory_period_s=0.0)
    ev = _static_run(p, value=0.0)
    # v2e: the rate falls from rate_hz in the dark by (1 - 0.75 inten01); inten01 = 20/275 at I = 0
    expected = 2.0 * (1 - 0.75 * float(intensity01(torch.tensor(0.0))))
    rate = len(ev) / (48 * 48 * 20.0)
    assert rate == pytest.approx(expected, rel=0.1)
    assert (ev["p"] > 0).mean() == pytest.approx(0.5, abs=0.03)
    # stamped in continuous time, not on the 50 Hz frame grid
    assert np.mean(ev["t"] % 20_000 != 0) > 0.9


def test_bright_pixels_make_less_shot_noise():
    p = DVSParams(sigma_thres=0.0, cutoff_hz=0.0, leak_rate_hz=0.0, shot_noise_rate_hz=4.0,
                  refractory_period_s=0.0)
    dark = len(_static_run(p, seconds=5, value=0.0))
    bright = len(_static_run(p, seconds=5, value=255.0))
    assert bright / dark == pytest.approx((1 - 0.75 * 275 / 275) / (1 - 0.75 * 20 / 275), rel=0.15)


def test_threshold_mismatch_statistics():
    p = DVSParams(sigma_thres=0.05)
    sim = EventSimulator([p], [7], 128, 128)
    sim.reset(0, torch.zeros(128, 128), 0)
    pos, neg = sim.pos_thres[0].flatten().clone(), sim.neg_thres[0].flatten().clone()
    for thr in (pos, neg):
        assert float(thr.mean()) == pytest.approx(0.2, abs=0.002)
        assert float(thr.std()) == pytest.approx(0.05, rel=0.05)
        assert float(thr.min()) >= np.float32(0.01)
    assert abs(float(torch.corrcoef(torch.stack([pos, neg]))[0, 1])) < 0.03
    # a different seed gives a different mismatch pattern
    sim.reset(0, torch.zeros(128, 128), 0, seed=8)
    assert not torch.equal(sim.pos_thres[0].flatten(), pos)


def test_refractory_period_spaces_and_defers_events():
    # a fast ramp (5 log units in 10 ms -> an event every 0.4 ms) with a 2 ms refractory period
    p = DVSParams(sigma_thres=0, cutoff_hz=0, leak_rate_hz=0, shot_noise_rate_hz=0, refractory_period_s=0.002)
    n = 11
    frames = np.stack([np.full((2, 2), 30 * math.exp(5.0 * min(i, 10) / 10)) for i in range(n + 30)])
    ts = np.arange(len(frames)) * 1000
    ev = simulate_frames(frames.astype(np.float32), ts, p, upsample=NONE)
    ideal = simulate_frames(frames.astype(np.float32), ts, IDEAL, upsample=NONE)
    for x in range(2):
        t = np.sort(ev["t"][(ev["x"] == x) & (ev["y"] == 0)])
        assert np.all(np.diff(t) > 2000)
    # events blocked during the ramp are deferred, not lost: they keep coming after the ramp stops
    assert ev["t"].max() > 10_000 + 2000
    assert len(ev) <= len(ideal)


def test_brighter_pixels_respond_faster_through_the_lowpass():
    p = DVSParams(sigma_thres=0, cutoff_hz=20.0, leak_rate_hz=0, shot_noise_rate_hz=0, refractory_period_s=0)
    frames = np.empty((300, 1, 2), np.float32)
    frames[:, 0, 0] = 30.0
    frames[:, 0, 1] = 120.0
    frames[5:] *= 2.0  # the same log step (ln 2) on a dark and a bright pixel
    ts = np.arange(300) * 1000
    ev = simulate_frames(frames, ts, p, upsample=NONE)
    first = {x: ev["t"][ev["x"] == x].min() for x in (0, 1)}
    assert len(ev[ev["x"] == 0]) == len(ev[ev["x"] == 1]) == 3  # the filter delays, never loses, events
    assert first[1] < first[0]


def _three_sequences():
    frames = [_smooth_frames(n=10, seed=s) for s in range(3)]
    ts = np.arange(10) * 4_000
    return frames, ts


def test_batched_equals_one_by_one_and_is_deterministic():
    from evforge.simulator.engine import BatchEngine
    from evforge.simulator.resample import prepare_frames

    params = get_preset("noisy", shot_noise_rate_hz=50.0, leak_rate_hz=5.0)
    frames, ts = _three_sequences()
    seeds = [11, 12, 13]
    alone = [simulate_frames(f, ts, params, seed=s, upsample=UpsampleConfig()) for f, s in zip(frames, seeds)]
    eng = BatchEngine(3, 24, 32, "cpu", UpsampleConfig())
    for b in range(3):
        eng.start(b, prepare_frames([frames[b][0]], None, "cpu")[0], int(ts[0]), params, seeds[b])
    got = [[] for _ in range(3)]
    for i in range(1, len(ts)):
        ev = eng.advance(prepare_frames([f[i] for f in frames], None, "cpu"), [int(ts[i])] * 3, [True] * 3)
        for b in range(3):
            m = ev.b == b
            got[b].append(torch.stack([ev.x[m], ev.y[m], ev.t[m], ev.p[m].long()], 1))
    for b in range(3):
        g = torch.cat(got[b]).numpy()
        a = alone[b]
        assert len(a) > 100
        np.testing.assert_array_equal(g, np.stack([a["x"], a["y"], a["t"], a["p"]], 1).astype(np.int64))
    again = simulate_frames(frames[0], ts, params, seed=seeds[0], upsample=UpsampleConfig())
    np.testing.assert_array_equal(again, alone[0])
    other = simulate_frames(frames[0], ts, params, seed=99, upsample=UpsampleConfig())
    assert len(other) != len(alone[0]) or not np.array_equal(other, alone[0])


def test_ecddp_preset_draws_shot_rate_per_sequence():
    p = get_preset("ecddp")
    rates = {p.resolve(seed).shot_noise_rate_hz for seed in range(20)}
    assert len(rates) == 20 and all(0 <= r <= 0.25 for r in rates)
    assert p.resolve(3).shot_noise_rate_hz == p.resolve(3).shot_noise_rate_hz


def test_time_must_increase():
    sim = EventSimulator([IDEAL], [0], 2, 2)
    sim.reset(0, torch.zeros(2, 2), 100)
    with pytest.raises(ValueError, match="later than"):
        sim.step(torch.zeros(1, 2, 2), [100])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_equals_cuda():
    params = get_preset("noisy", shot_noise_rate_hz=50.0)
    frames, ts = _three_sequences()
    cpu = simulate_frames(frames[0], ts, params, seed=5, device="cpu")
    gpu = simulate_frames(frames[0], ts, params, seed=5, device="cuda")
    # identical random streams; float rounding may flip a count exactly at a threshold on a few pixels
    assert abs(len(cpu) - len(gpu)) <= 0.001 * len(cpu)
    ideal_cpu = simulate_frames(frames[0], ts, IDEAL, device="cpu", upsample=NONE)
    ideal_gpu = simulate_frames(frames[0], ts, IDEAL, device="cuda", upsample=NONE)
    assert abs(len(ideal_cpu) - len(ideal_gpu)) <= 0.001 * len(ideal_cpu)
