"""Reading shards for training: a map-style torch dataset, a packing collate, samplers and a loader.

* :class:`EventDataset` indexes a manifest's split (or a subset) from the shards' in-file indexes only; items
  are whole samples (``kind="samples"``) or, for ``kind="streams"``, the events between consecutive source
  frames of every stream (ECDDP's sample: events in ``[frame_j, frame_{j+1})``). Shard files are opened
  lazily, once per process, so the dataset pickles into DataLoader workers (fork or spawn) cheaply.
* the loader packs items with :func:`~evforge.data.collate.collate_events` into an
  :class:`~evforge.data.collate.EventBatch` (flat columns plus offsets, no padding).
* :func:`make_sampler` / :func:`make_loader` add the DistributedSampler when training on several ranks.
"""

from __future__ import annotations

import os
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, SequentialSampler

from evforge.errors import InputError
from evforge.formats.manifest import MANIFEST_NAME, Manifest
from evforge.formats.shards import ShardReader

from .collate import collate_events

__all__ = ["EventDataset", "make_sampler", "make_loader", "resolve_manifest"]


def resolve_manifest(path) -> Path:
    """``path`` itself when it is a file, else ``path/manifest.json`` (a dataset folder)."""
    path = Path(path)
    return path / MANIFEST_NAME if path.is_dir() else path


class EventDataset(Dataset):
    """Map-style dataset over one split of a manifest; ``item -> dict(events, label, key[, t_start, t_end])``.

    ``events`` is an :data:`~evforge.formats.events.EVENT_DTYPE` array (absolute ``t`` in us, ``p`` +1/-1);
    :func:`collate_events` turns a list of items into tensors.

    * ``kind == "samples"``: item ``i`` is the ``i``-th sample of the split, in shard order.
    * ``kind == "streams"``: item is a window of ``window`` (default 1) consecutive frame intervals of one
      stream sample, non-overlapping: events in ``[frame_j, frame_{j+window})`` for ``j = 0, window, ...``
      (a trailing partial group is dropped); ``key = f"{sample key}#{j}"``, ``t_start``/``t_end`` are the
      two frame times (absolute us), ``label`` is the stream's label.

    ``subset`` names a manifest subset (e.g. ``"train_10pct"``); its split must be ``split``. Items keep
    shard order whatever the order of the subset's keys. ``min_events`` drops items with fewer events (from
    the index: nothing is read). ``transform(events) -> events`` is applied to each item's events.
    ``max_open_files`` bounds the shard handles one process keeps open (least recently used are closed), so a
    split of thousands of shards stays under the file-descriptor limit in every worker.

    Nothing is read silently wrong: a dataset whose build has not finished is refused (``Manifest.load``), every
    shard must have the sample count, event count and size the manifest records (else :class:`InputError`
    naming the shard: it was rewritten after the manifest), keys must be unique across the split's shards, and
    every item read is checked for the invariants of its sample (``ShardReader.events``). The sha256 of the
    shards is ``verify``'s job (it reads everything).
    """

    def __init__(self, manifest_path, split: str, *, subset: str | None = None, window: int | None = None,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None, min_events: int = 0,
                 max_open_files: int = 64):
        self.manifest_path = resolve_manifest(manifest_path)
        m = Manifest.load(self.manifest_path)
        if split not in m.splits:
            raise ValueError(f"{self.manifest_path}: no split {split!r} (splits: {', '.join(m.splits)})")
        keys = None
        if subset is not None:
            if subset not in m.subsets:
                raise ValueError(f"{self.manifest_path}: no subset {subset!r} "
                                 f"(subsets: {', '.join(m.subsets) or 'none'})")
            sub = m.subsets[subset]
            if sub["split"] != split:
                raise ValueError(f"{self.manifest_path}: subset {subset!r} is drawn from split "
                                 f"{sub['split']!r}, not {split!r}")
            keys = sub["keys"]
        self.split, self.subset = split, subset
        self.name = m.name
        paths = m.shard_paths(self.manifest_path.absolute().parent, split)
        self._build(paths, classes=m.classes, keys=keys, window=window, transform=transform,
                    min_events=min_events, max_open_files=max_open_files, expected=m.shards_of(split))

    @classmethod
    def from_shards(cls, paths: Sequence, *, classes: Sequence[str] | None = None, window: int | None = None,
                    transform: Callable | None = None, min_events: int = 0, keys=None,
                    max_open_files: int = 64) -> "EventDataset":
        """A dataset over bare shard files (no manifest): e.g. for a preview of one shard."""
        self = cls.__new__(cls)
        self.manifest_path, self.split, self.subset, self.name = None, None, None, None
        self._build([Path(p) for p in paths], classes=classes, keys=keys, window=window, transform=transform,
                    min_events=min_events, max_open_files=max_open_files)
        return self

    # ---- index
    def _build(self, paths, *, classes, keys, window, transform, min_events, max_open_files,
               expected: list[dict] | None = None) -> None:
        """Read every shard's index once and lay out the items as flat arrays (no event reads). ``expected``:
        the manifest's entries of the shards, which each shard must match."""
        if max_open_files < 1:
            raise ValueError(f"max_open_files must be >= 1, got {max_open_files}")
        self.max_open_files = int(max_open_files)
        self._open, self._open_pid = OrderedDict(), None  # this process's open shards, least recent first
        if window is not None and (isinstance(window, bool) or not isinstance(window, (int, np.integer))
                                   or window < 1):
            raise ValueError(f"window must be a positive number of frame intervals, got {window!r}")
        self.transform = transform
        self.readers = [ShardReader(p) for p in paths]
        for reader, entry in zip(self.readers, expected or ()):
            self._check_entry(reader, entry)
        kinds = {r.kind for r in self.readers}
        sizes = {r.sensor_size for r in self.readers}
        if len(kinds) > 1 or len(sizes) > 1:
            raise ValueError(f"shards mix kinds {sorted(kinds)} or sensor sizes {sorted(sizes)}")
        self.kind = kinds.pop() if kinds else "samples"
        self.sensor_size = sizes.pop() if sizes else (0, 0)
        if window is not None and self.kind != "streams":
            raise ValueError("window applies to 'streams' datasets (frame intervals); samples are whole")
        self.window = int(window or 1)
        self.classes = None if classes is None else list(classes)
        wanted = None if keys is None else set(keys)

        shard, sample, start, stop, label, j, t0, t1 = ([] for _ in range(8))
        self._sample_keys: list[str] = []  # per selected shard sample
        owner: list[np.ndarray] = []  # per item: row in _sample_keys
        found = 0
        for si, r in enumerate(self.readers):
            ix, shard_keys = r.index, r.keys
            rows = np.arange(r.num_samples)
            if wanted is not None:
                rows = np.array([i for i, k in enumerate(shard_keys) if k in wanted], dtype=np.int64)
                found += len(rows)
            base = len(self._sample_keys)
            self._sample_keys.extend(shard_keys[i] for i in rows)
            labels = ix["label"].astype(np.int64)
            if self.kind == "samples":
                n = len(rows)
                label.append(labels[rows])
                shard.append(np.full(n, si, np.int32))
                sample.append(rows)
                start.append(np.zeros(n, np.int64))
                stop.append(ix["count"][rows].astype(np.int64))
                owner.append(base + np.arange(n))
                continue
            for k, i in enumerate(rows):
                ft, fidx = r.frame_times(int(i)), r.frame_event_idx(int(i))
                js = np.arange(0, len(ft) - self.window, self.window)
                shard.append(np.full(len(js), si, np.int32))
                sample.append(np.full(len(js), i, np.int64))
                label.append(np.full(len(js), labels[i], np.int64))
                start.append(fidx[js])
                stop.append(fidx[js + self.window])
                j.append(js)
                t0.append(ft[js])
                t1.append(ft[js + self.window])
                owner.append(np.full(len(js), base + k, np.int64))
        if len(set(self._sample_keys)) != len(self._sample_keys):
            dup = next(k for k, n in Counter(self._sample_keys).items() if n > 1)
            raise InputError(self.manifest_path or paths[0], f"sample key {dup!r} is in more than one shard of "
                                                              f"the split (run evforge verify)")
        if wanted is not None and found != len(wanted):
            have = set(self._sample_keys)
            missing = next(k for k in keys if k not in have)
            raise KeyError(f"subset key {missing!r} is in none of the split's shards")

        cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
        self._shard, self._sample = cat(shard, np.int32), cat(sample, np.int64)
        self._start, self._stop = cat(start, np.int64), cat(stop, np.int64)
        self._owner = cat(owner, np.int64)
        self._j, self._t0, self._t1 = cat(j, np.int64), cat(t0, np.int64), cat(t1, np.int64)
        self._labels = cat(label, np.int64)
        if min_events > 0:
            self._select(np.flatnonzero(self._stop - self._start >= min_events))

    def _check_entry(self, reader: ShardReader, entry: dict) -> None:
        """The shard must be what the manifest lists (counts from its index, bytes from the file system)."""
        try:
            size = reader.path.stat().st_size
        except OSError as err:
            raise InputError(reader.path, f"cannot stat the shard ({err.strerror or err})") from None
        got = {"num_samples": reader.num_samples, "num_events": reader.num_events, "bytes": size}
        bad = [f"{k} {got[k]} (manifest: {entry[k]})" for k in got if got[k] != entry[k]]
        if bad:
            raise InputError(reader.path, f"does not match {self.manifest_path}: {', '.join(bad)}; the shard was "
                                          f"changed after the manifest was written (run evforge verify, rebuild)")

    def _select(self, keep: np.ndarray) -> None:
        for name in ("_shard", "_sample", "_start", "_stop", "_owner", "_labels"):
            setattr(self, name, getattr(self, name)[keep])
        if self.kind == "streams":
            self._j, self._t0, self._t1 = self._j[keep], self._t0[keep], self._t1[keep]

    # ---- queries (index only)
    def __len__(self) -> int:
        return len(self._shard)

    @property
    def labels(self) -> np.ndarray:
        """Label of every item (int64, -1 = unlabelled)."""
        return self._labels.copy()

    @property
    def num_events(self) -> np.ndarray:
        """Event count of every item (from the index)."""
        return self._stop - self._start

    def key(self, i: int) -> str:
        k = self._sample_keys[self._owner[i]]
        return f"{k}#{int(self._j[i])}" if self.kind == "streams" else k

    @property
    def keys(self) -> list[str]:
        return [self.key(i) for i in range(len(self))]

    def label_name(self, label: int) -> str:
        if label < 0:
            return "unlabelled"
        return self.classes[label] if self.classes and label < len(self.classes) else str(label)

    # ---- items (one slice read per item)
    def __getitem__(self, i) -> dict:
        n = len(self)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -n <= i < n:
            raise IndexError(f"item {i!r} out of range ({n} items)")
        i = int(i) % n
        reader = self._reader(int(self._shard[i]))
        events = reader.events(int(self._sample[i]), int(self._start[i]), int(self._stop[i]))
        if self.transform is not None:
            events = self.transform(events)
        item = {"events": events, "label": int(self._labels[i]), "key": self.key(i)}
        if self.kind == "streams":
            item["t_start"], item["t_end"] = int(self._t0[i]), int(self._t1[i])
        return item

    def _reader(self, s: int) -> ShardReader:
        """Reader ``s``, noting it as open in this process; closes the least recently used beyond the limit."""
        if self._open_pid != os.getpid():  # a new process (fork): the inherited bookkeeping is not ours
            self._open, self._open_pid = OrderedDict(), os.getpid()
        if s in self._open:
            self._open.move_to_end(s)
        else:
            self._open[s] = None
            while len(self._open) > self.max_open_files:
                self.readers[self._open.popitem(last=False)[0]].close()
        return self.readers[s]

    def close(self) -> None:
        """Close this process's open shard handles (they reopen on the next read)."""
        for r in self.readers:
            r.close()
        self._open = OrderedDict()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"], state["_open_pid"] = OrderedDict(), None  # readers drop their handles when pickled
        return state

    def __repr__(self) -> str:
        where = self.manifest_path or f"{len(self.readers)} shard(s)"
        sub = f", subset={self.subset!r}" if self.subset else ""
        return f"EventDataset({where}, split={self.split!r}{sub}, kind={self.kind}, {len(self)} items)"


# ----------------------------------------------------------------------------------------- sampling, loader
def _world(rank, world_size) -> tuple[int, int]:
    """(rank, world size): the arguments, else torch.distributed's when initialised, else (0, 1)."""
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised and world_size > 1 else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return int(rank), int(world_size)


def make_sampler(dataset, *, shuffle: bool, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, drop_last: bool = False) -> Sampler:
    """A DistributedSampler when ``world_size > 1``, else a seeded RandomSampler or a SequentialSampler.

    ``rank``/``world_size`` default to torch.distributed's when a process group is initialised. A
    DistributedSampler pads by repeating items so every rank gets the same count (unless ``drop_last``);
    call ``sampler.set_epoch(epoch)`` each epoch so it reshuffles. The RandomSampler's generator is seeded
    once, so successive epochs draw different, reproducible permutations.
    """
    rank, world_size = _world(rank, world_size)
    if world_size > 1:
        return DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                  drop_last=drop_last)
    if shuffle:
        return RandomSampler(dataset, generator=torch.Generator().manual_seed(int(seed)))
    return SequentialSampler(dataset)


def make_loader(dataset, *, batch_size: int, shuffle: bool = False, seed: int = 0, num_workers: int = 0,
                rank: int | None = None, world_size: int | None = None, drop_last: bool = False,
                pin_memory: bool | None = None, persistent_workers: bool | None = None,
                prefetch_factor: int | None = None, collate_fn=collate_events, **kwargs) -> DataLoader:
    """DataLoader with :func:`make_sampler`, :func:`collate_events`, persistent workers when ``num_workers``
    and pinned memory when CUDA is available. ``drop_last`` drops both the sampler's padding across ranks and
    the last partial batch. Extra ``kwargs`` go to DataLoader (e.g. ``multiprocessing_context="spawn"``).
    """
    sampler = make_sampler(dataset, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                           drop_last=drop_last)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    if num_workers > 0 and hasattr(dataset, "close"):
        dataset.close()  # workers open their own handles; do not hand them this process's HDF5 state
    extra = {"prefetch_factor": prefetch_factor} if num_workers > 0 and prefetch_factor else {}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_fn, pin_memory=pin_memory, drop_last=drop_last,
                      persistent_workers=persistent_workers and num_workers > 0, **extra, **kwargs)
