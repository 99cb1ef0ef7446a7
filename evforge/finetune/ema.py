"""Model EMA: a frozen copy whose weights follow the trained model, ``w_ema <- d * w_ema + (1 - d) * w``.

The copy is a submodule of the task's model, so its weights are in the trainer checkpoint and a resumed run
continues it exactly; the decay is a pure function of the optimizer step (no hidden counter). With
``warmup`` the decay is ``min(decay, (1 + step) / (10 + step))`` (TensorFlow's ``num_updates`` rule): early on
the average forgets quickly, so short runs and the first epochs are not dominated by the random init.
Buffers are copied, not averaged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ModelEMA"]


class ModelEMA(nn.Module):
    """An exponential moving average of ``model`` (``self.module``, always in eval mode, never trained)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        if not 0 <= float(decay) < 1:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.module.eval()
        self.decay, self.warmup = float(decay), bool(warmup)

    def decay_at(self, step: int) -> float:
        """The decay used for the update after optimizer step ``step`` (1-based: the first update has step 1)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move the average towards ``model``'s current weights (same architecture)."""
        d = self.decay_at(step)
        ema_p = [p for p in self.module.parameters()]
        cur_p = [p.detach() for p in model.parameters()]
        if len(ema_p) != len(cur_p):
            raise ValueError("the EMA and the model differ in their parameters")
        floats = [(e, c) for e, c in zip(ema_p, cur_p) if e.dtype.is_floating_point]
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [c.to(e.dtype) for e, c in floats], 1.0 - d)
        for e, c in zip(self.module.buffers(), model.buffers()):
            e.copy_(c)

    def train(self, mode: bool = True) -> "ModelEMA":
        super().train(mode)
        self.module.eval()  # the average is only ever evaluated
        return self

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
