"""One interface over every raw recording format: :func:`open_recording` -> :class:`Recording`.

A :class:`Recording` knows its format and sensor size (``None`` when the file does not say: DAT without
``% Width``/``% Height``) and streams its events with :meth:`Recording.chunks` as
:data:`~evforge.formats.events.EVENT_DTYPE` arrays (absolute microseconds, epoch time where the camera wrote it) in file
order, with bounded memory, optionally restricted to ``[t_start, t_stop)``. Side data (triggers; AEDAT4 IMU)
comes alongside each chunk.

Formats, by suffix (and, for HDF5, by content):

=================  ==========================================================================================
``.aedat4``        iniVation AEDAT 4.0, decoded by the ``aedat`` package (Rust; LZ4/Zstd packets); the first
                   event stream, its IMU and trigger streams
``.raw``           Prophesee EVT 2.0 / 3.0 (encoding from the header), :mod:`.prophesee`
``.dat``           Prophesee DAT, :mod:`.prophesee`
``.h5`` ``.hdf5``  DSEC ``events.h5`` (``/events/{x,y,p,t}`` + ``/t_offset``; sensor 640x480) or an evforge
                   stream file (root attr ``evforge_format = "stream"``)
=================  ==========================================================================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from evforge.errors import InputError
from evforge.formats.events import EVENT_DTYPE

from .prophesee import TRIGGER_DTYPE, iter_dat, iter_evt2, iter_evt3, read_raw_header

__all__ = ["FORMATS", "SUFFIXES", "Recording", "Chunk", "open_recording", "find_recordings", "sorted_chunks",
           "IMU_DTYPE"]

FORMATS = ("aedat4", "evt2", "evt3", "dat", "dsec", "stream")
SUFFIXES = (".aedat4", ".raw", ".dat", ".h5", ".hdf5")
DSEC_SENSOR = (640, 480)
IMU_DTYPE = np.dtype([("t", "<i8"), ("ax", "<f4"), ("ay", "<f4"), ("az", "<f4"), ("gx", "<f4"), ("gy", "<f4"),
                      ("gz", "<f4"), ("temperature", "<f4")])
H5_CHUNK = 1 << 20  # events read at once from HDF5 sources


@dataclass
class Chunk:
    """Events of one block in file order, plus the side data decoded with them (may be empty), and where the
    block starts (``resume``: pass it to :meth:`Recording.chunks` to read from here; None where the format
    cannot resume: AEDAT4, whose decoder reads from the start, and HDF5, which seeks by time itself)."""

    events: np.ndarray
    triggers: np.ndarray  # TRIGGER_DTYPE
    imu: np.ndarray  # IMU_DTYPE
    resume: tuple | None = None


def _no_triggers() -> np.ndarray:
    return np.empty(0, dtype=TRIGGER_DTYPE)


def _no_imu() -> np.ndarray:
    return np.empty(0, dtype=IMU_DTYPE)


class Recording:
    """An opened recording (see the module docstring). ``sensor_size`` is (width, height) or None."""

    def __init__(self, path, fmt: str, sensor_size, header=None):
        self.path = Path(path)
        self.format = fmt
        self.sensor_size = None if sensor_size is None else (int(sensor_size[0]), int(sensor_size[1]))
        self._header = header

    def __repr__(self) -> str:
        return f"Recording({str(self.path)!r}, format={self.format}, sensor_size={self.sensor_size})"

    def chunks(self, t_start: int | None = None, t_stop: int | None = None, *, resume: tuple | None = None
               ) -> Iterator[Chunk]:
        """Stream the recording as :class:`Chunk` objects, keeping only ``t_start <= t < t_stop`` (events and
        side data). Stops reading once a block starts past ``t_stop`` (timestamps are non-decreasing; the
        caller checks that). ``resume``: a chunk's ``resume`` from an earlier read, to start decoding there."""
        for chunk in self._raw_chunks(t_start, resume):
            ev = chunk.events
            if t_start is not None or t_stop is not None:
                lo = -np.inf if t_start is None else t_start
                hi = np.inf if t_stop is None else t_stop
                keep = lambda a: a[(a["t"] >= lo) & (a["t"] < hi)] if len(a) else a
                chunk = Chunk(keep(ev), keep(chunk.triggers), keep(chunk.imu), chunk.resume)
                if len(ev) and t_stop is not None and int(ev["t"][0]) >= t_stop:
                    return
            yield chunk

    def events(self, t_start: int | None = None, t_stop: int | None = None) -> np.ndarray:
        """All events (in ``[t_start, t_stop)``) as one array: for short recordings and tests."""
        parts = [c.events for c in self.chunks(t_start, t_stop)]
        return np.concatenate(parts) if parts else np.empty(0, dtype=EVENT_DTYPE)

    # ---- per format
    def _raw_chunks(self, t_start, resume) -> Iterator[Chunk]:
        try:
            if self.format in ("evt2", "evt3", "dat"):
                decode = {"evt2": iter_evt2, "evt3": iter_evt3, "dat": iter_dat}[self.format]
                for block in decode(self.path, self._header, resume=None if resume is None else tuple(resume)):
                    yield Chunk(block.events, block.triggers, _no_imu(), block.resume)
            elif self.format == "aedat4":
                yield from self._aedat4_chunks()
            else:
                yield from self._h5_chunks(t_start)
        except OSError as err:
            raise InputError(self.path, f"cannot read ({err.strerror or err})") from None

    def _aedat4_chunks(self) -> Iterator[Chunk]:
        aedat = _aedat(self.path)
        try:
            decoder = aedat.Decoder(os.fspath(self.path))
        except Exception as err:  # aedat raises plain exceptions for bad headers
            raise InputError(self.path, f"not a readable AEDAT4 file ({err})") from None
        streams = decoder.id_to_stream()
        event_ids = sorted(i for i, s in streams.items() if s["type"] == "events")
        wanted = event_ids[0]
        try:
            for packet in decoder:
                if "events" in packet and packet["stream_id"] == wanted:
                    e = packet["events"]
                    ev = np.empty(len(e), dtype=EVENT_DTYPE)
                    ev["x"], ev["y"], ev["t"] = e["x"], e["y"], e["t"].astype(np.int64)
                    ev["p"] = np.where(e["on"], 1, -1)
                    yield Chunk(ev, _no_triggers(), _no_imu())
                elif "imus" in packet:
                    m = packet["imus"]
                    imu = np.empty(len(m), dtype=IMU_DTYPE)
                    imu["t"] = m["t"].astype(np.int64)
                    for a, b in (("ax", "accelerometer_x"), ("ay", "accelerometer_y"), ("az", "accelerometer_z"),
                                 ("gx", "gyroscope_x"), ("gy", "gyroscope_y"), ("gz", "gyroscope_z"),
                                 ("temperature", "temperature")):
                        imu[a] = m[b]
                    yield Chunk(np.empty(0, dtype=EVENT_DTYPE), _no_triggers(), imu)
                elif "triggers" in packet:
                    g = packet["triggers"]
                    tr = np.empty(len(g), dtype=TRIGGER_DTYPE)
                    tr["t"] = g["t"].astype(np.int64)
                    tr["id"] = g["source"].astype(np.uint8) if "source" in (g.dtype.names or ()) else 0
                    tr["value"] = 1
                    yield Chunk(np.empty(0, dtype=EVENT_DTYPE), tr, _no_imu())
        except InputError:
            raise
        except Exception as err:  # a damaged packet: aedat raises RuntimeError / ValueError with its reason
            raise InputError(self.path, f"damaged AEDAT4 packet ({err})") from None

    def _h5_chunks(self, t_start) -> Iterator[Chunk]:
        import h5py
        import hdf5plugin  # noqa: F401  (DSEC files are Blosc-compressed)

        with h5py.File(self.path, "r") as f:
            cols = {k: f[f"events/{k}"] for k in ("x", "y", "p", "t")}
            n = cols["t"].shape[0]
            off = int(np.asarray(f["t_offset"][()]).reshape(-1)[0]) if "t_offset" in f else 0
            start = 0
            if t_start is not None and "ms_to_idx" in f:  # jump to the millisecond (DSEC definition)
                m = max(0, (int(t_start) - off) // 1000)
                ms = f["ms_to_idx"]
                start = int(ms[min(m, ms.shape[0] - 1)]) if ms.shape[0] else 0
                start = min(start, n)
            for a in range(start, n, H5_CHUNK):
                b = min(n, a + H5_CHUNK)
                ev = np.empty(b - a, dtype=EVENT_DTYPE)
                ev["x"], ev["y"] = cols["x"][a:b], cols["y"][a:b]
                ev["t"] = cols["t"][a:b].astype(np.int64) + off
                p = cols["p"][a:b]
                if p.size and p.max() > 1:
                    raise InputError(self.path, f"events/p holds {int(p.max())}: expected 0 or 1")
                ev["p"] = p.astype(np.int8) * 2 - 1
                yield Chunk(ev, _no_triggers(), _no_imu())


def sorted_chunks(chunks: Iterable[Chunk], window_us: int, path) -> Iterator[Chunk]:
    """``chunks`` with their events in time order, for sources whose timestamps go back by at most ``window_us``
    (a sensor's readout order): events are held back until no later block can come before them (memory: one
    window of events). A larger step back is an InputError naming ``path``. Side data passes through as is."""
    held = np.empty(0, dtype=EVENT_DTYPE)
    final = None  # the largest t emitted: nothing later may come before it
    for c in chunks:
        ev = c.events
        if not len(ev):
            yield c
            continue
        if final is not None and int(ev["t"].min()) < final:
            raise InputError(path, f"timestamps go back by more than {window_us} us (to {int(ev['t'].min())} after "
                                   f"{final}): outside the sort window")
        both = np.concatenate([held, ev]) if len(held) else ev
        both = both[np.argsort(both["t"], kind="stable")]
        cut = int(np.searchsorted(both["t"], int(ev["t"].max()) - window_us, "right"))
        out, held = both[:cut], both[cut:]
        if len(out):
            final = int(out["t"][-1])
        yield Chunk(out, c.triggers, c.imu, c.resume)
    if len(held):
        yield Chunk(held, _no_triggers(), _no_imu(), None)


def open_recording(path) -> Recording:
    """Open ``path`` as a recording; InputError naming it for an unknown suffix or unreadable header."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise InputError(path, "not a file")
    if suffix == ".aedat4":
        return _open_aedat4(path)
    if suffix == ".raw":
        header = read_raw_header(path)
        if header.encoding not in ("evt2", "evt3"):
            raise InputError(path, f"RAW encoding {header.encoding or 'missing'} is not supported "
                                   f"(EVT 2.0 and EVT 3.0 are; the header's '% format' or '% evt' line says which)")
        size = (header.width, header.height) if header.width and header.height else None
        return Recording(path, header.encoding, size, header)
    if suffix == ".dat":
        header = read_raw_header(path, stop_at_end=False)
        if not header.lines:
            raise InputError(path, "missing header: a DAT file starts with '%' header lines")
        size = (header.width, header.height) if header.width and header.height else None
        return Recording(path, "dat", size, header)
    if suffix in (".h5", ".hdf5"):
        return _open_h5(path)
    raise InputError(path, f"unknown recording format {suffix or '(no suffix)'}; known: {', '.join(SUFFIXES)}")


def _aedat(path):
    """The ``aedat`` package (AEDAT4 decoder, pinned in requirements.txt), or InputError naming the file."""
    try:
        import aedat
    except ImportError:
        raise InputError(path, "reading AEDAT4 needs the 'aedat' package (pip install aedat==2.3.0)") from None
    return aedat


def _open_aedat4(path: Path) -> Recording:
    aedat = _aedat(path)
    try:
        streams = aedat.Decoder(os.fspath(path)).id_to_stream()
    except Exception as err:
        raise InputError(path, f"not a readable AEDAT4 file ({err})") from None
    events = sorted((i, s) for i, s in streams.items() if s.get("type") == "events")
    if not events:
        raise InputError(path, "AEDAT4 file has no event stream")
    s = events[0][1]
    return Recording(path, "aedat4", (s["width"], s["height"]))


def _open_h5(path: Path) -> Recording:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("evforge_format") == "stream":
                if not f.attrs.get("complete", False):
                    raise InputError(path, "stream file is incomplete (its writer was interrupted)")
                return Recording(path, "stream", (int(f.attrs["width"]), int(f.attrs["height"])))
            for k in ("x", "y", "p", "t"):
                ds = f.get(f"events/{k}")
                if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.dtype.kind not in "ui":
                    raise InputError(path, f"events/{k} is missing or not a 1-D integer dataset (expected a DSEC "
                                           f"events.h5 or an evforge stream file)")
            if len({f[f'events/{k}'].shape[0] for k in ('x', 'y', 'p', 't')}) != 1:
                raise InputError(path, "event columns differ in length")
    except OSError as err:
        raise InputError(path, f"not a readable HDF5 file ({err})") from None
    return Recording(path, "dsec", DSEC_SENSOR)


def find_recordings(src) -> list[Path]:
    """Recordings under ``src`` (a file, or a folder searched recursively), sorted; HDF5 files are included
    only when they look like event files (DSEC's ``rectify_map.h5`` and other HDF5 files are left out)."""
    src = Path(src)
    if src.is_file():
        return [src]
    out = []
    for p in sorted(src.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in SUFFIXES:
            continue
        if p.suffix.lower() in (".h5", ".hdf5") and not _looks_like_events(p):
            continue
        out.append(p)
    return out


def _looks_like_events(path: Path) -> bool:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("evforge_format") == "stream" or isinstance(f.get("events/t"), h5py.Dataset)
    except OSError:
        return True  # unreadable: listed, so that the build reports it
