"""Shards: bit-exact round trips, one-slice sample reads, frame windows, atomic writes, clear errors, pickling."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle

import h5py
import numpy as np
import pytest

from evforge.errors import InputError
from evforge.formats.events import EVENT_DTYPE, EventFormatError, empty_events, make_events
from evforge.formats.shards import (
    CHUNK_EVENTS,
    RAW_EVENT_BYTES,
    RollingShardWriter,
    ShardReader,
    ShardWriter,
    estimate_sample_bytes,
    sha256_file,
)

W, H = 64, 48
T0 = 1_700_000_000  # absolute us far from zero, as real recordings are
BLOSC_FILTER_ID = 32001


def random_events(n, t0=T0, duration_us=100_000, seed=0):
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(t0, t0 + duration_us, n))
    if n > 10:
        t[n // 2 : n // 2 + 5] = t[n // 2]  # equal timestamps keep their order
    return make_events(rng.integers(0, W, n), rng.integers(0, H, n), t, rng.choice([1, -1], n))


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


SAMPLES = [  # (key, label, n events, start time, attrs)
    ("cat/image_0001", 0, 1000, T0, {"source": "cat/image_0001.bin"}),
    ("cat/image_0002", 0, CHUNK_EVENTS + 17, T0 + 5_000_000, {}),  # crosses a chunk boundary
    ("dog/image_0001", 1, 1, 0, {"crop": [0, 0, 10, 10]}),  # a single event at t = 0
    ("dog/image_0002", -1, 3000, T0 - 10**9, None),  # unlabelled, earlier clock than the sample before
]


def write_samples(path, compression="zstd", attrs=None):
    events = [random_events(n, t0, seed=i) for i, (_, _, n, t0, _) in enumerate(SAMPLES)]
    with ShardWriter(path, sensor_size=(W, H), compression=compression, attrs=attrs) as w:
        for i, ((key, label, _, _, a), ev) in enumerate(zip(SAMPLES, events)):
            assert w.add_sample(ev, key=key, label=label, attrs=a) == i
        w.add_sample(empty_events(), key="empty/0", allow_empty=True)
    return events + [empty_events()]


# --------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("compression", ["zstd", "lz4", "gzip"])
def test_samples_round_trip_bit_for_bit(tmp_path, compression):
    path = tmp_path / "train-00000.h5"
    attrs = {"split": "train", "converter": {"name": "ncaltech101", "canvas": [240, 180]}, "seed": 3}
    events = write_samples(path, compression, attrs)
    with ShardReader(path) as r:
        assert len(r) == len(SAMPLES) + 1 and r.num_events == sum(map(len, events))
        assert r.kind == "samples" and r.sensor_size == (W, H) and r.attrs == attrs
        assert r.keys == [s[0] for s in SAMPLES] + ["empty/0"]
        np.testing.assert_array_equal(r.labels, [s[1] for s in SAMPLES] + [-1])
        for i, ev in enumerate(events):
            got, label, key = r.sample(i)
            assert got.dtype == EVENT_DTYPE and got.tobytes() == ev.tobytes(), key
            assert (label, key) == (int(r.labels[i]), r.keys[i])
            row = r.index[i]
            if len(ev):
                assert row["t_offset"] == row["t_start"] == ev["t"][0] and row["t_end"] == ev["t"][-1] + 1
        assert r.sample(-1)[2] == "empty/0" and len(r.sample(-1)[0]) == 0
        assert r.index[-1]["t_start"] == r.index[-1]["t_end"] == 0
        assert [r.sample_attrs(i) for i in range(len(r))] == [a or {} for *_, a in SAMPLES] + [{}]
        np.testing.assert_array_equal(r.index["offset"], np.concatenate([[0], np.cumsum(list(map(len, events)))[:-1]]))
        assert r.check() == []
        with pytest.raises(IndexError):
            r.sample(len(r))
    with h5py.File(path) as f:
        assert f.attrs["evforge_format"] == "shard" and f.attrs["format_version"] == 1
        assert f.attrs["num_samples"] == len(events) and bool(f.attrs["complete"])
        dtypes = {name: f["events"][name].dtype for name in "xypt"}
        assert dtypes == {"x": np.uint16, "y": np.uint16, "p": np.uint8, "t": np.uint32}
        assert f["index/label"].dtype == np.int32 and f["index/offset"].dtype == np.uint64
        assert f["index/t_offset"].dtype == np.int64
        for name in "xypt":
            ds = f["events"][name]
            assert ds.chunks == (CHUNK_EVENTS,)
            plist = ds.id.get_create_plist()
            ids = [plist.get_filter(k)[0] for k in range(plist.get_nfilters())]
            assert ids == ([h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_DEFLATE] if compression == "gzip"
                           else [BLOSC_FILTER_ID])
            if compression != "gzip":  # Blosc cd_values end in clevel, shuffle (2 = bit), compressor
                assert plist.get_filter(0)[2][-3:] == (5, 2, {"zstd": 5, "lz4": 1}[compression])


def test_plain_h5py_recipe_from_format_doc(tmp_path):
    path = tmp_path / "s.h5"
    events = write_samples(path)
    i = 1
    with h5py.File(path, "r") as f:
        o, n = int(f["index/offset"][i]), int(f["index/count"][i])
        x, y, p = (f["events/" + c][o : o + n] for c in "xyp")
        t = f["events/t"][o : o + n].astype(np.int64) + f["index/t_offset"][i]
    assert np.array_equal(t, events[i]["t"]) and np.array_equal(x, events[i]["x"])
    assert np.array_equal(y, events[i]["y"]) and np.array_equal(p.astype(int) * 2 - 1, events[i]["p"])


def test_large_sample_and_buffered_small_samples(tmp_path):
    """Many small samples (buffered) and one sample larger than the flush size land where the index says."""
    rng = np.random.default_rng(5)
    sizes = list(rng.integers(1, 3000, 600)) + [3 * 16 * CHUNK_EVENTS + 11] + list(rng.integers(1, 50, 20))
    events = [random_events(int(n), seed=i) for i, n in enumerate(sizes)]
    with ShardWriter(tmp_path / "s.h5", sensor_size=(W, H), compression="lz4") as w:
        for i, ev in enumerate(events):
            assert w.add_sample(ev, key=f"k{i}", label=i % 7) == i
        assert w.num_events == sum(sizes)
    with ShardReader(tmp_path / "s.h5") as r:
        for i in (0, 1, 299, 599, 600, 601, len(sizes) - 1):
            assert r.sample(i)[0].tobytes() == events[i].tobytes()
        assert r.events(600, 100, 200).tobytes() == events[600][100:200].tobytes()
        assert r.check() == []


def stream_data():
    """Two sequences: frames every 10 ms; the second has a frame before its first event and one after its last."""
    ev0 = random_events(20_000, T0, 200_000, seed=1)
    ft0 = np.arange(T0, T0 + 200_001, 10_000)
    ev1 = random_events(5_000, T0 + 1_000_000, 50_000, seed=2)
    ft1 = np.arange(T0 + 995_000, T0 + 1_060_001, 10_000)
    return [(ev0, ft0), (ev1, ft1)]


def test_stream_shard_frames_and_windows(tmp_path):
    data = stream_data()
    path = tmp_path / "streams-00000.h5"
    with ShardWriter(path, sensor_size=(W, H), kind="streams") as w:
        for i, (ev, ft) in enumerate(data):
            w.add_sample(ev, key=f"seq{i}", frame_times=ft, attrs={"fps": 100})
        w.add_sample(empty_events(), key="no-events", frame_times=[T0, T0 + 10], allow_empty=True)
    with ShardReader(path) as r:
        assert r.kind == "streams" and len(r) == 3
        for i, (ev, ft) in enumerate(data):
            assert r.sample(i)[0].tobytes() == ev.tobytes()
            np.testing.assert_array_equal(r.frame_times(i), ft)
            np.testing.assert_array_equal(r.frame_event_idx(i), np.searchsorted(ev["t"], ft, "left"))
            assert r.index[i]["t_offset"] == min(ev["t"][0], ft[0])
            assert r.index[i]["t_end"] == max(ev["t"][-1], ft[-1]) + 1
            t = ev["t"]
            for j in range(len(ft) - 1):
                expected = ev[(t >= ft[j]) & (t < ft[j + 1])]
                assert r.frame_window(i, j).tobytes() == expected.tobytes(), (i, j)
            with pytest.raises(IndexError):
                r.frame_window(i, len(ft) - 1)
        assert r.index[0]["t_offset"] == T0  # first frame == first-event floor
        assert r.frame_event_idx(1)[-1] == len(data[1][0])  # frame after the last event -> count
        np.testing.assert_array_equal(r.frame_event_idx(2), [0, 0])
        assert len(r.frame_window(2, 0)) == 0
        assert r.check() == []
    with h5py.File(path) as f:
        assert f["frames/t"].dtype == np.int64 and f["frames/event_idx"].dtype == np.uint64
        assert len(f["frames/t"]) == sum(len(ft) for _, ft in data) + 2
        n0, n1 = len(data[0][1]), len(data[1][1])
        np.testing.assert_array_equal(f["index/frame_offset"][:], [0, n0, n0 + n1])


# ---------------------------------------------------------------------------------------- bounded reads
def test_sample_reads_exactly_its_slice_of_each_column(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"
    events = write_samples(path)
    reads = []
    original = h5py.Dataset.__getitem__

    def recording(self, args, *rest, **kw):
        reads.append((self.name, args))
        return original(self, args, *rest, **kw)

    with ShardReader(path) as r:
        offsets, counts = r.index["offset"].astype(int), r.index["count"].astype(int)
        monkeypatch.setattr(h5py.Dataset, "__getitem__", recording)
        for i in (1, 3, 0):
            reads.clear()
            got, _, _ = r.sample(i)
            assert got.tobytes() == events[i].tobytes()
            o, n = offsets[i], counts[i]
            assert sorted(reads) == sorted((f"/events/{c}", slice(o, o + n, None)) for c in "xypt"), reads
        reads.clear()
        r.sample(4)  # the empty sample reads nothing at all
        assert reads == []


def test_reading_one_sample_does_not_touch_other_samples_chunks(tmp_path):
    """Sample 0 fills chunk 0 exactly; with chunk 1 (sample 1) destroyed on disk, sample 0 still reads."""
    path = tmp_path / "s.h5"
    ev0, ev1 = random_events(CHUNK_EVENTS, seed=1), random_events(5000, T0 + 10**6, seed=2)
    with ShardWriter(path, sensor_size=(W, H), compression="gzip") as w:
        w.add_sample(ev0, key="a")
        w.add_sample(ev1, key="b")
    with h5py.File(path) as f:
        spans = [f["events"][c].id.get_chunk_info_by_coord((CHUNK_EVENTS,)) for c in "xypt"]
    with open(path, "r+b") as fh:
        for info in spans:
            fh.seek(info.byte_offset)
            fh.write(b"\xff" * info.size)  # not a deflate stream any more
    with ShardReader(path) as r:
        assert r.sample(0)[0].tobytes() == ev0.tobytes()
        with pytest.raises(InputError) as err:
            r.sample(1)
        assert str(err.value).startswith(f"{path}: cannot read sample 1")


# ------------------------------------------------------------------------------------ processes, pickling
def test_pickled_reader_reopens(tmp_path):
    path = tmp_path / "s.h5"
    events = write_samples(path)
    r = ShardReader(path)
    assert r.sample(0)[0].tobytes() == events[0].tobytes()  # handle now open in this process
    clone = pickle.loads(pickle.dumps(r))
    assert clone._file is None  # the handle did not travel
    assert clone.sample(1)[0].tobytes() == events[1].tobytes()
    assert clone.keys == r.keys and np.array_equal(clone.index, r.index) and not clone.index.flags.writeable
    r.close()
    clone.close()


def _read_in_child(reader, i, queue):
    queue.put(reader.sample(i)[0].tobytes())


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_reader_in_worker_process(tmp_path, method):
    """As in DataLoader workers: a forked child reopens (parent handle already open), a spawned one unpickles."""
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    path = tmp_path / "s.h5"
    events = write_samples(path)
    with ShardReader(path) as r:
        r.sample(0)
        ctx = multiprocessing.get_context(method)
        queue = ctx.Queue()
        proc = ctx.Process(target=_read_in_child, args=(r, 3, queue))
        proc.start()
        got = queue.get(timeout=120)
        proc.join(timeout=60)
        assert proc.exitcode == 0
        assert got == events[3].tobytes()
        assert r.sample(1)[0].tobytes() == events[1].tobytes()  # the parent's handle still works


# ------------------------------------------------------------------------------------------ atomic writes
def test_exception_inside_with_leaves_nothing(tmp_path):
    path = tmp_path / "s.h5"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(path, sensor_size=(W, H)) as w:
            w.add_sample(random_events(100), key="a")
            assert listing(tmp_path) == [f"s.h5.tmp-{os.getpid()}"]
            raise RuntimeError("boom")
    assert listing(tmp_path) == []


def test_bad_sample_aborts_and_keeps_previous_file(tmp_path):
    path = tmp_path / "s.h5"
    write_samples(path)
    before = sha256_file(path)
    with pytest.raises(EventFormatError, match="not sorted"):
        with ShardWriter(path, sensor_size=(W, H)) as w:
            w.add_sample(random_events(100)[::-1], key="a")
    assert listing(tmp_path) == ["s.h5"] and sha256_file(path) == before


def test_writer_rejects_bad_input(tmp_path):
    ev = random_events(100)
    with ShardWriter(tmp_path / "s.h5", sensor_size=(W, H)) as w:
        w.add_sample(ev, key="a")
        cases = [
            (dict(key="a"), ValueError, "duplicate"),
            (dict(key=""), ValueError, "key"),
            (dict(key="x\ny"), ValueError, "key"),
            (dict(key="b", label=-2), ValueError, "label"),
            (dict(key="b", label=1.5), ValueError, "label"),
            (dict(key="b", frame_times=[T0]), ValueError, "no frames"),
            (dict(key="b", attrs={"f": object()}), ValueError, "JSON"),
        ]
        for kwargs, exc, match in cases:
            with pytest.raises(exc, match=match):
                w.add_sample(ev, **kwargs)
        with pytest.raises(EventFormatError, match="no events"):
            w.add_sample(empty_events(), key="e")
        wide = ev.copy()
        wide["x"][7] = W
        with pytest.raises(EventFormatError, match="outside"):
            w.add_sample(wide, key="w")
        long = ev.copy()
        long["t"][-1] = long["t"][0] + 2**32
        with pytest.raises(EventFormatError, match="u4"):
            w.add_sample(long, key="l")
        assert w.num_samples == 1
    with ShardWriter(tmp_path / "t.h5", sensor_size=(W, H), kind="streams") as w:
        with pytest.raises(ValueError, match="needs frame_times"):
            w.add_sample(ev, key="a")
        with pytest.raises(ValueError, match="not sorted"):
            w.add_sample(ev, key="a", frame_times=[T0 + 10, T0])
        with pytest.raises(ValueError, match="integer"):
            w.add_sample(ev, key="a", frame_times=[T0 + 0.5])
    for kwargs, match in [(dict(compression="bzip2"), "compression"), (dict(kind="video"), "kind"),
                          (dict(attrs={"width": 3}), "reserved")]:
        with pytest.raises(ValueError, match=match):
            ShardWriter(tmp_path / "u.h5", sensor_size=(W, H), **kwargs)
    assert listing(tmp_path) == ["s.h5", "t.h5"]


def test_rolling_writer_cuts_at_target_bytes(tmp_path):
    sizes = [400, 300, 500, 2000, 10, 10, 690]
    target = estimate_sample_bytes(400) + estimate_sample_bytes(300)  # exactly the first two samples
    events = [random_events(n, seed=i) for i, n in enumerate(sizes)]
    placed = []
    with RollingShardWriter(tmp_path / "out", prefix="train", sensor_size=(W, H), target_bytes=target) as rw:
        for i, ev in enumerate(events):
            placed.append(rw.add_sample(ev, key=f"k{i}", label=0))
    names = [p.name for p in rw.paths]
    assert names == [f"train-{i:05d}.h5" for i in range(5)]
    # [400 | 300] [500] [2000 alone, over target] [10 10] [690]: a shard starts when the next would overflow
    assert [(p.name, j) for p, j in placed] == [("train-00000.h5", 0), ("train-00000.h5", 1),
                                                ("train-00001.h5", 0), ("train-00002.h5", 0),
                                                ("train-00003.h5", 0), ("train-00003.h5", 1),
                                                ("train-00004.h5", 0)]
    for (p, j), ev in zip(placed, events):
        with ShardReader(p) as r:
            assert r.sample(j)[0].tobytes() == ev.tobytes()
    assert estimate_sample_bytes(1000, 10) == 1000 * RAW_EVENT_BYTES + 10 * 16 + 48


def test_rolling_writer_exception_keeps_finished_shards_only(tmp_path):
    with pytest.raises(RuntimeError):
        target = estimate_sample_bytes(150)
        with RollingShardWriter(tmp_path, prefix="val", sensor_size=(W, H), target_bytes=target) as rw:
            rw.add_sample(random_events(100), key="a")
            rw.add_sample(random_events(100), key="b")  # starts val-00001
            raise RuntimeError("stop")
    assert listing(tmp_path) == ["val-00000.h5"]


# ------------------------------------------------------------------------------------------------ errors
def test_reader_errors_name_the_file(tmp_path, non_evforge_files):
    good = tmp_path / "good.h5"
    write_samples(good)
    missing, text, other = non_evforge_files
    stream = tmp_path / "stream.h5"
    with h5py.File(stream, "w") as f:
        f.attrs["evforge_format"] = "stream"
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases = [(missing, "no such file"), (text, "not a readable HDF5 file"), (other, "not an evforge shard"),
             (stream, "not an evforge shard"), (truncated, "")]
    for attr, value, problem in [("complete", False, "incomplete shard"), ("format_version", 2, "newer"),
                                 ("format_version", 0, "unsupported"), ("complete", None, "incomplete")]:
        path = tmp_path / f"{attr}-{value}.h5"
        path.write_bytes(good.read_bytes())
        with h5py.File(path, "a") as f:
            if value is None:
                del f.attrs[attr]
            else:
                f.attrs[attr] = value
        cases.append((path, problem))
    broken = tmp_path / "no-index.h5"
    broken.write_bytes(good.read_bytes())
    with h5py.File(broken, "a") as f:
        del f["index/count"]
    cases.append((broken, "malformed shard"))
    short = tmp_path / "short-column.h5"
    short.write_bytes(good.read_bytes())
    with h5py.File(short, "a") as f:
        f["events/y"].resize((5,))
    cases.append((short, "events/y has shape"))
    for path, problem in cases:
        with pytest.raises(InputError) as err:
            ShardReader(path)
        msg = str(err.value)
        assert msg.startswith(f"{path}: ") and problem in msg and "\n" not in msg, msg


def corrupt(path, name, index, value):
    with h5py.File(path, "a") as f:
        f[name][index] = value


@pytest.mark.parametrize("name,index,value,match", [
    ("events/x", 1500, W, "outside the 64x48 sensor"),
    ("events/y", 0, H + 3, "outside the 64x48 sensor"),
    ("events/p", 10, 2, "not 0 or 1"),
    ("events/t", 1500, 0, "not sorted at event 1500 (sample 1)"),  # sample 1 starts at 1000
    ("index/offset", 2, 5, "not contiguous"),
    ("index/label", 0, -5, "label -5"),
    ("index/t_end", 0, 0, "t_end < t_start"),
])
def test_check_finds_broken_invariants(tmp_path, name, index, value, match):
    path = tmp_path / "s.h5"
    write_samples(path)
    corrupt(path, name, index, value)
    with ShardReader(path) as r:
        faults = r.check(block_events=4096)  # small blocks: faults on block edges are found too
    assert len(faults) >= 1 and any(match in f for f in faults), faults
    assert all(f.startswith(f"{path}: ") for f in faults)


def test_check_unsorted_across_block_edge_and_bad_frame_index(tmp_path):
    path = tmp_path / "s.h5"
    data = stream_data()
    with ShardWriter(path, sensor_size=(W, H), kind="streams") as w:
        for i, (ev, ft) in enumerate(data):
            w.add_sample(ev, key=f"seq{i}", frame_times=ft)
    corrupt(path, "events/t", 4096, 0)  # the first event of the second block goes back in time
    with ShardReader(path) as r:
        assert any("not sorted at event 4096" in f for f in r.check(block_events=4096))
    path2 = tmp_path / "s2.h5"
    with ShardWriter(path2, sensor_size=(W, H), kind="streams") as w:
        for i, (ev, ft) in enumerate(data):
            w.add_sample(ev, key=f"seq{i}", frame_times=ft)
    with h5py.File(path2, "a") as f:
        f["frames/event_idx"][3] += 1
    with ShardReader(path2) as r:
        assert any("frames/event_idx" in f for f in r.check())


def test_sha256_file(tmp_path):
    path = tmp_path / "blob"
    data = os.urandom(3 * (1 << 20) + 123)
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------- frame images
def label_images(n_frames, h=11, w=13, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n_frames, h, w), dtype=np.uint8)


def test_frame_images_round_trip_and_layout(tmp_path):
    data = stream_data()
    images = [label_images(len(ft), seed=i) for i, (_, ft) in enumerate(data)]
    path = tmp_path / "img.h5"
    with ShardWriter(path, sensor_size=(W, H), kind="streams") as w:
        w.add_sample(data[0][0], key="seq0", frame_times=data[0][1], frame_images=images[0])
        w.add_sample(data[1][0], key="no-images", frame_times=data[1][1])  # mixed: zero rows, has_image 0
        w.add_sample(data[1][0], key="seq1", frame_times=data[1][1], frame_images=images[1])
    with ShardReader(path) as r:
        assert r.has_frame_images and r.frame_image_size == (13, 11)
        for j in range(len(data[0][1])):
            np.testing.assert_array_equal(r.frame_image(0, j), images[0][j])
        assert r.frame_image(1, 0) is None and r.frame_image(1, -1) is None
        np.testing.assert_array_equal(r.frame_image(2, -1), images[1][-1])
        with pytest.raises(IndexError):
            r.frame_image(0, len(data[0][1]))
        assert r.check() == []
        r2 = pickle.loads(pickle.dumps(r))  # reopened lazily after unpickling
        np.testing.assert_array_equal(r2.frame_image(2, 0), images[1][0])
    with h5py.File(path) as f:
        ds = f["frames/image"]
        assert ds.dtype == np.uint8 and ds.shape == (len(f["frames/t"]), 11, 13) and ds.chunks == (1, 11, 13)
        plist = ds.id.get_create_plist()
        assert [plist.get_filter(k)[0] for k in range(plist.get_nfilters())] == [BLOSC_FILTER_ID]
        n0, n1 = len(data[0][1]), len(data[1][1])
        np.testing.assert_array_equal(f["frames/has_image"][:], [1] * n0 + [0] * n1 + [1] * n1)
        assert not ds[n0 : n0 + n1].any()
        assert f.attrs["format_version"] == 1


def test_frame_images_absent_and_refused(tmp_path):
    data = stream_data()
    path = tmp_path / "plain.h5"
    with ShardWriter(path, sensor_size=(W, H), kind="streams") as w:
        w.add_sample(data[0][0], key="seq0", frame_times=data[0][1])
    with ShardReader(path) as r:
        assert not r.has_frame_images and r.frame_image_size is None and r.frame_image(0, 0) is None
    with h5py.File(path) as f:
        assert "frames/image" not in f and "frames/has_image" not in f
    ev, ft = data[1]
    with ShardWriter(tmp_path / "bad.h5", sensor_size=(W, H), kind="streams") as w:
        for bad, match in ((label_images(len(ft) + 1), "F = "), (label_images(len(ft)).astype(np.int16), "uint8"),
                           (label_images(len(ft))[..., 0], "uint8")):
            with pytest.raises(ValueError, match=match):
                w.add_sample(ev, key="a", frame_times=ft, frame_images=bad)
        w.add_sample(ev, key="b", frame_times=ft, frame_images=label_images(len(ft)))
        with pytest.raises(ValueError, match="one size per shard"):
            w.add_sample(ev, key="c", frame_times=ft, frame_images=label_images(len(ft), h=12))
    with ShardReader(tmp_path / "bad.h5") as r:  # refused samples left nothing behind
        assert r.keys == ["b"] and r.check() == []
    with ShardWriter(tmp_path / "samples.h5", sensor_size=(W, H)) as w:
        with pytest.raises(ValueError, match="no frames"):
            w.add_sample(ev, key="a", frame_images=label_images(1))


def test_frame_image_bytes_count_in_size_policy(tmp_path):
    assert estimate_sample_bytes(10, 2, image_bytes=500) == estimate_sample_bytes(10, 2) + 500
    ev, ft = stream_data()[1]
    img = label_images(len(ft), h=100, w=100)
    target = 2 * estimate_sample_bytes(len(ev), len(ft), img.nbytes)
    with RollingShardWriter(tmp_path, prefix="train", sensor_size=(W, H), kind="streams",
                            target_bytes=target) as rw:
        for k in range(5):
            rw.add_sample(ev, key=f"s{k}", frame_times=ft, frame_images=img)
    assert [ShardReader(p).num_samples for p in rw.paths] == [2, 2, 1]
    with ShardWriter(tmp_path / "one.h5", sensor_size=(W, H), kind="streams") as w:
        w.add_sample(ev, key="s", frame_times=ft, frame_images=img)
        assert w.raw_bytes == estimate_sample_bytes(len(ev), len(ft), img.nbytes)


# ---------------------------------------------------------------------- chunks compressed in the thread pool
from evforge.formats.events import validate_events  # noqa: E402
from evforge.formats.shards import blosc  # noqa: E402
from evforge.formats.shards import writer as shard_writer  # noqa: E402


def _all_chunks(path):
    """Every stored chunk of the event columns: (offset, filter mask, stored bytes)."""
    out = {}
    with h5py.File(path) as f:
        for c in "xypt":
            dsid = f["events"][c].id
            infos = [dsid.get_chunk_info(k) for k in range(dsid.get_num_chunks())]
            out[c] = [(i.chunk_offset, *dsid.read_direct_chunk(i.chunk_offset)) for i in infos]
    return out


def _write(path, samples, compression, sensor=(W, H)):
    with ShardWriter(path, sensor_size=sensor, compression=compression) as w:
        direct = w._direct is not None
        for i, ev in enumerate(samples):
            w.add_sample(ev, key=f"k{i}", label=i % 3, allow_empty=True)
    return direct


@pytest.mark.parametrize("compression", ["zstd", "lz4"])
def test_pool_compressed_chunks_equal_hdf5_filter_chunks(tmp_path, monkeypatch, compression):
    """The thread-pool path stores exactly the chunks HDF5's own Blosc filter stores, incompressible ones
    (raw, filter mask 1) included, for samples of every size (empty, single events, several flushes)."""
    monkeypatch.setattr(blosc, "usable_cpus", lambda: 2)  # the pool path even on one CPU
    rng = np.random.default_rng(9)
    sizes = [1, 0, 70_000, 3, 16 * CHUNK_EVENTS - 5, 2 * 16 * CHUNK_EVENTS + 7, 4000, 1]
    samples = [random_events(n, seed=i) if n else empty_events() for i, n in enumerate(sizes)]
    noisy = make_events(rng.integers(0, 65535, 3 * CHUNK_EVENTS), rng.integers(0, 65535, 3 * CHUNK_EVENTS),
                        np.sort(rng.integers(T0, T0 + 2**31, 3 * CHUNK_EVENTS)), rng.choice([1, -1], 3 * CHUNK_EVENTS))
    for name, data, sensor in (("plain", samples, (W, H)), ("noisy", [noisy, samples[2]], (65535, 65535))):
        fast, slow = tmp_path / f"{name}-fast.h5", tmp_path / f"{name}-slow.h5"
        assert _write(fast, data, compression, sensor)
        with monkeypatch.context() as m:
            m.setattr(shard_writer, "direct_args", lambda ds: None)
            assert not _write(slow, data, compression, sensor)
        a, b = _all_chunks(fast), _all_chunks(slow)
        assert a == b, name
        if name == "noisy":
            assert any(mask == 1 for _, mask, _ in a["x"])  # some chunks were stored raw
        with ShardReader(fast) as r:
            for i, ev in enumerate(data):
                assert r.sample(i)[0].tobytes() == ev.tobytes()
            assert r.check() == []


def test_rejected_samples_leave_no_trace_in_the_buffer(tmp_path, monkeypatch):
    """A sample refused after it was staged (bad frame/attrs/label data, or bad events) is not written; the
    large-sample path names the first broken invariant as validate_events does."""
    monkeypatch.setattr(blosc, "usable_cpus", lambda: 2)
    monkeypatch.setattr(shard_writer, "_SLICE_EVENTS", 1 << 18)  # large samples are checked in 4 slices
    good = [random_events(n, seed=i) for i, n in enumerate([60_000] * 20 + [5])]
    big = random_events(16 * CHUNK_EVENTS + 100, seed=50)
    with ShardWriter(tmp_path / "s.h5", sensor_size=(W, H)) as w:
        for i, ev in enumerate(good[:10]):
            w.add_sample(ev, key=f"g{i}")
            with pytest.raises(ValueError, match="JSON"):
                w.add_sample(good[-1 - i], key=f"bad{i}", attrs={"f": object()})
            with pytest.raises(EventFormatError, match="u4"):
                long = good[i + 1].copy()
                long["t"][-1] = long["t"][0] + 2**32
                w.add_sample(long, key=f"long{i}")
        unsorted = big.copy()
        unsorted["t"][1 << 18] = unsorted["t"][(1 << 18) - 1] - 1  # exactly at a check slice boundary
        with pytest.raises(EventFormatError) as err:
            w.add_sample(unsorted, key="u")
        with pytest.raises(EventFormatError) as ref:
            validate_events(unsorted, (W, H), what=f"{w.path}: sample 'u'")
        assert str(err.value) == str(ref.value) and "not sorted" in str(err.value)
        for field, value in (("x", W), ("y", H), ("p", 0)):
            bad = big.copy()
            bad[field][-1] = value
            with pytest.raises(EventFormatError) as err:
                w.add_sample(bad, key="b")
            with pytest.raises(EventFormatError) as ref:
                validate_events(bad, (W, H), what=f"{w.path}: sample 'b'")
            assert str(err.value) == str(ref.value)
        w.add_sample(big, key="big")
        for i, ev in enumerate(good[10:]):
            w.add_sample(ev, key=f"g{10 + i}")
    expected = good[:10] + [big] + good[10:]
    with ShardReader(tmp_path / "s.h5") as r:
        assert r.keys == [f"g{i}" for i in range(10)] + ["big"] + [f"g{i}" for i in range(10, len(good))]
        for i, ev in enumerate(expected):
            assert r.sample(i)[0].tobytes() == ev.tobytes()
        assert r.check() == []


def _write_in_child(path, queue):
    try:
        samples = [random_events(50_000, seed=i) for i in range(30)]
        _write(path, samples, "zstd")
        with ShardReader(path) as r:
            queue.put(all(r.sample(i)[0].tobytes() == ev.tobytes() for i, ev in enumerate(samples)))
    except BaseException as err:  # pragma: no cover (reported to the parent)
        queue.put(repr(err))


def test_writer_in_forked_child_after_parent_used_the_pool(tmp_path, monkeypatch):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork start method here")
    monkeypatch.setattr(blosc, "usable_cpus", lambda: 2)
    _write(tmp_path / "parent.h5", [random_events(40 * CHUNK_EVENTS, seed=1)], "zstd")  # pool threads running
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_write_in_child, args=(tmp_path / "child.h5", queue))
    proc.start()
    got = queue.get(timeout=120)
    proc.join(timeout=60)
    assert got is True and proc.exitcode == 0
