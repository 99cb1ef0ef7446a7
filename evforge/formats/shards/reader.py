"""Shard reader: :class:`ShardReader` loads a complete shard's index once and reads events one sample slice at
a time (cheap invariants checked on every read; the full pass is :mod:`~evforge.formats.shards.check`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from evforge.errors import InputError
from evforge.formats.events import EVENT_DTYPE, empty_events
from evforge.formats.hdf5 import check_local, decode_attr, decode_attrs, header_problem
from evforge.formats.shards.check import check_shard
from evforge.formats.shards.layout import (
    COLUMNS,
    FORMAT,
    FORMAT_VERSION,
    INDEX_FIELDS,
    KINDS,
    RESERVED_ATTRS,
    STREAM_INDEX_FIELDS,
)
from evforge.formats.streamfile import CHUNK_EVENTS


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
            self.kind = decode_attr(a["kind"])
            if self.kind not in KINDS:
                raise InputError(self.path, f"unknown shard kind {self.kind!r}")
            self.width, self.height = int(a["width"]), int(a["height"])
            self.num_samples, self.num_events = int(a["num_samples"]), int(a["num_events"])
            self.attrs = decode_attrs(a, reserved=RESERVED_ATTRS)
            fields = dict(INDEX_FIELDS, **(STREAM_INDEX_FIELDS if self.kind == "streams" else {}))
            index = np.zeros(self.num_samples, dtype=list(fields.items()))
            for name in fields:
                index[name] = self._column(f, f"index/{name}", self.num_samples)
            index.setflags(write=False)
            self._index = index
            self._keys = [str(k) for k in self._column(f, "index/key", self.num_samples, string=True)]
            self._attrs_json = list(self._column(f, "index/attrs", self.num_samples, string=True))
            for name in COLUMNS:
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
            problem = header_problem(f.attrs, fmt=FORMAT, version=FORMAT_VERSION, what="shard")
            if problem:
                raise InputError(self.path, problem)
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
            counts = (decode_attr(f.attrs.get("num_samples")), decode_attr(f.attrs.get("num_events")))
            if counts != (self.num_samples, self.num_events):
                f.close()
                raise InputError(self.path, f"changed since it was opened: {counts[0]} samples and {counts[1]} "
                                            f"events, its index had {self.num_samples} and {self.num_events}")
            self._file, self._pid = f, os.getpid()
            self._cols = {name: self._file["events"][name] for name in COLUMNS}
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
        return self._frames_of(i, self._frame_t)

    def frame_event_idx(self, i: int) -> np.ndarray:
        """Per frame of sample ``i``: the first event (relative to the sample) with t >= the frame time."""
        return self._frames_of(i, self._frame_idx)

    def _frames_of(self, i: int, column: np.ndarray) -> np.ndarray:
        """Sample ``i``'s rows of a per-frame column, as a copy (empty for a 'samples' shard)."""
        row = self._index[self._check(i)]
        if self.kind != "streams":
            return np.zeros(0, dtype=np.int64)
        fo, fc = int(row["frame_offset"]), int(row["frame_count"])
        return column[fo : fo + fc].copy()

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

    def check(self, block_events: int = 16 * CHUNK_EVENTS) -> list[str]:
        """Invariant faults ("<path>: <problem>", first occurrence of each kind): :func:`check_shard`."""
        return check_shard(self, block_events)
