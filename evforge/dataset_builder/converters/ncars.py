"""N-Cars converter: ``SRC/{train,test}/{background,cars}/*.dat`` Prophesee DAT v2 clips -> samples.

* **Folders**: ``train``/``test`` (or the release's ``n-cars_train``/``n-cars_test``) give the split, the class
  folder ``background`` (label 0) or ``cars`` (label 1) the label. Having both ``train`` and ``n-cars_train``
  is an error (which one is meant?).
* **Keys** are the path relative to ``SRC`` without extension, e.g. ``"n-cars_train/cars/obj_004396_td"``.
* **Sensor** 120x100 (the clips' size); events outside it are an error for that file, as are unsorted
  timestamps in file order (``unsorted="sort"`` accepts the decoder's stable sort instead).
"""

from __future__ import annotations

import os
from pathlib import Path

from evforge.errors import InputError
from evforge.formats.decoders import read_prophesee_dat

from .base import DatasetPlan, Sample, SourceItem
from .ncaltech101 import check_unsorted_policy, read_checked

SENSOR_SIZE = (120, 100)
CLASSES = ["background", "cars"]
SPLIT_FOLDERS = {"train": ("train", "n-cars_train"), "test": ("test", "n-cars_test")}


class NCarsConverter:
    """The N-Cars converter (see the module docstring)."""

    name = "ncars"
    raw_bytes_per_file_byte = 9 / 8  # 8-byte DAT events, 9 raw bytes in a shard

    def scan(self, src, *, unsorted: str = "error") -> DatasetPlan:
        src = Path(src)
        check_unsorted_policy(unsorted)
        if not src.is_dir():
            raise InputError(src, "not a directory (expected SRC/{train,test}/{background,cars}/*.dat)")
        items, folders = [], {}
        for split, names in SPLIT_FOLDERS.items():
            found = [n for n in names if (src / n).is_dir()]
            if len(found) > 1:
                raise InputError(src, f"both {found[0]}/ and {found[1]}/ exist: keep one {split} folder")
            if not found:
                continue
            folders[split] = found[0]
            for label, cls in enumerate(CLASSES):
                for p in sorted((src / found[0] / cls).glob("*.dat")):
                    items.append(SourceItem(key=f"{found[0]}/{cls}/{p.stem}", path=os.path.abspath(p),
                                            label=label, split=split))
        if not items:
            raise InputError(src, "no .dat files under {train,test}/{background,cars}/ "
                                  "(or n-cars_train/, n-cars_test/)")
        params = {"sensor_size": list(SENSOR_SIZE), "unsorted": unsorted, "split_folders": folders}
        return DatasetPlan(name=self.name, kind="samples", sensor_size=SENSOR_SIZE, classes=list(CLASSES),
                           items=items, params=params)

    def read(self, item: SourceItem, plan: DatasetPlan) -> list[Sample]:
        return read_checked(item, plan, read_prophesee_dat)
