"""Stream files: bit-exact round trips, DSEC indices, atomic writes and clear errors."""

from __future__ import annotations

import math
import os

import h5py
import numpy as np
import pytest

from evforge.errors import InputError
from evforge.formats.events import EventFormatError, make_events
from evforge.formats.streamfile import StreamFile, StreamWriter, is_complete_stream, write_stream

W, H = 64, 48
T0 = 1_700_000_000  # absolute us of the first frame: far from zero, as real recordings are
BLOSC_FILTER_ID = 32001


def random_events(n=5000, duration_us=200_000, seed=0):
    """Sorted random events that include t exactly at t_offset, on ms boundaries and at the end."""
    rng = np.random.default_rng(seed)
    t = np.sort(np.concatenate([
        rng.integers(T0, T0 + duration_us, n - 5),
        [T0, T0, T0 + 1000, T0 + 5000, T0 + duration_us],
    ]))
    return make_events(rng.integers(0, W, n), rng.integers(0, H, n), t, rng.choice([1, -1], n))


def frame_times(duration_us=200_000, step=33_333):
    return np.arange(T0, T0 + duration_us + 1, step, dtype=np.int64)


def dsec_ms_to_idx(t_rel):
    last = math.ceil(t_rel[-1] / 1000) if len(t_rel) else 0
    return np.searchsorted(t_rel, np.arange(last + 1) * 1000, "left")


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def events():
    return random_events()


@pytest.mark.parametrize("flush", [None, (700, 2)], ids=["default", "small-buffers"])
def test_chunked_appends_equal_one_shot_bit_for_bit(tmp_path, events, flush, monkeypatch):
    if flush:  # the writer holds appends in memory: write them out between appends too
        import evforge.formats.streamfile as sf_module

        monkeypatch.setattr(sf_module, "FLUSH_EVENTS", flush[0])
        monkeypatch.setattr(sf_module, "FLUSH_FRAMES", flush[1])
    ft = frame_times()
    write_stream(tmp_path / "one.h5", events, ft, width=W, height=H)
    pending = list(ft)
    with StreamWriter(tmp_path / "chunks.h5", width=W, height=H, t_offset=int(ft[0])) as w:
        for chunk in np.array_split(events, [1, 700, 701, 3000]):
            while pending and pending[0] <= chunk["t"][0]:  # frames in time order, interleaved with events
                w.add_frame(int(pending.pop(0)))
            w.append(chunk)
        for t in pending:
            w.add_frame(int(t))
    for name in ("one.h5", "chunks.h5"):
        with StreamFile(tmp_path / name) as sf:
            got = sf.events()
            assert got.dtype == events.dtype
            assert got.tobytes() == events.tobytes()
            assert sf.num_events == len(events) and sf.t_offset == T0
            assert (sf.width, sf.height) == (W, H)
            np.testing.assert_array_equal(sf.frame_times, ft)
    with h5py.File(tmp_path / "one.h5") as a, h5py.File(tmp_path / "chunks.h5") as b:
        for key in ("events/x", "events/y", "events/p", "events/t", "ms_to_idx", "frames/t", "frames/event_idx"):
            np.testing.assert_array_equal(a[key][:], b[key][:], err_msg=key)


def test_on_disk_columns_are_dsec(tmp_path, events):
    write_stream(tmp_path / "s.h5", events, frame_times(), width=W, height=H)
    with h5py.File(tmp_path / "s.h5") as f:
        assert f["events/t"].dtype == np.uint32 and f["events/p"].dtype == np.uint8
        assert f["events/x"].dtype == np.uint16 and f["events/y"].dtype == np.uint16
        assert f["events/t"].chunks == (65536,)
        np.testing.assert_array_equal(f["events/p"][:], (events["p"] > 0).astype(np.uint8))
        t_rel = f["events/t"][:].astype(np.int64)
        np.testing.assert_array_equal(t_rel, events["t"] - T0)
        ms = f["ms_to_idx"][:]
        assert ms.dtype == np.uint64
        np.testing.assert_array_equal(ms, dsec_ms_to_idx(t_rel))
        assert f.attrs["evforge_format"] == "stream" and f.attrs["format_version"] == 1
        assert f.attrs["complete"] and f.attrs["num_events"] == len(events)


@pytest.mark.parametrize("last_rel", [200_000, 200_001, 199_999])
def test_ms_to_idx_end_entry(tmp_path, last_rel):
    ev = make_events([1, 2, 3], [1, 2, 3], [T0 + 10, T0 + 1000, T0 + last_rel], [1, -1, 1])
    write_stream(tmp_path / "s.h5", ev, [T0], width=W, height=H)
    with StreamFile(tmp_path / "s.h5") as sf:
        ms = sf.ms_to_idx
    assert len(ms) == math.ceil(last_rel / 1000) + 1
    np.testing.assert_array_equal(ms, dsec_ms_to_idx(ev["t"] - T0))


def test_frame_event_idx(tmp_path, events):
    ft = np.concatenate([frame_times(), [T0 + 250_000]])  # a frame after the last event
    write_stream(tmp_path / "s.h5", events, ft, width=W, height=H)
    with StreamFile(tmp_path / "s.h5") as sf:
        np.testing.assert_array_equal(sf.frame_event_idx, np.searchsorted(events["t"], ft, "left"))
        assert sf.frame_event_idx[-1] == len(events)


def test_frame_idx_robust_to_frames_added_after_events(tmp_path, events):
    ft = frame_times()
    with StreamWriter(tmp_path / "s.h5", width=W, height=H, t_offset=int(ft[0])) as w:
        w.append(events)  # all events first, then the frames
        for t in ft:
            w.add_frame(int(t))
    with StreamFile(tmp_path / "s.h5") as sf:
        np.testing.assert_array_equal(sf.frame_event_idx, np.searchsorted(events["t"], ft, "left"))


def test_window_and_between_frames_match_numpy_slices(tmp_path, events):
    ft = frame_times()
    write_stream(tmp_path / "s.h5", events, ft, width=W, height=H)
    t = events["t"]
    rng = np.random.default_rng(1)
    bounds = [(T0, T0 + 1000), (T0 - 5000, T0 + 1), (T0 + 999, T0 + 5001), (T0 + 5000, T0 + 5000),
              (T0 + 150_000, T0 + 10**9), (T0 + 300_000, T0 + 400_000), (T0 + 200_000, T0 + 200_001)]
    bounds += [tuple(sorted(rng.integers(T0 - 100, T0 + 201_000, 2))) for _ in range(50)]
    with StreamFile(tmp_path / "s.h5") as sf:
        for a, b in bounds:
            expected = events[np.searchsorted(t, a, "left") : np.searchsorted(t, b, "left")]
            assert sf.window(int(a), int(b)).tobytes() == expected.tobytes(), (a, b)
        for i in range(len(ft) - 1):
            expected = events[(t >= ft[i]) & (t < ft[i + 1])]
            assert sf.between_frames(i).tobytes() == expected.tobytes()
        with pytest.raises(IndexError):
            sf.between_frames(len(ft) - 1)
        assert sf.events(100, 200).tobytes() == events[100:200].tobytes()


def test_attrs_round_trip(tmp_path, events):
    attrs = {"source": "clip_0001.mp4", "fps": 30.0, "seed": 7, "noisy": True,
             "simulator": {"C_on": 0.2, "refractory_us": [100, 200]}, "tags": ["a", "b"]}
    write_stream(tmp_path / "s.h5", events, frame_times(), width=W, height=H, attrs=attrs)
    with StreamFile(tmp_path / "s.h5") as sf:
        assert sf.attrs == attrs
    with pytest.raises(ValueError, match="reserved"):
        write_stream(tmp_path / "bad.h5", events, frame_times(), width=W, height=H, attrs={"width": 3})


@pytest.mark.parametrize("compression", ["zstd", "lz4", "gzip"])
def test_compression_options_round_trip(tmp_path, events, compression):
    path = tmp_path / f"{compression}.h5"
    write_stream(path, events, frame_times(), width=W, height=H, compression=compression)
    with StreamFile(path) as sf:
        assert sf.events().tobytes() == events.tobytes()
    with h5py.File(path) as f:
        for name in ("x", "y", "p", "t"):
            plist = f["events"][name].id.get_create_plist()
            ids = [plist.get_filter(k)[0] for k in range(plist.get_nfilters())]
            assert ids == ([h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_DEFLATE] if compression == "gzip"
                           else [BLOSC_FILTER_ID])
        if compression != "gzip":
            # Blosc cd_values: [..., clevel, shuffle, compressor]; 2 = bit-shuffle, zstd = 5, lz4 = 1
            cd = f["events/t"].id.get_create_plist().get_filter(0)[2]
            assert cd[-3:] == (5, 2, {"zstd": 5, "lz4": 1}[compression])
    with pytest.raises(ValueError, match="compression"):
        StreamWriter(tmp_path / "x.h5", width=W, height=H, t_offset=0, compression="bzip2")


def test_exception_inside_with_leaves_nothing(tmp_path, events):
    path = tmp_path / "s.h5"
    with pytest.raises(RuntimeError, match="boom"):
        with StreamWriter(path, width=W, height=H, t_offset=T0) as w:
            w.add_frame(T0)
            w.append(events[:100])
            assert listing(tmp_path) == [f"s.h5.tmp-{os.getpid()}"]  # work happens in the temp file
            raise RuntimeError("boom")
    assert listing(tmp_path) == []


def test_failed_rerun_keeps_previous_file(tmp_path, events):
    path = tmp_path / "s.h5"
    write_stream(path, events, frame_times(), width=W, height=H)
    with pytest.raises(EventFormatError):
        with StreamWriter(path, width=W, height=H, t_offset=T0) as w:
            w.append(events[::-1])
    assert listing(tmp_path) == ["s.h5"] and is_complete_stream(path)


def test_reader_errors_start_with_path(tmp_path, events, non_evforge_files):
    missing, text, other = non_evforge_files
    incomplete = tmp_path / "incomplete.h5"
    write_stream(incomplete, events, frame_times(), width=W, height=H)
    with h5py.File(incomplete, "a") as f:
        f.attrs["complete"] = False
    newer = tmp_path / "newer.h5"
    write_stream(newer, events, frame_times(), width=W, height=H)
    with h5py.File(newer, "a") as f:
        f.attrs["format_version"] = 2
    for path, problem in [(missing, "no such file"), (text, "HDF5"), (other, "not an evforge stream"),
                          (incomplete, "incomplete stream file (interrupted write?)"),
                          (newer, "stream file format_version 2 is newer than this evforge reads (1): upgrade")]:
        with pytest.raises(InputError) as err:
            StreamFile(path)
        assert str(err.value).startswith(f"{path}: ") and problem in str(err.value)
        assert "\n" not in str(err.value)


def test_is_complete_stream(tmp_path, events):
    path = tmp_path / "s.h5"
    assert not is_complete_stream(path)
    write_stream(path, events, frame_times(), width=W, height=H)
    assert is_complete_stream(path)
    with h5py.File(path, "a") as f:
        f.attrs["complete"] = False
    assert not is_complete_stream(path)
    (tmp_path / "junk.h5").write_bytes(b"\x00" * 100)
    assert not is_complete_stream(tmp_path / "junk.h5")


def test_invalid_appends_raise(tmp_path, events):
    with StreamWriter(tmp_path / "s.h5", width=W, height=H, t_offset=T0) as w:
        with pytest.raises(EventFormatError, match="not sorted"):
            w.append(events[::-1])
        with pytest.raises(EventFormatError, match="outside the 64x48 sensor"):
            w.append(make_events([W], [0], [T0 + 1], [1]))
        with pytest.raises(EventFormatError, match="outside the 64x48 sensor"):
            w.append(make_events([0], [H], [T0 + 1], [1]))
        with pytest.raises(EventFormatError, match="before t_offset"):
            w.append(make_events([0], [0], [T0 - 1], [1]))
        with pytest.raises(EventFormatError, match="u4"):
            w.append(make_events([0], [0], [T0 + 2**32], [1]))
        w.append(events[:10])
        with pytest.raises(EventFormatError, match="before the last event"):
            w.append(events[:1])
        with pytest.raises(EventFormatError, match="dtype"):
            w.append(np.zeros(3, dtype=np.int64))
        w.append(events[10:])
    with StreamFile(tmp_path / "s.h5") as sf:
        assert sf.events().tobytes() == events.tobytes()  # rejected chunks left no trace


def test_empty_stream_round_trip(tmp_path):
    ft = frame_times()
    write_stream(tmp_path / "s.h5", make_events([], [], [], []), ft, width=W, height=H, attrs={"note": "x"})
    with h5py.File(tmp_path / "s.h5") as f:
        np.testing.assert_array_equal(f["ms_to_idx"][:], [0])
        assert f["events/t"].shape == (0,)
    with StreamFile(tmp_path / "s.h5") as sf:
        assert sf.num_events == 0 and len(sf.events()) == 0
        assert len(sf.window(T0, T0 + 10**6)) == 0 and len(sf.between_frames(0)) == 0
        np.testing.assert_array_equal(sf.frame_event_idx, np.zeros(len(ft)))
        assert sf.attrs == {"note": "x"} and not sf.has_frames and sf.gray_frame(0) is None
    with StreamWriter(tmp_path / "bare.h5", width=W, height=H, t_offset=0):
        pass
    with StreamFile(tmp_path / "bare.h5") as sf:
        assert sf.num_events == 0 and len(sf.frame_times) == 0
    assert is_complete_stream(tmp_path / "bare.h5")


@pytest.mark.parametrize("flush_frames", [16, 2])
def test_gray_frames_round_trip(tmp_path, events, flush_frames, monkeypatch):
    monkeypatch.setattr("evforge.formats.streamfile.FLUSH_FRAMES", flush_frames)
    ft = frame_times()
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (len(ft), H, W), dtype=np.uint8)
    write_stream(tmp_path / "s.h5", events, ft, width=W, height=H, frames=gray)
    with StreamFile(tmp_path / "s.h5") as sf:
        assert sf.has_frames
        for i in range(len(ft)):
            np.testing.assert_array_equal(sf.gray_frame(i), gray[i])
    with h5py.File(tmp_path / "s.h5") as f:
        assert f["frames/gray"].chunks == (1, H, W) and f["frames/gray"].dtype == np.uint8
    with pytest.raises(ValueError, match="shape"):
        write_stream(tmp_path / "bad.h5", events, ft, width=W, height=H, frames=gray[:, :, :-1])
    assert not (tmp_path / "bad.h5").exists()
