"""Shard files: many samples (or stream sequences) in one HDF5 file, read one sample at a time.

Layout (``format_version`` 1, full tables in ``docs/FORMAT.md``)::

    /events/x, /events/y   u2   pixel column / row, all samples concatenated (chunks of 65536 events)
    /events/p              u1   1 = ON, 0 = OFF (as DSEC)
    /events/t              u4   microseconds relative to the sample's index/t_offset
    /index/offset          u8   first event of sample i in /events/*
    /index/count           u8   its number of events
    /index/label           i4   class id (-1 = unlabelled)
    /index/key             str  unique sample key (utf-8), e.g. "airplanes/image_0001"
    /index/t_offset        i8   absolute us: the earliest of the sample's first event and first frame
    /index/t_start, t_end  i8   absolute us, half-open range [t_start, t_end) holding all its events and frames
    /index/attrs           str  per-sample JSON object ("{}" when none)
    streams only:
    /index/frame_offset    u8   first frame of sample i in /frames/*
    /index/frame_count     u8   its number of frames
    /frames/t              i8   absolute us of the source frames, all samples concatenated
    /frames/event_idx      u8   per frame, relative to its sample start: first event with t >= frame time
    optional, streams given ``frame_images`` (readers ignore them when absent):
    /frames/image          u1   (F, H_img, W_img) one image per frame (e.g. a label map), one frame per chunk
    /frames/has_image      u1   (F,) 1 where frame j has an image, 0 where its row is zero fill

    root attrs: evforge_format = "shard", format_version = 1, kind ("samples" | "streams"), width, height,
                num_samples, num_events, complete = True (written last), plus user attrs as in stream files.

Reading sample ``i`` is one slice ``offset:offset+count`` of each event column; the index is read once.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

from evforge.atomic import commit, temp_path
from evforge.errors import InputError
from evforge.events import EVENT_DTYPE, EventFormatError, empty_events, validate_events
from evforge.h5local import check_local
from evforge.streamfile import CHUNK_EVENTS, _decode_attr, _filter_kwargs

__all__ = [
    "FORMAT", "FORMAT_VERSION", "KINDS", "CHUNK_EVENTS", "RAW_EVENT_BYTES", "DEFAULT_TARGET_BYTES",
    "ShardWriter", "ShardReader", "RollingShardWriter", "estimate_sample_bytes", "sha256_file",
]

FORMAT = "shard"
FORMAT_VERSION = 1
KINDS = ("samples", "streams")
RAW_EVENT_BYTES = 9  # x u2 + y u2 + p u1 + t u4: one event's column bytes before compression
RAW_FRAME_BYTES = 16  # frames/t i8 + frames/event_idx u8
RAW_INDEX_BYTES = 48  # one index row (offset, count, label, t_offset, t_start, t_end, key/attrs pointers)
DEFAULT_TARGET_BYTES = 256 << 20

_COLUMNS = {"x": "<u2", "y": "<u2", "p": "u1", "t": "<u4"}
_INDEX = {"offset": "<u8", "count": "<u8", "label": "<i4", "t_offset": "<i8", "t_start": "<i8", "t_end": "<i8"}
_STREAM_INDEX = {"frame_offset": "<u8", "frame_count": "<u8"}
_RESERVED_ATTRS = {"evforge_format", "format_version", "kind", "width", "height", "num_samples", "num_events",
                   "complete", "evforge_json_attrs"}
_U4_MAX = np.iinfo(np.uint32).max
_I4_MAX = np.iinfo(np.int32).max
_FLUSH_EVENTS = 16 * CHUNK_EVENTS  # events are buffered and written in whole chunks: each compressed once
_SLICE_EVENTS = 1 << 22  # large samples are checked in slices (bounded extra memory)
_STR = h5py.string_dtype("utf-8")


def estimate_sample_bytes(num_events: int, num_frames: int = 0, image_bytes: int = 0) -> int:
    """Uncompressed bytes a sample adds to a shard (event columns, frame index, frame images, index row):
    the size policy."""
    return (int(num_events) * RAW_EVENT_BYTES + int(num_frames) * RAW_FRAME_BYTES + int(image_bytes)
            + RAW_INDEX_BYTES)


def sha256_file(path, block_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def _encode_user_attrs(attrs: dict) -> tuple[dict, list[str]]:
    """User attrs as HDF5 values; dicts / lists / tuples / None become JSON strings (names returned)."""
    out, json_names = {}, []
    for key, value in attrs.items():
        if key in _RESERVED_ATTRS:
            raise ValueError(f"attr name {key!r} is reserved by the shard format")
        if value is None or isinstance(value, (dict, list, tuple)):
            out[key] = json.dumps(value)
            json_names.append(key)
        else:
            out[key] = value
    return out, json_names


# ------------------------------------------------------------------------------- parallel chunk compression
# HDF5 runs a dataset's filters in the writing thread, one chunk at a time. For the Blosc filter (zstd, lz4)
# the writer instead compresses whole chunks in a small thread pool with the very function the filter calls
# (``blosc_compress_ctx`` of hdf5plugin's own Blosc plugin, same arguments: the dataset's cd_values, automatic
# block size, one internal thread, output no larger than the input) and stores them with
# ``write_direct_chunk``; a chunk that does not compress is stored raw with filter-mask bit 0 set, as HDF5 does
# when this optional filter declines. The files are the same chunk for chunk. Each (dtype, cd_values) is
# checked once per process against HDF5's own filter output on an in-memory file; if anything differs, or
# the library cannot be loaded, or only one CPU is usable, the writer uses the ordinary filtered writes.
_BLOSC_ID = 32001
_BLOSC_CNAMES = {0: b"blosclz", 1: b"lz4", 2: b"lz4hc", 3: b"snappy", 4: b"zlib", 5: b"zstd"}
_MAX_COMPRESS_THREADS = 4
_direct_lock = threading.Lock()
_blosc_fn = None  # ctypes blosc_compress_ctx; False once loading it failed
_direct_ok: dict[tuple, bool] = {}  # (dtype, cd_values) -> verified against HDF5's filter
_pool: ThreadPoolExecutor | None = None
_pool_pid: int | None = None


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _blosc_compress_ctx():
    """``blosc_compress_ctx`` from hdf5plugin's Blosc plugin library (the one HDF5 filters with), or None."""
    global _blosc_fn
    if _blosc_fn is None:
        _blosc_fn = False
        try:
            registered = getattr(getattr(hdf5plugin, "_utils", None), "registered_filters", {}).get("blosc")
            if registered is not None:
                lib = registered[1]
            else:
                lib = ctypes.CDLL(os.path.join(hdf5plugin.PLUGIN_PATH, "libh5blosc.so"))
            fn = lib.blosc_compress_ctx
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p,
                           ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
            fn.restype = ctypes.c_int
            _blosc_fn = fn
        except (AttributeError, OSError, TypeError, ValueError, IndexError):
            pass
    return _blosc_fn or None


def _compress_chunk(fn, args: tuple, data: np.ndarray) -> tuple[int, np.ndarray]:
    """Blosc-compress one whole chunk as the HDF5 filter does: ``(status, buffer)``; status 0 = no gain."""
    clevel, shuffle, typesize, cname = args
    out = np.empty(data.nbytes, dtype=np.uint8)
    status = fn(clevel, shuffle, typesize, data.nbytes, data.ctypes.data, out.ctypes.data, data.nbytes, cname,
                0, 1)
    return status, out


def _direct_args(ds: h5py.Dataset) -> tuple | None:
    """Blosc arguments for compressing ``ds``'s chunks outside HDF5, or None (then use ordinary writes)."""
    try:
        plist = ds.id.get_create_plist()
        if plist.get_nfilters() != 1 or ds.chunks != (CHUNK_EVENTS,):
            return None
        code, flags, cd, _ = plist.get_filter(0)
        cd = tuple(int(v) for v in cd)
        itemsize = ds.dtype.itemsize
        if (code != _BLOSC_ID or not flags & h5py.h5z.FLAG_OPTIONAL or len(cd) < 7 or cd[2] != itemsize
                or cd[3] != CHUNK_EVENTS * itemsize or cd[6] not in _BLOSC_CNAMES):
            return None
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if _usable_cpus() < 2 or _blosc_compress_ctx() is None:
        return None
    args = (cd[4], cd[5], itemsize, _BLOSC_CNAMES[cd[6]])
    key = (ds.dtype.str, cd)
    with _direct_lock:
        if key not in _direct_ok:
            _direct_ok[key] = _verify_direct(ds.dtype, cd, args)
    return args if _direct_ok[key] else None


def _verify_direct(dtype: np.dtype, cd: tuple, args: tuple) -> bool:
    """True when our chunks equal HDF5's own filter output (a compressible and an incompressible chunk)."""
    fn = _blosc_compress_ctx()
    rng = np.random.default_rng(0)
    n = CHUNK_EVENTS
    smooth = (np.cumsum(rng.integers(0, 3, n)) % (1 << min(8 * dtype.itemsize, 20))).astype(dtype)
    noise = rng.integers(0, 256, n * dtype.itemsize, dtype=np.uint8).view(dtype)
    try:
        with h5py.File(f"evforge-verify-{os.getpid()}-{id(cd)}.h5", "w", driver="core", backing_store=False) as f:
            ds = f.create_dataset("v", shape=(2 * n,), dtype=dtype, chunks=(n,), compression=_BLOSC_ID,
                                  compression_opts=cd)
            ds[:n], ds[n:] = smooth, noise
            for k, data in enumerate((smooth, noise)):
                mask, stored = ds.id.read_direct_chunk((k * n,))
                status, out = _compress_chunk(fn, args, data)
                mine = (0, out[:status].tobytes()) if status > 0 else (1, data.tobytes()) if status == 0 else None
                if mine != (mask, bytes(stored)):
                    return False
    except Exception:  # any surprise: ordinary writes
        return False
    return True


def _compress_pool() -> ThreadPoolExecutor:
    """The process's chunk-compression threads (a new pool after fork: threads do not survive it)."""
    global _pool, _pool_pid
    with _direct_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=min(_usable_cpus(), _MAX_COMPRESS_THREADS),
                                       thread_name_prefix="evforge-shard-compress")
            _pool_pid = os.getpid()
        return _pool


# ---------------------------------------------------------------------------------------------- writer
class ShardWriter:
    """Write one shard sample by sample; the file appears at ``path`` only when complete.

    A context manager: on normal exit the index is written, ``complete=True`` set last, the temp file
    (``<name>.tmp-<pid>`` next to ``path``) fsynced and renamed into place; on an exception it is deleted.
    """

    def __init__(self, path, *, sensor_size, kind: str = "samples", compression: str = "zstd",
                 attrs: dict | None = None):
        self.path = Path(path)
        self.width, self.height = (int(v) for v in sensor_size)
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"sensor size must be positive, got {self.width}x{self.height}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        event_filter = _filter_kwargs(compression)
        user_attrs, json_names = _encode_user_attrs(attrs or {})

        self._rows: dict[str, list[int]] = {name: [] for name in (*_INDEX, *_STREAM_INDEX)}
        self._keys: list[str] = []
        self._key_set: set[str] = set()
        self._sample_attrs: list[str] = []
        self._frame_t: list[np.ndarray] = []
        self._frame_idx: list[np.ndarray] = []
        self._num_frames = 0
        self._compression = compression
        self._has_image: list[np.ndarray] = []  # per sample: u1 flag per frame (frame images)
        self._image_shape: tuple[int, int] | None = None  # (H_img, W_img) once a sample brought images
        self._image_bytes = 0
        # event columns are staged in preallocated buffers and leave them in whole chunks
        self._buf: dict[str, np.ndarray] | None = None  # column -> buffer of _FLUSH_EVENTS events
        self._fill = 0  # events staged in self._buf
        self._spare: dict[str, np.ndarray] | None = None  # a free buffer set to swap in
        self._inflight: list | None = None  # chunks being compressed: (dataset, offset, data, future)
        self._inflight_buf: dict[str, np.ndarray] | None = None  # the buffer set they point into
        self._direct: dict[str, tuple] | None = None  # column -> Blosc args when compressing in the pool
        self._n = 0  # events accepted (written, in flight or staged)
        self._written = 0  # events given to the file (the datasets' extent)

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_path(self.path)
        self._file = h5py.File(self._tmp, "w")
        try:
            f = self._file
            f.attrs.update({"evforge_format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
                            "width": self.width, "height": self.height, "complete": False})
            f.attrs.update(user_attrs)
            if json_names:
                f.attrs["evforge_json_attrs"] = json.dumps(json_names)
            events = f.create_group("events")
            self._ds = {name: events.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype,
                                                    chunks=(CHUNK_EVENTS,), **event_filter)
                        for name, dtype in _COLUMNS.items()}
            direct = {name: _direct_args(ds) for name, ds in self._ds.items()}
            self._direct = direct if all(a is not None for a in direct.values()) else None
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def num_samples(self) -> int:
        return len(self._keys)

    @property
    def num_events(self) -> int:
        return self._n

    @property
    def raw_bytes(self) -> int:
        """Uncompressed bytes so far, as :func:`estimate_sample_bytes` counts them."""
        return (self._n * RAW_EVENT_BYTES + self._num_frames * RAW_FRAME_BYTES + self._image_bytes
                + self.num_samples * RAW_INDEX_BYTES)

    def add_sample(self, events: np.ndarray, *, key: str, label: int = -1, frame_times=None,
                   attrs: dict | None = None, allow_empty: bool = False,
                   frame_images: np.ndarray | None = None) -> int:
        """Append one sample (EVENT_DTYPE, absolute sorted ``t``) and return its index in the shard.

        ``frame_times`` (absolute us, non-decreasing) is required for ``kind="streams"`` and refused otherwise;
        ``attrs`` is a JSON-serialisable dict kept per sample. An empty sample needs ``allow_empty=True``.
        ``frame_images`` (streams only, optional): ``(F, H_img, W_img)`` uint8, one image per frame time (e.g.
        a segmentation label); every image of a shard has the same size, which need not be the sensor's.
        """
        if self._file is None:
            raise ValueError(f"{self.path}: writer is closed")
        if not isinstance(key, str) or not key or any(c in key for c in "\r\n\0"):
            raise ValueError(f"{self.path}: sample key must be a non-empty one-line string, got {key!r}")
        if key in self._key_set:
            raise ValueError(f"{self.path}: duplicate sample key {key!r}")
        what = f"{self.path}: sample {key!r}"
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not -1 <= label <= _I4_MAX:
            raise ValueError(f"{what}: label must be an int >= -1 (-1 = unlabelled), got {label!r}")
        if not isinstance(events, np.ndarray) or events.dtype != EVENT_DTYPE or events.ndim != 1:
            validate_events(events, (self.width, self.height), what=what)  # raises for a wrong dtype
            raise EventFormatError(f"{what}: expected a 1-D event array, got shape {events.shape}")
        n = len(events)
        if n > _FLUSH_EVENTS - self._fill:
            self._flush_chunks()  # leaves less than one chunk staged
        staged = n <= _FLUSH_EVENTS - self._fill  # stage into the buffer now, checking the staged copy
        if staged:
            t = self._stage(events, self._fill)
            ok = self._staged_ok(self._fill, n, t)
        else:  # a large sample: check it in slices first, stage it piece by piece once everything passed
            t = events["t"]
            ok = self._events_ok(events)
        if not ok:  # name the first broken invariant exactly as validate_events does
            validate_events(events, (self.width, self.height), what=what)
        frames = self._check_frames(frame_times, what)
        images = self._check_images(frame_images, len(frames), what)
        try:
            attrs_json = json.dumps({} if attrs is None else dict(attrs))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{what}: attrs are not a JSON-serialisable dict ({err})") from None

        if n == 0 and not allow_empty:
            raise EventFormatError(f"{what}: no events (pass allow_empty=True to store an empty sample)")
        firsts = [int(a[0]) for a in (t, frames) if len(a)]
        lasts = [int(a[-1]) for a in (t, frames) if len(a)]
        t_offset = min(firsts) if firsts else 0
        t_end = max(lasts) + 1 if lasts else 0  # half-open [t_start, t_end)
        if n and int(t[-1]) - t_offset > _U4_MAX:
            raise EventFormatError(f"{what}: spans {int(t[-1]) - t_offset} us, more than 2**32-1 (does not fit u4)")

        # commit: everything is checked (nothing above this line changed the staged events' fate)
        if staged:
            self._finish_staged(self._fill, n, t, t_offset)
            self._fill += n
        else:
            s = 0
            while s < n:
                if self._fill == _FLUSH_EVENTS:
                    self._flush_chunks()
                m = min(n - s, _FLUSH_EVENTS - self._fill)
                part = events[s : s + m]
                self._finish_staged(self._fill, m, self._stage(part, self._fill), t_offset)
                self._fill += m
                s += m
        if self._fill == _FLUSH_EVENTS:
            self._flush_chunks()

        row = {"offset": self._n, "count": n, "label": int(label), "t_offset": t_offset, "t_start": t_offset,
               "t_end": t_end, "frame_offset": self._num_frames, "frame_count": len(frames)}
        for name, value in row.items():
            self._rows[name].append(value)
        if self.kind == "streams":
            self._frame_t.append(frames)
            self._frame_idx.append(np.searchsorted(t, frames, "left").astype(np.uint64))
            if images is not None:
                self._write_images(images, self._num_frames)
            self._has_image.append(np.full(len(frames), images is not None, dtype=np.uint8))
            self._num_frames += len(frames)
        self._keys.append(key)
        self._key_set.add(key)
        self._sample_attrs.append(attrs_json)
        self._n += n
        return len(self._keys) - 1

    def _check_frames(self, frame_times, what: str) -> np.ndarray:
        if self.kind == "samples":
            if frame_times is not None:
                raise ValueError(f"{what}: frame_times given, but a 'samples' shard has no frames")
            return np.zeros(0, dtype=np.int64)
        if frame_times is None:
            raise ValueError(f"{what}: a 'streams' shard needs frame_times")
        frames = np.asarray(frame_times).reshape(-1)
        if frames.size and frames.dtype.kind not in "iu":
            raise ValueError(f"{what}: frame_times must be integer microseconds, got dtype {frames.dtype}")
        frames = frames.astype(np.int64)
        bad = np.flatnonzero(np.diff(frames) < 0)
        if bad.size:
            raise ValueError(f"{what}: frame_times not sorted at index {int(bad[0]) + 1}")
        return frames

    def _check_images(self, frame_images, num_frames: int, what: str) -> np.ndarray | None:
        if frame_images is None:
            return None
        if self.kind != "streams":
            raise ValueError(f"{what}: frame_images given, but a 'samples' shard has no frames")
        images = np.asarray(frame_images)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[0] != num_frames or 0 in images.shape[1:]:
            raise ValueError(f"{what}: frame_images must be uint8 (F, H, W) with F = {num_frames} frames, "
                             f"got {images.dtype} {images.shape}")
        if self._image_shape is not None and images.shape[1:] != self._image_shape:
            raise ValueError(f"{what}: frame images are {images.shape[2]}x{images.shape[1]}, but this shard's "
                             f"are {self._image_shape[1]}x{self._image_shape[0]} (one size per shard)")
        return images

    def _write_images(self, images: np.ndarray, f0: int) -> None:
        """Write rows ``f0 ..`` of frames/image (created on first use; earlier frames stay zero fill)."""
        h, w = images.shape[1:]
        if self._image_shape is None:
            self._image_shape = (h, w)
            self._file.create_dataset("frames/image", shape=(0, h, w), maxshape=(None, h, w), dtype="u1",
                                      chunks=(1, h, w), fillvalue=0, **_filter_kwargs(self._compression))
        ds = self._file["frames/image"]
        f1 = f0 + len(images)
        ds.resize((max(f1, len(ds)), h, w))
        ds[f0:f1] = images
        self._image_bytes += images.nbytes

    # ---- event staging and chunk output
    def _new_buffer(self) -> dict[str, np.ndarray]:
        return {name: np.empty(_FLUSH_EVENTS, dtype=dtype) for name, dtype in _COLUMNS.items()}

    def _stage(self, events: np.ndarray, a: int) -> np.ndarray:
        """Copy x, y and the raw int8 p of ``events`` into buffer rows ``a..``; return t as a contiguous copy."""
        if self._buf is None:
            self._buf = self._new_buffer()
        b, n = self._buf, len(events)
        b["x"][a : a + n] = events["x"]
        b["y"][a : a + n] = events["y"]
        b["p"][a : a + n].view(np.int8)[...] = events["p"]
        return np.ascontiguousarray(events["t"])

    def _staged_ok(self, a: int, n: int, t: np.ndarray) -> bool:
        """The checks of validate_events (t sorted, p = +-1, inside the sensor) on staged rows ``a..a+n``."""
        if n == 0:
            return True
        b = self._buf
        p = b["p"][a : a + n].view(np.int8)
        return bool(not np.any(t[1:] < t[:-1]) and p.min() >= -1 and p.max() <= 1 and not np.any(p == 0)
                    and b["x"][a : a + n].max() < self.width and b["y"][a : a + n].max() < self.height)

    def _events_ok(self, events: np.ndarray) -> bool:
        """As :meth:`_staged_ok` for a sample too large to stage at once (checked in slices)."""
        prev = None
        for s in range(0, len(events), _SLICE_EVENTS):
            part = events[s : s + _SLICE_EVENTS]
            t = np.ascontiguousarray(part["t"])
            p = np.ascontiguousarray(part["p"])
            if (np.any(t[1:] < t[:-1]) or (prev is not None and t[0] < prev) or p.min() < -1 or p.max() > 1
                    or np.any(p == 0) or part["x"].max() >= self.width or part["y"].max() >= self.height):
                return False
            prev = t[-1]
        return True

    def _finish_staged(self, a: int, n: int, t: np.ndarray, t_offset: int) -> None:
        """Turn staged rows ``a..a+n`` into stored form: p +1/-1 -> 1/0, t -> u4 relative to ``t_offset``."""
        p = self._buf["p"][a : a + n].view(np.int8)
        p += 1
        p >>= 1
        np.subtract(t, t_offset, out=self._buf["t"][a : a + n], casting="unsafe")

    def _flush_chunks(self) -> None:
        """Hand the whole chunks staged to the file (compressed in the pool when possible); keep the rest."""
        k = self._fill - self._fill % CHUNK_EVENTS
        if k == 0:
            return
        n0, n1 = self._written, self._written + k
        buf, tail = self._buf, self._fill - k
        if self._direct is None:
            for name, ds in self._ds.items():
                ds.resize((n1,))
                ds[n0:n1] = buf[name][:k]
                buf[name][:tail] = buf[name][k : k + tail]
        else:
            self._drain()  # at most one batch in flight: bounded memory, and its buffer becomes the spare
            pool, fn = _compress_pool(), _blosc_compress_ctx()
            jobs = []
            for name, ds in self._ds.items():
                ds.resize((n1,))
                args = self._direct[name]
                for c in range(0, k, CHUNK_EVENTS):
                    data = buf[name][c : c + CHUNK_EVENTS]
                    jobs.append((ds, n0 + c, data, pool.submit(_compress_chunk, fn, args, data)))
            self._inflight, self._inflight_buf = jobs, buf
            nxt = self._spare if self._spare is not None else self._new_buffer()
            self._spare = None
            for name in buf:
                nxt[name][:tail] = buf[name][k : k + tail]
            self._buf = nxt
        self._fill, self._written = tail, n1

    def _drain(self) -> None:
        """Write the chunks compressed in the pool (in order, from this thread: HDF5 is not re-entrant)."""
        jobs, self._inflight = self._inflight, None
        if jobs is None:
            return
        for ds, offset, data, future in jobs:
            status, out = future.result()
            if status > 0:
                ds.id.write_direct_chunk((offset,), out[:status], 0)
            elif status == 0:  # no gain: stored raw, filter skipped (bit 0 of the filter mask), as HDF5 does
                ds.id.write_direct_chunk((offset,), data, 1)
            else:  # let HDF5's own filter run and report
                ds[offset : offset + len(data)] = data
        self._spare, self._inflight_buf = self._inflight_buf, None

    def _flush(self) -> None:
        """Write everything staged: whole chunks, then the last partial chunk through the ordinary filter."""
        self._flush_chunks()
        self._drain()
        if self._fill:
            n0, n1 = self._written, self._written + self._fill
            for name, ds in self._ds.items():
                ds.resize((n1,))
                ds[n0:n1] = self._buf[name][: self._fill]
            self._fill, self._written = 0, n1

    def close(self) -> None:
        """Write the index, set ``complete=True`` last, fsync and rename into place."""
        if self._file is None:
            return
        try:
            self._flush()
            f = self._file
            fields = dict(_INDEX, **(_STREAM_INDEX if self.kind == "streams" else {}))
            for name, dtype in fields.items():
                f.create_dataset(f"index/{name}", data=np.asarray(self._rows[name], dtype=dtype))
            f.create_dataset("index/key", data=np.asarray(self._keys, dtype=object), dtype=_STR)
            f.create_dataset("index/attrs", data=np.asarray(self._sample_attrs, dtype=object), dtype=_STR)
            if self.kind == "streams":
                cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
                f.create_dataset("frames/t", data=cat(self._frame_t, "<i8"))
                f.create_dataset("frames/event_idx", data=cat(self._frame_idx, "<u8"))
                if self._image_shape is not None:
                    f["frames/image"].resize((self._num_frames, *self._image_shape))  # trailing frames: zero fill
                    f.create_dataset("frames/has_image", data=cat(self._has_image, "u1"))
            f.attrs["num_samples"] = self.num_samples
            f.attrs["num_events"] = self._n
            f.attrs["complete"] = True
            f.flush()
            f.close()
            self._file = None
            commit(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Discard the shard being written (nothing is left at ``path`` or in the temp file)."""
        for job in self._inflight or ():
            job[3].cancel()
        self._inflight = self._inflight_buf = None
        if self._file is not None:
            try:
                self._file.close()
            except Exception:
                pass
            self._file = None
        self._tmp.unlink(missing_ok=True)


class RollingShardWriter:
    """Write samples into ``<directory>/<prefix>-00000.h5``, ``-00001.h5``, ... cutting at ``target_bytes``.

    A new shard starts when the next sample would push the current one past ``target_bytes`` of raw bytes
    (:func:`estimate_sample_bytes`); a single larger sample gets a shard of its own. Finished shards are
    complete files (listed in :attr:`paths`); on an exception only the shard in progress is discarded.
    """

    def __init__(self, directory, *, prefix: str, sensor_size, kind: str = "samples", compression: str = "zstd",
                 attrs: dict | None = None, target_bytes: int = DEFAULT_TARGET_BYTES):
        if target_bytes <= 0:
            raise ValueError(f"target_bytes must be positive, got {target_bytes}")
        self.directory = Path(directory)
        self.prefix = prefix
        self.target_bytes = int(target_bytes)
        self._writer_kwargs = dict(sensor_size=sensor_size, kind=kind, compression=compression, attrs=attrs)
        self._writer: ShardWriter | None = None
        self.paths: list[Path] = []

    def __enter__(self) -> "RollingShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._writer is not None:
            self._writer.abort()
            self._writer = None

    def add_sample(self, events: np.ndarray, **kwargs) -> tuple[Path, int]:
        """Add a sample (arguments as :meth:`ShardWriter.add_sample`); returns (shard path, index in shard)."""
        frames, images = kwargs.get("frame_times"), kwargs.get("frame_images")
        size = estimate_sample_bytes(len(events), 0 if frames is None else np.size(frames),
                                     0 if images is None else np.size(images))
        w = self._writer
        if w is not None and w.num_samples and w.raw_bytes + size > self.target_bytes:
            self._finish()
        if self._writer is None:
            path = self.directory / f"{self.prefix}-{len(self.paths):05d}.h5"
            self._writer = ShardWriter(path, **self._writer_kwargs)
        return self._writer.path, self._writer.add_sample(events, **kwargs)

    def _finish(self) -> None:
        self._writer.close()
        self.paths.append(self._writer.path)
        self._writer = None

    def close(self) -> None:
        if self._writer is not None:
            self._finish()


# ---------------------------------------------------------------------------------------------- reader
def _slice_problem(cols: dict, width: int, height: int, t_span: int, first: int) -> str | None:
    """What is wrong with columns read from a sample (events ``first..`` of it), or None: the invariants every
    sample has (coordinates inside the sensor, p in {0, 1}, t sorted and before the sample's end)."""
    x, y, p, t = cols["x"], cols["y"], cols["p"], cols["t"]
    if not len(t):
        return None
    for name, values, limit in (("x", x, width), ("y", y, height)):
        if int(values.max()) >= limit:
            k = int(np.argmax(values >= limit))
            return f"{name}={int(values[k])} at event {first + k} is outside the {width}x{height} sensor"
    if int(p.max()) > 1:
        k = int(np.argmax(p > 1))
        return f"p={int(p[k])} at event {first + k} is not 0 or 1"
    down = t[1:] < t[:-1]
    if down.any():
        return f"timestamps decrease at event {first + int(np.argmax(down)) + 1}"
    if int(t[-1]) >= t_span:
        return f"t={int(t[-1])} us after the sample's start is past its end ({t_span} us)"
    return None


class ShardReader:
    """Lazy reader of a complete shard: the index is loaded once, events are read one sample slice at a time.

    The constructor validates the file and loads the index, then closes it; the HDF5 handle is opened on the
    first event read, and again in a new process (after fork, or after unpickling: ``__getstate__`` drops it),
    so a reader can be handed to DataLoader workers.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._file = None
        self._pid = None
        self._key_map: dict[str, int] | None = None
        f = self._open()
        try:
            a = f.attrs
            self.kind = _decode_attr(a["kind"])
            if self.kind not in KINDS:
                raise InputError(self.path, f"unknown shard kind {self.kind!r}")
            self.width, self.height = int(a["width"]), int(a["height"])
            self.num_samples, self.num_events = int(a["num_samples"]), int(a["num_events"])
            json_names = set(json.loads(_decode_attr(a.get("evforge_json_attrs", "[]"))))
            self.attrs = {k: json.loads(_decode_attr(v)) if k in json_names else _decode_attr(v)
                          for k, v in a.items() if k not in _RESERVED_ATTRS}
            fields = dict(_INDEX, **(_STREAM_INDEX if self.kind == "streams" else {}))
            index = np.zeros(self.num_samples, dtype=list(fields.items()))
            for name in fields:
                index[name] = self._column(f, f"index/{name}", self.num_samples)
            index.setflags(write=False)
            self._index = index
            self._keys = [str(k) for k in self._column(f, "index/key", self.num_samples, string=True)]
            self._attrs_json = list(self._column(f, "index/attrs", self.num_samples, string=True))
            for name in _COLUMNS:
                if f["events"][name].shape != (self.num_events,):
                    raise InputError(self.path, f"events/{name} has shape {f['events'][name].shape}, "
                                                f"expected ({self.num_events},) from num_events")
            self._has_image = None  # per frame: True where frames/image holds an image (None: no frame images)
            self.frame_image_size = None  # (W_img, H_img) of the frame images, None without them
            if self.kind == "streams":
                num_frames = len(f["frames/t"])
                self._frame_t = self._column(f, "frames/t", num_frames).astype(np.int64)
                self._frame_idx = self._column(f, "frames/event_idx", num_frames).astype(np.int64)
                if "frames/image" in f:
                    shape = f["frames/image"].shape
                    if len(shape) != 3 or shape[0] != num_frames:
                        raise InputError(self.path, f"frames/image has shape {shape}, expected "
                                                    f"({num_frames}, H, W) from frames/t")
                    self._has_image = self._column(f, "frames/has_image", num_frames).astype(bool)
                    self.frame_image_size = (int(shape[2]), int(shape[1]))
            else:
                self._frame_t = self._frame_idx = np.zeros(0, dtype=np.int64)
        except InputError:
            raise
        except (KeyError, OSError, ValueError, TypeError) as err:
            raise InputError(self.path, f"malformed shard ({err})") from None
        finally:
            f.close()

    def _open(self) -> h5py.File:
        """Open and check format, version and completeness (InputError naming the file otherwise)."""
        if not self.path.exists():
            raise InputError(self.path, "no such file")
        try:
            f = h5py.File(self.path, "r")
        except OSError as err:
            raise InputError(self.path, f"not a readable HDF5 file ({err})") from None
        try:
            a = f.attrs
            if _decode_attr(a.get("evforge_format")) != FORMAT:
                raise InputError(self.path, "not an evforge shard (missing evforge_format='shard')")
            version = _decode_attr(a.get("format_version"))
            if isinstance(version, int) and version > FORMAT_VERSION:
                raise InputError(self.path, f"shard format_version {version} is newer than this evforge reads "
                                            f"({FORMAT_VERSION}): upgrade evforge")
            if version != FORMAT_VERSION:
                raise InputError(self.path, f"unsupported shard format_version {version!r}")
            if _decode_attr(a.get("complete")) is not True:
                raise InputError(self.path, "incomplete shard (interrupted write?)")
            check_local(f, self.path)  # no data from outside the file (external links, storage, virtual)
        except BaseException:
            f.close()
            raise
        return f

    def _column(self, f: h5py.File, name: str, length: int, *, string: bool = False) -> np.ndarray:
        ds = f[name]
        if ds.shape != (length,):
            raise InputError(self.path, f"{name} has shape {ds.shape}, expected ({length},)")
        return ds.asstr()[:] if string else ds[:]

    def _h5(self) -> h5py.File:
        """The open HDF5 handle of this process (opened on first use, reopened in a forked child).

        A file that no longer has the counts the index was loaded with (replaced since) is refused."""
        if self._file is None or self._pid != os.getpid():
            f = self._open()
            counts = (_decode_attr(f.attrs.get("num_samples")), _decode_attr(f.attrs.get("num_events")))
            if counts != (self.num_samples, self.num_events):
                f.close()
                raise InputError(self.path, f"changed since it was opened: {counts[0]} samples and {counts[1]} "
                                            f"events, its index had {self.num_samples} and {self.num_events}")
            self._file, self._pid = f, os.getpid()
            self._cols = {name: self._file["events"][name] for name in _COLUMNS}
        return self._file

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = state["_pid"] = None  # h5py handles cannot cross processes
        state.pop("_cols", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._index.setflags(write=False)  # unpickled arrays come back writeable

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.num_samples

    # ---- index (in memory)
    @property
    def sensor_size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def index(self) -> np.ndarray:
        """Read-only structured array, one row per sample: offset, count, label, t_offset, t_start, t_end
        (+ frame_offset, frame_count for streams)."""
        return self._index

    @property
    def keys(self) -> list[str]:
        return list(self._keys)

    @property
    def labels(self) -> np.ndarray:
        return self._index["label"].copy()

    def find(self, key: str) -> int:
        """Index of the sample with ``key`` (KeyError if absent)."""
        if self._key_map is None:
            self._key_map = {k: i for i, k in enumerate(self._keys)}
        return self._key_map[key]

    def sample_attrs(self, i: int) -> dict:
        return json.loads(self._attrs_json[self._check(i)])

    def frame_times(self, i: int) -> np.ndarray:
        """Absolute frame times (us) of sample ``i`` (empty for a 'samples' shard)."""
        row = self._index[self._check(i)]
        if self.kind != "streams":
            return np.zeros(0, dtype=np.int64)
        fo, fc = int(row["frame_offset"]), int(row["frame_count"])
        return self._frame_t[fo : fo + fc].copy()

    def frame_event_idx(self, i: int) -> np.ndarray:
        """Per frame of sample ``i``: the first event (relative to the sample) with t >= the frame time."""
        row = self._index[self._check(i)]
        if self.kind != "streams":
            return np.zeros(0, dtype=np.int64)
        fo, fc = int(row["frame_offset"]), int(row["frame_count"])
        return self._frame_idx[fo : fo + fc].copy()

    @property
    def has_frame_images(self) -> bool:
        """True when the shard stores per-frame images (``frames/image``)."""
        return self._has_image is not None

    def frame_image(self, i: int, j: int) -> np.ndarray | None:
        """The (H_img, W_img) uint8 image of frame ``j`` of stream sample ``i`` (one chunk read), or None when
        the shard or that frame has no image."""
        row = self._index[self._check(i)]
        if self.kind != "streams":
            raise ValueError(f"{self.path}: a 'samples' shard has no frames")
        fo, fc = int(row["frame_offset"]), int(row["frame_count"])
        if isinstance(j, bool) or not isinstance(j, (int, np.integer)) or not -fc <= j < fc:
            raise IndexError(f"{self.path}: frame {j!r} of sample {i} out of range ({fc} frames)")
        g = fo + int(j) % fc
        if self._has_image is None or not self._has_image[g]:
            return None
        try:
            return self._h5()["frames/image"][g]
        except OSError as err:
            raise InputError(self.path, f"cannot read frame image {g} ({err})") from None

    def _check(self, i) -> int:
        n = self.num_samples
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not -n <= i < n:
            raise IndexError(f"{self.path}: sample index {i!r} out of range ({n} samples)")
        return int(i) % n

    # ---- events (slices of the columns)
    def sample(self, i: int) -> tuple[np.ndarray, int, str]:
        """``(events, label, key)`` of sample ``i``: one slice of each event column."""
        i = self._check(i)
        return self.events(i), int(self._index["label"][i]), self._keys[i]

    __getitem__ = sample

    def events(self, i: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Events ``[start, stop)`` (indices within sample ``i``, clipped to it) as EVENT_DTYPE, t absolute."""
        row = self._index[self._check(i)]
        offset, count = int(row["offset"]), int(row["count"])
        start, stop, _ = slice(start, stop).indices(count)
        if stop <= start:
            return empty_events()
        a, b = offset + start, offset + stop
        try:
            self._h5()
            cols = {name: ds[a:b] for name, ds in self._cols.items()}
        except OSError as err:
            raise InputError(self.path, f"cannot read sample {int(i)} ({err})") from None
        # cheap invariants of what is returned (a flipped bit, a swapped file); the checksums are verify's job
        problem = _slice_problem(cols, self.width, self.height, int(row["t_end"]) - int(row["t_offset"]), start)
        if problem:
            k = self._check(i)
            raise InputError(self.path, f"sample {k} ({self._keys[k]!r}) is corrupt: {problem}; run evforge verify "
                                        f"on the dataset")
        ev = np.empty(b - a, dtype=EVENT_DTYPE)
        ev["x"], ev["y"] = cols["x"], cols["y"]
        ev["t"] = cols["t"].astype(np.int64) + int(row["t_offset"])
        ev["p"] = cols["p"].astype(np.int8) * 2 - 1
        return ev

    def frame_window(self, i: int, j: int) -> np.ndarray:
        """Events of stream sample ``i`` in ``[frame j, frame j+1)``."""
        idx = self.frame_event_idx(i)
        if self.kind != "streams":
            raise ValueError(f"{self.path}: a 'samples' shard has no frames")
        if not 0 <= j < len(idx) - 1:
            raise IndexError(f"{self.path}: frame interval {j} of sample {i} out of range "
                             f"(0 .. {len(idx) - 2})")
        return self.events(i, int(idx[j]), int(idx[j + 1]))

    # ---- integrity
    def check(self, block_events: int = 16 * CHUNK_EVENTS) -> list[str]:
        """Invariant faults ("<path>: <problem>", first occurrence of each kind), reading the columns in blocks.

        Checks index consistency (contiguous offsets, counts, unique keys, labels >= -1, frame index), then per
        event: coordinates inside the sensor, p in {0, 1}, t sorted within its sample and inside [t_start, t_end),
        and each frame's event_idx is the first event with t >= the frame time.
        """
        faults: dict[str, str] = {}  # kind -> first message

        def fault(kind: str, message: str) -> None:
            faults.setdefault(kind, f"{self.path}: {message}")

        ix = self._index
        offset, count = ix["offset"].astype(np.int64), ix["count"].astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(count)])[:-1]
        if np.any(offset != starts):
            i = int(np.flatnonzero(offset != starts)[0])
            fault("offset", f"index/offset[{i}] = {offset[i]}, expected {starts[i]} (samples not contiguous)")
        if int(count.sum()) != self.num_events:
            fault("count", f"index/count sums to {int(count.sum())}, but num_events = {self.num_events}")
        if len(set(self._keys)) != len(self._keys) or not all(self._keys):
            fault("key", "sample keys are empty or not unique")
        if np.any(ix["label"] < -1):
            fault("label", f"label {int(ix['label'].min())} < -1")
        t_off, t_start, t_end = ix["t_offset"], ix["t_start"], ix["t_end"]
        if np.any(t_start != t_off) or np.any(t_end < t_start):
            fault("trange", "index t_start != t_offset or t_end < t_start")
        ft_sample = self._check_frames(fault)
        if faults:  # the per-event pass relies on a sane index
            return list(faults.values())

        ends = starts + count
        prev_t = None  # (sample, absolute t) of the last event of the previous block
        ft, fidx = self._frame_t, self._frame_idx
        f_global = starts[ft_sample] + fidx if len(ft) else np.zeros(0, dtype=np.int64)
        try:
            self._h5()
            for a in range(0, self.num_events, block_events):
                b = min(a + block_events, self.num_events)
                x, y, p, t = (self._cols[c][a:b] for c in ("x", "y", "p", "t"))
                pos = np.arange(a, b)
                sid = np.searchsorted(ends, pos, "right")
                tabs = t.astype(np.int64) + t_off[sid]
                for name, values, limit in (("x", x, self.width), ("y", y, self.height)):
                    bad = np.flatnonzero(values >= limit)
                    if bad.size:
                        k = int(bad[0])
                        fault(name, f"{name}={values[k]} at event {a + k} is outside the "
                                    f"{self.width}x{self.height} sensor")
                bad = np.flatnonzero(p > 1)
                if bad.size:
                    fault("p", f"p={p[bad[0]]} at event {a + int(bad[0])} is not 0 or 1")
                bad = np.flatnonzero((tabs < t_start[sid]) | (tabs >= t_end[sid]))
                if bad.size:
                    k = int(bad[0])
                    fault("tspan", f"event {a + k} (t={tabs[k]}) is outside its sample's [t_start, t_end)")
                same = sid[1:] == sid[:-1]
                bad = np.flatnonzero(same & (tabs[1:] < tabs[:-1]))
                if bad.size or (prev_t is not None and len(t) and prev_t[0] == sid[0] and tabs[0] < prev_t[1]):
                    k = a + (int(bad[0]) + 1 if bad.size else 0)
                    sample = int(np.searchsorted(ends, k, "right"))
                    fault("sort", f"timestamps not sorted at event {k} (sample {sample})")
                if len(t):
                    prev_t = (int(sid[-1]), int(tabs[-1]))
                # frame j's event g = first with t >= ft[j]: t[g-1] < ft[j] (if any before) and t[g] >= ft[j]
                before = (fidx > 0) & (f_global - 1 >= a) & (f_global - 1 < b)
                after = (fidx < count[ft_sample]) & (f_global >= a) & (f_global < b)
                late = tabs[f_global[before] - 1 - a] >= ft[before]
                if np.any(late) or np.any(tabs[f_global[after] - a] < ft[after]):
                    fault("frame_event_idx", "frames/event_idx does not point at the first event at or after "
                                             "its frame time")
        except OSError as err:
            fault("read", f"cannot read events ({err})")
        return list(faults.values())

    def _check_frames(self, fault) -> np.ndarray:
        """Check the frame index; returns the sample of each frame (empty for 'samples' shards)."""
        if self.kind != "streams":
            return np.zeros(0, dtype=np.int64)
        ix = self._index
        fo, fc = ix["frame_offset"].astype(np.int64), ix["frame_count"].astype(np.int64)
        fstarts = np.concatenate([[0], np.cumsum(fc)])[:-1]
        if np.any(fo != fstarts) or int(fc.sum()) != len(self._frame_t):
            fault("frame_offset", "index/frame_offset / frame_count do not tile frames/t")
            return np.zeros(0, dtype=np.int64)
        sample_of = np.repeat(np.arange(self.num_samples), fc)
        ft, fidx = self._frame_t, self._frame_idx
        same = sample_of[1:] == sample_of[:-1]
        if np.any(same & (np.diff(ft) < 0)):
            fault("frame_sort", "frames/t not sorted within a sample")
        if np.any(same & (np.diff(fidx) < 0)) or np.any(fidx > ix["count"].astype(np.int64)[sample_of]):
            fault("frame_idx", "frames/event_idx decreasing within a sample or past the sample's end")
        if np.any((ft < ix["t_start"][sample_of]) | (ft >= ix["t_end"][sample_of])):
            fault("frame_span", "a frame time is outside its sample's [t_start, t_end)")
        return sample_of
