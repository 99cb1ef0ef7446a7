"""Resumable, rank-sharded batch sampling and per-item RNG seeding for reproducible data loading.

* :class:`ResumableBatchSampler` shards a seeded permutation across ranks exactly as torch's DistributedSampler
  does (permutation of ``seed + epoch``, padded by repeating, rank ``r`` takes every ``world``-th index) and can
  start an epoch at a batch offset, so a resumed run skips consumed batches without loading them.
* With ``seed_items``, each index comes paired with a seed from ``(seed, epoch, index)``; :class:`SeededDataset`
  seeds torch/numpy/random with it before reading the item, and :class:`SeededCollate` before collating.
  Random augmentations then depend neither on the worker count nor on where a run was resumed. In the main
  process (``num_workers=0``) the RNG states are saved and restored around it, so the training RNG is untouched.
"""

from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

__all__ = ["ResumableBatchSampler", "SeededDataset", "SeededCollate", "mix_seed"]

_MASK = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (splitmix64 chaining): nearby inputs give unrelated seeds."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK)) & _MASK
        h = (h + 0x9E3779B97F4A7C15) & _MASK
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        h = z ^ (z >> 31)
    return h >> 1


class ResumableBatchSampler(Sampler):
    """Batches of dataset indices for one rank; ``set_epoch(epoch, start_batch)`` picks the epoch and the first batch.

    ``pad`` (default ``not drop_last``) repeats indices so every rank gets the same count, as DistributedSampler;
    validation uses ``pad=False`` (no duplicates; ranks may get one batch more or less). ``drop_last`` drops
    both the tail that does not divide across ranks and the last partial batch. ``len()`` is the number of
    batches of a whole epoch, whatever the start. With ``seed_items`` batches are lists of ``(index, seed)``.
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False, pad: bool | None = None, seed_items: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.n, self.batch_size = int(n), int(batch_size)
        self.shuffle, self.seed, self.rank, self.world_size = bool(shuffle), int(seed), int(rank), int(world_size)
        self.drop_last = bool(drop_last)
        self.pad = (not drop_last) if pad is None else bool(pad)
        self.seed_items = bool(seed_items)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def indices(self) -> list[int]:
        """This rank's indices for the current epoch, in order (all batches)."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        w = self.world_size
        if self.drop_last:
            order = order[: self.n // w * w]
        elif self.pad and self.n % w and self.n:
            extra = w - self.n % w
            order += (order * (extra // len(order) + 1))[:extra]
        return order[self.rank::w]

    def _num_items(self) -> int:
        w = self.world_size
        if self.drop_last:
            return self.n // w
        if self.pad:
            return -(-self.n // w) if self.n else 0
        return len(range(self.rank, self.n, w))

    def __len__(self) -> int:
        k = self._num_items()
        return k // self.batch_size if self.drop_last else -(-k // self.batch_size)

    def __iter__(self):
        idx = self.indices()
        bs = self.batch_size
        for b in range(self.start_batch, len(self)):
            batch = idx[b * bs:(b + 1) * bs]
            if self.seed_items:
                yield [(i, mix_seed(self.seed, self.epoch, i)) for i in batch]
            else:
                yield batch


@contextmanager
def _seeded(seed: int):
    """Seed torch (CPU), numpy and random with ``seed``; in the main process restore their states afterwards."""
    if get_worker_info() is not None:  # a worker: its RNG is its own
        torch.default_generator.manual_seed(seed)
        np.random.seed(seed % (1 << 32))
        random.seed(seed)
        yield
        return
    t, n, p = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        torch.default_generator.manual_seed(seed)
        np.random.seed(seed % (1 << 32))
        random.seed(seed)
        yield
    finally:
        torch.set_rng_state(t)
        np.random.set_state(n)
        random.setstate(p)


class SeededDataset(Dataset):
    """``dataset[(index, seed)] -> (item, seed)``: the item read with the RNGs seeded from ``seed``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with _seeded(seed):
            return self.dataset[index], seed


class SeededCollate:
    """Collate ``[(item, seed), ...]`` with the RNGs seeded from the batch's seeds (for random batch transforms)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, pairs):
        items = [item for item, _ in pairs]
        with _seeded(mix_seed(*(s for _, s in pairs[:4]), len(pairs))):
            return self.collate(items)
