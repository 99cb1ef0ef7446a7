"""Validation metrics as additive statistics: what a task's ``validation_step`` returns and the trainer sums.

A task's ``validation_step`` returns a dict of tensors (sums, counts, histograms, confusion matrices) whose sum
over batches and ranks is what its metrics need; the trainer adds them up (:func:`accumulate`), sums them over
ranks (:func:`all_reduce_stats`, one collective) and calls the task's ``validation_metrics`` once on the
totals. Metrics built this way are exact whatever the batching and the number of ranks (dinov2 keeps metric
objects with update / compute for the same reason).

The metric objects here write a batch's statistics into a dict (``update``) and read the totals (``compute``):
:class:`Mean` (``<name>.sum``, ``<name>.count``) and :class:`Histogram`. Confusion-matrix metrics live with
the tasks that use them (:mod:`evforge.finetune.metrics`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["Mean", "Histogram", "accumulate", "all_reduce_stats", "mean_metrics", "batch_count"]

Stats = dict  # str -> torch.Tensor


def _add(stats: Stats, name: str, value) -> None:
    v = value.detach() if torch.is_tensor(value) else torch.as_tensor(value)
    v = v.to(torch.float64) if v.dtype not in (torch.int64,) and v.device.type != "mps" else v
    stats[name] = stats[name] + v if name in stats else v


class Mean:
    """The mean of a value over items: ``<name>.sum`` and ``<name>.count`` (e.g. a loss weighted by items)."""

    def __init__(self, name: str):
        self.name = name

    def update(self, stats: Stats, value, count=1) -> Stats:
        """Add ``value`` (a batch's mean over ``count`` items, or a tensor of per-item values with
        ``count=None``) to ``stats``; returns ``stats``."""
        if count is None:
            value = torch.as_tensor(value).detach()
            value, count = value.double().sum(), value.numel()
        else:
            value = (value.detach().double() if torch.is_tensor(value) else float(value)) * count
        _add(stats, f"{self.name}.sum", value)
        _add(stats, f"{self.name}.count", float(count))
        return stats

    def compute(self, stats: Stats) -> dict[str, float]:
        s, n = stats.get(f"{self.name}.sum"), stats.get(f"{self.name}.count")
        if s is None or n is None:
            return {}
        return {self.name: float(s) / float(n) if float(n) else math.nan}


class Histogram:
    """A summed histogram ``<name>`` (e.g. codebook usage); ``metrics(hist) -> dict`` turns the total into
    values."""

    def __init__(self, name: str, metrics: Callable[[torch.Tensor], dict]):
        self.name, self.metrics = name, metrics

    def update(self, stats: Stats, hist: torch.Tensor) -> Stats:
        _add(stats, self.name, hist.detach().double())
        return stats

    def compute(self, stats: Stats) -> dict[str, float]:
        h = stats.get(self.name)
        return {} if h is None else self.metrics(h.double().cpu())


def mean_metrics(stats: Stats) -> dict[str, float]:
    """Every ``<name>.sum`` / ``<name>.count`` pair of ``stats`` as ``name``: the base task's default metrics."""
    out = {}
    for key in stats:
        if key.endswith(".sum") and f"{key[:-4]}.count" in stats:
            out.update(Mean(key[:-4]).compute(stats))
    return out


def batch_count(batch) -> int:
    """Items in a collated batch (packed events: ``offsets`` has one more entry than samples)."""
    offsets = getattr(batch, "offsets", None)  # an EventBatch
    if torch.is_tensor(offsets):
        return int(offsets.numel()) - 1
    if isinstance(batch, dict):
        if "offsets" in batch:
            return int(batch["offsets"].numel()) - 1
        if "key" in batch:
            return len(batch["key"])
        for v in batch.values():
            if torch.is_tensor(v) and v.dim():
                return int(v.shape[0])
    raise ValueError("batch_count: cannot tell the number of items of this batch")


def accumulate(total: Stats, stats: Stats) -> Stats:
    """Add one batch's statistics into ``total`` (in place; float64 sums, int64 counts kept exact)."""
    for name, v in (stats or {}).items():
        _add(total, name, v)
    return total


def all_reduce_stats(total: Stats, fabric, world_size: int) -> Stats:
    """The totals summed over ranks (every rank gets them). Rank 0 names the statistics and their shapes (it
    has the most validation batches: the sampler is sequential and unpadded); a rank without them adds zeros."""
    if world_size <= 1:
        return {k: v.cpu() for k, v in total.items()}
    spec = sorted((k, tuple(v.shape)) for k, v in total.items())
    spec = fabric.broadcast(spec, src=0)
    dev = fabric.device
    dtype = torch.float32 if dev.type == "mps" else torch.float64
    parts = [total[k].to(dev, dtype).reshape(-1) if k in total else torch.zeros(math.prod(s), dtype=dtype, device=dev)
             for k, s in spec]
    if not parts:
        return {}
    vec = fabric.all_reduce(torch.cat(parts), reduce_op="sum").cpu()
    out, i = {}, 0
    for k, s in spec:
        n = math.prod(s)
        out[k] = vec[i:i + n].reshape(s)
        i += n
    return out
