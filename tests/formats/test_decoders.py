"""Tests for evforge.formats.decoders: real bytes, bit-exact round trips, and every bad input."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from evforge.errors import InputError
from evforge.formats.decoders import (
    check_events,
    read_atis_bin,
    read_nimagenet_npz,
    read_prophesee_dat,
    read_prophesee_dat_header,
    write_atis_bin,
    write_nimagenet_npz,
    write_prophesee_dat,
)
from evforge.formats.events import EVENT_DTYPE, make_events


def _realdata_dir() -> Path:
    env = os.environ.get("EVFORGE_REALDATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "realdata"


def _realfile(name: str) -> Path:
    path = _realdata_dir() / name
    if not path.is_file():
        pytest.skip(f"real sample {path} is absent (set EVFORGE_REALDATA to the folder holding {name})")
    return path


def _random_events(rng, n, width, height, t_max) -> np.ndarray:
    t = np.sort(rng.integers(0, t_max, n))
    t[n // 2 : n // 2 + 5] = t[n // 2]  # a run of equal timestamps: their order must survive
    return make_events(rng.integers(0, width, n), rng.integers(0, height, n), t, rng.choice([-1, 1], n))


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype == EVENT_DTYPE and a.tobytes() == b.tobytes()


def _raises_input_error(path, fn, *args, match: str) -> InputError:
    with pytest.raises(InputError) as info:
        fn(*args)
    msg = str(info.value)
    assert msg.startswith(f"{os.fspath(path)}: "), msg
    assert "\n" not in msg, msg
    assert match in msg, msg
    return info.value


# --------------------------------------------------------------------------- independent reference decoders
def _tonic_read_mnist_file(path) -> np.ndarray:
    """tonic.io.read_mnist_file (neuromorphs/tonic), ported: per-marker loop, no sort, p as 0/1."""
    raw = np.fromfile(path, dtype=np.uint8).astype(np.uint32)
    all_y, all_x = raw[1::5], raw[0::5]
    all_p = (raw[2::5] & 128) >> 7
    all_ts = ((raw[2::5] & 127) << 16) | (raw[3::5] << 8) | raw[4::5]
    for overflow_index in np.where(all_y == 240)[0]:
        all_ts[overflow_index:] += 2**13
    td = np.where(all_y != 240)[0]
    return make_events(all_x[td], all_y[td], all_ts[td].astype(np.int64), all_p[td])


def _struct_read_dat(path) -> np.ndarray:
    """Event-by-event DAT reader with struct, sharing no code with the module."""
    data = Path(path).read_bytes()
    pos = 0
    while data[pos : pos + 1] == b"%":
        pos = data.index(b"\n", pos) + 1
    assert data[pos + 1] == 8
    rows = []
    for t, w in struct.iter_unpack("<II", data[pos + 2 :]):
        rows.append((w & 0x3FFF, (w >> 14) & 0x3FFF, t, 1 if (w >> 28) & 1 else -1))
    return np.array(rows, dtype=EVENT_DTYPE)


# ------------------------------------------------------------------------------------------- real bytes
def test_real_nmnist_bin():
    path = _realfile("sample_nmnist.bin")
    ev = read_atis_bin(path)
    assert ev.dtype == EVENT_DTYPE
    assert len(ev) == 4325
    assert ev["x"].max() <= 33 and ev["y"].max() <= 33
    assert (ev["t"].min(), ev["t"].max()) == (654, 311175)
    assert int((ev["p"] == 1).sum()) == 2145
    assert ev[:3].tolist() == [(7, 15, 654, 1), (19, 18, 2999, -1), (21, 17, 3017, -1)]
    assert ev[-3:].tolist() == [(20, 15, 308251, 1), (33, 12, 310771, 1), (21, 14, 311175, 1)]
    assert _same(ev, _tonic_read_mnist_file(path))  # same order and values as tonic


def test_real_ncars_dat():
    path = _realfile("sample_ncars.dat")
    header = read_prophesee_dat_header(path)
    assert header["lines"][:2] == ["Data file containing N9Chronocam7Event2dE events.", "Version 2"]
    assert header["version"] == 2 and header["event_class"] == "N9Chronocam7Event2dE"
    assert (header["event_type"], header["event_size"], header["data_offset"]) == (0, 8, 93)
    ev = read_prophesee_dat(path)
    assert len(ev) == 2009
    assert (ev["t"].min(), ev["t"].max()) == (0, 99952)
    assert ev["x"].max() <= 77 and ev["y"].max() <= 41
    assert ev[:5].tolist() == [(25, 8, 0, -1), (67, 35, 35, -1), (56, 27, 152, 1), (74, 39, 202, 1), (49, 28, 244, 1)]
    assert ev[-3:].tolist() == [(68, 34, 99742, -1), (51, 4, 99851, 1), (75, 28, 99952, 1)]
    assert _same(ev, _struct_read_dat(path))
    check_events(ev, (120, 100), path)  # N-Cars clips fit the 120x100 canvas


# ------------------------------------------------------------------------------------------ round trips
def test_atis_round_trip_with_overflow_markers(tmp_path):
    rng = np.random.default_rng(0)
    ev = _random_events(rng, 5000, 256, 240, 2**26)
    path = tmp_path / "a.bin"
    write_atis_bin(path, ev)
    raw = np.fromfile(path, np.uint8).reshape(-1, 5)
    n_markers = int((raw[:, 1] == 240).sum())
    assert n_markers == (int(ev["t"].max()) - 2**23) // 2**13 + 1  # the fewest markers that fit 23 bits
    assert _same(read_atis_bin(path), ev)
    assert _same(_tonic_read_mnist_file(path), ev)  # tonic reads our files the same way


def test_atis_round_trip_without_markers(tmp_path):
    rng = np.random.default_rng(1)
    ev = _random_events(rng, 3000, 256, 240, 2**23)
    path = tmp_path / "a.bin"
    write_atis_bin(path, ev, overflow=False)
    assert path.stat().st_size == 5 * len(ev)
    assert _same(read_atis_bin(path), ev)
    big = make_events([1], [1], [2**23], [1])
    with pytest.raises(ValueError):
        write_atis_bin(tmp_path / "b.bin", big, overflow=False)


def test_atis_markers_anywhere_match_tonic(tmp_path):
    """Arbitrary bytes (markers at random places, unsorted t): tonic's values, sorted stably by t."""
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, (2000, 5), dtype=np.uint8)
    raw[:, 1] = np.where(rng.random(2000) < 0.05, 240, rng.integers(0, 240, 2000))
    path = tmp_path / "r.bin"
    path.write_bytes(raw.tobytes())
    ref = _tonic_read_mnist_file(path)
    assert _same(read_atis_bin(path), ref[np.argsort(ref["t"], kind="stable")])


def test_dat_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    ev = _random_events(rng, 4000, 304, 240, 2**32)
    path = tmp_path / "a.dat"
    write_prophesee_dat(path, ev, 304, 240, date="2017-10-31 11:29:21")
    header = read_prophesee_dat_header(path)
    assert (header["width"], header["height"], header["version"]) == (304, 240, 2)
    assert header["date"] == "2017-10-31 11:29:21"
    assert _same(read_prophesee_dat(path), ev)
    assert _same(_struct_read_dat(path), ev)


def test_dat_read_the_same_by_the_ncars_decoder_and_the_recordings_reader(tmp_path):
    """One DAT decoding (formats.prophesee.decode_dat) behind read_prophesee_dat and open_recording; a '% end'
    header line (RAW's terminator) does not end a DAT header in either."""
    from evforge.formats import open_recording

    rng = np.random.default_rng(5)
    ev = _random_events(rng, 3000, 304, 240, 2**31)
    plain, ended = tmp_path / "a.dat", tmp_path / "b.dat"
    write_prophesee_dat(plain, ev, 304, 240)
    data = plain.read_bytes()
    ended.write_bytes(data.replace(b"% Version 2\n", b"% Version 2\n% end\n% Note after end\n", 1))
    for path in (plain, ended):
        assert _same(read_prophesee_dat(path), ev)
        rec = open_recording(path)
        assert rec.sensor_size == (304, 240)
        np.testing.assert_array_equal(rec.events(), read_prophesee_dat(path, sort=False))


@pytest.mark.parametrize("legacy", [False, True])
def test_npz_round_trip(tmp_path, legacy):
    rng = np.random.default_rng(4)
    ev = _random_events(rng, 4000, 640, 480, 10**7)
    path = tmp_path / "a.npz"
    write_nimagenet_npz(path, ev, legacy=legacy)
    with np.load(path) as npz:
        assert npz.files == (["x_pos", "y_pos", "timestamp", "polarity"] if legacy else ["event_data"])
    assert _same(read_nimagenet_npz(path), ev)


def test_npz_event_data_with_legacy_field_names_and_pm1_polarity(tmp_path):
    rng = np.random.default_rng(5)
    ev = _random_events(rng, 1000, 640, 480, 10**6)
    data = np.empty(len(ev), dtype=[("x_pos", "<i4"), ("y_pos", "<i4"), ("timestamp", "<u8"), ("polarity", "i1")])
    data["x_pos"], data["y_pos"], data["timestamp"], data["polarity"] = ev["x"], ev["y"], ev["t"], ev["p"]
    path = tmp_path / "a.npz"
    np.savez(path, event_data=data)
    assert _same(read_nimagenet_npz(path), ev)


def test_npz_float_time_rule(tmp_path):
    t_us = np.array([0, 1500, 250_000, 999_999], dtype=np.int64)
    for name, t in (("s", t_us / 1e6), ("us", t_us.astype(np.float64))):
        data = np.zeros(4, dtype=[("x", "<u2"), ("y", "<u2"), ("t", "<f8"), ("p", "u1")])
        data["t"], data["p"] = t, [0, 1, 1, 0]
        path = tmp_path / f"{name}.npz"
        np.savez(path, event_data=data)
        ev = read_nimagenet_npz(path)
        assert ev["t"].tolist() == t_us.tolist(), name
        assert ev["p"].tolist() == [-1, 1, 1, -1]


def test_unsorted_npz_is_sorted_stably(tmp_path):
    ev = make_events([1, 2, 3, 4], [0, 0, 0, 0], [30, 10, 30, 10], [1, -1, 1, -1])
    data = np.zeros(4, dtype=[("x", "<u2"), ("y", "<u2"), ("t", "<i8"), ("p", "?")])
    data["x"], data["t"], data["p"] = ev["x"], ev["t"], ev["p"] > 0
    path = tmp_path / "u.npz"
    np.savez(path, event_data=data)
    assert read_nimagenet_npz(path)["x"].tolist() == [2, 4, 1, 3]


# ------------------------------------------------------------------------------------------- bad input
def test_bin_bad_inputs(tmp_path):
    odd = tmp_path / "odd.bin"
    odd.write_bytes(bytes(12))
    _raises_input_error(odd, read_atis_bin, odd, match="truncated: 12 bytes is not a multiple of 5")
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    _raises_input_error(empty, read_atis_bin, empty, match="no events")
    markers = tmp_path / "markers.bin"
    markers.write_bytes(bytes([0, 240, 0, 0, 0]) * 3)
    _raises_input_error(markers, read_atis_bin, markers, match="no events")
    missing = tmp_path / "missing.bin"
    _raises_input_error(missing, read_atis_bin, missing, match="cannot read file")
    _raises_input_error(tmp_path, read_atis_bin, tmp_path, match="cannot read file")  # a folder


def _dat_bytes(lines: list[str], type_size: bytes, payload: bytes) -> bytes:
    return "".join(f"% {s}\n" for s in lines).encode() + type_size + payload


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("noheader", b"\x00\x08" + bytes(16), "missing header"),
        ("empty", b"", "missing header"),
        ("notypesize", _dat_bytes(["Version 2"], b"", b""), "no event type/size bytes"),
        ("unterminated", b"% Version 2", "not terminated by a newline"),
        ("badline", _dat_bytes(["Width abc"], b"\x00\x08", bytes(8)), "bad line '% Width abc'"),
        ("size16", _dat_bytes(["Version 2"], b"\x00\x10", bytes(32)), "unsupported event size 16"),
        ("truncated", _dat_bytes(["Version 2"], b"\x00\x08", bytes(20)), "truncated: payload of 20 bytes"),
        ("nopayload", _dat_bytes(["Version 2"], b"\x00\x08", b""), "no events"),
    ],
)
def test_dat_bad_inputs(tmp_path, name, content, match):
    path = tmp_path / f"{name}.dat"
    path.write_bytes(content)
    _raises_input_error(path, read_prophesee_dat, path, match=match)


def test_dat_missing_file(tmp_path):
    path = tmp_path / "missing.dat"
    _raises_input_error(path, read_prophesee_dat, path, match="cannot read file")
    _raises_input_error(path, read_prophesee_dat_header, path, match="cannot read file")


def _npz_object_array(path):
    np.savez(path, event_data=np.array([{"x": 1}, None], dtype=object))


def _npz_object_field(path):
    np.savez(path, event_data=np.zeros(3, dtype=[("x", "O"), ("y", "<u2"), ("t", "<i8"), ("p", "?")]))


@pytest.mark.parametrize(
    "name, make, match",
    [
        ("garbage", lambda p: p.write_bytes(b"not a zip at all"), "not an .npz (zip) file"),
        ("npy", lambda p: np.save(p.with_suffix(".npy"), np.zeros(3)) or p.with_suffix(".npy").rename(p),
         "not an .npz (zip) file"),
        ("badzip", lambda p: p.write_bytes(b"PK\x03\x04" + bytes(40)), "cannot read npz"),
        ("nokey", lambda p: np.savez(p, events=np.zeros(3), labels=np.zeros(1)),
         "no 'event_data' array (keys: events, labels)"),
        ("objarray", _npz_object_array, "object array refused"),
        ("objfield", _npz_object_field, "object array refused"),
        ("plain", lambda p: np.savez(p, event_data=np.zeros((3, 4))), "not a structured array"),
        ("fields", lambda p: np.savez(p, event_data=np.zeros(3, dtype=[("x", "u2"), ("y", "u2"), ("t", "i8")])),
         "lack x, y, t, p"),
        ("polarity", lambda p: np.savez(p, event_data=np.array([(1, 1, 5, 2)], dtype=[
            ("x", "u2"), ("y", "u2"), ("t", "i8"), ("p", "i1")])), "polarity must be 0/1 or -1/+1, found 2"),
        ("floatx", lambda p: np.savez(p, event_data=np.zeros(3, dtype=[
            ("x", "f4"), ("y", "u2"), ("t", "i8"), ("p", "?")])), "field x has non-integer dtype float32"),
        ("empty", lambda p: np.savez(p, event_data=np.zeros(0, dtype=[
            ("x", "u2"), ("y", "u2"), ("t", "i8"), ("p", "?")])), "no events"),
    ],
)
def test_npz_bad_inputs(tmp_path, name, make, match):
    path = tmp_path / f"{name}.npz"
    make(path)
    assert path.is_file()
    _raises_input_error(path, read_nimagenet_npz, path, match=match)


def test_npz_missing_file(tmp_path):
    path = tmp_path / "missing.npz"
    _raises_input_error(path, read_nimagenet_npz, path, match="cannot read file")


def test_check_events(tmp_path):
    path = tmp_path / "sample.bin"
    ev = make_events([0, 303, 5], [0, 239, 7], [1, 2, 2], [1, -1, 1])
    assert check_events(ev, (304, 240), path) is ev
    assert check_events(ev, None, path) is ev
    _raises_input_error(path, check_events, ev, (303, 240), path, match="x=303 at index 1 is outside the 303x240")
    _raises_input_error(path, check_events, ev, (304, 239), path, match="y=239 at index 1 is outside")
    unsorted = make_events([0, 1, 2], [0, 0, 0], [5, 9, 7], [1, 1, 1])
    _raises_input_error(path, check_events, unsorted, (304, 240), path, match="timestamps not sorted at index 2")
    _raises_input_error(path, check_events, ev[:0], (304, 240), path, match="no events")
    _raises_input_error(path, check_events, np.zeros(3), (304, 240), path, match="expected")
    bad_p = ev.copy()
    bad_p["p"][2] = 0
    _raises_input_error(path, check_events, bad_p, (304, 240), path, match="polarity 0 at index 2")


def test_encoders_refuse_what_the_format_cannot_hold(tmp_path):
    with pytest.raises(ValueError):
        write_atis_bin(tmp_path / "y.bin", make_events([0], [240], [0], [1]))  # y == 240 is the marker row
    with pytest.raises(ValueError):
        write_atis_bin(tmp_path / "x.bin", make_events([256], [0], [0], [1]))
    with pytest.raises(ValueError):
        write_atis_bin(tmp_path / "u.bin", make_events([0, 0], [0, 0], [5, 1], [1, 1]))  # unsorted
    with pytest.raises(ValueError):
        write_prophesee_dat(tmp_path / "o.dat", make_events([304], [0], [0], [1]), 304, 240)
    with pytest.raises(ValueError):
        write_prophesee_dat(tmp_path / "t.dat", make_events([0], [0], [2**32], [1]), 304, 240)


# ------------------------------------------------------------------------------ fast paths and sort=False
def _old_read_atis_bin(path) -> np.ndarray:
    """The previous (row-gather) ATIS decoder, kept as a reference for the strided fast path."""
    b = np.fromfile(path, dtype=np.uint8).reshape(-1, 5)
    rows = np.flatnonzero(b[:, 1] != 240)
    markers_before = rows - np.arange(len(rows))
    b = b[rows]
    t = ((b[:, 2].astype(np.int64) & 0x7F) << 16) | (b[:, 3].astype(np.int64) << 8) | b[:, 4]
    t += 2**13 * markers_before
    return make_events(b[:, 0], b[:, 1], t, (b[:, 2] >> 7).astype(np.int8))


@pytest.mark.parametrize("markers", [False, True])
@pytest.mark.parametrize("n", [1, 2, 7, 4096])
def test_atis_any_bytes_match_reference_and_sort_false_keeps_file_order(tmp_path, markers, n):
    """Every bit pattern (y up to 255, all p and t bits, with or without markers): file order as the
    reference decoder, sorted stably by default."""
    rng = np.random.default_rng(10 + n)
    raw = rng.integers(0, 256, (n, 5), dtype=np.uint8)
    raw[:, 1] = np.where(raw[:, 1] == 240, 241, raw[:, 1])  # no marker unless asked for
    if markers:
        raw[rng.random(n) < 0.1, 1] = 240
        raw[-1, 1] = 0  # at least one event
    path = tmp_path / "r.bin"
    path.write_bytes(raw.tobytes())
    ref = _old_read_atis_bin(path)
    assert _same(read_atis_bin(path, sort=False), ref)
    assert _same(read_atis_bin(path), ref[np.argsort(ref["t"], kind="stable")])
    assert _same(read_atis_bin(path, sort=False), _tonic_read_mnist_file(path))


def test_atis_sorted_file_is_returned_in_file_order(tmp_path):
    ev = make_events([1, 2, 3, 4], [0, 0, 0, 0], [5, 5, 7, 2**23 + 9], [1, -1, 1, -1])  # ties, a marker
    path = tmp_path / "s.bin"
    write_atis_bin(path, ev)
    assert _same(read_atis_bin(path), ev) and _same(read_atis_bin(path, sort=False), ev)


def test_dat_and_npz_sort_false_keep_file_order(tmp_path):
    ev = make_events([1, 2, 3, 4], [0, 0, 0, 0], [30, 10, 30, 10], [1, -1, 1, -1])
    raw = np.empty(4, dtype=[("t", "<u4"), ("w", "<u4")])
    raw["t"] = ev["t"]
    raw["w"] = ev["x"].astype(np.uint32) | ((ev["p"] > 0).astype(np.uint32) << 28)
    dat = tmp_path / "u.dat"
    dat.write_bytes(b"% Version 2\n" + bytes([0, 8]) + raw.tobytes())
    assert _same(read_prophesee_dat(dat, sort=False), ev)
    assert _same(read_prophesee_dat(dat), ev[np.argsort(ev["t"], kind="stable")])
    data = np.zeros(4, dtype=[("x", "<u2"), ("y", "<u2"), ("t", "<i8"), ("p", "?")])
    data["x"], data["t"], data["p"] = ev["x"], ev["t"], ev["p"] > 0
    npz = tmp_path / "u.npz"
    np.savez(npz, event_data=data)
    assert _same(read_nimagenet_npz(npz, sort=False), ev)
    assert _same(read_nimagenet_npz(npz), ev[np.argsort(ev["t"], kind="stable")])


def test_check_events_fast_path_agrees_with_full_checks(tmp_path):
    """Each broken invariant alone, and several at once: the message names the first, as before."""
    path = tmp_path / "e.bin"
    ev = make_events(np.arange(10) % 8, np.arange(10) % 6, np.arange(10) * 3, np.where(np.arange(10) % 2, 1, -1))
    assert check_events(ev, (8, 6), path) is ev
    cases = []
    for field, i, value, match in [("x", 4, 8, "x=8 at index 4"), ("y", 9, 6, "y=6 at index 9"),
                                   ("t", 5, 0, "not sorted at index 5 (12 > 0)"), ("p", 3, 0, "polarity 0 at index 3"),
                                   ("p", 2, 2, "polarity 2 at index 2")]:
        bad = ev.copy()
        bad[field][i] = value
        cases.append((bad, match))
    both = ev.copy()
    both["p"][1], both["t"][8], both["y"][7] = 0, 0, 6  # y is checked first, then t, then p
    cases.append((both.copy(), "y=6 at index 7"))
    both["y"][7] = 0
    cases.append((both, "not sorted at index 8"))
    for bad, match in cases:
        _raises_input_error(path, check_events, bad, (8, 6), path, match=match)
    assert check_events(ev, None, path) is ev
