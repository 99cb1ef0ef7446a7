"""Classification splits: which split validates and which reports (``auto``), and the seeded, stratified
holdout of the training split that validates when a dataset has no separate validation split (see
:mod:`evforge.finetune.classification`)."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from evforge.data.dataset import EventDataset
from evforge.formats.manifest import Manifest

from ..dataset_builder.subsets import stratified_split
from ..errors import ConfigError
from ..trainer.sampler import mix_seed

__all__ = ["HOLDOUT", "resolve_splits", "holdout_indices", "Items"]

HOLDOUT = "train_holdout"


def resolve_splits(splits, data: dict) -> tuple[str, str]:
    """``(val_split, test_split)`` for a manifest with ``splits`` (see the module docstring for ``auto``)."""
    splits = list(splits)
    test = data.get("test_split", "auto")
    if test in (None, "auto"):
        test = "test" if "test" in splits else "val" if "val" in splits else None
        if test is None:
            raise ConfigError(f"data.test_split: the dataset has no test or val split (splits: {splits})")
    val = data.get("val_split", "auto")
    if val in (None, "auto"):
        val = "val" if "val" in splits and test != "val" else HOLDOUT
    for key, name in (("val_split", val), ("test_split", test)):
        if name != HOLDOUT and name not in splits:
            raise ConfigError(f"data.{key}: no split {name!r} in the dataset (splits: {splits}, or {HOLDOUT!r})")
    return val, test


def holdout_indices(full: EventDataset, manifest: Manifest, split: str, fraction: float, seed: int) -> np.ndarray:
    """Indices into ``full`` (the whole training split) of the :data:`HOLDOUT` validation items.

    ``round(fraction * len(full))`` items, stratified by class, drawn with a seed mixed from ``seed`` among the
    samples that belong to none of the manifest's subsets of ``split`` (the label-efficiency subsets are nested,
    so this is the complement of the largest); when that pool is too small, all of it. Deterministic.
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"data.holdout_fraction: expected a number in (0, 1), got {fraction!r}")
    reserved = set()
    for sub in manifest.subsets.values():
        if sub["split"] == split:
            reserved.update(sub["keys"])
    keys = full.keys
    pool = np.asarray([i for i, k in enumerate(keys) if k not in reserved], dtype=np.int64)
    want = int(round(fraction * len(keys)))
    if want < 1 or not len(pool):
        raise ConfigError(f"data.holdout_fraction: {fraction} of {len(keys)} training samples "
                          f"({len(pool)} outside the subsets) leaves no validation items; set data.val_split")
    if want >= len(pool):
        return pool
    f = want / len(pool)
    parts = stratified_split(full.labels[pool], {"holdout": f, "rest": 1.0 - f}, seed=mix_seed(seed, 0x401D))
    return pool[parts["holdout"]]


class Items(Dataset):
    """Some items of an :class:`EventDataset`, by index (keeps ``close``, ``labels`` and the sensor size)."""

    def __init__(self, base: EventDataset, index: np.ndarray):
        self.base, self.index = base, np.asarray(index, dtype=np.int64)
        self.sensor_size, self.classes = base.sensor_size, base.classes

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        return self.base[int(self.index[i])]

    @property
    def labels(self) -> np.ndarray:
        return self.base.labels[self.index]

    @property
    def keys(self) -> list[str]:
        keys = self.base.keys
        return [keys[int(i)] for i in self.index]

    def close(self) -> None:
        self.base.close()
