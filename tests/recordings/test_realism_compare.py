"""``evforge compare``: the realism statistics checked against independent counts on the real samples, and a
source compared with itself."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from evforge.cli import main
from evforge.realism.compare import compare_sources
from evforge.realism.sources import load_source
from evforge.realism.stats import StatsConfig, event_stats

REAL = Path("/work/shared/realdata")
# file, sensor size, events, ON events (from the README of ../shared/realdata)
SAMPLES = [("sample_dvxplorer.aedat4", (320, 240), 111_954, 55_023), ("sample_ncars.dat", (78, 42), 2009, 1350),
           ("sample_nmnist.bin", (34, 34), 4325, 2145)]


def _real(name: str) -> Path:
    path = REAL / name
    if not path.is_file():
        pytest.skip(f"{path} absent (real camera samples are in ../shared/realdata)")
    return path


def _independent(ev, size, cfg: StatsConfig) -> dict:
    """The statistics again, by plain loops and Counters (no shared code with evforge.realism.stats)."""
    w, h = size
    t = [int(v) for v in ev["t"]]
    T = (t[-1] - t[0] + 1) / 1e6
    per_pixel = defaultdict(list)
    for x, y, tt in zip(ev["x"].tolist(), ev["y"].tolist(), t):
        per_pixel[(x, y)].append(tt)
    counts = Counter({k: len(v) for k, v in per_pixel.items()})
    intervals = sorted(b - a for ts in per_pixel.values() for a, b in zip(sorted(ts), sorted(ts)[1:]))
    allc = np.array([counts.get((x, y), 0) for y in range(h) for x in range(w)], float)
    thr = allc.mean() + cfg.hot_std * allc.std()
    hot = [k for k, c in counts.items() if c > thr]
    tiles = {}
    for ty in range(0, h, cfg.tile):
        for tx in range(0, w, cfg.tile):
            px = [(x, y) for y in range(ty, min(h, ty + cfg.tile)) for x in range(tx, min(w, tx + cfg.tile))]
            tiles[(tx, ty)] = (sum(counts.get(p, 0) for p in px), len(px))
    dens = np.array([e / n for e, n in tiles.values()])
    q = np.quantile(dens, cfg.quiet_quantile)
    quiet = [(e, n) for e, n in tiles.values() if e / n <= q]
    # lag-1 autocorrelation of the first 10 ms frame, from its definition
    f = np.zeros((h, w))
    for x, y, tt in zip(ev["x"].tolist(), ev["y"].tolist(), t):
        if tt - t[0] < cfg.frame_us:
            f[y, x] += 1
    f -= f.mean()
    lag1 = ((f[:, 1:] * f[:, :-1]).sum() / (f * f).sum() + (f[1:] * f[:-1]).sum() / (f * f).sum()) / 2
    return {"num_events": len(t), "duration_s": T, "active": len(counts) / (w * h),
            "rate_mean": len(t) / T / (w * h), "iei_min": intervals[0], "iei_median": float(np.median(intervals)),
            "num_intervals": len(intervals), "hot": len(hot), "hot_events": sum(counts[k] for k in hot) / len(t),
            "ba": sum(e for e, _ in quiet) / (sum(n for _, n in quiet) * T), "lag1_frame0": lag1}


@pytest.mark.parametrize("name,size,num,on", SAMPLES)
def test_statistics_of_the_real_samples(name, size, num, on):
    src = load_source(_real(name))
    assert src.sensor_size == size and len(src.events) == num
    cfg = StatsConfig(max_frames=1)
    st = event_stats(src.events, src.sensor_size, cfg)
    ref = _independent(src.events, size, cfg)
    assert st["num_events"] == num and st["on_fraction"] == pytest.approx(on / num, abs=1e-12)
    assert st["duration_s"] == pytest.approx(ref["duration_s"])
    assert st["event_rate_hz"] == pytest.approx(num / ref["duration_s"])
    series, bin_us = np.array(st["rate_series_hz"]), st["rate_bin_us"]
    assert bin_us * len(series) == pytest.approx(ref["duration_s"] * 1e6)  # equal bins tile the duration
    edges = np.linspace(0, ref["duration_s"] * 1e6, len(series) + 1)
    ref_counts = np.histogram(src.events["t"] - src.events["t"][0], bins=edges)[0]
    np.testing.assert_allclose(series * bin_us / 1e6, ref_counts)  # every event in its bin, rate per bin length
    assert st["active_pixel_fraction"] == pytest.approx(ref["active"])
    assert st["pixel_rate_mean_hz"] == pytest.approx(ref["rate_mean"])
    assert st["num_intervals"] == ref["num_intervals"] == num - round(ref["active"] * size[0] * size[1])
    assert st["iei_min_us"] == ref["iei_min"] and st["iei_median_us"] == ref["iei_median"]
    assert st["hot_pixels"] == ref["hot"] and st["hot_event_fraction"] == pytest.approx(ref["hot_events"])
    assert st["ba_rate_hz"] == pytest.approx(ref["ba"])
    assert st["autocorr_frames"] == 1 and st["autocorr_lag1"] == pytest.approx(ref["lag1_frame0"])
    assert sum(st["pixel_rate_hist"]) == round(ref["active"] * size[0] * size[1])


def test_a_source_compared_with_itself_shows_no_difference(tmp_path):
    path = _real("sample_dvxplorer.aedat4")
    report = compare_sources(path, path, tmp_path / "self")
    d = report["difference"]
    assert d["identical"] is True
    assert all(v["diff"] == 0 for k, v in d.items() if isinstance(v, dict) and "diff" in v)
    assert d["pixel_rate_hist"]["tv_distance"] == 0 and d["iei_hist"]["tv_distance"] == 0
    saved = json.loads((tmp_path / "self" / "report.json").read_text())
    assert saved["a"]["num_events"] == saved["b"]["num_events"] == 111_954
    assert "identical in every statistic" in (tmp_path / "self" / "report.md").read_text()
    assert (tmp_path / "self" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_different_sources_differ_and_the_cli_writes_the_report(tmp_path, capsys):
    a, b = _real("sample_dvxplorer.aedat4"), _real("sample_ncars.dat")
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "r"), "--labels", "dvx,ncars"]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["difference"]["identical"] is False
    assert report["a"]["label"] == "dvx" and report["b"]["num_events"] == 2009
    assert report["difference"]["on_fraction"]["diff"] == pytest.approx(1350 / 2009 - 55_023 / 111_954)
    assert "| ON fraction |" in (tmp_path / "r" / "report.md").read_text()
    assert main(["compare", str(tmp_path / "missing.dat"), str(b), "--out", str(tmp_path / "x")]) == 2
    assert "missing.dat" in capsys.readouterr().err


def test_a_converted_dataset_is_a_source(tmp_path):
    """The shards of a converted recording hold the same events: same counts, ON fraction and hot pixels."""
    import shutil

    from evforge.dataset_builder.build import build_dataset

    path = _real("sample_dvxplorer.aedat4")
    (tmp_path / "recs").mkdir()
    shutil.copy(path, tmp_path / "recs")
    build_dataset("recordings", tmp_path / "recs", tmp_path / "ds", progress=False, sample_ms=50, min_events=100,
                  val_fraction=0)
    report = compare_sources(tmp_path / "ds", path, tmp_path / "r")
    a, b = report["a"], report["b"]
    assert a["kind"] == "dataset" and a["num_events"] == b["num_events"] == 111_954
    assert a["on_fraction"] == b["on_fraction"] and a["hot_pixels"] == b["hot_pixels"]
    assert report["difference"]["pixel_rate_hist"]["tv_distance"] < 0.05  # same counts, durations within 1 %


def test_a_simulation_compared_with_itself_shows_no_difference(tmp_path):
    from evforge.formats.streamfile import write_stream
    from evforge.simulator.engine import simulate_frames
    from evforge.simulator.params import get_preset

    frames = np.zeros((21, 24, 32), np.uint8)
    for i in range(21):
        frames[i] = np.rint(100 + 60 * np.sin(2 * np.pi * (np.arange(32) / 8 - i / 10)))[None]
    ev = simulate_frames(frames, np.arange(21) * 20_000, get_preset("noisy"), seed=0)
    path = write_stream(tmp_path / "sim.h5", ev, np.arange(21) * 20_000, width=32, height=24)
    assert main(["compare", str(path), str(path), "--out", str(tmp_path / "r")]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["difference"]["identical"] is True and report["a"]["num_events"] == len(ev) > 1000
    # one event moved: no longer identical
    other = ev.copy()
    other["x"][0] = (other["x"][0] + 1) % 32
    path2 = write_stream(tmp_path / "sim2.h5", other, np.arange(21) * 20_000, width=32, height=24)
    assert compare_sources(path, path2, tmp_path / "r2")["difference"]["identical"] is False
