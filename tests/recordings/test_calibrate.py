"""``evforge calibrate``: the self-consistency test (simulate with known parameters, calibrate, recover them),
what a recording cannot determine, and ``evforge simulate --params camera.yaml``."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import yaml

from evforge.cli import main
from evforge.formats.streamfile import StreamFile, write_stream
from evforge.realism.calibrate import calibrate, calibrate_events, read_camera_params, write_camera_file
from evforge.realism.sources import EventSource
from evforge.simulator.engine import simulate_frames
from evforge.simulator.params import DVSParams

TOLERANCE = 0.15  # relative error allowed for every identifiable parameter
TRUE = DVSParams(pos_thres=0.25, neg_thres=0.2, sigma_thres=0.03, cutoff_hz=30.0, leak_rate_hz=0.5,
                 shot_noise_rate_hz=2.0, refractory_period_s=0.005)


def grating_scene(width: int, height: int, frames: int, cycles: int = 10) -> np.ndarray:
    """Left half static (brightness 100), right half a sine grating (period 16 px, 40..160) moving ``cycles``
    periods over the sequence, so every pixel ends where it started (what the threshold ratio needs)."""
    out = np.full((frames, height, width), 100.0)
    x = np.arange(width // 2, width)
    for i in range(frames):
        out[i, :, width // 2:] = 100 + 60 * np.sin(2 * np.pi * (x / 16.0 - cycles * i / (frames - 1)))
    return np.rint(out).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def simulated(width: int = 64, height: int = 32, frames: int = 201, dt_us: int = 50_000, params=TRUE):
    scene = grating_scene(width, height, frames)
    times = np.arange(frames, dtype=np.int64) * dt_us
    return simulate_frames(scene, times, params, seed=1), scene, times


def _close(est, true, what):
    assert est.determined, what
    assert est.value == pytest.approx(true, rel=TOLERANCE), what
    assert abs(est.value - true) <= 4 * est.uncertainty + 0.03 * true, f"{what}: uncertainty too small"


def test_self_consistency_recovers_the_parameters(tmp_path):
    """10 s of a 64x32 sensor (1.5 s to simulate): leak, shot noise, refractory period and threshold ratio back
    within 15 % (measured: 0.488 Hz, 2.01 Hz, 5.001 ms, 1.242 for 0.5, 2.0, 5 ms, 1.25)."""
    ev, scene, times = simulated()
    # through a stream file: its gray frames give the brightness the shot noise depends on
    path = write_stream(tmp_path / "sim.h5", ev, times, width=64, height=32, frames=scene)
    cal = calibrate(path)
    e = cal.estimates
    _close(e["leak_rate_hz"], TRUE.leak_rate_hz, "leak")
    _close(e["shot_noise_rate_hz"], TRUE.shot_noise_rate_hz, "shot noise")
    _close(e["refractory_period_s"], TRUE.refractory_period_s, "refractory")
    _close(e["pos_neg_threshold_ratio"], TRUE.pos_thres / TRUE.neg_thres, "threshold ratio")
    assert cal.measured["quiet_pixels"] == 32 * 32  # the static half, exactly
    assert cal.measured["hot_pixels"]["count"] == 0
    p = cal.dvs_params
    assert p["pos_thres"] / p["neg_thres"] == pytest.approx(e["pos_neg_threshold_ratio"].value)
    assert {"pos_thres", "sigma_thres", "cutoff_hz"} <= set(cal.not_determined)
    # without frames the brightness is unknown: the dark-rate estimate, with the white-scene range as uncertainty
    no_frames = calibrate_events(EventSource("sim", "sim", ev, (64, 32)))
    shot = no_frames.estimates["shot_noise_rate_hz"]
    f100 = 1 - 0.75 * 120 / 275
    assert shot.value == pytest.approx(e["shot_noise_rate_hz"].value * f100, rel=1e-9)
    assert shot.value + shot.uncertainty >= TRUE.shot_noise_rate_hz and "brightness unknown" in shot.note


def test_a_static_scene_cannot_give_the_threshold_ratio():
    ev, _, _ = simulated()
    static = ev[ev["x"] < 32]  # the static half alone: noise only
    cal = calibrate_events(EventSource("static", "sim", static, (32, 32)), frames=np.full((3, 32, 32), 100))
    assert "pos_neg_threshold_ratio" in cal.not_determined
    assert "static scene" in cal.not_determined["pos_neg_threshold_ratio"]
    assert cal.dvs_params["neg_thres"] == cal.dvs_params["pos_thres"]  # the preset's, untouched
    _close(cal.estimates["leak_rate_hz"], TRUE.leak_rate_hz, "leak")
    _close(cal.estimates["shot_noise_rate_hz"], TRUE.shot_noise_rate_hz, "shot noise")


def test_no_refractory_period_is_not_invented():
    params = DVSParams(pos_thres=0.2, neg_thres=0.2, sigma_thres=0.0, cutoff_hz=0.0, leak_rate_hz=0.0,
                       shot_noise_rate_hz=20.0, refractory_period_s=0.0)
    scene = np.full((41, 16, 16), 100, np.uint8)
    ev = simulate_frames(scene, np.arange(41) * 50_000, params, seed=2)
    cal = calibrate_events(EventSource("noref", "sim", ev, (16, 16)))
    assert "refractory_period_s" in cal.not_determined
    assert not cal.estimates["refractory_period_s"].determined
    assert cal.dvs_params["refractory_period_s"] == DVSParams().refractory_period_s  # the base preset's


def test_camera_file_round_trip_and_simulate_params(tmp_path, capsys):
    ev, scene, times = simulated()
    src = write_stream(tmp_path / "sim.h5", ev, times, width=64, height=32, frames=scene)
    cam = tmp_path / "camera.yaml"
    assert main(["calibrate", str(src), "--out", str(cam)]) == 0
    assert "leak_rate_hz" in capsys.readouterr().out
    data = yaml.safe_load(cam.read_text())
    assert set(data) == {"source", "dvs_params", "estimates", "not_determined", "measured"}
    params = read_camera_params(cam)
    assert params["leak_rate_hz"] == pytest.approx(data["estimates"]["leak_rate_hz"]["value"])
    # simulate with it: the stream file records the parameters it was made with
    frames = tmp_path / "frames"
    frames.mkdir()
    from PIL import Image

    for i in range(0, 12):
        Image.fromarray(scene[i]).save(frames / f"{i:04d}.png")
    out = tmp_path / "sim_out"
    assert main(["simulate", str(frames), "--out", str(out), "--params", str(cam), "--fps", "20", "--quiet",
                 "--device", "cpu", "--refractory-period-s", "0.001"]) == 0
    stream = next(out.rglob("*.h5"))
    with StreamFile(stream) as s:
        assert s.attrs["leak_rate_hz"] == pytest.approx(params["leak_rate_hz"])
        assert s.attrs["shot_noise_rate_hz"] == pytest.approx(params["shot_noise_rate_hz"])
        assert s.attrs["neg_thres"] == pytest.approx(params["neg_thres"])
        assert s.attrs["refractory_period_s"] == pytest.approx(0.001)  # a flag beats the camera file
    bad = tmp_path / "bad.yaml"
    bad.write_text("dvs_params: {leak_rate: 1}\n")
    assert main(["simulate", str(frames), "--out", str(tmp_path / "x"), "--params", str(bad), "--quiet"]) == 2
    assert "bad.yaml" in capsys.readouterr().err


def test_real_dvxplorer_calibration(tmp_path):
    path = Path("/work/shared/realdata/sample_dvxplorer.aedat4")
    if not path.is_file():
        pytest.skip(f"{path} absent (real camera samples are in ../shared/realdata)")
    cal = calibrate(path)
    e = cal.estimates
    # 0.59 s of a moving scene: the refractory edge and the noise floor show, the threshold ratio does not
    assert e["refractory_period_s"].determined and e["refractory_period_s"].value == pytest.approx(197e-6)
    assert not e["pos_neg_threshold_ratio"].determined and "pos_neg_threshold_ratio" in cal.not_determined
    assert cal.measured["hot_pixels"]["count"] == 35  # the same rule as the compare report (test_realism_compare)
    assert 0 < e["shot_noise_rate_hz"].value < 1 and "brightness unknown" in e["shot_noise_rate_hz"].note
    write_camera_file(cal, tmp_path / "camera.yaml")
    assert read_camera_params(tmp_path / "camera.yaml")["refractory_period_s"] == pytest.approx(197e-6)


@pytest.mark.slow
def test_self_consistency_at_a_larger_size():
    """128x64, 20 s: the same recovery within 10 % (measured: 0.197 Hz, 1.004 Hz, 2.002 ms, 1.504 for 0.2, 1.0,
    2 ms, 1.5)."""
    params = DVSParams(pos_thres=0.3, neg_thres=0.2, sigma_thres=0.03, cutoff_hz=30.0, leak_rate_hz=0.2,
                       shot_noise_rate_hz=1.0, refractory_period_s=0.002)
    ev, scene, times = simulated(128, 64, 401, 50_000, params)
    cal = calibrate_events(EventSource("sim", "sim", ev, (128, 64)), frames=scene)
    for name, true in (("leak_rate_hz", 0.2), ("shot_noise_rate_hz", 1.0), ("refractory_period_s", 0.002),
                       ("pos_neg_threshold_ratio", 1.5)):
        assert cal.estimates[name].value == pytest.approx(true, rel=0.10), name


def test_shot_noise_brightness_dependence_from_frames():
    """A static brightness ramp (60..200): the OFF noise falls with brightness as the model's f(I); the fitted
    white-to-dark ratio is the model's 0.25 within its uncertainty."""
    params = DVSParams(pos_thres=0.2, neg_thres=0.2, sigma_thres=0.0, cutoff_hz=0.0, leak_rate_hz=0.2,
                       shot_noise_rate_hz=4.0, refractory_period_s=0.001)
    ramp = np.repeat(np.linspace(60, 200, 48)[:, None], 48, 1)
    scene = np.repeat(np.rint(ramp)[None].astype(np.uint8), 201, 0)
    ev = simulate_frames(scene, np.arange(201) * 50_000, params, seed=3)
    cal = calibrate_events(EventSource("ramp", "sim", ev, (48, 48)), frames=scene[:5])
    est = cal.estimates["shot_noise_white_to_dark"]
    assert est.determined and abs(est.value - 0.25) <= 3 * est.uncertainty and est.uncertainty < 0.1
    bins = cal.measured["shot_intensity"]["bins"]
    assert [b[1] for b in bins] == sorted((b[1] for b in bins), reverse=True)  # brighter: less noise
    _close(cal.estimates["shot_noise_rate_hz"], 4.0, "shot noise on a ramp")
    _close(cal.estimates["leak_rate_hz"], 0.2, "leak on a ramp")
    # without frames it cannot be told
    blind = calibrate_events(EventSource("ramp", "sim", ev, (48, 48)))
    assert "shot_noise_white_to_dark" in blind.not_determined


def test_real_nmnist_without_noise_events_leaves_shot_noise_open():
    path = Path("/work/shared/realdata/sample_nmnist.bin")
    if not path.is_file():
        pytest.skip(f"{path} absent (real camera samples are in ../shared/realdata)")
    cal = calibrate(path)
    assert not cal.estimates["shot_noise_rate_hz"].determined and "shot_noise_rate_hz" in cal.not_determined
    assert cal.dvs_params["shot_noise_rate_hz"] == DVSParams().shot_noise_rate_hz  # the preset's, not 0
