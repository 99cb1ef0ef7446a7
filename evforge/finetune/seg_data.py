"""DSEC-Semantic label windows: one item per labelled stream sample (its newest events and its label image)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from evforge.data.collate import EventBatch, collate_events
from evforge.data.dataset import resolve_manifest
from evforge.formats.manifest import Manifest
from evforge.formats.shards import ShardReader

from ..labels import DSEC_SENSOR_SIZE as SENSOR_SIZE
from .rectify import Rectifier

__all__ = ["LabelWindowDataset", "SegCollate", "SENSOR_SIZE"]


def _sequence_and_index(reader: ShardReader, i: int, key: str) -> tuple[str, int, bool]:
    """(sequence, label index, rectified by the converter) of a DSEC sample: its attrs, else its key
    ``<sequence>/<index:06d>``."""
    attrs = reader.sample_attrs(i)
    seq, _, tail = key.rpartition("/")
    seq = str(attrs.get("sequence", seq or key))
    index = attrs.get("label_index", int(tail) if tail.isdigit() else 0)
    return seq, int(index), bool(attrs.get("rectified", False))


class LabelWindowDataset(Dataset):
    """One item per labelled stream sample of a manifest split: ``{events, label: -1, key, mask}``.

    ``events``: the newest ``max_events`` events of the sample (all when None); ``mask``: its label image
    (H, W) uint8 (frame image 0). ``sequences`` keeps only those sequences, ``exclude_sequences`` drops some
    (both are checked to exist); ``label_stride`` / ``first_label`` keep label indices
    ``first_label, first_label + stride, ...`` of every sequence (ECDDP/ESS: 6 and 2); ``min_events`` drops
    samples with fewer events (index only). ``rectifier`` (:class:`~evforge.finetune.rectify.Rectifier`)
    rectifies the events of raw (unrectified) shards when an item is read; their x, y are then int32 and may lie
    outside the sensor (the representation drops them after chunking, as the public loader).
    """

    def __init__(self, manifest_path, split: str, *, sequences: Sequence[str] | None = None,
                 exclude_sequences: Sequence[str] = (), label_stride: int = 1, first_label: int = 0,
                 min_events: int = 1, max_events: int | None = None, rectifier: Rectifier | None = None):
        path = resolve_manifest(manifest_path)
        m = Manifest.load(path)
        if split not in m.splits:
            raise ValueError(f"{path}: no split {split!r} (splits: {', '.join(m.splits)})")
        if label_stride < 1 or first_label < 0:
            raise ValueError(f"label_stride must be >= 1 and first_label >= 0, got {label_stride}, {first_label}")
        self.manifest_path, self.split, self.name, self.classes = path, split, m.name, list(m.classes)
        self.max_events = None if max_events is None else int(max_events)
        self.rectifier = rectifier
        self.readers = [ShardReader(p) for p in m.shard_paths(path.absolute().parent, split)]
        for r in self.readers:
            if r.kind != "streams" or not r.has_frame_images:
                raise ValueError(f"{r.path}: segmentation needs stream shards with label images "
                                 f"(evforge convert dsec), got kind={r.kind!r} without frame images")
        sizes = {(r.sensor_size, r.frame_image_size) for r in self.readers}
        if len(sizes) > 1:
            raise ValueError(f"{path}: shards of split {split!r} mix sensor / label sizes {sorted(sizes)}")
        self.sensor_size, self.label_size = sizes.pop() if sizes else (SENSOR_SIZE, None)
        wanted = None if sequences is None else set(sequences)
        excluded = set(exclude_sequences or ())
        seen: set[str] = set()
        self._items: list[tuple[int, int]] = []
        self.keys: list[str] = []
        self.sequences: list[str] = []
        for si, r in enumerate(self.readers):
            counts = r.index["count"]
            for i, key in enumerate(r.keys):
                seq, index, rectified = _sequence_and_index(r, i, key)
                if rectifier is not None and rectified:
                    raise ValueError(f"{r.path}: sample {key!r} was rectified by the converter (--rectify); "
                                     f"rectifying when read needs shards built without --rectify")
                seen.add(seq)
                if (wanted is not None and seq not in wanted) or seq in excluded:
                    continue
                if index < first_label or (index - first_label) % label_stride or counts[i] < min_events:
                    continue
                self._items.append((si, i))
                self.keys.append(key)
                self.sequences.append(seq)
        missing = sorted(((wanted or set()) | excluded) - seen)
        if missing:
            raise ValueError(f"{path}: split {split!r} has no sequence {', '.join(map(repr, missing))} "
                             f"(has: {', '.join(sorted(seen))})")
        if rectifier is not None:
            for seq in sorted(set(self.sequences)):
                rectifier.path(seq)  # a missing map fails here, not in a loader worker

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i) -> dict:
        si, s = self._items[i]
        r = self.readers[si]
        count = int(r.index["count"][s])
        start = 0 if self.max_events is None else max(0, count - self.max_events)
        mask = r.frame_image(s, 0)
        if mask is None:
            raise ValueError(f"{r.path}: sample {self.keys[i]!r} has no label image")
        events = r.events(s, start)
        if self.rectifier is not None:
            events = self.rectifier(events, self.sequences[i])
        return {"events": events, "label": -1, "key": self.keys[i], "mask": np.asarray(mask)}

    def close(self) -> None:
        """Close this process's shard handles (they reopen on the next read)."""
        for r in self.readers:
            r.close()

    def __repr__(self) -> str:
        return f"LabelWindowDataset({self.manifest_path}, split={self.split!r}, {len(self)} items)"


class SegCollate:
    """``collate_events`` plus ``mask``: the stacked label images ``(B, H, W)`` uint8."""

    def __call__(self, items: list[dict]) -> EventBatch:
        out = collate_events(items)
        out["mask"] = torch.from_numpy(np.stack([np.asarray(it["mask"], dtype=np.uint8) for it in items]))
        return out
