"""Rectify raw DSEC events while a label window is read, as the public ECDDP (and ESS) loaders do.

DSEC-Semantic labels live in the rectified frame of the left event camera. evforge's converter can rectify
once, when it builds the shards (``evforge convert dsec --rectify``: ``rint`` of the map, events outside the
sensor dropped, before the window is split into chunks). The public code instead keeps the raw events and, per
label window (data/DESC_dataset.py:296-303, data/seg_utils.py:320-336):

1. looks each event up in ``rectify_map[y, x]`` (float x, y);
2. splits the window into its chunks *before* anything is dropped;
3. casts the coordinates to int64 (``astype``: truncation toward zero, so -0.7 -> 0) and drops events with
   x outside [0, W) or y >= H in the histogram (y < 0 is not checked: see
   :func:`evforge.data.representations.stacked_histograms` ``wrap_negative_rows``).

:class:`Rectifier` does step 1 and 3's rounding on the samples of a *raw* dataset (built without
``--rectify``) and keeps every event, so that :func:`~evforge.data.representations.stacked_histograms` chunks and
drops in the reference's order. ``rounding="rint"`` gives the converter's rounding instead. The maps are read
from the DSEC source (``<root>/[<split>/]<sequence>/events/left/rectify_map.h5`` or ``.../events_left/...``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError

__all__ = ["ROUNDINGS", "RECTIFIED_DTYPE", "find_rectify_map", "load_rectify_map", "rectify_events", "Rectifier"]

ROUNDINGS = ("rint", "trunc")
MAP_FILES = ("events/left/rectify_map.h5", "events_left/rectify_map.h5")
MAP_SHAPE = (480, 640, 2)  # DSEC's event cameras: (H, W, [x, y])
# x, y may fall outside the sensor (kept for the histogram to drop); int32 as the collate's packed columns
RECTIFIED_DTYPE = np.dtype([("x", "<i4"), ("y", "<i4"), ("t", "<i8"), ("p", "i1")])
_FAR = -(1 << 30)  # where events on non-finite map entries go: outside any sensor, even with row wrap-around


def find_rectify_map(root, sequence: str) -> Path:
    """``rectify_map.h5`` of ``sequence`` under the DSEC source ``root`` (the sequence folder directly under it,
    or under one split folder)."""
    root = Path(root)
    candidates = [root / sequence / f for f in MAP_FILES]
    if root.is_dir():
        for split in sorted(p for p in root.iterdir() if p.is_dir()):
            candidates += [split / sequence / f for f in MAP_FILES]
    for c in candidates:
        if c.is_file():
            return c
    raise InputError(root, f"no rectify_map.h5 for sequence {sequence!r} (looked for {sequence}/{MAP_FILES[0]} "
                           f"and {sequence}/{MAP_FILES[1]}, also one split folder down)")


def load_rectify_map(path) -> np.ndarray:
    """The ``rectify_map`` dataset: (480, 640, 2) float32, rectified (x, y) of raw pixel ``[y, x]``."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            ds = f.get("rectify_map")
            if not isinstance(ds, h5py.Dataset) or ds.shape != MAP_SHAPE or ds.dtype.kind != "f":
                got = f"{ds.dtype} {ds.shape}" if isinstance(ds, h5py.Dataset) else "nothing"
                raise InputError(path, f"rectify_map is {got}, expected float {MAP_SHAPE}")
            out = np.asarray(ds[()], dtype=np.float32)
    except OSError as err:
        raise InputError(path, f"not a readable HDF5 file ({err})") from None
    out.setflags(write=False)
    return out


def rectify_events(events: np.ndarray, rectify_map: np.ndarray, rounding: str = "trunc") -> np.ndarray:
    """``events`` (raw x, y) moved to ``rectify_map[y, x]`` rounded by ``rounding`` (``"trunc"``: toward zero,
    numpy's float -> int cast, the public loaders; ``"rint"``: to nearest, the converter). Every event is kept
    (dtype :data:`RECTIFIED_DTYPE`); non-finite map entries send the event far outside the sensor."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, not {rounding!r}")
    h, w = rectify_map.shape[:2]
    x, y = events["x"].astype(np.intp), events["y"].astype(np.intp)
    if len(events) and (x.max() >= w or y.max() >= h):
        raise ValueError(f"raw events reach ({int(x.max())}, {int(y.max())}), outside the {w}x{h} rectify map "
                         f"(is the dataset already rectified?)")
    xy = rectify_map[y, x]
    out = np.empty(len(events), dtype=RECTIFIED_DTYPE)
    with np.errstate(invalid="ignore"):
        r = np.trunc(xy) if rounding == "trunc" else np.rint(xy)
        r = np.where(np.isfinite(r), np.clip(r, _FAR, -_FAR), _FAR)
    out["x"], out["y"] = r[:, 0].astype(np.int32), r[:, 1].astype(np.int32)
    out["t"], out["p"] = events["t"], events["p"]
    return out


class Rectifier:
    """Per-sequence rectification of raw label windows: ``rectifier(events, sequence)``; maps found under
    ``root`` (see :func:`find_rectify_map`) and read once per process."""

    def __init__(self, root, rounding: str = "trunc"):
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, not {rounding!r}")
        self.root, self.rounding = Path(root), rounding
        if not self.root.is_dir():
            raise InputError(self.root, "rectify maps: not a folder (give the DSEC source folder)")
        self._maps: dict[str, np.ndarray] = {}
        self._paths: dict[str, Path] = {}

    def path(self, sequence: str) -> Path:
        if sequence not in self._paths:
            self._paths[sequence] = find_rectify_map(self.root, sequence)
        return self._paths[sequence]

    def __call__(self, events: np.ndarray, sequence: str) -> np.ndarray:
        if sequence not in self._maps:
            self._maps[sequence] = load_rectify_map(self.path(sequence))
        return rectify_events(events, self._maps[sequence], self.rounding)

    def __getstate__(self) -> dict:  # DataLoader workers read the maps again rather than pickling them
        return {"root": self.root, "rounding": self.rounding, "_maps": {}, "_paths": dict(self._paths)}

    def __repr__(self) -> str:
        return f"Rectifier({os.fspath(self.root)!r}, rounding={self.rounding!r})"
