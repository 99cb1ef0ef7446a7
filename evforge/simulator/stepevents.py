"""The events of one simulator step for a whole batch (:class:`StepEvents`) and the sorting they need."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import cpu_kernels


@dataclass
class StepEvents:
    """Events of one step for the whole batch, sorted by (batch index, t): ``b`` says which sequence."""

    b: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor  # int64 microseconds
    p: torch.Tensor  # int8, +1 / -1

    def __len__(self) -> int:
        return int(self.t.shape[0])

    def to_host(self) -> tuple[np.ndarray, ...]:
        """Columns (b, x, y, t, p) as numpy arrays (int64, p int8): views on the CPU, elsewhere one
        device->host copy of 15 bytes per event (b, x and y travel as int16: the copy is what limits a GPU)."""
        if self.t.device.type == "cpu":
            return tuple(getattr(self, f).numpy() for f in "bxytp")
        return self._packed_to_host()

    def _packed_to_host(self) -> tuple[np.ndarray, ...]:
        """to_host through one packed buffer: t (8 bytes), b, x, y (int16) and p (1 byte) per event."""
        n = len(self)
        bxy = torch.stack([self.b, self.x, self.y], 1).to(torch.int16)
        buf = torch.cat([self.t.contiguous().view(torch.uint8), bxy.view(-1).view(torch.uint8),
                         self.p.contiguous().view(torch.uint8)]).cpu().numpy()
        t = buf[: 8 * n].view(np.int64)
        b, x, y = (c.astype(np.int64) for c in buf[8 * n : 14 * n].view(np.int16).reshape(n, 3).T)
        return b, x, y, t, buf[14 * n :].view(np.int8)

    def sorted(self) -> "StepEvents":
        """Sorted by (b, t); stable, so equal times keep generation order (pixel order y, x)."""
        if len(self) == 0:
            return self
        if cpu_kernels.AVAILABLE and self.t.device.type == "cpu":
            cols = (getattr(self, f).contiguous().numpy() for f in "bxytp")
            return StepEvents(*(torch.from_numpy(c) for c in cpu_kernels.sort_events(*cols)))
        t_rel = self.t - self.t.min()
        order = stable_argsort(self.b * (int(t_rel.max()) + 1) + t_rel)
        return StepEvents(*(getattr(self, f).index_select(0, order) for f in "bxytp"))

    @staticmethod
    def cat(items: list["StepEvents"]) -> "StepEvents":
        """Concatenate steps in time order; a stable sort by ``b`` keeps each sequence time-ordered."""
        b = torch.cat([e.b for e in items])
        order = torch.sort(b, stable=True).indices
        return StepEvents(b[order], *(torch.cat([getattr(e, f) for e in items])[order] for f in "xytp"))


def stable_argsort(key: torch.Tensor) -> torch.Tensor:
    """Stable argsort of non-negative int64 keys.

    On CPU an LSD radix sort over 16-bit digits with numpy (its stable sort of uint16 is a radix sort,
    ~10x faster than a comparison sort for the few-thousand-to-million keys of a step); elsewhere torch.sort.
    """
    if key.device.type != "cpu" or key.numel() < 2:
        return torch.sort(key, stable=True).indices
    k = key.numpy()
    top = int(k.max())
    order = None
    shift = 0
    while True:
        digit = ((k >> shift) & 0xFFFF).astype(np.uint16)
        if order is None:
            order = np.argsort(digit, kind="stable")
        else:
            order = order[np.argsort(digit[order], kind="stable")]
        shift += 16
        if top >> shift == 0:
            break
    return torch.from_numpy(order.astype(np.int64))


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.view(-1)[index]`` via index_select, several times faster than advanced indexing on CPU."""
    return x.reshape(-1).index_select(0, index)


def empty_events(device) -> StepEvents:
    e = torch.zeros(0, dtype=torch.int64, device=device)
    return StepEvents(e, e, e, e, e.to(torch.int8))
