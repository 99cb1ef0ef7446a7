"""The task protocol: what a training method (ECDDP, MEM, finetuning) gives the shared trainer.

The trainer owns everything generic (devices and precision through Lightning Fabric, the optimizer and
schedules, accumulation, clipping, checkpoints and exact resume, logging, the data loader and sampler);
a task owns the model, the data, and one step's loss. Configs are plain nested dicts (from YAML).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset


class Task(Protocol):
    """One training method. All methods receive the full config dict ``cfg`` (task options under ``cfg["task"]``).

    ``config_keys`` (a class attribute) names the keys the task reads in the trainer's sections, with their types
    as in :data:`evforge.trainer.config.TYPES`: ``{"data": {"path": "str", ...}, "optim": {...}, "schedules":
    {"ema_momentum": "any", ...}}``. The trainer refuses every other key there (typos); a task without a
    ``schedules`` entry accepts any schedule name. The task checks its own ``task`` section.
    """

    config_keys: dict

    def build_model(self, cfg: dict) -> nn.Module:
        """The module whose parameters are optimised (an EMA teacher may live inside it, excluded from
        the optimizer by :meth:`param_groups`)."""

    def build_dataset(self, cfg: dict, split: str) -> Dataset:
        """The dataset of a split (``"train"``, ``"val"``); items are collated with :meth:`collate`."""

    def collate(self, items: list) -> Any:
        """Batch items on the CPU (packing variable-length events); the trainer moves tensors to the device."""

    def param_groups(self, model: nn.Module, cfg: dict) -> list[dict]:
        """Optimizer parameter groups: dicts with ``params`` and optional ``lr_scale``, ``weight_decay``
        (``0`` for biases and norms), ``name``. The trainer multiplies scheduled lr by ``lr_scale``."""

    def training_step(self, model: nn.Module, batch: Any, state: dict) -> tuple[torch.Tensor, dict]:
        """Loss (scalar tensor) and logs (floats) for one micro-batch. ``state`` holds ``step`` (optimizer
        steps done), ``epoch``, the current scheduled scalars (``lr``, ``weight_decay`` and any task scalar
        such as ``ema_momentum`` or ``teacher_temp``) and ``device``."""

    def before_gradient_clip(self, model: nn.Module, state: dict) -> None:
        """Optional: called after the backward pass(es), before gradient clipping (e.g. ECDDP's public order,
        which drops the prototype gradients before the norm is taken). ``model`` is the plain module."""

    def before_optimizer_step(self, model: nn.Module, state: dict) -> None:
        """Optional: called after gradient clipping, before each optimizer step (e.g. zeroing the gradients
        of prototype layers during the first epoch). ``model`` is the plain module."""

    def after_optimizer_step(self, model: nn.Module, state: dict) -> None:
        """Called after each optimizer step (EMA teacher update, prototype freezing, ...)."""

    def validation_step(self, model: nn.Module, batch: Any, state: dict) -> dict:
        """Metrics (floats) for one validation batch; the trainer averages them over the split."""
