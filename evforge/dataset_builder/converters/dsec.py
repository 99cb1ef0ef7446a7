"""DSEC-Semantic -> stream shards: one sample per semantic label, the events just before it, the label image.

Source layout (``SRC/<split>/<sequence>/...``; the split is the top-level folder name, e.g. ``train``/``test``)::

    <sequence>/events/left/events.h5        (or <sequence>/events_left/events.h5)
    <sequence>/events/left/rectify_map.h5   next to events.h5; read only with rectify=True
    <sequence>/semantic/left/11classes/data/000000.png ...   (also semantic/11classes/data, semantic/11classes,
                                                               11classes/data or 11classes: the ESS and the
                                                               official DSEC-Semantic download layouts)
    <sequence>/semantic/timestamps.txt      one integer us timestamp per label PNG (also semantic/left/,
                                            <sequence>/<sequence>_semantic_timestamps.txt, <sequence>/)

``events.h5`` is DSEC's event file: ``/events/{x,y,p,t}`` (u2, u2, u1, u4 us relative to ``/t_offset``),
``/t_offset`` (i8; taken as 0 when absent, as DSEC's own ``EventSlicer`` does) and ``/ms_to_idx``
(``ms_to_idx[m]`` = first event with ``t >= m * 1000``). Events are only ever read as h5py slices: the label
time is located through ``ms_to_idx`` and a one-millisecond slice of ``t``, so memory stays bounded by
``events_per_label`` whatever the recording length (DSEC sequences hold 100M+ events).

Sample definition (ECDDP / ESS segmentation input): for label ``i`` at time ``T_i`` the sample holds exactly the
last ``events_per_label`` (default 500 000) events with ``t < T_i`` (fewer at the start of a recording; a label
with fewer than ``min_events`` events before it yields no sample), ``frame_times = [T_i]`` and
``frame_images = label[None]`` (DSEC-Semantic labels are 640x440 uint8: the rectified left event camera frame
without its bottom 40 rows, class ids 0..K-1, 255 = ignore), attrs ``{sequence, label_index, label_file,
rectified}``; key ``<sequence>/<label_index:06d>``, label -1 (the plan's ``classes`` are the pixel classes).
Consecutive labels' windows overlap (labels come at 20 Hz), so events are stored once per label.

Rectification (``rectify=True``; labels live in the rectified frame): each event ``(x, y)`` moves to
``rint(rectify_map[y, x])``; events that land outside 640x480 (or on a non-finite map entry) are dropped, so a
rectified sample can hold fewer than ``events_per_label`` events (the window is chosen on the raw stream, as ESS
does). Off by default: the raw sensor frame is what DSEC ships.

Sequences with events but no label folder are skipped (listed in ``plan.params["unlabelled_sequences"]``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers Blosc: DSEC event files are Blosc-compressed)
import numpy as np
from PIL import Image

from evforge.errors import InputError
from evforge.formats.events import EVENT_DTYPE
from evforge.labels import DSEC_LABEL_CLASSES, DSEC_SENSOR_SIZE

from .base import DatasetPlan, Sample, SourceItem

__all__ = ["DSECConverter", "DSECEvents", "LABEL_CLASSES", "SENSOR_SIZE"]

SENSOR_SIZE = DSEC_SENSOR_SIZE  # (width, height) of DSEC's event cameras
LABEL_CLASSES = DSEC_LABEL_CLASSES  # the label sets, shared with the training side (evforge.labels)
EVENT_FILES = ("events/left/events.h5", "events_left/events.h5")
_SEARCH_SLICE = 1 << 16  # t values read at once when ms_to_idx cannot narrow the search to one millisecond


def _label_dirs(seq: Path, label_set: str) -> list[Path]:
    return [seq / "semantic" / "left" / label_set / "data", seq / "semantic" / "left" / label_set,
            seq / "semantic" / label_set / "data", seq / "semantic" / label_set, seq / label_set / "data",
            seq / label_set]


def _timestamp_files(seq: Path) -> list[Path]:
    return [seq / "semantic" / "timestamps.txt", seq / "semantic" / "left" / "timestamps.txt",
            seq / f"{seq.name}_semantic_timestamps.txt", seq / "timestamps.txt"]


def _first(paths, test=os.path.isfile) -> Path | None:
    return next((p for p in paths if test(p)), None)


class DSECEvents:
    """A DSEC ``events.h5`` opened and checked, read by index slices; ``InputError`` naming it on bad content."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(self.path, "missing events.h5")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as err:
            raise InputError(self.path, f"not a readable HDF5 file ({err})") from None
        try:
            self._cols = {}
            for name in ("x", "y", "p", "t"):
                ds = self._file.get(f"events/{name}")
                if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.dtype.kind not in "ui":
                    raise InputError(self.path, f"events/{name} is missing or not a 1-D integer dataset")
                self._cols[name] = ds
            lengths = {name: ds.shape[0] for name, ds in self._cols.items()}
            if len(set(lengths.values())) != 1:
                raise InputError(self.path, f"event columns differ in length {lengths}")
            self.num_events = lengths["t"]
            ms = self._file.get("ms_to_idx")
            if not isinstance(ms, h5py.Dataset) or ms.ndim != 1 or ms.dtype.kind not in "ui" or ms.shape[0] == 0:
                raise InputError(self.path, "ms_to_idx is missing or not a non-empty 1-D integer dataset")
            self._ms = ms
            off = self._file.get("t_offset")
            if off is None:
                self.t_offset = 0
            elif not isinstance(off, h5py.Dataset) or off.size != 1 or off.dtype.kind not in "ui":
                raise InputError(self.path, "t_offset is not an integer scalar")
            else:
                self.t_offset = int(np.asarray(off[()]).reshape(-1)[0])
        except InputError:
            self._file.close()
            raise
        except (OSError, KeyError, ValueError) as err:
            self._file.close()
            raise InputError(self.path, f"malformed DSEC event file ({err})") from None

    def __enter__(self) -> "DSECEvents":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def index_before(self, t_abs: int) -> int:
        """Number of events with absolute ``t < t_abs`` (= the first index with ``t >= t_abs``).

        ``ms_to_idx`` gives the millisecond's bounds; only that slice of ``t`` is read. The answer is checked
        against its neighbours, so an ``ms_to_idx`` that disagrees with ``t`` is reported, not trusted.
        """
        n, t_rel = self.num_events, int(t_abs) - self.t_offset
        if n == 0 or t_rel <= 0:
            return 0
        try:
            m = t_rel // 1000
            bounds = self._ms[m : m + 2].astype(np.int64) if m < len(self._ms) else self._ms[-1:].astype(np.int64)
            lo = int(bounds[0])
            hi = int(bounds[1]) if len(bounds) > 1 and m < len(self._ms) else n
            if not 0 <= lo <= hi <= n:
                raise InputError(self.path, f"ms_to_idx[{m}] = {lo} .. {hi} is outside the {n} events")
            idx = self._search(t_rel, lo, hi)
            t = self._cols["t"]
            if (idx > 0 and int(t[idx - 1]) >= t_rel) or (idx < n and int(t[idx]) < t_rel):
                raise InputError(self.path, f"ms_to_idx disagrees with events/t near t = {t_rel} us "
                                            f"(after t_offset); is events/t sorted?")
        except OSError as err:
            raise InputError(self.path, f"cannot read events ({err})") from None
        return idx

    def _search(self, t_rel: int, lo: int, hi: int) -> int:
        """First index in ``[lo, hi)`` with ``t >= t_rel`` (``hi`` if none): bisection on single values while
        the range is wide, then one bounded slice."""
        t = self._cols["t"]
        while hi - lo > _SEARCH_SLICE:
            mid = (lo + hi) // 2
            if int(t[mid]) < t_rel:
                lo = mid + 1
            else:
                hi = mid
        return lo + int(np.searchsorted(t[lo:hi].astype(np.int64), t_rel, "left"))

    def read(self, start: int, stop: int) -> np.ndarray:
        """Events ``[start, stop)`` as EVENT_DTYPE (absolute t, p +1/-1), checked: sorted, p in {0, 1}, inside
        the 640x480 sensor."""
        try:
            cols = {name: ds[start:stop] for name, ds in self._cols.items()}
        except OSError as err:
            raise InputError(self.path, f"cannot read events {start}:{stop} ({err})") from None
        if len(cols["t"]) != stop - start:
            raise InputError(self.path, f"events {start}:{stop} are past the end of the file")
        p = cols["p"]
        bad = np.flatnonzero(p > 1)
        if bad.size:
            raise InputError(self.path, f"p = {p[bad[0]]} at event {start + int(bad[0])} is not 0 or 1")
        for name, limit in (("x", SENSOR_SIZE[0]), ("y", SENSOR_SIZE[1])):
            bad = np.flatnonzero(cols[name] >= limit)
            if bad.size:
                k = int(bad[0])
                raise InputError(self.path, f"{name} = {cols[name][k]} at event {start + k} is outside the "
                                            f"{SENSOR_SIZE[0]}x{SENSOR_SIZE[1]} sensor")
        t = cols["t"].astype(np.int64)
        bad = np.flatnonzero(np.diff(t) < 0)
        if bad.size:
            raise InputError(self.path, f"events/t not sorted at event {start + int(bad[0]) + 1}")
        ev = np.empty(len(t), dtype=EVENT_DTYPE)
        ev["x"], ev["y"], ev["t"] = cols["x"], cols["y"], t + self.t_offset
        ev["p"] = p.astype(np.int8) * 2 - 1
        return ev


@functools.lru_cache(maxsize=4)
def load_rectify_map(path: str) -> np.ndarray:
    """``rectify_map`` (480, 640, 2) float: rectified (x, y) per raw pixel ``[y, x]`` (cached per process)."""
    if not os.path.isfile(path):
        raise InputError(path, "missing rectify_map.h5 (needed for rectify=True)")
    try:
        with h5py.File(path, "r") as f:
            ds = f.get("rectify_map")
            if not isinstance(ds, h5py.Dataset):
                raise InputError(path, "no rectify_map dataset")
            want = (SENSOR_SIZE[1], SENSOR_SIZE[0], 2)
            if ds.shape != want or ds.dtype.kind != "f":
                raise InputError(path, f"rectify_map is {ds.dtype} {ds.shape}, expected float {want}")
            out = ds[()]
    except OSError as err:
        raise InputError(path, f"not a readable HDF5 file ({err})") from None
    out.setflags(write=False)
    return out


def rectify_events(events: np.ndarray, rectify_map: np.ndarray) -> np.ndarray:
    """Move events to ``rint(rectify_map[y, x])``; drop those outside the sensor or on non-finite entries."""
    xy = rectify_map[events["y"].astype(np.intp), events["x"].astype(np.intp)]
    with np.errstate(invalid="ignore"):
        xr, yr = np.rint(xy[:, 0]), np.rint(xy[:, 1])
        keep = (np.isfinite(xr) & np.isfinite(yr) & (xr >= 0) & (xr < SENSOR_SIZE[0]) & (yr >= 0)
                & (yr < SENSOR_SIZE[1]))
    out = events[keep].copy()
    out["x"], out["y"] = xr[keep].astype(np.uint16), yr[keep].astype(np.uint16)
    return out


def read_label(path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A label PNG as (H, W) uint8; it must be single-channel 8-bit (mode L or P) and, if given, ``size`` (W, H)."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P"):
                raise InputError(path, f"label image has mode {img.mode}, expected 8-bit single-channel (L or P)")
            if size is not None and tuple(img.size) != tuple(size):
                raise InputError(path, f"label image is {img.size[0]}x{img.size[1]}, expected {size[0]}x{size[1]} "
                                       f"(the size of the dataset's first label)")
            return np.asarray(img, dtype=np.uint8).copy()
    except InputError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise InputError(path, f"not a readable image ({err})") from None


def read_timestamps(path: Path) -> np.ndarray:
    """One integer us timestamp per line (empty lines and ``#`` comments skipped), strictly increasing."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read timestamps ({err})") from None
    values = []
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            values.append(int(line))
        except ValueError:
            raise InputError(path, f"line {number}: {line[:40]!r} is not an integer microsecond timestamp") from None
    ts = np.asarray(values, dtype=np.int64)
    bad = np.flatnonzero(np.diff(ts) <= 0)
    if bad.size:
        k = int(bad[0])
        raise InputError(path, f"timestamps not increasing at entry {k + 1} ({ts[k]} then {ts[k + 1]})")
    return ts


class DSECConverter:
    """DSEC-Semantic sequences -> one stream sample per label (see the module docstring)."""

    name = "dsec"
    kind = "streams"
    sensor_size = SENSOR_SIZE

    def scan(self, src, *, events_per_label: int = 500_000, rectify: bool = False, label_set: str = "11classes",
             min_events: int = 1, out=None) -> DatasetPlan:
        """Find ``SRC/<split>/<sequence>`` folders with labels; check timestamps and each ``events.h5`` header.

        ``out`` (the dataset folder) is accepted for symmetry with converters that write scratch files; unused.
        """
        if label_set not in LABEL_CLASSES:
            raise ValueError(f"dsec: label_set must be one of {list(LABEL_CLASSES)}, got {label_set!r}")
        if int(events_per_label) <= 0 or int(min_events) < 0:
            raise ValueError("dsec: events_per_label must be positive and min_events >= 0")
        src = Path(src)
        if not src.is_dir():
            raise InputError(src, "not a folder (expected SRC/<split>/<sequence>/...)")
        items: list[SourceItem] = []
        unlabelled: list[str] = []
        seen: dict[str, Path] = {}
        label_size = None
        for split_dir in sorted(p for p in src.iterdir() if p.is_dir()):
            if self._is_sequence(split_dir, label_set):
                raise InputError(split_dir, "is a sequence folder; expected SRC/<split>/<sequence> "
                                            "(the split is the top-level folder name)")
            for seq in sorted(p for p in split_dir.iterdir() if p.is_dir()):
                label_dir = _first(_label_dirs(seq, label_set), os.path.isdir)
                events = _first(seq / f for f in EVENT_FILES)
                if label_dir is None:
                    if events is not None:
                        unlabelled.append(f"{split_dir.name}/{seq.name}")
                    continue
                if seq.name in seen:
                    raise InputError(seq, f"sequence name {seq.name!r} also in {seen[seq.name]}")
                seen[seq.name] = seq
                if events is None:
                    raise InputError(seq / EVENT_FILES[0], f"missing events.h5 (looked for {', '.join(EVENT_FILES)})")
                pngs = sorted(p for p in label_dir.iterdir() if p.suffix.lower() == ".png" and p.is_file())
                ts_file = _first(_timestamp_files(seq))
                if ts_file is None:
                    raise InputError(seq / "semantic" / "timestamps.txt", "missing label timestamps file")
                ts = read_timestamps(ts_file)
                if len(ts) != len(pngs):
                    raise InputError(ts_file, f"{len(ts)} timestamps but {len(pngs)} label PNGs in {label_dir}")
                if not pngs:
                    unlabelled.append(f"{split_dir.name}/{seq.name}")
                    continue
                if label_size is None:
                    label_size = read_label(pngs[0]).shape[::-1]
                with DSECEvents(events):
                    pass  # header check: a missing, corrupt or malformed events.h5 fails the scan
                rect = events.parent / "rectify_map.h5"
                if rectify:
                    load_rectify_map(str(rect))
                items += [SourceItem(key=f"{seq.name}/{i:06d}", path=str(events), label=-1, split=split_dir.name,
                                     extra=(str(png), int(t), i, seq.name, str(rect)))
                          for i, (png, t) in enumerate(zip(pngs, ts))]
        if not items:
            raise InputError(src, f"no DSEC-Semantic sequences with {label_set} labels found under SRC/<split>/")
        params = {"events_per_label": int(events_per_label), "rectify": bool(rectify), "label_set": label_set,
                  "label_size": list(label_size), "min_events": int(min_events),
                  "window": "the last events_per_label events with t < label time", "ignore_label": 255,
                  "unlabelled_sequences": unlabelled}
        return DatasetPlan(name=self.name, kind=self.kind, sensor_size=SENSOR_SIZE,
                           classes=list(LABEL_CLASSES[label_set]), items=items, params=params)

    @staticmethod
    def _is_sequence(folder: Path, label_set: str) -> bool:
        return (_first(_label_dirs(folder, label_set), os.path.isdir) is not None
                or _first(folder / f for f in EVENT_FILES) is not None)

    def sources(self, item: SourceItem) -> list[str]:
        """The files a sample is made from (their size and mtime are part of its unit's fingerprint): the events,
        the label image and the rectification map."""
        png, _t, _i, _seq, rect = item.extra
        return [item.path, png, rect]

    def read(self, item: SourceItem, plan: DatasetPlan) -> list[Sample]:
        """The label's window of events (bounded slices), its label image, optionally rectified."""
        png, t_label, index, sequence, rect = item.extra
        p = plan.params
        with DSECEvents(item.path) as ev:
            stop = ev.index_before(t_label)
            start = max(0, stop - int(p["events_per_label"]))
            if stop - start < max(1, int(p["min_events"])):
                return []
            events = ev.read(start, stop)
        label = read_label(png, tuple(p["label_size"]))
        if p["rectify"]:
            events = rectify_events(events, load_rectify_map(rect))
            if len(events) < max(1, int(p["min_events"])):
                return []
        attrs = {"sequence": sequence, "label_index": int(index), "label_file": os.path.basename(png),
                 "rectified": bool(p["rectify"])}
        return [Sample(key=item.key, events=events, label=-1, frame_times=np.array([t_label], dtype=np.int64),
                       attrs=attrs, frame_images=label[None])]
