"""Stream files that nothing silently breaks (issue 15): streams of any length (a u8 time column past 2**32-1
us), write errors that HDF5 never sees, and data from outside the file refused by the reader."""

from __future__ import annotations

import errno

import h5py
import numpy as np
import pytest

from evforge.errors import InputError, OutputError
from evforge.formats.events import EventFormatError, make_events
from evforge.formats.h5guard import GuardedFile, create
from evforge.formats.streamfile import StreamFile, StreamWriter, write_stream

U4 = 2**32


def _long_events(t0: int) -> np.ndarray:
    """Few events over 80 minutes, some on either side of the u4 limit (2**32 us after t0)."""
    rel = np.array([0, 1, 999, 1000, U4 - 2, U4 - 1, U4, U4 + 1, U4 + 1, U4 + 1500, 4_800_000_000])
    n = len(rel)
    return make_events(np.arange(n) % 7, np.arange(n) % 5, t0 + rel, np.where(np.arange(n) % 2, 1, -1))


@pytest.mark.parametrize("t0", [0, 1_733_160_000_000_000])
def test_a_stream_over_2_32_us_is_written_with_a_u8_time_column_and_read_back_exactly(tmp_path, t0):
    ev = _long_events(t0)
    frames = np.array([t0, t0 + 2_400_000_000, t0 + 4_800_000_000])
    path = write_stream(tmp_path / "long.h5", ev, frames, width=7, height=5)
    with StreamFile(path) as sf:
        assert sf._cols["t"].dtype == np.dtype("<u8") and sf.t_offset == t0
        assert np.array_equal(sf.events(), ev)
        assert np.array_equal(sf.column("t"), ev["t"])
        assert list(sf.frame_event_idx) == [0, 4, 10]  # first event at or after each frame
        for t in (t0 + U4 - 1, t0 + U4, t0 + U4 + 1, t0 + U4 + 2, t0 + 4_800_000_000):
            assert sf.index_of(t) == int(np.searchsorted(ev["t"], t, "left")), t
        assert np.array_equal(sf.window(t0 + U4, t0 + U4 + 1500), ev[(ev["t"] >= t0 + U4) &
                                                                     (ev["t"] < t0 + U4 + 1500)])
        assert len(sf.ms_to_idx) == 4_800_001  # ms_to_idx: one entry per ms, written in blocks
        assert np.array_equal(sf.between_frames(1), ev[4:10])


def test_a_short_stream_keeps_the_u4_time_column_and_a_writer_without_t_end_refuses_more(tmp_path):
    ev = make_events([1, 2], [1, 2], [10, 20], [1, -1])
    with StreamFile(write_stream(tmp_path / "s.h5", ev, [0, 30], width=4, height=4)) as sf:
        assert sf._cols["t"].dtype == np.dtype("<u4")  # DSEC's type whenever it is enough
    with pytest.raises(EventFormatError, match="t_end="):
        with StreamWriter(tmp_path / "w.h5", width=4, height=4, t_offset=0) as w:
            w.append(make_events([1], [1], [U4], [1]))
    assert not list(tmp_path.glob("w.h5*"))


def test_a_stream_file_with_another_time_type_is_refused(tmp_path):
    path = write_stream(tmp_path / "s.h5", make_events([1], [1], [10], [1]), [0, 30], width=4, height=4)
    with h5py.File(path, "a") as f:
        del f["events/t"]
        f["events/t"] = np.array([10], dtype=np.float64)
    with pytest.raises(InputError, match="events/t is float64, expected u4 or u8"):
        StreamFile(path)


@pytest.mark.parametrize("kind", ["external_link", "external_storage"])
def test_stream_file_with_data_from_outside_it_is_refused(tmp_path, kind):
    path = write_stream(tmp_path / "s.h5", make_events([1, 2], [1, 2], [10, 20], [1, -1]), [0, 30],
                        width=4, height=4)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(bytes(range(8)))
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.array([3, 3], dtype="<u2")
    with h5py.File(path, "a") as f:
        del f["events/x"]
        if kind == "external_link":
            f["events/x"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/x")
        else:
            f.create_dataset("events/x", shape=(2,), dtype="<u2", external=[(str(outside), 0, 4)])
    with pytest.raises(InputError, match=r"refused: /events/x (is an external link|has external storage)") as info:
        StreamFile(path)
    assert str(info.value).startswith(f"{path}: ")


def test_guarded_file_keeps_the_first_write_error_and_hdf5_goes_on(tmp_path, monkeypatch):
    """After the disk fails, HDF5 reads back what it wrote (from memory) and closes without an error."""
    real, calls = GuardedFile._write_at, []

    def write_at(self, data, offset):
        calls.append(offset)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data, offset)

    monkeypatch.setattr(GuardedFile, "_write_at", write_at)
    f, guard = create(tmp_path / "g.h5")
    ds = f.create_dataset("a", shape=(0,), maxshape=(None,), dtype="<i8", chunks=(1024,))
    for k in range(20):  # more than the chunk cache holds: chunks are written, evicted and read back
        ds.resize(((k + 1) * 100_000,))
        ds[k * 100_000 :] = np.arange(k * 100_000, (k + 1) * 100_000)
        f.flush()
    assert guard.error is not None and guard.error.errno == errno.ENOSPC
    assert guard.error.filename == str(tmp_path / "g.h5")
    assert np.array_equal(ds[:], np.arange(2_000_000))
    f.close()
    with pytest.raises(OSError, match="No space left"):
        guard.check()
    guard.close()


def test_writer_on_a_failing_disk_raises_output_error_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(GuardedFile, "_write_at", lambda self, data, offset: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    ev = make_events(np.arange(1000) % 4, np.arange(1000) % 4, np.arange(1000), np.ones(1000))
    with pytest.raises(OutputError) as info:
        write_stream(tmp_path / "s.h5", ev, [0, 1000], width=4, height=4)
    assert str(info.value) == f"{tmp_path / 's.h5'}: disk full (no space left on device)"
    assert not list(tmp_path.iterdir())
