"""Stream files: one HDF5 file per simulated sequence, with DSEC-compatible event columns.

Layout (``format_version`` 1)::

    /events/x          u2   pixel column
    /events/y          u2   pixel row
    /events/p          u1   1 = ON, 0 = OFF (as DSEC)
    /events/t          u4   microseconds relative to /t_offset; u8 when the stream spans more than 2**32-1 us
                            (71.6 min; the writer decides from ``t_end``), so a stream of any length fits
    /t_offset          i8   scalar, microseconds: the first source frame time
    /ms_to_idx         u8   ms_to_idx[m] = first event index with t >= m*1000, m = 0 .. ceil(t_last / 1000)
                            (DSEC definition; ``[0]`` for a file without events)
    /frames/t          i8   absolute microseconds of the source frames
    /frames/event_idx  u8   first event index with absolute t >= frames/t[i]; the events of interval i are
                            event_idx[i]:event_idx[i+1], those at or after the last frame follow event_idx[-1]
    /frames/gray       u1   (N, H, W), optional: the simulator's gray input frames at output resolution
                            (compressed at the lowest level of the file's codec: they are previews)

    root attrs: evforge_format = "stream", format_version = 1, width, height, num_events, complete = True
                (written last, so a file without it was interrupted), plus user attrs: scalars and strings
                as HDF5 attrs, dicts / lists / tuples / None as JSON strings (their names are listed in the
                ``evforge_json_attrs`` attr and decoded back on read; :mod:`evforge.formats.hdf5`, shared with
                shards).

Event columns are chunked by 65536 events and compressed with Blosc zstd + bit-shuffle (hdf5plugin) by
default; ``compression="lz4"`` selects Blosc lz4, ``"gzip"`` the HDF5 built-in filter for readers without
hdf5plugin. Readers take ``/events/t`` as u4 or u8 (StreamFile refuses other types). Inside evforge events
are :data:`~evforge.formats.events.EVENT_DTYPE` arrays with absolute ``t`` and ``p`` in {+1, -1}; the conversion
happens here only.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter so Blosc-compressed files can be read)
import numpy as np

from evforge.errors import InputError, OutputError, environment_problem
from evforge.formats import h5guard
from evforge.formats.atomic import AtomicWriter, commit, temp_path
from evforge.formats.events import EVENT_DTYPE, EventFormatError, validate_events
from evforge.formats.hdf5 import check_local, decode_attr, decode_attrs, encode_attrs, header_problem

FORMAT = "stream"
FORMAT_VERSION = 1
CHUNK_EVENTS = 65536
_MS_CHUNK = 16384
_MS_BLOCK = 1 << 20  # ms_to_idx entries made (and written) at a time: a long gap without events is many
_U4_MAX = np.iinfo(np.uint32).max
_I8_MAX = np.iinfo(np.int64).max
T_DTYPES = ("<u4", "<u8")  # /events/t: u4 (DSEC's), u8 for streams longer than 2**32-1 us
_COLUMNS = {"x": "<u2", "y": "<u2", "p": "u1", "t": "<u4"}
_RESERVED_ATTRS = {"evforge_format", "format_version", "width", "height", "complete", "num_events",
                   "evforge_json_attrs"}


def _filter_kwargs(compression: str, *, shuffle: bool = True, fast: bool = False) -> dict:
    """h5py ``create_dataset`` keyword arguments for a compression name; ``fast``: the lowest level."""
    if compression in ("zstd", "lz4"):
        mode = hdf5plugin.Blosc.BITSHUFFLE if shuffle else hdf5plugin.Blosc.NOSHUFFLE
        return dict(hdf5plugin.Blosc(cname=compression, clevel=1 if fast else 5, shuffle=mode))
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 1 if fast else 4, "shuffle": shuffle}
    raise ValueError(f"compression must be 'zstd', 'lz4' or 'gzip', got {compression!r}")


FLUSH_EVENTS = 16 * CHUNK_EVENTS  # events held in memory before they are written (about 9 MiB)
FLUSH_FRAMES = 16  # gray frames held in memory before they are written


class StreamWriter(AtomicWriter):
    """Write one stream file incrementally (bounded memory); the file appears at ``path`` only when complete.

    Appended events and frames are converted to the file's columns at once and held in memory until
    ``FLUSH_EVENTS`` events (or ``FLUSH_FRAMES`` frames) are pending, then written with one HDF5 call per
    column: a simulator appends a few thousand events per step, and writing each step on its own cost
    more than simulating it (every write re-reads and re-compresses the column's last chunk).

    ``t_end`` (absolute us, e.g. the last frame time) sizes the time column: u4 as DSEC's when the stream spans
    at most 2**32-1 us after ``t_offset``, u8 beyond; without it, events past that span are refused.

    Use as a context manager: on normal exit the file is finalized and renamed into place, on an exception
    the temporary file (``<name>.tmp-<pid>`` next to ``path``) is deleted. A full disk, a read-only folder or
    an I/O error while writing raises :class:`~evforge.errors.OutputError` naming ``path``, with the temporary
    file already deleted: the file is written through :mod:`evforge.formats.h5guard`, so HDF5 never sees the failed
    write (it does not survive one) and the process goes on normally.
    """

    def __init__(self, path, *, width: int, height: int, t_offset: int, attrs: dict | None = None,
                 compression: str = "zstd", save_frames: bool = False, t_end: int | None = None):
        self.path = Path(path)
        self.width, self.height, self.t_offset = int(width), int(height), int(t_offset)
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"sensor size must be positive, got {width}x{height}")
        if t_end is not None and not 0 <= int(t_end) - self.t_offset <= _I8_MAX:
            raise ValueError(f"{self.path}: t_end={t_end} is not within 2**63-1 us at or after t_offset={t_offset}")
        wide = t_end is not None and int(t_end) - self.t_offset > _U4_MAX
        self.t_dtype = T_DTYPES[1] if wide else T_DTYPES[0]
        event_filter = _filter_kwargs(compression)
        user_attrs = encode_attrs(attrs or {}, reserved=_RESERVED_ATTRS, fmt="stream")
        self.save_frames = bool(save_frames)
        # the gray frames (previews, 300 KB each at 640x480) at the lowest level: zstd 5 took longer to
        # compress a frame than the simulator took to make its events; level 1 is 5x faster, 1.4x larger
        self._gray_filter = _filter_kwargs(compression, shuffle=False, fast=True)
        self._n = 0  # events written
        self._t_last = None  # absolute t of the last event written
        self._next_ms = 0  # first ms_to_idx entry not yet known
        self._frame_t: list[int] = []
        self._pending: dict[str, list[np.ndarray]] = {name: [] for name in (*_COLUMNS, "ms_to_idx")}
        self._pending_events = 0
        self._pending_ms = 0
        self._pending_frames: list[np.ndarray] = []

        self._tmp = temp_path(self.path)
        self._file = self._guard = None
        with self._aborting():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file, self._guard = h5guard.create(self._tmp)
            f = self._file
            f.attrs.update({"evforge_format": FORMAT, "format_version": FORMAT_VERSION,
                            "width": self.width, "height": self.height, "complete": False})
            f.attrs.update(user_attrs)
            f.create_dataset("t_offset", data=np.int64(self.t_offset))
            events = f.create_group("events")
            for name, dtype in _COLUMNS.items():
                dtype = self.t_dtype if name == "t" else dtype
                events.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(CHUNK_EVENTS,),
                                      **event_filter)
            f.create_dataset("ms_to_idx", shape=(0,), maxshape=(None,), dtype="<u8", chunks=(_MS_CHUNK,),
                             **event_filter)
            if self.save_frames:
                f.create_dataset("frames/gray", shape=(0, self.height, self.width), dtype="u1",
                                 maxshape=(None, self.height, self.width), chunks=(1, self.height, self.width),
                                 **self._gray_filter)
            self._guard.check()

    @contextmanager
    def _aborting(self):
        """Any failure inside drops the file; a failed write (full disk, read-only, I/O error) is raised as the
        :class:`OutputError` naming the final path, other errors as they are."""
        try:
            yield
        except OSError as err:
            self.abort()
            self._raise_output_error(err)
        except BaseException:
            self.abort()
            raise

    @property
    def num_events(self) -> int:
        return self._n

    def append(self, events: np.ndarray) -> None:
        """Append a sorted chunk of events (absolute ``t``) that starts at or after everything written so far."""
        what = f"{self.path}: appended events"
        validate_events(events, (self.width, self.height), what=what)
        if len(events) == 0:
            return
        t = events["t"]
        floor = self.t_offset if self._t_last is None else self._t_last
        if t[0] < floor:
            which = "t_offset" if self._t_last is None else "the last event already written"
            raise EventFormatError(f"{what}: t={t[0]} is before {which} ({floor})")
        span = int(t[-1]) - self.t_offset
        if span > (_U4_MAX if self.t_dtype == "<u4" else _I8_MAX):
            limit = ("2**32-1 us after t_offset (a u4 time column: give the writer t_end= to get u8)"
                     if self.t_dtype == "<u4" else "2**63-1 us after t_offset")
            raise EventFormatError(f"{what}: t={t[-1]} is more than {limit}, t_offset={self.t_offset}")
        t_rel = t - self.t_offset
        n0, n1 = self._n, self._n + len(events)
        columns = {"x": events["x"].copy(), "y": events["y"].copy(), "p": (events["p"] > 0).astype("u1"),
                   "t": t_rel.astype(self.t_dtype)}
        for name, values in columns.items():
            self._pending[name].append(values)
        self._pending_events += len(events)
        # ms entries with m*1000 <= t_rel[-1] are final now: later events are all >= t_rel[-1].
        self._add_ms(int(t_rel[-1]) // 1000 + 1, t_rel, n0)
        self._n, self._t_last = n1, int(t[-1])
        if self._pending_events >= FLUSH_EVENTS:
            self._write(self._flush)

    def add_frame(self, t: int, gray: np.ndarray | None = None) -> None:
        """Record a source frame time (non-decreasing); ``gray`` (H, W) uint8, or float in [0, 1], is stored
        when the writer was made with ``save_frames=True``. Its event index is computed at close, so frames
        and event chunks may be given in any interleaving."""
        t = int(t)
        if self._frame_t and t < self._frame_t[-1]:
            raise ValueError(f"{self.path}: frame time {t} is before the previous frame ({self._frame_t[-1]})")
        if self.save_frames:
            if gray is None:
                raise ValueError(f"{self.path}: save_frames=True but frame {len(self._frame_t)} has no gray image")
            gray = np.asarray(gray)
            if gray.shape != (self.height, self.width):
                raise ValueError(f"{self.path}: gray frame shape {gray.shape} != {(self.height, self.width)}")
            if gray.dtype != np.uint8:
                gray = np.clip(np.rint(gray.astype(np.float64) * 255), 0, 255).astype(np.uint8)
            self._pending_frames.append(gray.copy())
            if len(self._pending_frames) >= FLUSH_FRAMES:
                self._write(self._flush_frames)
        self._frame_t.append(t)

    def _add_ms(self, stop: int, t_rel: np.ndarray | None = None, n0: int = 0) -> None:
        """ms_to_idx entries up to ``stop`` (exclusive): the first index ``n0 + k`` with ``t_rel[k] >= m*1000``,
        or the event count when ``t_rel`` is None. Made in blocks and written as they pile up, so a long span
        without events (a 2**40 us stream has 10**9 entries) never sits in memory."""
        while self._next_ms < stop:
            hi = min(stop, self._next_ms + _MS_BLOCK)
            if t_rel is None:
                idx = np.full(hi - self._next_ms, self._n, dtype=np.uint64)
            else:
                ms = np.arange(self._next_ms, hi, dtype=np.int64)
                idx = (n0 + np.searchsorted(t_rel, ms * 1000, "left")).astype(np.uint64)
            self._pending["ms_to_idx"].append(idx)
            self._pending_ms += len(idx)
            self._next_ms = hi
            if self._pending_ms >= _MS_BLOCK:
                self._write(self._flush)

    def _write(self, flush) -> None:
        """Run a flush; a write that failed (full disk, read-only, I/O error) drops the file and raises
        :class:`OutputError` naming the final path."""
        with self._aborting():
            flush()
            self._guard.check()

    def _raise_output_error(self, err: OSError):
        """Raise ``err`` as the OutputError for this file: every failed write of the temp file is the
        environment's (a full disk, a read-only or failing device); other errors (an HDF5 bug) as they are."""
        if self._guard is not None and self._guard.error is not None:
            err = self._guard.error
        elif environment_problem(err) is None and err.errno is None:
            raise err
        problem = environment_problem(err) or " ".join((err.strerror or str(err)).split())
        raise OutputError(self.path, problem) from err

    def _flush(self) -> None:
        """Write the pending event columns and ms_to_idx entries, one resize and one write per dataset."""
        for name, parts in self._pending.items():
            if not parts:
                continue
            values = parts[0] if len(parts) == 1 else np.concatenate(parts)
            ds = self._file["ms_to_idx"] if name == "ms_to_idx" else self._file["events"][name]
            n = len(ds)
            ds.resize((n + len(values),))
            ds[n:] = values
            parts.clear()
        self._pending_events = self._pending_ms = 0

    def _flush_frames(self) -> None:
        if self._pending_frames:
            ds = self._file["frames/gray"]
            n = len(ds)
            ds.resize((n + len(self._pending_frames), self.height, self.width))
            ds[n:] = np.stack(self._pending_frames)
            self._pending_frames.clear()

    def _first_index(self, t_abs: int) -> int:
        """First written event index with absolute t >= ``t_abs`` (ms_to_idx narrows the search)."""
        if self._t_last is None or t_abs > self._t_last:
            return self._n
        t_rel = t_abs - self.t_offset
        if t_rel <= 0:
            return 0
        m = t_rel // 1000
        ms = self._file["ms_to_idx"][m : m + 2]
        lo, hi = int(ms[0]), int(ms[1]) if len(ms) > 1 else self._n
        return lo + int(np.searchsorted(self._file["events/t"][lo:hi].astype(np.int64), t_rel, "left"))

    def close(self) -> None:
        """Finalize (ms_to_idx, frame indices, num_events, complete=True), fsync and rename into place."""
        if self._file is None:
            return
        with self._aborting():
            f = self._file
            last_ms = 0 if self._t_last is None else -(-(self._t_last - self.t_offset) // 1000)
            self._add_ms(last_ms + 1)
            self._flush()
            self._flush_frames()
            self._guard.check()
            frame_idx = [self._first_index(t) for t in self._frame_t]
            f.create_dataset("frames/t", data=np.asarray(self._frame_t, dtype=np.int64))
            f.create_dataset("frames/event_idx", data=np.asarray(frame_idx, dtype=np.uint64))
            f.attrs["num_events"] = self._n
            f.attrs["complete"] = True
            f.flush()
            f.close()
            self._file = None
            self._guard.check()
            self._guard.close()
            commit(self._tmp, self.path)

    def abort(self) -> None:
        """Discard the file being written (nothing is left at ``path`` or in the temp file). Closing the HDF5
        handle is safe after a failed write: HDF5 never saw it fail (:mod:`evforge.formats.h5guard`)."""
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()  # before the guard: HDF5 flushes through it
            except Exception:
                pass
        if self._guard is not None:
            self._guard.close()
        self._discard_temp()


def write_stream(path, events: np.ndarray, frame_times, *, width: int, height: int, attrs: dict | None = None,
                 frames: np.ndarray | None = None, compression: str = "zstd") -> Path:
    """Write a whole sequence at once; ``t_offset`` is the first frame time (else the first event, else 0)."""
    frame_times = np.asarray(frame_times, dtype=np.int64).reshape(-1)
    if len(frame_times):
        t_offset = int(frame_times[0])
    else:
        t_offset = int(events["t"][0]) if len(events) else 0
    if frames is not None and len(frames) != len(frame_times):
        raise ValueError(f"{path}: {len(frames)} gray frames for {len(frame_times)} frame times")
    ends = [int(v[-1]) for v in (frame_times, events["t"]) if len(v)]
    with StreamWriter(path, width=width, height=height, t_offset=t_offset, attrs=attrs,
                      compression=compression, save_frames=frames is not None,
                      t_end=max(ends) if ends else None) as writer:
        for i, t in enumerate(frame_times):
            writer.add_frame(int(t), None if frames is None else frames[i])
        for start in range(0, len(events), 1 << 22):
            writer.append(events[start : start + (1 << 22)])
    return Path(path)


class StreamFile:
    """Lazy reader of a complete stream file: columns are read only for the slices asked for."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(path, "no such file")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as err:
            raise InputError(path, f"not a readable HDF5 file ({err})") from None
        try:
            check_local(self._file, path)  # no data from outside the file (external links, storage, VDS)
            a = self._file.attrs
            problem = header_problem(a, fmt=FORMAT, version=FORMAT_VERSION, what="stream file")
            if problem:
                raise InputError(path, problem)
            self.width, self.height = int(a["width"]), int(a["height"])
            self.num_events = int(a["num_events"])
            self.t_offset = int(self._file["t_offset"][()])
            self.attrs = decode_attrs(a, reserved=_RESERVED_ATTRS)
            self.frame_times = self._file["frames/t"][:].astype(np.int64)
            self.frame_event_idx = self._file["frames/event_idx"][:].astype(np.int64)
            self.has_frames = "frames/gray" in self._file
            self._cols = {name: self._file["events"][name] for name in _COLUMNS}
            if self._cols["t"].dtype.str not in T_DTYPES:
                raise InputError(path, f"events/t is {self._cols['t'].dtype}, expected u4 or u8")
            self._ms = self._file["ms_to_idx"]
        except InputError:
            self._file.close()
            raise
        except (KeyError, OSError, ValueError) as err:
            self._file.close()
            raise InputError(path, f"malformed stream file ({err})") from None

    def __enter__(self) -> "StreamFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.num_events

    def close(self) -> None:
        self._file.close()

    @property
    def ms_to_idx(self) -> np.ndarray:
        """The whole ms_to_idx table (one u8 per millisecond of the sequence)."""
        return self._ms[:]

    def column(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """One event column over ``[start, stop)`` in evforge conventions: t absolute int64, p +1/-1 int8."""
        values = self._cols[name][start:stop]
        if name == "t":
            return values.astype(np.int64) + self.t_offset
        if name == "p":
            return values.astype(np.int8) * 2 - 1
        return values

    def events(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Events ``[start, stop)`` by index as an EVENT_DTYPE array."""
        t = self.column("t", start, stop)
        ev = np.empty(len(t), dtype=EVENT_DTYPE)
        ev["t"] = t
        for name in ("x", "y", "p"):
            ev[name] = self.column(name, start, stop)
        return ev

    def index_of(self, t_abs: int) -> int:
        """First event index with absolute t >= ``t_abs``: ms_to_idx bounds a one-millisecond slice to search."""
        t_rel = int(t_abs) - self.t_offset
        if t_rel <= 0 or self.num_events == 0:
            return 0
        m = t_rel // 1000
        ms = self._ms[m : m + 2]
        if len(ms) == 0:
            return self.num_events
        lo, hi = int(ms[0]), int(ms[1]) if len(ms) > 1 else self.num_events
        return lo + int(np.searchsorted(self._cols["t"][lo:hi].astype(np.int64), t_rel, "left"))

    def window(self, t_start_us: int, t_end_us: int) -> np.ndarray:
        """Events with ``t_start_us <= t < t_end_us`` (absolute microseconds)."""
        i0 = self.index_of(t_start_us)
        i1 = max(i0, self.index_of(t_end_us))
        return self.events(i0, i1)

    def between_frames(self, i: int) -> np.ndarray:
        """Events in ``[frame_times[i], frame_times[i+1])``."""
        if not 0 <= i < len(self.frame_times) - 1:
            raise IndexError(f"{self.path}: frame interval {i} out of range (0 .. {len(self.frame_times) - 2})")
        return self.events(int(self.frame_event_idx[i]), int(self.frame_event_idx[i + 1]))

    def gray_frame(self, i: int) -> np.ndarray | None:
        """The stored gray input frame ``i`` (H, W) uint8, or None when the file has no frames."""
        return self._file["frames/gray"][i] if self.has_frames else None


def is_complete_stream(path) -> bool:
    """True iff ``path`` is an evforge stream file whose write finished (used to skip done sequences)."""
    try:
        with h5py.File(path, "r") as f:
            return (decode_attr(f.attrs.get("evforge_format")) == FORMAT
                    and decode_attr(f.attrs.get("complete")) is True)
    except (OSError, ValueError):
        return False
