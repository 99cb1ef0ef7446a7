"""The full integrity pass over one shard (index, then every event in blocks): what ``ShardReader.check`` and
``evforge verify`` report."""

from __future__ import annotations

import numpy as np

from evforge.formats.streamfile import CHUNK_EVENTS


def check_shard(reader, block_events: int = 16 * CHUNK_EVENTS) -> list[str]:
    """Invariant faults of a :class:`~evforge.formats.shards.reader.ShardReader`'s shard ("<path>:
    <problem>", first occurrence of each kind), reading the columns in blocks.

    Checks index consistency (contiguous offsets, counts, unique keys, labels >= -1, frame index), then per
    event: coordinates inside the sensor, p in {0, 1}, t sorted within its sample and inside [t_start, t_end),
    and each frame's event_idx is the first event with t >= the frame time.
    """
    faults: dict[str, str] = {}  # kind -> first message

    def fault(kind: str, message: str) -> None:
        faults.setdefault(kind, f"{reader.path}: {message}")

    ix = reader._index
    offset, count = ix["offset"].astype(np.int64), ix["count"].astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(count)])[:-1]
    if np.any(offset != starts):
        i = int(np.flatnonzero(offset != starts)[0])
        fault("offset", f"index/offset[{i}] = {offset[i]}, expected {starts[i]} (samples not contiguous)")
    if int(count.sum()) != reader.num_events:
        fault("count", f"index/count sums to {int(count.sum())}, but num_events = {reader.num_events}")
    if len(set(reader._keys)) != len(reader._keys) or not all(reader._keys):
        fault("key", "sample keys are empty or not unique")
    if np.any(ix["label"] < -1):
        fault("label", f"label {int(ix['label'].min())} < -1")
    t_off, t_start, t_end = ix["t_offset"], ix["t_start"], ix["t_end"]
    if np.any(t_start != t_off) or np.any(t_end < t_start):
        fault("trange", "index t_start != t_offset or t_end < t_start")
    ft_sample = _check_frames(reader, fault)
    if faults:  # the per-event pass relies on a sane index
        return list(faults.values())

    ends = starts + count
    prev_t = None  # (sample, absolute t) of the last event of the previous block
    ft, fidx = reader._frame_t, reader._frame_idx
    f_global = starts[ft_sample] + fidx if len(ft) else np.zeros(0, dtype=np.int64)
    try:
        reader._h5()
        for a in range(0, reader.num_events, block_events):
            b = min(a + block_events, reader.num_events)
            x, y, p, t = (reader._cols[c][a:b] for c in ("x", "y", "p", "t"))
            pos = np.arange(a, b)
            sid = np.searchsorted(ends, pos, "right")
            tabs = t.astype(np.int64) + t_off[sid]
            for name, values, limit in (("x", x, reader.width), ("y", y, reader.height)):
                bad = np.flatnonzero(values >= limit)
                if bad.size:
                    k = int(bad[0])
                    fault(name, f"{name}={values[k]} at event {a + k} is outside the "
                                f"{reader.width}x{reader.height} sensor")
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


def _check_frames(reader, fault) -> np.ndarray:
    """Check the frame index; returns the sample of each frame (empty for 'samples' shards)."""
    if reader.kind != "streams":
        return np.zeros(0, dtype=np.int64)
    ix = reader._index
    fo, fc = ix["frame_offset"].astype(np.int64), ix["frame_count"].astype(np.int64)
    fstarts = np.concatenate([[0], np.cumsum(fc)])[:-1]
    if np.any(fo != fstarts) or int(fc.sum()) != len(reader._frame_t):
        fault("frame_offset", "index/frame_offset / frame_count do not tile frames/t")
        return np.zeros(0, dtype=np.int64)
    sample_of = np.repeat(np.arange(reader.num_samples), fc)
    ft, fidx = reader._frame_t, reader._frame_idx
    same = sample_of[1:] == sample_of[:-1]
    if np.any(same & (np.diff(ft) < 0)):
        fault("frame_sort", "frames/t not sorted within a sample")
    if np.any(same & (np.diff(fidx) < 0)) or np.any(fidx > ix["count"].astype(np.int64)[sample_of]):
        fault("frame_idx", "frames/event_idx decreasing within a sample or past the sample's end")
    if np.any((ft < ix["t_start"][sample_of]) | (ft >= ix["t_end"][sample_of])):
        fault("frame_span", "a frame time is outside its sample's [t_start, t_end)")
    return sample_of
