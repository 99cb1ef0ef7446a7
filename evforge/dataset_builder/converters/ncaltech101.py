"""N-Caltech101 converter: ``SRC/<class>/image_XXXX.bin`` ATIS files -> classification samples.

* **Classes** are the class folders directly under ``SRC`` (101 in the release, ``BACKGROUND_Google`` and
  ``Faces_easy`` included), sorted by name; a file's label is its folder's index. Files are matched to classes
  by their exact folder name, never by substring (MEM's loader put ``elephant`` files into ``ant``).
* **Keys** are the path relative to ``SRC`` without extension, e.g. ``"airplanes/image_0001"``: exactly the
  part after ``train/`` or ``val/`` in MEM's split files.
* **Splits** come from a split file (``train|val/<class>/image_XXXX`` lines, optionally ending in ``.npy`` or
  ``.bin`` as MEM writes them; read with :func:`read_split_file`) or, without one, from a seeded stratified
  split (``val_fraction`` of every class to ``val``). A split-file line that names no file under ``SRC``, or a
  key listed twice, stops the scan with an error naming the split file and the line. Files the split file does
  not list are left out (their number is recorded as ``unlisted`` in the parameters).
* **Canvas** 240x180 (the size used downstream): events outside it are an error for that file.
* **Timestamps** must be non-decreasing in file order (``unsorted="error"``, the default); with
  ``unsorted="sort"`` the decoder's stable sort is accepted instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from evforge.errors import InputError
from evforge.formats.decoders import check_events, read_atis_bin

from ..subsets import split_file_lines, stratified_split
from .base import DatasetPlan, Sample, SourceItem

SENSOR_SIZE = (240, 180)
SPLIT_SUFFIXES = (".npy", ".bin")  # stripped from split-file keys (MEM lists the .npy files it wrote)
UNSORTED_POLICIES = ("error", "sort")


class NCaltech101Converter:
    """The N-Caltech101 converter (see the module docstring)."""

    name = "ncaltech101"
    # raw shard bytes per source byte: 5 bytes an event in the .bin, 9 in the shard's columns (size estimate)
    raw_bytes_per_file_byte = 9 / 5

    def scan(self, src, *, split_file=None, seed: int = 0, val_fraction: float = 0.2,
             unsorted: str = "error", sensor_size=SENSOR_SIZE) -> DatasetPlan:
        """``sensor_size`` (W, H): N-Caltech101's 240x180 canvas by default; the same ATIS format holds N-MNIST
        (34x34) and evforge's synthetic sets, which pass their own size."""
        sensor_size = tuple(int(v) for v in sensor_size)
        src = Path(src)
        check_unsorted_policy(unsorted)
        if not src.is_dir():
            raise InputError(src, "not a directory (expected SRC/<class>/image_XXXX.bin)")
        classes = sorted(d.name for d in src.iterdir() if d.is_dir())
        files: dict[str, tuple[str, int]] = {}  # key -> (path, label)
        for label, name in enumerate(classes):
            # a directory named x.bin is kept: reading it fails and is reported as that file's error
            for p in sorted((src / name).glob("*.bin")):
                files[f"{name}/{p.stem}"] = (os.path.abspath(p), label)
        if not files:
            deeper = _root_below(src)
            hint = f"; the dataset root seems to be {deeper}: convert that folder" if deeper else ""
            raise InputError(src, f"no class folders with .bin files (expected SRC/<class>/image_XXXX.bin){hint}")

        params = {"sensor_size": list(sensor_size), "unsorted": unsorted}
        if split_file is not None:
            splits, unlisted = _splits_from_file(Path(split_file), files)
            params.update(split="file", split_file=os.path.abspath(split_file), unlisted=unlisted)
        else:
            if not 0 < val_fraction < 1:
                raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
            keys = sorted(files)
            parts = stratified_split([files[k][1] for k in keys],
                                     {"train": 1 - val_fraction, "val": val_fraction}, seed=seed)
            splits = {keys[i]: split for split, idx in parts.items() for i in idx}
            params.update(split="stratified", val_fraction=val_fraction, seed=seed)
        items = [SourceItem(key=k, path=files[k][0], label=files[k][1], split=s) for k, s in sorted(splits.items())]
        return DatasetPlan(name=self.name, kind="samples", sensor_size=sensor_size, classes=classes, items=items,
                           params=params)

    def read(self, item: SourceItem, plan: DatasetPlan) -> list[Sample]:
        return read_checked(item, plan, read_atis_bin)


def _splits_from_file(path: Path, files: dict) -> tuple[dict[str, str], int]:
    """``{key: split}`` from a MEM-style split file, and how many files under SRC it does not list."""
    out: dict[str, str] = {}
    for n, split, key, line in split_file_lines(path, expect="split/<class>/image_XXXX"):
        for suffix in SPLIT_SUFFIXES:
            key = key.removesuffix(suffix)
        if key not in files:  # exact key: a class is matched by its full folder name only
            raise InputError(path, f"line {n}: no file for {key!r} under the source folder ({line!r})")
        if key in out:
            raise InputError(path, f"line {n}: {key!r} is listed twice ({out[key]!r} and {split!r})")
        out[key] = split
    if not out:
        raise InputError(path, "split file lists no samples")
    return out, len(files) - len(out)


def _root_below(src: Path, depth: int = 2) -> Path | None:
    """A folder under ``src`` (at most ``depth`` levels down) whose subfolders hold .bin files: the root the
    user probably meant when ``src`` is one or two folders too high (e.g. an archive's outer folder)."""
    level = [src]
    for _ in range(depth):
        level = sorted(d for parent in level for d in parent.iterdir() if d.is_dir())
        for d in level:
            if any(next(c.glob("*.bin"), None) for c in d.iterdir() if c.is_dir()):
                return d
    return None


# ------------------------------------------------------------------------------- shared with ncars / nimagenet
def check_unsorted_policy(unsorted: str) -> None:
    if unsorted not in UNSORTED_POLICIES:
        raise ValueError(f"unsorted must be one of {UNSORTED_POLICIES}, got {unsorted!r}")


def read_checked(item: SourceItem, plan: DatasetPlan, decode) -> list[Sample]:
    """One sample from a raw event file: decoded in file order, its order checked (or sorted with
    ``unsorted: sort``), coordinates checked against the sensor."""
    strict = plan.params.get("unsorted", "error") == "error"
    events = decode(item.path, sort=not strict)  # strict: keep file order and check it here (one decode)
    if strict:
        check_file_order(item.path, events["t"])
    check_events(events, tuple(plan.sensor_size), item.path)
    return [Sample(key=item.key, events=events, label=item.label,
                   attrs={"source": item.key + Path(item.path).suffix})]


def check_file_order(path, t: np.ndarray) -> None:
    """InputError naming ``path`` if the timestamps, in file order, ever decrease.

    The decoders return events stably sorted by ``t``, which hides an unsorted file; the converters re-read the
    timestamps in file order to decide (the file is in the page cache by then, so this is cheap for .bin/.dat).
    """
    bad = np.flatnonzero(t[1:] < t[:-1])
    if bad.size:
        i = int(bad[0]) + 1
        raise InputError(path, f"timestamps not sorted in the file at event {i} ({t[i - 1]} > {t[i]}); "
                               f"convert with unsorted='sort' to accept sorted copies")
