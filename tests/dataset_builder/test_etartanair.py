"""The E-TartanAir recipe on the conversion side: per-interval samples kept by the public ECDDP code's rule.

The public pipeline is emulated here from its description (split at i * 1e6 us into one lzf file per interval
with x u2, y u2, p i1, t f32; skip interval 0 and every interval whose own or previous file is under 100 KiB,
judged by the size on disk), and evforge's selection must keep exactly the same intervals.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from evforge.data.dataset import EventDataset
from evforge.dataset_builder.build import build_dataset
from evforge.dataset_builder.converters.etartanair_intervals import (
    REFERENCE_MIN_BYTES,
    interval_bounds,
    reference_file_bytes,
    reference_times,
    select_intervals,
)
from evforge.dataset_builder.converters.tartanair import TartanAirConverter
from evforge.dataset_builder.inspect import format_report, inspect_path
from evforge.errors import InputError
from evforge.formats.events import make_events
from evforge.formats.streamfile import write_stream

W, H = 640, 480
BIG, SMALL = 20_000, 5_000  # random events: about 180 KB and 50 KB in the reference layout


def interval_events(counts, t0=0, seed=0, at_frames=True):
    """Random events, ``counts[i]`` in interval i = [t0 + i s, t0 + (i+1) s); with ``at_frames`` the first
    event of every interval i >= 1 lies exactly on its frame time (it belongs to interval i, not i - 1)."""
    rng = np.random.default_rng(seed)
    parts = []
    for i, n in enumerate(counts):
        lo = t0 + i * 1_000_000
        t = rng.integers(lo, lo + 1_000_000, n)
        if at_frames and i and n:
            t[0] = lo
        parts.append(t)
    t = np.sort(np.concatenate(parts))
    n = len(t)
    return make_events(rng.integers(0, W, n), rng.integers(0, H, n), t, rng.choice([1, -1], n))


def write_trajectory(root: Path, rel: str, counts, *, t0=0, seed=0, spacing=1_000_000, at_frames=True):
    ev = interval_events(counts, t0, seed, at_frames)
    ft = t0 + np.arange(len(counts) + 1, dtype=np.int64) * spacing
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    write_stream(path, ev, ft, width=W, height=H, attrs={"seed": seed, "shot_noise_rate_hz": 0.1 + seed / 100})
    return ev, ft


def reference_kept(ev, ft, folder: Path) -> list[int]:
    """The public pipeline, emulated: write the per-interval files, then list the intervals kept by file size."""
    folder.mkdir(parents=True)
    t = (ev["t"] - ft[0]).astype(np.float32)
    edges = np.searchsorted(t, [i * 10**6 for i in range(len(ft))])
    for i in range(len(ft) - 1):
        a, b = edges[i], edges[i + 1]
        with h5py.File(folder / f"{i:06d}_{i + 1:06d}_event.hdf5", "w") as f:
            f.create_dataset("x", data=ev["x"][a:b].astype(np.uint16), dtype=np.uint16, compression="lzf")
            f.create_dataset("y", data=ev["y"][a:b].astype(np.uint16), dtype=np.uint16, compression="lzf")
            f.create_dataset("p", data=(ev["p"][a:b] > 0).astype(np.int8), dtype=np.int8, compression="lzf")
            f.create_dataset("t", data=t[a:b], dtype=np.float32, compression="lzf")
    size = lambda i: os.path.getsize(folder / f"{i:06d}_{i + 1:06d}_event.hdf5")
    return [i for i in range(1, len(ft) - 1) if size(i) >= 100 * 1024 and size(i - 1) >= 100 * 1024]


# ---------------------------------------------------------------------------------------- the file layout
@pytest.mark.parametrize("n", [0, 1, 3_000, 12_000, 40_000])
def test_reference_file_bytes_is_the_size_of_the_reference_file_on_disk(tmp_path, n):
    ev = interval_events([n], t0=7_000_000, seed=n)
    t_rel = ev["t"] - 0
    path = tmp_path / "f.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=ev["x"], dtype=np.uint16, compression="lzf")
        f.create_dataset("y", data=ev["y"], dtype=np.uint16, compression="lzf")
        f.create_dataset("p", data=(ev["p"] > 0).astype(np.int8), dtype=np.int8, compression="lzf")
        f.create_dataset("t", data=t_rel.astype(np.float32), dtype=np.float32, compression="lzf")
    # h5py's lzf leaves its hash table uninitialised (liblzf INIT_HTAB 0), so the compressed size of the same
    # data can differ by a few bytes from call to call, in the reference too; never by more than this
    assert abs(reference_file_bytes(ev["x"], ev["y"], ev["p"], t_rel) - path.stat().st_size) <= 64


def test_random_events_straddle_100_kib_where_the_tests_assume():
    big, small = (interval_events([n], seed=1) for n in (BIG, SMALL))
    assert reference_file_bytes(big["x"], big["y"], big["p"], big["t"]) > 1.5 * REFERENCE_MIN_BYTES
    assert reference_file_bytes(small["x"], small["y"], small["p"], small["t"]) < 0.6 * REFERENCE_MIN_BYTES


def test_reference_times_float32_rounding():
    t0 = 5_000_000_000
    t = t0 + np.array([0, 16_777_215, 16_777_217, 16_999_999, 1_000_000_033], dtype=np.int64)
    assert reference_times(t, t0, False).tolist() == [0, 16_777_215, 16_777_217, 16_999_999, 1_000_000_033]
    # exact below 2**24 us; then steps of 2 us (ties to even), ... 64 us at 1000 s
    assert reference_times(t, t0, True).tolist() == [0, 16_777_215, 16_777_216, 17_000_000, 1_000_000_064]


def test_interval_bounds_are_left_closed():
    t = np.array([0, 999_999, 1_000_000, 1_000_001, 2_000_000, 2_500_000])
    assert interval_bounds(t, [0, 1_000_000, 2_000_000, 3_000_000]).tolist() == [0, 2, 4, 6]


# --------------------------------------------------------------------------------------------- the rule
def test_select_intervals_rule():
    big, small = REFERENCE_MIN_BYTES, REFERENCE_MIN_BYTES - 1
    sizes = [big, big, small, big, big, big, big]
    sel = select_intervals([1] * 7, sizes)
    assert sel.kept.tolist() == [1, 4, 5, 6]
    assert sel.reason == ["first", "", "small", "previous_small", "", "", ""]
    assert select_intervals([1] * 7, sizes, drop_last=True).kept.tolist() == [1, 4, 5]
    assert select_intervals([1] * 7, sizes, drop_first=False).kept.tolist() == [0, 1, 4, 5, 6]
    # interval 0 is no sample, but its size still decides interval 1
    assert select_intervals([1] * 3, [small, big, big]).kept.tolist() == [2]
    assert select_intervals([1] * 3, [small, big, big]).dropped() == {"first": 1, "previous_small": 1}
    # a count rule instead of bytes; no rule at all
    assert select_intervals([50, 9, 10, 10], min_events=10).kept.tolist() == [3]
    assert select_intervals([0, 0, 0], min_bytes=0).kept.tolist() == [1, 2]
    with pytest.raises(ValueError, match="needs the reference file sizes"):
        select_intervals([1, 2])


# ------------------------------------------------------------------------------------- the converter
COUNTS = {  # per trajectory: events per interval (7 intervals, 8 frames)
    "hospital/Easy/P000.h5": [BIG, BIG, SMALL, BIG, BIG, BIG, BIG],
    "office/Easy/P000.h5": [SMALL, BIG, BIG, 0, BIG, BIG, SMALL],
    "office/Hard/P001.h5": [BIG] * 7,
}


@pytest.fixture()
def streams(tmp_path):
    root = tmp_path / "streams"
    data = {rel: write_trajectory(root, rel, counts, seed=k) for k, (rel, counts) in enumerate(COUNTS.items())}
    return root, data


def test_recipe_keeps_exactly_the_intervals_the_public_code_keeps(streams, tmp_path):
    root, data = streams
    conv = TartanAirConverter()
    plan = conv.scan(root, recipe="ecddp", drop_last_interval=False)
    assert plan.params["recipe"]["name"] == "ecddp" and plan.params["allow_empty"]
    assert [(it.key, it.split) for it in plan.items] == [
        ("hospital/Easy/P000", "test"), ("office/Easy/P000", "train"), ("office/Hard/P001", "train")]
    for item in plan.items:
        ev, ft = data[item.key + ".h5"]
        samples = conv.read(item, plan)
        kept = [int(s.attrs["interval"]) for s in samples]
        assert kept == reference_kept(ev, ft, tmp_path / "ref" / item.key)
        for s, i in zip(samples, kept):
            assert s.key == f"{item.key}/{i:06d}_{i + 1:06d}"
            assert s.frame_times.tolist() == [i * 1_000_000, (i + 1) * 1_000_000]  # 1 s per interval
            expected = ev[(ev["t"] >= ft[i]) & (ev["t"] < ft[i + 1])]
            assert s.events.tobytes() == expected.tobytes()
            assert s.attrs["env"] == item.key.split("/")[0] and s.attrs["intervals"] == 7
            assert s.attrs["bytes"] >= REFERENCE_MIN_BYTES <= s.attrs["previous_bytes"]
    kept = {it.key: [int(s.attrs["interval"]) for s in conv.read(it, plan)] for it in plan.items}
    assert kept == {"hospital/Easy/P000": [1, 4, 5, 6], "office/Easy/P000": [2, 5],
                    "office/Hard/P001": [1, 2, 3, 4, 5, 6]}
    # the recipe's default also drops each trajectory's last interval (never simulated by the public code)
    plan = conv.scan(root, recipe="ecddp")
    kept = {it.key: [int(s.attrs["interval"]) for s in conv.read(it, plan)] for it in plan.items}
    assert kept == {"hospital/Easy/P000": [1, 4, 5], "office/Easy/P000": [2, 5], "office/Hard/P001": [1, 2, 3, 4, 5]}


def test_recipe_options(streams):
    root, _ = streams
    conv = TartanAirConverter()
    count = lambda plan: sum(len(conv.read(it, plan)) for it in plan.items)
    # no size rule: every interval but the first and last, empty ones too
    plan = conv.scan(root, recipe="ecddp", min_interval_bytes=0)
    samples = [s for it in plan.items for s in conv.read(it, plan)]
    assert len(samples) == 3 * 5 and sum(len(s.events) == 0 for s in samples) == 1
    assert count(conv.scan(root, recipe="ecddp", min_interval_events=BIG)) == 3 + 2 + 5
    assert count(conv.scan(root, recipe="ecddp", drop_first_interval=False, drop_last_interval=False)) == 5 + 2 + 7
    with pytest.raises(ValueError, match="belong to a recipe"):
        conv.scan(root, min_interval_bytes=0)
    with pytest.raises(ValueError, match="unknown recipe"):
        conv.scan(root, recipe="nope")


def test_recipe_needs_its_time_base(tmp_path):
    write_trajectory(tmp_path, "gascola/Easy/P000.h5", [10] * 3, spacing=100_000)  # simulated at 10 Hz
    with pytest.raises(InputError, match=r"gascola/Easy/P000.h5: frames 0 and 1 are 100000 us apart; recipe "
                                         r"'ecddp' has 1000000 us per interval"):
        TartanAirConverter().scan(tmp_path, recipe="ecddp")
    assert len(TartanAirConverter().scan(tmp_path).items) == 1  # fine without the recipe


def test_float32_time_moves_events_across_a_boundary_as_the_public_code_does(tmp_path):
    counts = [BIG] * 20
    ev, ft = write_trajectory(tmp_path, "office/Easy/P000.h5", counts, at_frames=False, seed=3)
    # an event 1 us before the 17 s frame: float32(16999999) = 17000000, so the public code files it in 17
    assert 16_999_999 not in ev["t"]
    ev = np.sort(np.concatenate([ev, make_events([5], [6], [16_999_999], [1])]), order="t")
    write_stream(tmp_path / "office/Easy/P000.h5", ev, ft, width=W, height=H)
    conv = TartanAirConverter()

    def samples(**options):
        plan = conv.scan(tmp_path, recipe="ecddp", **options)
        return {s.key[-13:]: s for it in plan.items for s in conv.read(it, plan)}

    exact, rounded = samples(), samples(float32_time=True)
    assert exact["000016_000017"].events["t"].max() == 16_999_999
    assert rounded["000017_000018"].events["t"].min() == 17_000_000
    assert len(rounded["000016_000017"].events) == len(exact["000016_000017"].events) - 1
    assert np.all(rounded["000018_000019"].events["t"] % 2 == 0)  # 2 us steps above 2**24 us


def test_recipe_dataset_build_inspect_and_training_items(streams, tmp_path):
    root, _ = streams
    report = build_dataset("tartanair", root, tmp_path / "ds", recipe="ecddp", progress=False)
    assert report.exit_code == 0 and report.splits == {"test": 3, "train": 2 + 5}
    d = inspect_path(tmp_path / "ds")
    rec = d["recipe"]
    rows = {(r["env"], r["split"]): r for r in rec["rows"]}
    assert rows[("hospital", "test")]["samples"] == 3 and rows[("hospital", "test")]["intervals"] == 7
    assert rows[("hospital", "test")]["dropped"] == {"first": 1, "last": 1, "small": 2}
    assert rows[("office", "train")]["trajectories"] == 2 and rows[("office", "train")]["samples"] == 7
    assert rows[("office", "train")]["dropped"] == {"first": 2, "last": 2, "small": 3}
    assert rec["all"]["interval_s"]["min"] == rec["all"]["interval_s"]["max"] == 1.0
    assert rec["all"]["start_s"]["min"] == 1.0 and rec["all"]["start_s"]["max"] == 5.0
    assert rec["all"]["event_rate_hz"]["min"] == pytest.approx(BIG, abs=1)
    text = format_report(d)
    assert "recipe    ecddp: E-TartanAir" in text and "dropped first/last/small" in text
    assert len(text.splitlines()) < 40
    ds = EventDataset(tmp_path / "ds", "train")  # the pretraining items: one per kept interval
    assert len(ds) == 7 and {ds[i]["t_end"] - ds[i]["t_start"] for i in range(len(ds))} == {1_000_000}
    again = build_dataset("tartanair", root, tmp_path / "ds", recipe="ecddp", progress=False)
    assert again.units_skipped == again.num_units  # resumable: nothing redone
    other = build_dataset("tartanair", root, tmp_path / "ds", recipe="ecddp", min_interval_bytes=0, progress=False)
    assert other.units_run == other.num_units and other.num_samples == 15
