"""Raw camera recordings -> unlabelled sample shards that MEM-style pretraining reads like any other dataset.

``SRC`` is a recording or a folder searched recursively for AEDAT4 (``.aedat4``), Prophesee RAW (``.raw``, EVT
2.0 / 3.0) and DAT (``.dat``), DSEC ``events.h5`` and evforge stream files (``.h5``; readers in
:mod:`evforge.formats`).

* **Samples.** A recording is cut into windows of ``sample_ms`` (default 100 ms) from its first event: window
  ``k`` holds the events with ``t0 + k S <= t < t0 + (k + 1) S``. A window with fewer than ``min_events`` events
  (default 1000: dead time) yields no sample. Key ``<path under SRC>/<k:06d>``, label -1 (``classes`` is
  empty), ``kind = "samples"`` (what MEM pretraining takes). Timestamps stay absolute: the shard's per-sample
  ``t_offset`` holds the epoch microseconds the camera wrote (AEDAT4, DSEC, Prophesee's camera time).
* **Bounded parts.** Each recording is split into parts of consecutive windows holding about ``part_events``
  events each (default 2M, ~18 MB of raw shard columns); a part is one build item, so one shard never holds
  more than one part of a long recording and memory stays bounded by a part. The scan streams every recording
  once (bounded memory) to count its events and find its time range, noting where each decoded block starts
  (byte offset and decoder state, Prophesee formats); a part's read resumes at the last block before its time
  range, so a long recording is decoded about twice in all. HDF5 sources seek by time (``ms_to_idx``); AEDAT4
  parts are decoded from the file's start (the ``aedat`` decoder cannot seek), so a long AEDAT4 recording
  costs one decode per part up to it: raise ``part_events`` for those.
* **Splits.** Every ``round(1 / val_fraction)``-th window goes to ``val`` (default ``val_fraction`` 0.1; 0: all
  ``train``), so a single recording gives both splits; a part's train and val windows are separate items.
* **Side data** (``side=True``): a sample's attrs hold the recording's triggers (``[[t, id, value], ...]``,
  EVT2/EVT3/AEDAT4) and AEDAT4 IMU rows (``[[t, ax, ay, az, gx, gy, gz, temperature], ...]``) inside its window,
  plus ``recording``, ``format`` and ``window``.
* **Sensor size.** ``sensor_size`` when given, else the size most headers state (DAT files without
  ``% Width``/``% Height``: the largest x/y seen + 1). A recording whose stated size differs, or with events
  outside the size, is reported in ``errors.jsonl`` (pass ``sensor_size`` or convert it separately).
* **Time order.** Timestamps must not go back (``unsorted="error"``, the default); with ``unsorted="sort"`` a
  disorder of up to ``sort_window_ms`` (10 ms: a sensor's readout order) is sorted while streaming, a larger
  one is an error.
* **Bad input** (an undecodable file, timestamps that go back) is one ``errors.jsonl`` line for that recording;
  the other recordings are converted.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import numpy as np

from evforge.errors import InputError
from evforge.formats import find_recordings, open_recording
from evforge.formats.recording import Chunk, sorted_chunks

from .base import DatasetPlan, Sample, SourceItem

__all__ = ["RecordingsConverter", "scan_recording"]


def scan_recording(path, *, sort_window_us: int | None = None) -> dict:
    """One streaming pass: ``{format, sensor_size, num_events, t_first, t_last, max_x, max_y, checkpoints}``
    (``checkpoints``: ``(smallest t, resume)`` of every decoded block that can be resumed); InputError for an
    unreadable file or timestamps that decrease (named by event index; with ``sort_window_us``: by more than
    that)."""
    rec = open_recording(path)
    n, first, last, mx, my = 0, None, None, -1, -1
    checkpoints = []

    def raw():
        for chunk in rec.chunks():
            if len(chunk.events) and chunk.resume is not None:
                checkpoints.append((int(chunk.events["t"].min()), chunk.resume))
            yield chunk

    chunks = raw() if sort_window_us is None else sorted_chunks(raw(), sort_window_us, path)
    for chunk in chunks:
        ev = chunk.events
        if not len(ev):
            continue
        t = ev["t"]
        if last is not None and t[0] < last:
            raise InputError(path, f"timestamps go back at event {n} ({last} > {int(t[0])} us); convert with "
                                   f"unsorted='sort' to accept a bounded disorder")
        bad = np.flatnonzero(t[1:] < t[:-1])
        if bad.size:
            i = int(bad[0]) + 1
            raise InputError(path, f"timestamps go back at event {n + i} ({int(t[i - 1])} > {int(t[i])} us); "
                                   f"convert with unsorted='sort' to accept a bounded disorder")
        first = int(t[0]) if first is None else first
        last = int(t[-1])
        mx, my = max(mx, int(ev["x"].max())), max(my, int(ev["y"].max()))
        n += len(ev)
    return {"format": rec.format, "sensor_size": rec.sensor_size, "num_events": n, "t_first": first,
            "t_last": last, "max_x": mx, "max_y": my, "checkpoints": checkpoints}


def _resume_before(checkpoints, t: int):
    """The resume point of the last block whose smallest timestamp is below ``t`` (in time-ordered data its
    predecessors hold only events at or before it, so nothing at or after ``t`` is skipped; callers pass ``t``
    less the sort window for bounded disorder), or None: from the start."""
    best = None
    for t_first, resume in checkpoints:
        if t_first >= t:
            break
        best = resume
    return best


class RecordingsConverter:
    """The recordings converter (see the module docstring)."""

    name = "recordings"
    # the build estimates each part at its whole file's size: a shard holds at most max(target size, one part)
    raw_bytes_per_file_byte = 1.0

    def scan(self, src, *, sample_ms: float = 100.0, min_events: int = 1000, part_events: int = 2_000_000,
             val_fraction: float = 0.1, sensor_size=None, side: bool = True, unsorted: str = "error",
             sort_window_ms: float = 10.0) -> DatasetPlan:
        src = Path(src)
        if sample_ms <= 0 or part_events < 1 or min_events < 1:
            raise ValueError("sample_ms must be > 0, part_events and min_events >= 1")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if not src.exists():
            raise InputError(src, "no such file or folder")
        files = find_recordings(src)
        if not files:
            raise InputError(src, "no recordings (.aedat4, .raw, .dat, DSEC events.h5, evforge stream .h5) found")
        if unsorted not in ("error", "sort"):
            raise ValueError(f"unsorted must be 'error' or 'sort', got {unsorted!r}")
        window = int(round(sort_window_ms * 1000)) if unsorted == "sort" else None
        root = src if src.is_dir() else src.parent
        infos, failed = {}, {}
        for path in files:
            rel = path.relative_to(root).as_posix()
            try:
                infos[rel] = (path, scan_recording(path, sort_window_us=window))
            except InputError as err:
                failed[rel] = (path, str(err))
        size = self._sensor_size(sensor_size, [info for _, info in infos.values()])
        sample_us = int(round(sample_ms * 1000))
        val_every = round(1 / val_fraction) if val_fraction > 0 else 0
        items = []
        for rel, (path, message) in failed.items():
            items.append(SourceItem(key=f"{rel}/part00000", path=os.path.abspath(path), extra=("error", message)))
        for rel, (path, info) in infos.items():
            problem = self._size_problem(info, size)
            if info["num_events"] == 0:
                problem = "no events"
            if problem:
                items.append(SourceItem(key=f"{rel}/part00000", path=os.path.abspath(path), extra=("error", problem)))
                continue
            windows = (info["t_last"] - info["t_first"]) // sample_us + 1
            parts = max(1, math.ceil(info["num_events"] / part_events))
            per_part = math.ceil(windows / parts)
            for j in range(math.ceil(windows / per_part)):
                k0, k1 = j * per_part, min(windows, (j + 1) * per_part)
                resume = (_resume_before(info["checkpoints"], info["t_first"] + k0 * sample_us - (window or 0))
                          if k0 else None)
                for split in ("train", "val") if val_every else ("train",):
                    items.append(SourceItem(key=f"{rel}/part{j:05d}" + ("" if split == "train" else "-val"),
                                            path=os.path.abspath(path), split=split,
                                            extra=("part", rel, info["format"], info["t_first"], k0, k1, resume)))
        params = {"sensor_size": list(size), "sample_us": sample_us, "min_events": int(min_events),
                  "part_events": int(part_events), "val_every": val_every, "side": bool(side),
                  "sort_window_us": window}
        return DatasetPlan(name=self.name, kind="samples", sensor_size=size, classes=[], items=items, params=params)

    @staticmethod
    def _sensor_size(option, infos) -> tuple[int, int]:
        if option is not None:
            w, h = (int(v) for v in (option.lower().split("x") if isinstance(option, str) else option))
            if w < 1 or h < 1:
                raise ValueError(f"sensor_size must be positive, got {option}")
            return (w, h)
        stated = Counter(tuple(i["sensor_size"]) for i in infos if i["sensor_size"] is not None)
        if stated:
            return max(stated, key=lambda s: (stated[s], s))
        seen = [i for i in infos if i["num_events"]]
        if not seen:
            return (1, 1)
        return (max(i["max_x"] for i in seen) + 1, max(i["max_y"] for i in seen) + 1)

    @staticmethod
    def _size_problem(info, size) -> str | None:
        stated = info["sensor_size"]
        if stated is not None and tuple(stated) != tuple(size):
            return (f"sensor {stated[0]}x{stated[1]} differs from the dataset's {size[0]}x{size[1]} (convert it "
                    f"separately or pass sensor_size)")
        if info["num_events"] and (info["max_x"] >= size[0] or info["max_y"] >= size[1]):
            return (f"events up to x = {info['max_x']}, y = {info['max_y']} are outside the {size[0]}x{size[1]} "
                    f"sensor")
        return None

    def read(self, item: SourceItem, plan: DatasetPlan) -> list[Sample]:
        if item.extra[0] == "error":
            raise InputError(item.path, item.extra[1].removeprefix(f"{item.path}: "))
        _, rel, fmt, t_first, k0, k1, resume = item.extra
        p = plan.params
        sample_us, val_every = int(p["sample_us"]), int(p["val_every"])
        lo, hi = t_first + k0 * sample_us, t_first + k1 * sample_us
        rec = open_recording(item.path)
        window = p.get("sort_window_us")
        if window is None:
            chunks = rec.chunks(lo, hi, resume=resume)
        else:  # sort first, then keep [lo, hi): a block may still hold events up to a window before hi
            keep = lambda a: a[(a["t"] >= lo) & (a["t"] < hi)] if len(a) else a
            chunks = (Chunk(keep(c.events), keep(c.triggers), keep(c.imu)) for c in
                      sorted_chunks(rec.chunks(None, hi + window, resume=resume), window, item.path))
        ev_parts, trig_parts, imu_parts, last = [], [], [], None
        for chunk in chunks:
            t = chunk.events["t"]
            if len(t):
                if (last is not None and t[0] < last) or (t[1:] < t[:-1]).any():
                    raise InputError(item.path, "timestamps go back (the file changed since the scan?)")
                last = int(t[-1])
            ev_parts.append(chunk.events)
            trig_parts.append(chunk.triggers)
            imu_parts.append(chunk.imu)
        events = np.concatenate(ev_parts) if ev_parts else rec.events(0, 0)
        triggers = np.concatenate(trig_parts) if trig_parts else None
        imu = np.concatenate(imu_parts) if imu_parts else None
        window = (events["t"] - t_first) // sample_us
        bounds = np.searchsorted(window, np.arange(k0, k1 + 1), "left")
        want_val = item.split == "val"
        samples = []
        for k in range(k0, k1):
            if val_every and ((k % val_every == val_every - 1) != want_val):
                continue
            a, b = int(bounds[k - k0]), int(bounds[k - k0 + 1])
            if b - a < int(p["min_events"]):
                continue
            attrs = {"recording": rel, "format": fmt, "window": k}
            if p.get("side", True):
                w0, w1 = t_first + k * sample_us, t_first + (k + 1) * sample_us
                for name, arr in (("triggers", triggers), ("imu", imu)):
                    if arr is not None and len(arr):
                        sel = arr[(arr["t"] >= w0) & (arr["t"] < w1)]
                        if len(sel):
                            attrs[name] = [[v.item() for v in row] for row in sel]
            samples.append(Sample(key=f"{rel}/{k:06d}", events=events[a:b], attrs=attrs))
        return samples
