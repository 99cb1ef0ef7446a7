"""N-ImageNet converter: ``SRC/extracted_{train,val}/<wnid>/*.npz`` -> classification samples.

* **Events**: each ``.npz`` holds ``event_data`` (fields ``x, y, t, p``, or the legacy ``x_pos, y_pos,
  timestamp, polarity``; dtypes are whatever the file holds, read by :func:`read_nimagenet_npz`). Sensor 640x480.
* **Classes**: the sorted wnid folders of both splits, or the order of ``class_list`` (one wnid per line,
  optionally followed by a name; a folder missing from that list is an error). ``mini=True`` keeps only the
  classes named in ``mini_list`` (Mini N-ImageNet's 100), in class-list order, and drops the other classes' files.
* **Split lists**: ``train_list``/``val_list`` (default ``SRC/train_list.txt``, ``SRC/val_list.txt`` when they
  exist) name the files of each split, usually by absolute paths on another machine; an entry is matched by
  its last two components ``<wnid>/<file>``. A listed file missing on disk becomes that item's read error.
  Without a list, every ``.npz`` of the split folder is taken.
* **Keys**: the path relative to ``SRC`` without extension, ``"extracted_train/<wnid>/<name>"``.
* **Timestamps** must be non-decreasing in file order unless ``unsorted="sort"``. Checking that re-loads the
  ``.npz`` (the decoder returns sorted events), which costs a second decompression per file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from evforge.errors import InputError
from evforge.formats.decoders import check_events, read_nimagenet_npz

from .base import DatasetPlan, Sample, SourceItem
from .ncaltech101 import check_file_order, check_unsorted_policy

SENSOR_SIZE = (640, 480)
SPLITS = {"train": "extracted_train", "val": "extracted_val"}


class NImageNetConverter:
    """The N-ImageNet converter (see the module docstring)."""

    name = "nimagenet"
    raw_bytes_per_file_byte = 2.0  # compressed npz of 13-byte events -> 9 raw bytes each (rough)

    def scan(self, src, *, class_list=None, mini: bool = False, mini_list=None, train_list=None, val_list=None,
             unsorted: str = "error") -> DatasetPlan:
        src = Path(src)
        check_unsorted_policy(unsorted)
        dirs = {split: src / folder for split, folder in SPLITS.items() if (src / folder).is_dir()}
        if not dirs:
            raise InputError(src, "no extracted_train/ or extracted_val/ folder")
        folders = sorted({d.name for root in dirs.values() for d in root.iterdir() if d.is_dir()})
        if class_list is not None:
            classes = [line.split()[0] for _, line in _read_list(class_list, "class list")]
            known = set(classes)
            if len(known) != len(classes):
                raise InputError(class_list, "a class is listed twice")
            for split, root in dirs.items():
                for w in folders:
                    if w not in known and (root / w).is_dir():
                        raise InputError(root / w, f"class folder is not in the class list {class_list}")
        else:
            classes = folders
        if mini:
            if mini_list is None:
                raise ValueError("mini=True needs mini_list (the file naming the 100 Mini N-ImageNet classes)")
            keep = set()
            for n, line in _read_list(mini_list, "mini class list"):
                w = line.split()[0]  # "<wnid> [name]"
                if w not in classes:
                    raise InputError(mini_list, f"line {n}: class {w!r} is not among the dataset's classes")
                keep.add(w)
            classes = [c for c in classes if c in keep]
        if not classes:
            raise InputError(src, "no class folders under extracted_train/ or extracted_val/")
        label_of = {w: i for i, w in enumerate(classes)}

        lists = {"train": train_list, "val": val_list}
        for split in SPLITS:
            default = src / f"{split}_list.txt"
            if lists[split] is None and default.is_file():
                lists[split] = default
        items = []
        for split, root in dirs.items():
            if lists[split] is not None:
                names = self._listed(Path(lists[split]), label_of, mini)
            else:
                names = [(w, p.name) for w in classes if (root / w).is_dir() for p in sorted((root / w).glob("*.npz"))]
            for wnid, fname in names:
                key = f"{SPLITS[split]}/{wnid}/{Path(fname).stem}"
                items.append(SourceItem(key=key, path=os.path.abspath(root / wnid / fname), label=label_of[wnid],
                                        split=split))
        if not items:
            raise InputError(src, "no .npz samples found")
        params = {"sensor_size": list(SENSOR_SIZE), "unsorted": unsorted, "mini": bool(mini),
                  "num_classes": len(classes),
                  "class_list": None if class_list is None else os.path.abspath(class_list),
                  "mini_list": None if mini_list is None else os.path.abspath(mini_list),
                  **{f"{s}_list": None if lists[s] is None else os.path.abspath(lists[s]) for s in SPLITS}}
        return DatasetPlan(name=self.name, kind="samples", sensor_size=SENSOR_SIZE, classes=classes, items=items,
                           params=params)

    @staticmethod
    def _listed(path: Path, label_of: dict, mini: bool) -> list[tuple[str, str]]:
        """``(wnid, file name)`` of a split list's entries (paths from any machine: last two components)."""
        out, seen = [], {}
        for n, entry in _read_list(path, "split list"):
            parts = [p for p in re.split(r"[\\/]+", entry) if p]
            if len(parts) < 2:
                raise InputError(path, f"line {n}: expected a path ending in <wnid>/<file>.npz, got {entry!r}")
            wnid, fname = parts[-2], parts[-1]
            if not fname.endswith(".npz"):
                fname += ".npz"
            if wnid not in label_of:
                if mini:  # Mini N-ImageNet reuses the full lists: other classes are dropped
                    continue
                raise InputError(path, f"line {n}: class {wnid!r} of {entry!r} is not a known class")
            if (wnid, fname) in seen:
                raise InputError(path, f"line {n}: {wnid}/{fname} already listed on line {seen[(wnid, fname)]}")
            seen[(wnid, fname)] = n
            out.append((wnid, fname))
        return sorted(out)

    def read(self, item: SourceItem, plan: DatasetPlan) -> list[Sample]:
        events = read_nimagenet_npz(item.path)
        if plan.params.get("unsorted", "error") == "error":
            check_file_order(item.path, npz_file_order_t(item.path))
        check_events(events, tuple(plan.sensor_size), item.path)
        return [Sample(key=item.key, events=events, label=item.label,
                       attrs={"source": item.key + Path(item.path).suffix})]


def _read_list(path, what: str) -> list[tuple[int, str]]:
    """``(line number, stripped line)`` of a text list, blank lines and ``#`` comments skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read {what} ({getattr(err, 'strerror', None) or err})") from None
    out = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    return [(n, line) for n, line in out if line and not line.startswith("#")]


def npz_file_order_t(path) -> np.ndarray:
    """The raw timestamps of an N-ImageNet ``.npz`` in file order (the file already decoded once)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "event_data" in npz.files:
                data = npz["event_data"]
                return data["t"] if "t" in data.dtype.names else data["timestamp"]
            return npz["timestamp"]
    except (OSError, ValueError, KeyError) as err:
        raise InputError(path, f"cannot read npz: {err}") from None
