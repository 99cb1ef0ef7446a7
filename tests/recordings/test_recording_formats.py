"""The raw-recording readers (evforge.formats) on exactly encoded files and on the real samples in
/work/shared/realdata (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from raw_encoders import encode_aedat4, encode_dat, encode_evt2, encode_evt3, random_events

from evforge.errors import InputError
from evforge.formats import find_recordings, open_recording
from evforge.formats.prophesee import iter_evt2, iter_evt3, read_raw_header
from evforge.formats.streamfile import write_stream

REAL = Path(__file__).resolve().parents[3] / "shared" / "realdata"  # /work/shared from /work/main/tests/recordings
if not REAL.is_dir():
    REAL = Path("/work/shared/realdata")


def _real(name: str) -> Path:
    path = REAL / name
    if not path.is_file():
        pytest.skip(f"{path} absent (real camera samples are in ../shared/realdata)")
    return path


def _same(ev, x, y, t, p) -> None:
    assert len(ev) == len(t)
    np.testing.assert_array_equal(ev["t"], t)
    np.testing.assert_array_equal(ev["x"], x)
    np.testing.assert_array_equal(ev["y"], y)
    np.testing.assert_array_equal(ev["p"], np.where(p > 0, 1, -1))


@pytest.mark.parametrize("fmt", ["evt2", "evt3", "dat"])
@pytest.mark.parametrize("span_us", [200_000, 40_000_000])  # 40 s: EVT3's 24-bit time wraps twice
def test_exactly_encoded_files_decode_to_the_events(tmp_path, fmt, span_us):
    x, y, t, p = random_events(5000, 640, 480, seed=3, t0=1_700_000_000_000_000 % (1 << 33), span_us=span_us)
    if fmt == "evt3":  # EVT3 holds 24-bit times + wraps counted from the file's start: start below 2**24
        t = t - t[0] + 12345
    enc = {"evt2": encode_evt2, "evt3": encode_evt3, "dat": encode_dat}[fmt]
    path = tmp_path / ("rec.dat" if fmt == "dat" else "rec.raw")
    path.write_bytes(enc(x, y, t, p, width=640, height=480))
    rec = open_recording(path)
    assert rec.format == fmt and rec.sensor_size == (640, 480)
    _same(rec.events(), x, y, t, p)
    # a time range: exactly the events inside it
    lo, hi = int(t[1000]), int(t[3000])
    sel = (t >= lo) & (t < hi)
    _same(rec.events(lo, hi), x[sel], y[sel], t[sel], p[sel])


@pytest.mark.parametrize("decode,enc", [(iter_evt2, encode_evt2), (iter_evt3, encode_evt3)])
def test_decoder_state_carries_across_tiny_blocks(tmp_path, decode, enc):
    """Blocks of 6 bytes cut vectors, time and row words apart: the carried state must make up for it."""
    x, y, t, p = random_events(3000, 1280, 720, seed=5, span_us=30_000_000)
    path = tmp_path / "rec.raw"
    path.write_bytes(enc(x, y, t, p, width=1280, height=720))
    header = read_raw_header(path)
    whole = np.concatenate([b.events for b in decode(path, header)])
    tiny = list(decode(path, header, block_bytes=12 if decode is iter_evt2 else 6))
    _same(whole, x, y, t, p)
    np.testing.assert_array_equal(whole, np.concatenate([b.events for b in tiny]))
    # resuming at any block's checkpoint decodes exactly the rest
    for k in (1, len(tiny) // 3, len(tiny) - 1):
        rest = np.concatenate([b.events for b in decode(path, header, resume=tiny[k].resume)])
        np.testing.assert_array_equal(rest, np.concatenate([b.events for b in tiny[k:]]))


@pytest.mark.parametrize("block_bytes", [6, 4096, 1 << 22])
def test_evt3_numba_and_numpy_kernels_agree(tmp_path, block_bytes):
    """The one-pass numba kernel and the vectorised numpy decoder: the same events, triggers and resume states."""
    x, y, t, p = random_events(4000, 1280, 720, seed=8, span_us=40_000_000)
    path = tmp_path / "rec.raw"
    path.write_bytes(encode_evt3(x, y, t, p, width=1280, height=720))
    a = list(iter_evt3(path, block_bytes=block_bytes, kernel="numba"))
    b = list(iter_evt3(path, block_bytes=block_bytes, kernel="numpy"))
    assert [blk.resume for blk in a] == [blk.resume for blk in b]
    for ba, bb in zip(a, b):
        np.testing.assert_array_equal(ba.events, bb.events)
        np.testing.assert_array_equal(ba.triggers, bb.triggers)
    _same(np.concatenate([blk.events for blk in a]), x, y, t, p)


def test_evt3_vectors_and_single_events(tmp_path):
    """Runs of one row and polarity are VECT_12/VECT_8 words (x up to 2047), the rest EVT_ADDR_X words."""
    x = np.array([3, 4, 5, 9, 17, 30, 2040, 2047, 100])
    y = np.array([7, 7, 7, 7, 7, 7, 8, 8, 9])
    t = np.array([4096, 4096, 4096, 4096, 4096, 4096, 70000, 70000, 16_777_300])
    p = np.array([1, 1, 1, 1, 1, 1, -1, -1, 1])
    path = tmp_path / "v.raw"
    path.write_bytes(encode_evt3(x, y, t, p, width=2048, height=16))
    words = np.frombuffer(path.read_bytes()[read_raw_header(path).data_offset:], "<u2")
    assert {0x3, 0x4, 0x5, 0x2} <= set((words >> 12).tolist())  # the file really uses vectors
    _same(open_recording(path).events(), x, y, t, p)


def test_evt2_triggers_are_side_data_not_events(tmp_path):
    x, y, t, p = random_events(200, 64, 48, seed=1, span_us=10_000)
    path = tmp_path / "trig.raw"
    path.write_bytes(encode_evt2(x, y, t, p, width=64, height=48, triggers=[(500, 3, 1), (9000, 3, 0)]))
    chunks = list(open_recording(path).chunks())
    _same(np.concatenate([c.events for c in chunks]), x, y, t, p)
    trig = np.concatenate([c.triggers for c in chunks])
    assert trig.tolist() == [(500, 3, 1), (9000, 3, 0)]


def test_exactly_encoded_aedat4(tmp_path):
    """Uncompressed AEDAT4 packets written here from the format (LZ4 packets: the real sample below)."""
    x, y, t, p = random_events(2300, 346, 260, seed=6, t0=1_605_537_493_718_345, span_us=300_000)
    path = tmp_path / "rec.aedat4"
    path.write_bytes(encode_aedat4(x, y, t, p, width=346, height=260, packet_events=500))
    rec = open_recording(path)
    assert rec.format == "aedat4" and rec.sensor_size == (346, 260)
    chunks = [c for c in rec.chunks() if len(c.events)]
    assert [len(c.events) for c in chunks] == [500, 500, 500, 500, 300]  # one chunk per packet
    _same(rec.events(), x, y, t, p)
    lo, hi = int(t[700]), int(t[1900])
    sel = (t >= lo) & (t < hi)
    _same(rec.events(lo, hi), x[sel], y[sel], t[sel], p[sel])
    cut = tmp_path / "cut.aedat4"
    cut.write_bytes(path.read_bytes()[:-100])  # the last packet cut short
    with pytest.raises(InputError, match=r"cut\.aedat4"):
        open_recording(cut).events()


def test_bad_files_name_the_file(tmp_path):
    x, y, t, p = random_events(100, 64, 48, seed=1)
    raw = tmp_path / "cut.raw"
    raw.write_bytes(encode_evt2(x, y, t, p, width=64, height=48)[:-3])  # a partial word
    with pytest.raises(InputError, match=r"cut\.raw.*truncated"):
        open_recording(raw).events()
    unknown = tmp_path / "noformat.raw"
    unknown.write_bytes(b"% camera Prophesee\n% end\n" + b"\0" * 8)
    with pytest.raises(InputError, match=r"noformat\.raw.*encoding missing"):
        open_recording(unknown)
    with pytest.raises(InputError, match=r"x\.mp4.*unknown recording format"):
        (tmp_path / "x.mp4").write_bytes(b"")
        open_recording(tmp_path / "x.mp4")
    bad = tmp_path / "bad.aedat4"
    bad.write_bytes(b"#!AER-DAT4.0\r\n garbage")
    with pytest.raises(InputError, match=r"bad\.aedat4"):
        open_recording(bad).events()


def test_dsec_events_h5_keeps_t_offset(tmp_path):
    x, y, t, p = random_events(3000, 640, 480, seed=2, span_us=50_000)
    path = tmp_path / "events.h5"
    offset = 1_600_000_000_000_000
    with h5py.File(path, "w") as f:
        for name, col, dt in (("x", x, "u2"), ("y", y, "u2"), ("p", (p > 0), "u1"), ("t", t, "u4")):
            f[f"events/{name}"] = np.asarray(col).astype(dt)
        f["t_offset"] = np.int64(offset)
        f["ms_to_idx"] = np.searchsorted(t, np.arange(0, t[-1] // 1000 + 2) * 1000).astype(np.uint64)
    with h5py.File(tmp_path / "rectify_map.h5", "w") as f:
        f["rectify_map"] = np.zeros((2, 2, 2), np.float32)  # not an event file: left out of the folder scan
    assert find_recordings(tmp_path) == [path]
    rec = open_recording(path)
    assert rec.format == "dsec" and rec.sensor_size == (640, 480)
    _same(rec.events(), x, y, t + offset, p)
    sel = t >= t[1200]  # from a millisecond inside the file (ms_to_idx jump, then the exact cut)
    _same(rec.events(offset + int(t[1200])), x[sel], y[sel], t[sel] + offset, p[sel])


def test_evforge_stream_file(tmp_path):
    x, y, t, p = random_events(2000, 32, 24, seed=4, t0=10_000, span_us=30_000)
    from evforge.formats.events import make_events

    ev = make_events(x, y, t, p)
    write_stream(tmp_path / "s.h5", ev, [10_000, 40_000], width=32, height=24)
    rec = open_recording(tmp_path / "s.h5")
    assert rec.format == "stream" and rec.sensor_size == (32, 24)
    np.testing.assert_array_equal(rec.events(), ev)


# ------------------------------------------------------------------------------------------ real bytes
def test_real_ncars_dat():
    path = _real("sample_ncars.dat")
    rec = open_recording(path)
    ev = rec.events()
    # independent decode: skip the '%' lines and the 2 type/size bytes, then (u32 t, u32 w) records
    data = path.read_bytes()
    pos = 0
    while data[pos:pos + 1] == b"%":
        pos = data.index(b"\n", pos) + 1
    raw = np.frombuffer(data[pos + 2:], dtype=[("t", "<u4"), ("w", "<u4")])
    assert len(ev) == len(raw) == 2009
    assert (ev["t"].min(), ev["t"].max()) == (0, 99952)
    assert ev["x"].max() <= 77 and ev["y"].max() <= 41
    np.testing.assert_array_equal(ev["x"], raw["w"] & 0x3FFF)
    np.testing.assert_array_equal(ev["y"], (raw["w"] >> 14) & 0x3FFF)
    np.testing.assert_array_equal(ev["p"] > 0, (raw["w"] >> 28) & 1 == 1)
    assert rec.sensor_size is None  # N-Cars' header states no size


def test_real_dvxplorer_aedat4():
    path = _real("sample_dvxplorer.aedat4")
    rec = open_recording(path)
    assert rec.format == "aedat4" and rec.sensor_size == (320, 240)
    chunks = list(rec.chunks())
    ev = np.concatenate([c.events for c in chunks])
    assert len(ev) == 111_954
    assert sum(1 for c in chunks if len(c.events)) == 59  # one chunk per event packet
    assert (int(ev["t"][0]), int(ev["t"][-1])) == (1605537493718345, 1605537494308262)
    assert (np.diff(ev["t"]) >= 0).all()
    assert ev["x"].max() <= 319 and ev["y"].max() <= 239
    assert int((ev["p"] > 0).sum()) == 55_023
    imu = np.concatenate([c.imu for c in chunks])
    assert len(imu) > 0 and (imu["t"] >= ev["t"][0] - 1_000_000).all() and (imu["t"] <= ev["t"][-1] + 1_000_000).all()
    assert np.isfinite(imu["az"]).all() and np.abs(imu["az"]).max() > 0.1  # gravity is in there somewhere


@pytest.mark.parametrize("kernel", ["numba", "numpy"])
def test_corrupt_evt3_names_the_file(tmp_path, kernel):
    head = b"% evt 3.0\n% end\n"
    early = tmp_path / "early.raw"  # an event before any TIME_HIGH word
    early.write_bytes(head + np.array([0x0005, 0x2003], "<u2").tobytes())
    with pytest.raises(InputError, match=r"early\.raw.*before the first EVT_TIME_HIGH"):
        np.concatenate([b.events for b in iter_evt3(early, kernel=kernel)])
    past = tmp_path / "past.raw"  # a vector starting at x = 2040 with 12 bits set
    past.write_bytes(head + np.array([0x8000, 0x6000, 0x0001, 0x3000 | 2040, 0x4FFF], "<u2").tobytes())
    with pytest.raises(InputError, match=r"past\.raw.*past x = 2047"):
        np.concatenate([b.events for b in iter_evt3(past, kernel=kernel)])
