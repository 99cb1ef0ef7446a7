"""``evforge convert recordings``: raw recordings -> sample shards MEM pretraining reads (resume, errors, verify)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from raw_encoders import encode_aedat4, encode_dat, encode_evt2, encode_evt3, random_events

from evforge.data.collate import collate_events
from evforge.data.dataset import EventDataset
from evforge.dataset_builder.build import build_dataset
from evforge.dataset_builder.verify import verify
from evforge.formats import open_recording
from evforge.formats.shards import ShardReader
from evforge.pretrain.mem.inputs import MEMInputConfig, mem_inputs

REAL = Path("/work/shared/realdata")


def _all_samples(out: Path) -> dict:
    """key -> events over every split of a built dataset."""
    got = {}
    for split in ("train", "val"):
        if (out / split).is_dir():
            ds = EventDataset(out, split)
            for i in range(len(ds)):
                item = ds[i]
                got[item["key"]] = item["events"]
    return got


def _expected_windows(events, sample_us: int, min_events: int) -> dict:
    k = (events["t"] - events["t"][0]) // sample_us
    out = {}
    for w in np.unique(k):
        sel = events[k == w]
        if len(sel) >= min_events:
            out[int(w)] = sel
    return out


def test_folder_of_recordings_becomes_windows(tmp_path):
    src = tmp_path / "recs"
    (src / "day1").mkdir(parents=True)
    epoch = 1_700_000_000_000_000
    x, y, t, p = random_events(6000, 320, 240, seed=1, t0=epoch, span_us=600_000)
    (src / "day1" / "a.raw").write_bytes(encode_evt2(x, y, t, p, width=320, height=240))
    x3, y3, t3, p3 = random_events(4000, 320, 240, seed=2, t0=7_000, span_us=400_000)
    (src / "b.raw").write_bytes(encode_evt3(x3, y3, t3, p3, width=320, height=240))
    xa, ya, ta, pa = random_events(3000, 320, 240, seed=3, t0=epoch + 10**9, span_us=300_000)
    (src / "day1" / "c.aedat4").write_bytes(encode_aedat4(xa, ya, ta, pa, width=320, height=240))
    report = build_dataset("recordings", src, tmp_path / "out", progress=False, sample_ms=50, min_events=100)
    assert report.exit_code == 0 and report.num_errors == 0
    got = _all_samples(tmp_path / "out")
    for rel, path in (("day1/a.raw", src / "day1" / "a.raw"), ("b.raw", src / "b.raw"),
                      ("day1/c.aedat4", src / "day1" / "c.aedat4")):
        ev = open_recording(path).events()
        want = _expected_windows(ev, 50_000, 100)
        assert want, "the test recording must give windows"
        for w, events in want.items():
            np.testing.assert_array_equal(got.pop(f"{rel}/{w:06d}"), events)  # absolute (epoch) t kept
    assert not got  # nothing else
    ds = EventDataset(tmp_path / "out", "train")
    assert ds.kind == "samples" and tuple(ds.sensor_size) == (320, 240)
    assert len(EventDataset(tmp_path / "out", "val")) > 0  # every 10th window
    assert verify(tmp_path / "out" / "manifest.json") == []
    # MEM's input pipeline takes a batch of it
    batch = collate_events([ds[i] for i in range(4)])
    img = mem_inputs(batch, MEMInputConfig(size=(64, 64), max_events=500, val_max_events=500), (320, 240),
                     train=True, generator=torch.Generator().manual_seed(0))
    assert img.shape == (4, 3, 64, 64) and img.sum() > 0
    # a rerun redoes nothing
    again = build_dataset("recordings", src, tmp_path / "out", progress=False, sample_ms=50, min_events=100)
    assert again.units_run == 0 and again.units_skipped == report.num_units


def test_long_recording_is_cut_into_bounded_parts(tmp_path):
    src = tmp_path / "recs"
    src.mkdir()
    x, y, t, p = random_events(20000, 64, 48, seed=3, t0=0, span_us=2_000_000, runs=False)
    (src / "long.dat").write_bytes(encode_dat(x, y, t, p, width=64, height=48))
    report = build_dataset("recordings", src, tmp_path / "out", progress=False, sample_ms=20, min_events=1,
                           part_events=3000, val_fraction=0, target_bytes=50_000)
    assert report.num_errors == 0  # a part is estimated at its file's size (160 kB): one part per shard
    shards = sorted((tmp_path / "out" / "train").glob("*.h5"))
    assert len(shards) >= 6  # 20000 events / 3000 per part
    counts = [ShardReader(s).num_events for s in shards]
    assert max(counts) <= 3000 * 1.5  # parts are equal time spans: about part_events each
    got = _all_samples(tmp_path / "out")
    ev = open_recording(src / "long.dat").events()
    assert sum(len(e) for e in got.values()) == len(ev)
    np.testing.assert_array_equal(np.concatenate([got[k] for k in sorted(got)]), ev)


@pytest.mark.parametrize("fmt", ["evt2", "evt3", "dat"])
def test_later_parts_resume_mid_file(tmp_path, monkeypatch, fmt):
    """A part's read starts at the decoded block before its time range (not at the file's start), and the
    samples are the same as when every part decodes from the start."""
    import evforge.formats.prophesee as prophesee

    monkeypatch.setattr(prophesee, "BLOCK_BYTES", 4096)
    for name in ("iter_evt2", "iter_evt3", "iter_dat"):  # the default block size is bound at definition
        fn = getattr(prophesee, name)
        monkeypatch.setattr(fn, "__kwdefaults__", {**fn.__kwdefaults__, "block_bytes": 4096})
    src = tmp_path / "recs"
    src.mkdir()
    x, y, t, p = random_events(20000, 64, 48, seed=4, t0=0, span_us=30_000_000 if fmt == "evt3" else 2_000_000)
    enc = {"evt2": encode_evt2, "evt3": encode_evt3, "dat": encode_dat}[fmt]
    (src / f"long.{'dat' if fmt == 'dat' else 'raw'}").write_bytes(enc(x, y, t, p, width=64, height=48))
    starts = []
    real = prophesee._blocks

    def spy(path, offset, *args):
        starts.append(offset)
        return real(path, offset, *args)

    monkeypatch.setattr(prophesee, "_blocks", spy)
    kw = dict(progress=False, sample_ms=20 if fmt != "evt3" else 300, min_events=1, part_events=3000,
              val_fraction=0, target_bytes=50_000)
    build_dataset("recordings", src, tmp_path / "out", **kw)
    header_end = min(starts)
    assert sum(s > header_end + 8 for s in starts) >= 5  # later parts started mid-file
    got = _all_samples(tmp_path / "out")
    ev = open_recording(next(src.iterdir())).events()
    np.testing.assert_array_equal(np.concatenate([got[k] for k in sorted(got)]), ev)


def test_bad_recording_is_reported_and_the_rest_converted(tmp_path):
    src = tmp_path / "recs"
    src.mkdir()
    x, y, t, p = random_events(3000, 64, 48, seed=3, span_us=300_000)
    (src / "good.raw").write_bytes(encode_evt2(x, y, t, p, width=64, height=48))
    (src / "good2.dat").write_bytes(encode_dat(x, y, t, p, width=64, height=48))  # most files are 64x48
    (src / "cut.raw").write_bytes(encode_evt2(x, y, t, p, width=64, height=48)[:-2])
    (src / "big.raw").write_bytes(encode_evt2(x, y, t, p, width=640, height=480))  # another sensor
    back = np.concatenate([t[:1500], t[1500:] - 100_000])  # timestamps go back
    (src / "back.dat").write_bytes(encode_dat(x, y, back, p, width=64, height=48))
    report = build_dataset("recordings", src, tmp_path / "out", progress=False, sample_ms=50, min_events=10)
    assert report.exit_code == 1 and report.num_errors == 3
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    by_file = {Path(e["path"]).name: e["error"] for e in errors}
    assert "truncated" in by_file["cut.raw"] and "cut.raw" in by_file["cut.raw"]
    assert "640x480 differs" in by_file["big.raw"]
    assert "timestamps go back at event 1500" in by_file["back.dat"]
    keys = _all_samples(tmp_path / "out")
    assert {k.split("/")[0] for k in keys} == {"good.raw", "good2.dat"}


def test_real_dvxplorer_recording(tmp_path):
    path = REAL / "sample_dvxplorer.aedat4"
    if not path.is_file():
        pytest.skip(f"{path} absent (real camera samples are in ../shared/realdata)")
    src = tmp_path / "recs"
    src.mkdir()
    shutil.copy(path, src)
    report = build_dataset("recordings", src, tmp_path / "out", progress=False, sample_ms=50, min_events=100)
    assert report.num_errors == 0 and report.num_events == 111_954  # every window is dense enough
    got = _all_samples(tmp_path / "out")
    first = got["sample_dvxplorer.aedat4/000000"]
    assert int(first["t"][0]) == 1605537493718345  # epoch us through the shard's t_offset
    reader = ShardReader(tmp_path / "out" / "train" / "train-00000.h5")
    assert int(reader.index["t_offset"][0]) == 1605537493718345
    attrs = reader.sample_attrs(0)
    assert attrs["format"] == "aedat4" and len(attrs["imu"]) > 0  # IMU rows of the window kept as attrs
    assert all(1605537493718345 <= row[0] < 1605537493768345 for row in attrs["imu"])


def test_cli_convert_recordings(tmp_path, capsys):
    from evforge.cli import main

    src = tmp_path / "recs"
    src.mkdir()
    x, y, t, p = random_events(3000, 64, 48, seed=3, span_us=300_000)
    (src / "a.dat").write_bytes(encode_dat(x, y, t, p))  # no size in the header
    args = ["convert", "recordings", str(src), "--out", str(tmp_path / "out"), "--sample-ms", "50",
            "--min-events", "10", "--sensor-size", "80x60", "--split-copy-dir", str(tmp_path / "splits"), "--quiet"]
    assert main(args) == 0
    assert EventDataset(tmp_path / "out", "train").sensor_size == (80, 60)
    assert "samples" in capsys.readouterr().out
    (src / "b.raw").write_bytes(b"% evt 2.0\n% end\n" + b"\x01\x00\x00\x10")  # an event before any time word
    assert main(args) == 1
    assert "b.raw" in (tmp_path / "out" / "errors.jsonl").read_text()


def test_bounded_disorder_is_sorted_on_request(tmp_path, monkeypatch):
    """A readout order that steps back up to 0.5 ms: refused by default, sorted exactly with unsorted='sort'
    (across decoder blocks and parts that resume mid-file), and a larger step back than the window refused."""
    import evforge.formats.prophesee as prophesee

    monkeypatch.setattr(prophesee.iter_dat, "__kwdefaults__", {**prophesee.iter_dat.__kwdefaults__,
                                                              "block_bytes": 4096})
    rng = np.random.default_rng(7)
    x, y, t, p = random_events(20000, 64, 48, seed=5, t0=0, span_us=2_000_000, runs=False)
    jittered = t + rng.integers(0, 500, len(t))  # file order = t order, stamps late by up to 0.5 ms
    src = tmp_path / "recs"
    src.mkdir()
    (src / "r.dat").write_bytes(encode_dat(x, y, jittered, p, width=64, height=48))
    kw = dict(progress=False, sample_ms=20, min_events=1, part_events=3000, val_fraction=0, target_bytes=50_000)
    strict = build_dataset("recordings", src, tmp_path / "strict", **kw)
    assert strict.num_errors == 1 and "unsorted='sort'" in (tmp_path / "strict" / "errors.jsonl").read_text()
    report = build_dataset("recordings", src, tmp_path / "sorted", unsorted="sort", sort_window_ms=1, **kw)
    assert report.num_errors == 0 and report.num_units >= 6
    got = _all_samples(tmp_path / "sorted")
    order = np.argsort(jittered, kind="stable")
    ev = open_recording(src / "r.dat").events()[order]
    np.testing.assert_array_equal(np.concatenate([got[k] for k in sorted(got)]), ev)
    narrow = build_dataset("recordings", src, tmp_path / "narrow", unsorted="sort", sort_window_ms=0.1, **kw)
    assert narrow.num_errors == 1 and "outside the sort window" in (tmp_path / "narrow" / "errors.jsonl").read_text()
