"""DSEC-Semantic and E-TartanAir converters: exact windows, label images, rectification, splits, bad input."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest
from PIL import Image

from evforge.dataset_builder.converters.dsec import DSECConverter
from evforge.dataset_builder.converters.tartanair import TartanAirConverter
from evforge.errors import InputError
from evforge.formats.events import make_events
from evforge.formats.shards import ShardReader, ShardWriter
from evforge.formats.streamfile import write_stream

T_OFFSET = 47_000_123_456  # DSEC's t_offset: absolute us of the recording start
N_EVENTS = 30_000
LABEL_T = (20_000, 150_000, 250_000)  # relative us: the first label has fewer than N_KEEP events before it
N_KEEP = 4_000


# --------------------------------------------------------------------------------------------- DSEC fixture
def dsec_columns(seed=0):
    """Sorted DSEC columns over 300 ms, with ties and events exactly at the label times."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(0, 300_000, N_EVENTS)).astype(np.uint32)
    for lt in LABEL_T:  # a few events at exactly the label time (must fall outside its window)
        k = int(np.searchsorted(t, lt))
        t[k : k + 3] = lt
    t.sort()
    return {"x": rng.integers(0, 640, N_EVENTS).astype(np.uint16),
            "y": rng.integers(0, 480, N_EVENTS).astype(np.uint16),
            "p": rng.integers(0, 2, N_EVENTS).astype(np.uint8), "t": t}


def write_dsec_events(path: Path, cols: dict, t_offset: int = T_OFFSET):
    """DSEC's events.h5: /events/{p,t,x,y} Blosc zstd, /ms_to_idx (first index with t >= ms*1000), /t_offset."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for name in ("p", "t", "x", "y"):
            f.create_dataset(f"events/{name}", data=cols[name], chunks=(4096,),
                             **hdf5plugin.Blosc(cname="zstd", clevel=1, shuffle=hdf5plugin.Blosc.BITSHUFFLE))
        t = cols["t"].astype(np.int64)
        ms = np.arange(0, math.ceil(int(t[-1]) / 1000) + 1, dtype=np.int64)
        f.create_dataset("ms_to_idx", data=np.searchsorted(t, ms * 1000, "left").astype(np.uint64))
        f.create_dataset("t_offset", data=np.int64(t_offset))


def rect_formula(x, y):
    """The fixture's rectification; fractional parts stay >= 0.05 away from .5, so rounding is unambiguous."""
    return x * 0.75 + 10.1, y * 1.25 - 20.2


def write_rectify_map(path: Path):
    yy, xx = np.mgrid[0:480, 0:640].astype(np.float64)
    xr, yr = rect_formula(xx, yy)
    m = np.stack([xr, yr], axis=-1).astype(np.float32)
    m[0, 0] = np.nan  # events at raw (0, 0) are dropped
    with h5py.File(path, "w") as f:
        f.create_dataset("rectify_map", data=m)


def make_sequence(seq: Path, seed=0, layout="ess"):
    """One DSEC-Semantic sequence; layout "ess" (semantic/left/11classes/data + semantic/timestamps.txt,
    events/left) or "official" (11classes/*.png + <seq>_semantic_timestamps.txt, events_left)."""
    cols = dsec_columns(seed)
    events_dir = seq / ("events/left" if layout == "ess" else "events_left")
    write_dsec_events(events_dir / "events.h5", cols)
    write_rectify_map(events_dir / "rectify_map.h5")
    label_dir = seq / ("semantic/left/11classes/data" if layout == "ess" else "11classes")
    ts_file = seq / ("semantic/timestamps.txt" if layout == "ess" else f"{seq.name}_semantic_timestamps.txt")
    label_dir.mkdir(parents=True)
    rng = np.random.default_rng(100 + seed)
    labels = []
    for i in range(len(LABEL_T)):
        lab = rng.integers(0, 11, (440, 640)).astype(np.uint8)
        lab[:5] = 255  # ignore label
        Image.fromarray(lab, mode="L").save(label_dir / f"{i:06d}.png")
        labels.append(lab)
    ts_file.write_text("".join(f"{T_OFFSET + lt}\n" for lt in LABEL_T))
    return cols, labels, ts_file, events_dir / "events.h5"


@pytest.fixture(scope="module")
def dsec_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsec")
    seqs = {"zurich_city_00_a": make_sequence(root / "train" / "zurich_city_00_a", 0, "ess"),
            "zurich_city_13_a": make_sequence(root / "test" / "zurich_city_13_a", 1, "official")}
    write_dsec_events(root / "train" / "zurich_city_03_a" / "events" / "left" / "events.h5", dsec_columns(2))
    return root, seqs


def reference_window(cols, t_label_abs, n_keep):
    t = cols["t"].astype(np.int64) + T_OFFSET
    stop = int(np.searchsorted(t, t_label_abs, "left"))
    start = max(0, stop - n_keep)
    return make_events(cols["x"][start:stop], cols["y"][start:stop], t[start:stop], cols["p"][start:stop])


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------------------------- DSEC tests
def test_dsec_scan_layouts_and_splits(dsec_root):
    root, _ = dsec_root
    plan = DSECConverter().scan(root, events_per_label=N_KEEP)
    assert plan.name == "dsec" and plan.kind == "streams" and plan.sensor_size == (640, 480)
    assert plan.classes[:3] == ["background", "building", "fence"] and len(plan.classes) == 11
    assert [(it.key, it.split) for it in plan.items] == (
        [(f"zurich_city_13_a/{i:06d}", "test") for i in range(3)]
        + [(f"zurich_city_00_a/{i:06d}", "train") for i in range(3)])
    assert all(it.label == -1 and it.path.endswith("events.h5") for it in plan.items)
    assert plan.params["label_size"] == [640, 440] and plan.params["unlabelled_sequences"] == ["train/zurich_city_03_a"]
    assert DSECConverter.name == "dsec" and DSECConverter().kind == "streams"


def test_dsec_samples_are_the_last_n_events_before_each_label(dsec_root, tmp_path):
    root, seqs = dsec_root
    conv = DSECConverter()
    plan = conv.scan(root, events_per_label=N_KEEP)
    samples = [s for it in plan.items for s in conv.read(it, plan)]
    assert len(samples) == len(plan.items)  # one per label
    path = tmp_path / "dsec-00000.h5"
    with ShardWriter(path, sensor_size=plan.sensor_size, kind="streams") as w:
        for s in samples:
            w.add_sample(s.events, key=s.key, label=s.label, frame_times=s.frame_times, attrs=s.attrs,
                         frame_images=s.frame_images)
    with ShardReader(path) as r:
        assert r.check() == [] and r.frame_image_size == (640, 440)
        for i, (s, it) in enumerate(zip(samples, plan.items)):
            seq, index = it.key.split("/")
            cols, labels, _, _ = seqs[seq]
            t_label = T_OFFSET + LABEL_T[int(index)]
            expected = reference_window(cols, t_label, N_KEEP)
            assert s.events.tobytes() == expected.tobytes()
            assert len(expected) == (N_KEEP if int(index) > 0 else int(np.sum(cols["t"] < LABEL_T[0])))
            assert r.sample(i)[0].tobytes() == expected.tobytes() and r.keys[i] == it.key
            np.testing.assert_array_equal(r.frame_times(i), [t_label])
            assert r.frame_event_idx(i)[0] == len(expected)  # every event is before the label time
            np.testing.assert_array_equal(r.frame_image(i, 0), labels[int(index)])
            assert r.sample_attrs(i) == {"sequence": seq, "label_index": int(index),
                                         "label_file": f"{int(index):06d}.png", "rectified": False}


def test_dsec_rectification_maps_coordinates(dsec_root):
    root, seqs = dsec_root
    conv = DSECConverter()
    plan = conv.scan(root, events_per_label=N_KEEP, rectify=True)
    item = next(it for it in plan.items if it.key == "zurich_city_00_a/000002")
    (sample,) = conv.read(item, plan)
    raw = reference_window(seqs["zurich_city_00_a"][0], T_OFFSET + LABEL_T[2], N_KEEP)
    xr, yr = (np.rint(v) for v in rect_formula(raw["x"].astype(np.float64), raw["y"].astype(np.float64)))
    keep = (xr >= 0) & (xr < 640) & (yr >= 0) & (yr < 480) & ~((raw["x"] == 0) & (raw["y"] == 0))
    assert 0 < keep.sum() < len(raw)  # some events leave the sensor (y < 16.16 or y > 399.76)
    np.testing.assert_array_equal(sample.events["x"], xr[keep])
    np.testing.assert_array_equal(sample.events["y"], yr[keep])
    np.testing.assert_array_equal(sample.events["t"], raw["t"][keep])
    np.testing.assert_array_equal(sample.events["p"], raw["p"][keep])
    assert sample.attrs["rectified"] is True and plan.params["rectify"] is True


def test_dsec_nan_map_entry_drops_the_event(tmp_path):
    from evforge.dataset_builder.converters.dsec import rectify_events
    m = np.zeros((480, 640, 2), np.float32)
    m[..., 0], m[..., 1] = 5.4, 7.6
    m[1, 2] = np.nan
    ev = make_events([2, 3, 639], [1, 1, 479], [10, 11, 12], [1, -1, 1])
    out = rectify_events(ev, m)
    assert out.tolist() == [(5, 8, 11, -1), (5, 8, 12, 1)]


def test_dsec_bad_inputs_name_the_file(dsec_root, tmp_path):
    root, _ = dsec_root
    conv = DSECConverter()

    def fresh(name):
        return copy_tree(root, tmp_path / name)

    r = fresh("missing")
    (r / "train/zurich_city_00_a/events/left/events.h5").unlink()
    with pytest.raises(InputError, match=r"zurich_city_00_a/events/left/events.h5: missing events.h5"):
        conv.scan(r)

    r = fresh("count")
    (r / "train/zurich_city_00_a/semantic/left/11classes/data/000002.png").unlink()
    with pytest.raises(InputError, match=r"semantic/timestamps.txt: 3 timestamps but 2 label PNGs"):
        conv.scan(r)

    r = fresh("order")
    ts = r / "test/zurich_city_13_a/zurich_city_13_a_semantic_timestamps.txt"
    ts.write_text(f"{T_OFFSET + 10}\n{T_OFFSET + 30}\n{T_OFFSET + 30}\n")
    with pytest.raises(InputError, match=r"zurich_city_13_a_semantic_timestamps.txt: timestamps not increasing"):
        conv.scan(r)

    r = fresh("truncated")
    ev = r / "train/zurich_city_00_a/events/left/events.h5"
    data = ev.read_bytes()
    ev.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=rf"{ev}: "):
        conv.scan(r)

    r = fresh("corrupt")  # header intact, one compressed chunk of events/x overwritten: fails on read
    ev = r / "train/zurich_city_00_a/events/left/events.h5"
    with h5py.File(ev) as f:
        info = f["events/x"].id.get_chunk_info(6)  # events 24576.. are in the last label's window
    with open(ev, "r+b") as fh:
        fh.seek(info.byte_offset + 16)
        fh.write(b"\xff" * (info.size - 16))
    plan = conv.scan(r, events_per_label=N_KEEP)
    item = next(it for it in plan.items if it.key == "zurich_city_00_a/000002")
    with pytest.raises(InputError, match=rf"{ev}: cannot read events"):
        conv.read(item, plan)

    r = fresh("msidx")  # an ms_to_idx that disagrees with t is reported, not trusted
    ev = r / "train/zurich_city_00_a/events/left/events.h5"
    with h5py.File(ev, "a") as f:
        f["ms_to_idx"][100:200] = 0
    plan = conv.scan(r, events_per_label=N_KEEP)
    item = next(it for it in plan.items if it.key == "zurich_city_00_a/000001")
    with pytest.raises(InputError, match=rf"{ev}: ms_to_idx disagrees"):
        conv.read(item, plan)

    r = fresh("norect")
    (r / "test/zurich_city_13_a/events_left/rectify_map.h5").unlink()
    conv.scan(r)  # not needed without rectify
    with pytest.raises(InputError, match=r"events_left/rectify_map.h5: missing rectify_map.h5"):
        conv.scan(r, rectify=True)

    with pytest.raises(InputError, match="not a folder"):
        conv.scan(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------- TartanAir
def stream_events(n, t0, duration, width, height, seed):
    rng = np.random.default_rng(seed)
    return make_events(rng.integers(0, width, n), rng.integers(0, height, n),
                       np.sort(rng.integers(t0, t0 + duration, n)), rng.choice([1, -1], n))


def write_streams(root: Path, specs):
    """specs: (relative path, width, height, seed) -> stream files with 10 Hz frames and simulator attrs."""
    out = {}
    for rel, w, h, seed in specs:
        ev = stream_events(5_000, 1_000_000, 500_000, w, h, seed)
        ft = np.arange(1_000_000, 1_500_001, 100_000)
        attrs = {"simulator": "evforge", "preset": "default", "pos_thres": 0.2, "overrides": {"cutoff_hz": 30.0},
                 "resolution": [w, h]}
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_stream(path, ev, ft, width=w, height=h, attrs=attrs)
        out[rel] = (ev, ft)
    return out


def test_tartanair_streams_round_trip_and_split(tmp_path):
    data = write_streams(tmp_path / "streams", [("hospital/Easy/P000.h5", 32, 24, 0),
                                                ("office/Hard/P001.h5", 32, 24, 1)])
    (tmp_path / "streams/office/Hard/P002.h5.tmp-123").write_bytes(b"junk")  # an interrupted write: ignored
    conv = TartanAirConverter()
    plan = conv.scan(tmp_path / "streams")
    assert plan.name == "tartanair" and plan.kind == "streams" and plan.sensor_size == (32, 24)
    assert plan.classes == [] and plan.params["test_envs"] == ["gascola", "hospital", "neighborhood"]
    assert [(it.key, it.split, it.label) for it in plan.items] == [("hospital/Easy/P000", "test", -1),
                                                                   ("office/Hard/P001", "train", -1)]
    path = tmp_path / "shard.h5"
    with ShardWriter(path, sensor_size=plan.sensor_size, kind="streams") as w:
        for it in plan.items:
            (s,) = conv.read(it, plan)
            assert s.frame_images is None
            w.add_sample(s.events, key=s.key, label=s.label, frame_times=s.frame_times, attrs=s.attrs)
    with ShardReader(path) as r:
        assert r.check() == []
        for i, rel in enumerate(data):
            ev, ft = data[rel]
            assert r.sample(i)[0].tobytes() == ev.tobytes()
            np.testing.assert_array_equal(r.frame_times(i), ft)
            for j in range(len(ft) - 1):  # ECDDP's sample: the events between consecutive source frames
                expected = ev[(ev["t"] >= ft[j]) & (ev["t"] < ft[j + 1])]
                assert r.frame_window(i, j).tobytes() == expected.tobytes()
            a = r.sample_attrs(i)
            assert a["pos_thres"] == 0.2 and a["overrides"] == {"cutoff_hz": 30.0} and a["stream_file"] == rel
            assert a["env"] == rel.split("/")[0]
    plan = conv.scan(tmp_path / "streams", test_envs=("OFFICE",))  # case-insensitive, replaces the default
    assert [it.split for it in plan.items] == ["train", "test"]


def test_tartanair_mismatched_sensor_sizes(tmp_path):
    write_streams(tmp_path, [("gascola/Easy/P000.h5", 32, 24, 0), ("gascola/Easy/P001.h5", 40, 24, 1)])
    with pytest.raises(InputError, match=r"gascola/Easy/P001.h5: sensor size 40x24 differs from 32x24"):
        TartanAirConverter().scan(tmp_path)
    (tmp_path / "gascola" / "Hard").mkdir()
    with pytest.raises(InputError, match="no stream files"):
        TartanAirConverter().scan(tmp_path / "gascola" / "Hard")


def test_tartanair_simulate_on_procedural_scenes(tmp_path):
    """The scan lists the frame sequences; a unit simulates its own when it runs (then reads them as streams)."""
    from evforge.simulator.scenes import SceneSpec, make_dataset
    make_dataset(tmp_path / "frames", envs=("hospital", "office"), trajectories=1,
                 spec=SceneSpec(width=32, height=24, frames=4, speed_px=2.0, seed=1))
    conv = TartanAirConverter()
    plan = conv.scan(tmp_path / "frames", simulate=True, out=tmp_path / "ds", device="cpu", batch=2)
    streams = tmp_path / "ds" / "_streams"
    assert not streams.exists()  # nothing simulated yet
    assert [(it.key, it.split) for it in plan.items] == [("hospital/Easy/P000", "test"), ("office/Easy/P000", "train")]
    assert [it.path for it in plan.items] == [str(streams / "hospital/Easy/P000.h5"),
                                              str(streams / "office/Easy/P000.h5")]
    assert plan.sensor_size == (32, 24) and plan.params["streams_dir"] == str(streams)
    assert plan.params["simulate_config"]["device"] == "cpu"
    conv.prepare_unit(plan.items, plan)
    assert sorted(p.relative_to(streams).as_posix() for p in streams.rglob("*.h5")) == [
        "hospital/Easy/P000.h5", "office/Easy/P000.h5"]
    for it in plan.items:
        (s,) = conv.read(it, plan)
        assert len(s.events) > 0 and len(s.frame_times) == 4
        assert s.attrs["sequence"] == it.key and s.attrs["simulator"] == "evforge"
    conv.finish_unit(plan.items, plan)
    assert not list(streams.rglob("*.h5"))  # dropped once the shard is written (keep_streams keeps them)
    again = conv.scan(tmp_path / "frames", simulate=True, out=tmp_path / "ds", device="cpu")
    assert [it.key for it in again.items] == [it.key for it in plan.items]
    with pytest.raises(ValueError, match="needs out="):
        conv.scan(tmp_path / "frames", simulate=True)
