"""Shard writers: :class:`ShardWriter` (one shard, sample by sample, atomic) and :class:`RollingShardWriter`
(a series of shards cut at a raw-size target). Layout in :mod:`evforge.formats.shards.layout`."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from evforge.formats.atomic import AtomicWriter, Transaction, commit, temp_path
from evforge.formats.events import EVENT_DTYPE, EventFormatError, validate_events
from evforge.formats.hdf5 import encode_attrs
from evforge.formats.shards.blosc import blosc_compress_ctx, compress_chunk, compress_pool, direct_args
from evforge.formats.shards.layout import (
    COLUMNS,
    DEFAULT_TARGET_BYTES,
    FORMAT,
    FORMAT_VERSION,
    INDEX_FIELDS,
    KINDS,
    RAW_EVENT_BYTES,
    RAW_FRAME_BYTES,
    RAW_INDEX_BYTES,
    RESERVED_ATTRS,
    STR_DTYPE,
    STREAM_INDEX_FIELDS,
    estimate_sample_bytes,
)
from evforge.formats.streamfile import CHUNK_EVENTS, _filter_kwargs

_U4_MAX = np.iinfo(np.uint32).max
_I4_MAX = np.iinfo(np.int32).max
_FLUSH_EVENTS = 16 * CHUNK_EVENTS  # events are buffered and written in whole chunks: each compressed once
_SLICE_EVENTS = 1 << 22  # large samples are checked in slices (bounded extra memory)


class ShardWriter(AtomicWriter):
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
        user_attrs = encode_attrs(attrs or {}, reserved=RESERVED_ATTRS, fmt="shard")

        self._rows: dict[str, list[int]] = {name: [] for name in (*INDEX_FIELDS, *STREAM_INDEX_FIELDS)}
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
            events = f.create_group("events")
            self._ds = {name: events.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype,
                                                    chunks=(CHUNK_EVENTS,), **event_filter)
                        for name, dtype in COLUMNS.items()}
            direct = {name: direct_args(ds) for name, ds in self._ds.items()}
            self._direct = direct if all(a is not None for a in direct.values()) else None
        except BaseException:
            self.abort()
            raise

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
        return {name: np.empty(_FLUSH_EVENTS, dtype=dtype) for name, dtype in COLUMNS.items()}

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
            pool, fn = compress_pool(), blosc_compress_ctx()
            jobs = []
            for name, ds in self._ds.items():
                ds.resize((n1,))
                args = self._direct[name]
                for c in range(0, k, CHUNK_EVENTS):
                    data = buf[name][c : c + CHUNK_EVENTS]
                    jobs.append((ds, n0 + c, data, pool.submit(compress_chunk, fn, args, data)))
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
            fields = dict(INDEX_FIELDS, **(STREAM_INDEX_FIELDS if self.kind == "streams" else {}))
            for name, dtype in fields.items():
                f.create_dataset(f"index/{name}", data=np.asarray(self._rows[name], dtype=dtype))
            f.create_dataset("index/key", data=np.asarray(self._keys, dtype=object), dtype=STR_DTYPE)
            f.create_dataset("index/attrs", data=np.asarray(self._sample_attrs, dtype=object), dtype=STR_DTYPE)
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
        self._discard_temp()


class RollingShardWriter(Transaction):
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

    def abort(self) -> None:
        """Discard the shard in progress (finished shards stay)."""
        if self._writer is not None:
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
