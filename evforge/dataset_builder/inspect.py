"""``evforge inspect`` / ``evforge verify``: what a dataset, shard or stream file holds, and whether it is sound.

:func:`inspect_path` reads only manifests, shard indexes and file attrs (never the event columns), so it is
quick on any size of dataset; :func:`verify_dataset` reads everything (checksums, per-event invariants).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers Blosc, needed to open the event columns' filter pipeline)
import numpy as np

from evforge.formats.hdf5 import check_local, decode_attr
from evforge.formats.manifest import MANIFEST_NAME, Manifest, compute_stats
from evforge.formats.shards import RAW_EVENT_BYTES, ShardReader
from evforge.formats.streamfile import StreamFile

from ..errors import InputError
from .recipe_report import format_recipe_summary, recipe_summary
from .verify import verify

__all__ = ["inspect_path", "format_report", "verify_dataset", "file_format", "compression_of"]

_BLOSC_ID = 32001
_BLOSC_NAMES = {0: "blosclz", 1: "lz4", 2: "lz4hc", 3: "snappy", 4: "zlib", 5: "zstd"}
_BLOCK = 1 << 20  # events per read when verifying a stream file


# ------------------------------------------------------------------------------------------------ helpers
def file_format(path) -> str | None:
    """``"dataset"`` (a folder or manifest JSON), ``"shard"``, ``"stream"``, or None for anything else.

    An evforge file that keeps data outside itself (external links, storage, virtual datasets) is refused with
    :class:`InputError` (:mod:`evforge.formats.hdf5`)."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() == ".json":
        return "dataset"
    try:
        with h5py.File(path, "r") as f:
            fmt = decode_attr(f.attrs.get("evforge_format"))
            if fmt in ("shard", "stream"):
                check_local(f, path)
    except (OSError, ValueError):
        return None
    return fmt if fmt in ("shard", "stream") else None


def compression_of(ds: h5py.Dataset) -> str:
    """The compression of an HDF5 dataset in evforge's names (``zstd``, ``lz4``, ``gzip``, ``none``, ...)."""
    plist = ds.id.get_create_plist()
    names = []
    for k in range(plist.get_nfilters()):
        code, _flags, values, name = plist.get_filter(k)
        if code == _BLOSC_ID:
            names.append(_BLOSC_NAMES.get(values[6], f"blosc{values[6]}") if len(values) > 6 else "blosc")
        elif code == h5py.h5z.FILTER_DEFLATE:
            names.append("gzip")
        elif code not in (h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_FLETCHER32):
            names.append(name.decode(errors="replace") if isinstance(name, bytes) else str(name))
    return "+".join(names) or "none"


def _compression(path: Path) -> str:
    with h5py.File(path, "r") as f:
        return compression_of(f["events/x"])


def _ratio(num_events: int, num_bytes: int) -> float | None:
    """Raw event-column bytes per file byte (how well the columns compress)."""
    return round(num_events * RAW_EVENT_BYTES / num_bytes, 2) if num_bytes and num_events else None


def _windows(reader: ShardReader) -> tuple[int, int]:
    """(frames, frame intervals) of a stream shard: the intervals are the stream dataset's items."""
    if reader.kind != "streams":
        return 0, 0
    fc = reader.index["frame_count"].astype(np.int64)
    return int(fc.sum()), int(np.maximum(fc - 1, 0).sum())


# ------------------------------------------------------------------------------------------------ inspect
def inspect_path(path) -> dict:
    """A summary dict of a dataset folder / ``manifest.json``, a shard file or a stream file.

    ``d["type"]`` says which; see :func:`format_report` for the fields. Raises InputError for anything else.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    fmt = file_format(path)
    if fmt == "dataset":
        return _inspect_dataset(path / MANIFEST_NAME if path.is_dir() else path)
    try:
        if fmt == "shard":
            return _inspect_shard(path)
        if fmt == "stream":
            return _inspect_stream(path)
    except (OSError, KeyError, ValueError) as err:  # a damaged file HDF5 cannot read past the header
        raise InputError(path, f"cannot read ({err})") from None
    raise InputError(path, "not an evforge dataset folder, manifest, shard or stream file")


def _inspect_dataset(manifest_path: Path) -> dict:
    m = Manifest.load(manifest_path)
    root = manifest_path.absolute().parent
    problems: list[str] = []
    splits, per_class = {}, {}
    all_cols = {"count": [], "duration": [], "label": []}
    compressions, total_bytes, any_unreadable = set(), 0, False
    for split, info in m.splits.items():
        cols = {"count": [], "duration": [], "label": []}
        frames = windows = 0
        unreadable = False
        entries = m.shards_of(split)
        split_bytes = sum(e["bytes"] for e in entries)
        total_bytes += split_bytes
        for e in entries:
            p = root / e["path"]
            try:
                reader = ShardReader(p)
                compressions.add(_compression(p))
            except (InputError, OSError) as err:
                problems.append(str(err) if isinstance(err, InputError) else f"{p}: {err}")
                unreadable = True
                continue
            ix = reader.index
            cols["count"].append(ix["count"].astype(np.int64))
            cols["duration"].append(ix["t_end"] - ix["t_start"])
            labels = ix["label"].astype(np.int64)
            if len(labels) and labels.max() >= len(m.classes):
                problems.append(f"{p}: label {labels.max()} has no class name (counted as unlabelled)")
                labels = np.where(labels >= len(m.classes), -1, labels)
            cols["label"].append(labels)
            f, w = _windows(reader)
            frames, windows = frames + f, windows + w
        cat = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in cols.items()}
        for k in all_cols:
            all_cols[k].append(cat[k])
        stats = compute_stats(cat["count"], cat["duration"], cat["label"], m.classes)
        if unreadable:  # unreadable shards: fall back to the manifest's record of this split
            stats = (m.stats.get("splits") or {}).get(split, stats)
        splits[split] = {"num_samples": info["num_samples"], "num_events": info["num_events"],
                         "num_shards": len(entries), "bytes": split_bytes, **_stat_fields(stats)}
        if m.kind == "streams":
            splits[split].update(num_frames=frames, num_windows=windows)
        any_unreadable |= unreadable
        for name, n in (stats.get("per_class") or {}).items():
            per_class.setdefault(name, {})[split] = n
    everything = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in all_cols.items()}
    overall = compute_stats(everything["count"], everything["duration"], everything["label"], m.classes)
    if any_unreadable:
        overall = m.stats.get("all") or overall
    classes = [{"id": i, "name": c, "per_split": {s: per_class.get(c, {}).get(s, 0) for s in m.splits},
                "total": sum(per_class.get(c, {}).values())} for i, c in enumerate(m.classes)]
    return {
        "type": "dataset", "path": str(manifest_path), "name": m.name, "kind": m.kind,
        "sensor_size": list(m.sensor_size),
        "num_samples": m.num_samples, "num_events": m.num_events,
        "splits": splits, "all": _stat_fields(overall), "classes": classes,
        "subsets": {name: {"split": s["split"], "percent": s.get("percent"), "seed": s.get("seed"),
                           "num_keys": len(s["keys"])} for name, s in m.subsets.items()},
        "shards": {"count": len(m.shards), "bytes": total_bytes, "compression": sorted(compressions),
                   "ratio": _ratio(m.num_events, total_bytes)},
        "provenance": {k: m.provenance.get(k) for k in ("converter", "source_root", "created", "evforge_version")},
        "problems": problems,
        "recipe": recipe_summary(m, root),  # None unless made with a data recipe
    }


def _stat_fields(stats: dict) -> dict:
    return {k: stats.get(k) for k in ("events_per_sample", "duration_us", "event_rate_hz", "unlabeled")}


def _inspect_shard(path: Path) -> dict:
    reader = ShardReader(path)
    ix = reader.index
    labels = ix["label"].astype(np.int64)
    names = reader.attrs.get("classes")
    if not (isinstance(names, list) and len(labels) and labels.max() < len(names)):
        names = [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
    stats = compute_stats(ix["count"], ix["t_end"] - ix["t_start"], labels, names)
    size = path.stat().st_size
    frames, windows = _windows(reader)
    out = {
        "type": "shard", "path": str(path), "kind": reader.kind, "sensor_size": list(reader.sensor_size),
        "num_samples": reader.num_samples, "num_events": reader.num_events, "bytes": size,
        "compression": _compression(path), "ratio": _ratio(reader.num_events, size),
        "labels": {k: v for k, v in stats["per_class"].items() if v}, **_stat_fields(stats),
        "attrs": {k: v for k, v in reader.attrs.items() if k != "classes"},
    }
    if reader.kind == "streams":
        out.update(num_frames=frames, num_windows=windows)
    return out


def _inspect_stream(path: Path) -> dict:
    with StreamFile(path) as sf:
        ft = sf.frame_times
        t_last = int(sf.column("t", sf.num_events - 1)[0]) if sf.num_events else None
        ends = [t for t in (t_last, int(ft[-1]) if len(ft) else None) if t is not None]
        duration = (max(ends) + 1 - sf.t_offset) if ends else 0
        dt = np.diff(ft)
        size = path.stat().st_size
        # events per source-frame interval, from frames/event_idx (no event reads)
        per_interval = np.diff(sf.frame_event_idx) if len(ft) >= 2 else np.zeros(0, np.int64)
        rates = per_interval[dt > 0] / (dt[dt > 0] * 1e-6)
        return {
            "type": "stream", "path": str(path), "sensor_size": [sf.width, sf.height],
            "num_events": sf.num_events, "t_offset": sf.t_offset, "duration_us": int(duration),
            "event_rate_hz": sf.num_events / (duration * 1e-6) if duration > 0 else None,
            "num_frames": len(ft), "frame_rate_hz": 1e6 / float(np.median(dt)) if len(dt) and np.median(dt) > 0
            else None, "gray_frames": sf.has_frames, "bytes": size,
            "compression": compression_of(sf._cols["x"]), "ratio": _ratio(sf.num_events, size),
            "intervals": {"count": int(len(dt)), "length_us": _minmax(dt), "events": _minmax(per_interval, True),
                          "event_rate_hz": _minmax(rates, True)},
            "recipe": sf.attrs.get("recipe"), "attrs": dict(sf.attrs),
        }


def _minmax(values, median: bool = False) -> dict | None:
    """min / max (and median) of an array, None when empty."""
    v = np.asarray(values)
    if not len(v):
        return None
    out = {"min": v.min().item(), "max": v.max().item()}
    if median:
        out["median"] = float(np.median(v))
    return out


# ------------------------------------------------------------------------------------------------ report
def _num(x) -> str:
    """Counts with thousands separators, other values with 3 significant digits."""
    if x is None:
        return "-"
    x = float(x)
    if x == int(x) and abs(x) < 1e15:
        return f"{int(x):,}"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _si(x) -> str:
    """A rate with a k / M / G suffix (28.1k, 1.25M)."""
    if x is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def _bytes(n) -> str:
    n = float(n or 0)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _summary(s: dict | None, scale: float = 1.0, fmt=None) -> str:
    """``median [min-max]`` of a compute_stats summary."""
    if not s:
        return "-"
    fmt = fmt or _num
    return f"{fmt(s['median'] * scale)} [{fmt(s['min'] * scale)}-{fmt(s['max'] * scale)}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                              for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return [fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]


def _stats_row(name: str, d: dict) -> list[str]:
    return [name, _num(d.get("num_samples")), _num(d.get("num_events")), _summary(d.get("events_per_sample")),
            _summary(d.get("duration_us"), 1e-3, _ms), _summary(d.get("event_rate_hz"), 1.0, _si)]


def _ms(x) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


_STATS_HEADER = ["split", "samples", "events", "events/sample median [min-max]", "duration ms",
                 "event rate /s"]


def format_report(d: dict) -> str:
    """A readable multi-line text report of an :func:`inspect_path` result."""
    lines: list[str] = []
    w, h = d["sensor_size"]
    if d["type"] == "dataset":
        sh = d["shards"]
        lines += [f"dataset   {d['name']}  ({d['kind']}, {w}x{h})  {d['path']}",
                  f"shards    {sh['count']} files, {_bytes(sh['bytes'])}, {', '.join(sh['compression']) or '-'}"
                  f" (ratio {sh['ratio'] or '-'}x)",
                  f"made by   {d['provenance'].get('converter')} on {d['provenance'].get('created')} "
                  f"(evforge {d['provenance'].get('evforge_version')})", ""]
        rows = [_stats_row(s, v) for s, v in d["splits"].items()]
        rows.append(_stats_row("all", {**d["all"], "num_samples": d["num_samples"], "num_events": d["num_events"]}))
        lines += _table(_STATS_HEADER, rows)
        if d["kind"] == "streams":
            lines += ["", *_table(["split", "shards", "bytes", "frames", "windows (frame intervals)"],
                                  [[s, str(v["num_shards"]), _bytes(v["bytes"]), _num(v.get("num_frames")),
                                    _num(v.get("num_windows"))] for s, v in d["splits"].items()])]
        if d["classes"]:
            splits = list(d["splits"])
            lines += ["", f"classes ({len(d['classes'])})"]
            lines += _table(["id  name", *splits, "total"],
                            [[f"{c['id']:<3} {c['name']}", *(str(c["per_split"][s]) for s in splits),
                              str(c["total"])] for c in d["classes"]])
        unl = {s: v.get("unlabeled") for s, v in d["splits"].items() if v.get("unlabeled")}
        if unl:
            lines.append("unlabelled: " + ", ".join(f"{s} {n}" for s, n in unl.items()))
        if d["subsets"]:
            lines += ["", "subsets"]
            lines += _table(["name", "split", "percent", "keys", "seed"],
                            [[n, s["split"], _num(s["percent"]), str(s["num_keys"]), str(s["seed"])]
                             for n, s in d["subsets"].items()])
        if d.get("problems"):
            lines += ["", "problems (stats from the manifest for those splits):", *d["problems"]]
        if d.get("recipe"):
            lines += ["", *format_recipe_summary(d["recipe"], _table)]
    elif d["type"] == "shard":
        lines += [f"shard     {d['path']}  ({d['kind']}, {w}x{h})",
                  f"size      {_bytes(d['bytes'])}, {d['compression']} (ratio {d['ratio'] or '-'}x)", ""]
        lines += _table(_STATS_HEADER[1:], [_stats_row("", d)[1:]])
        if d["kind"] == "streams":
            lines.append(f"frames    {d['num_frames']:,} ({d['num_windows']:,} frame intervals)")
        if d["labels"]:
            lines.append("labels    " + ", ".join(f"{k}: {v}" for k, v in d["labels"].items()))
        if d["unlabeled"]:
            lines.append(f"unlabelled {d['unlabeled']}")
        if d["attrs"]:
            lines.append("attrs     " + _short(d["attrs"]))
    else:
        lines += [f"stream    {d['path']}  ({w}x{h})",
                  f"size      {_bytes(d['bytes'])}, {d['compression']} (ratio {d['ratio'] or '-'}x)",
                  f"events    {d['num_events']:,} over {d['duration_us'] / 1e6:.3f} s "
                  f"({_si(d['event_rate_hz'])} events/s)",
                  f"frames    {d['num_frames']} at {_si(d['frame_rate_hz'])} Hz, gray images "
                  f"{'stored' if d['gray_frames'] else 'not stored'}"]
        iv = d.get("intervals") or {}
        if iv.get("count"):
            length, ev, rate = iv["length_us"], iv["events"], iv["event_rate_hz"]
            span = (f"{length['min'] / 1e6:.6f} s" if length["min"] == length["max"]
                    else f"{length['min'] / 1e6:.6f}-{length['max'] / 1e6:.6f} s")
            lines.append(f"intervals {iv['count']} of {span}, events median {_num(ev['median'])} "
                         f"[{_num(ev['min'])}-{_num(ev['max'])}], rate median {_si(rate['median']) if rate else '-'}"
                         f"/s{'' if not d.get('recipe') else ', recipe ' + str(d['recipe'])}")
        if d["attrs"]:
            lines.append("attrs     " + _short(d["attrs"]))
    return "\n".join(lines)


def _short(attrs: dict, limit: int = 300) -> str:
    text = json.dumps(attrs, default=str, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------ verify
def verify_dataset(path) -> list[str]:
    """Every fault found (``"<path>: <problem>"`` lines; empty: all good) in a dataset, shard or stream file.

    A dataset folder / manifest: :func:`evforge.dataset_builder.verify.verify` (checksums, counts, shard
    invariants, subsets). A bare shard: :meth:`ShardReader.check`. A stream file: its invariants (sorted ``t``,
    coordinates and polarity, ``ms_to_idx`` and ``frames/event_idx`` pointing at the right events).
    """
    path = Path(path)
    if not path.exists():
        return [f"{path}: no such file or folder"]
    try:
        fmt = file_format(path)
        if fmt == "dataset":
            return verify(path / MANIFEST_NAME if path.is_dir() else path)
        if fmt == "shard":
            with ShardReader(path) as reader:
                return reader.check()
        if fmt == "stream":
            return _check_stream(path)
    except InputError as err:
        return [str(err)]
    except (OSError, KeyError, ValueError) as err:  # a damaged file HDF5 cannot read past the header
        return [f"{path}: cannot read ({' '.join(str(err).split())})"]
    return [f"{path}: not an evforge dataset folder, manifest, shard or stream file"]


def _check_stream(path: Path) -> list[str]:
    """Invariant faults of a stream file (first occurrence of each kind), reading the columns in blocks."""
    faults: dict[str, str] = {}

    def fault(kind: str, message: str) -> None:
        faults.setdefault(kind, f"{path}: {message}")

    with StreamFile(path) as sf:
        n = sf.num_events
        for name, ds in sf._cols.items():
            if ds.shape != (n,):
                fault("shape", f"events/{name} has shape {ds.shape}, expected ({n},) from num_events")
        if faults:
            return list(faults.values())
        ms = sf.ms_to_idx.astype(np.int64)
        ft, fidx = sf.frame_times, sf.frame_event_idx
        t_last = int(sf._cols["t"][n - 1]) if n else 0
        want_ms = math.ceil(t_last / 1000) + 1 if n else 1
        if len(ms) != want_ms:
            fault("ms_len", f"ms_to_idx has {len(ms)} entries, expected {want_ms} (last event at {t_last} us)")
        if len(fidx) != len(ft):
            fault("frames", f"frames/event_idx has {len(fidx)} entries for {len(ft)} frames")
            fidx = fidx[: len(ft)]
            ft = ft[: len(fidx)]
        if np.any(np.diff(ft) < 0):
            fault("frame_sort", "frames/t not sorted")
        # (name, index per threshold, relative threshold): index must be the first event with t >= threshold
        pointers = [("ms_to_idx", ms, np.arange(len(ms), dtype=np.int64) * 1000),
                    ("frames/event_idx", fidx, ft - sf.t_offset)]
        for name, idx, _ in pointers:
            if np.any(np.diff(idx) < 0) or np.any(idx < 0) or np.any(idx > n):
                fault(name, f"{name} decreasing or outside [0, {n}]")
        if faults:
            return list(faults.values())
        prev = None
        for a in range(0, n, _BLOCK):
            b = min(a + _BLOCK, n)
            x, y, p = (sf._cols[c][a:b] for c in "xyp")
            t = sf._cols["t"][a:b].astype(np.int64)
            for c, values, limit in (("x", x, sf.width), ("y", y, sf.height)):
                bad = np.flatnonzero(values >= limit)
                if bad.size:
                    fault(c, f"{c}={values[bad[0]]} at event {a + int(bad[0])} is outside the "
                             f"{sf.width}x{sf.height} sensor")
            bad = np.flatnonzero(p > 1)
            if bad.size:
                fault("p", f"p={p[bad[0]]} at event {a + int(bad[0])} is not 0 or 1")
            bad = np.flatnonzero(np.diff(t) < 0)
            if bad.size or (prev is not None and len(t) and t[0] < prev):
                k = a + (int(bad[0]) + 1 if bad.size else 0)
                fault("sort", f"timestamps not sorted at event {k}")
            prev = int(t[-1])
            for name, idx, th in pointers:
                at = (idx >= a) & (idx < b)  # t[idx] >= threshold
                before = (idx - 1 >= a) & (idx - 1 < b)  # t[idx - 1] < threshold
                if np.any(t[idx[at] - a] < th[at]) or np.any(t[idx[before] - 1 - a] >= th[before]):
                    fault(name, f"{name} does not point at the first event at or after its time")
    return list(faults.values())
