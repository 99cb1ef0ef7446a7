"""The task base: what a training method (ECDDP, MEM, finetuning) gives the shared trainer.

The trainer owns everything generic (devices and precision through Lightning Fabric, the optimizer and
schedules, accumulation, clipping, checkpoints and exact resume, logging, the data loader and sampler,
the reduction of validation statistics); a task owns the model, the data, one step's loss and one validation
batch's statistics. Configs are plain nested dicts (from YAML). A new method subclasses :class:`Task` and
overrides what differs from the defaults (at least ``build_model``, ``build_dataset``, ``training_step``).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from .config import ConfigError, check_option_keys, merge
from .metrics import mean_metrics
from .optim import default_param_groups
from .sampler import mix_seed

__all__ = ["Task", "StepState", "step_generator", "keys_generator", "key_seed"]


@dataclasses.dataclass
class StepState(Mapping):
    """What a step knows: progress, this rank, and the scheduled scalars of the step (``lr``, ``weight_decay``,
    task scalars such as ``ema_momentum``). Read as attributes or as a mapping (``state["teacher_temp"]``,
    ``state.get("rank", 0)``; scalars by name); :meth:`replace` gives a changed copy."""

    step: int = 0                      # optimizer steps done
    epoch: int = 0
    device: Any = "cpu"
    rank: int = 0
    world_size: int = 1
    global_batch: int = 1
    steps_per_epoch: int = 1
    total_steps: int = 1
    accumulate: int = 1
    micro_step: int = 0                # index of the micro-batch within the step (gradient accumulation)
    scalars: dict = dataclasses.field(default_factory=dict)

    def _names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if f.name != "scalars"] + list(self.scalars)

    def __getitem__(self, key: str):
        if key != "scalars" and key in self.__dataclass_fields__:
            return getattr(self, key)
        return self.scalars[key]

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def replace(self, **changes) -> "StepState":
        fields = {k: v for k, v in changes.items() if k in self.__dataclass_fields__}
        scalars = {**self.scalars, **{k: v for k, v in changes.items() if k not in self.__dataclass_fields__}}
        return dataclasses.replace(self, **fields, scalars=scalars)


def step_generator(seed: int, salt: int, state: Mapping, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by ``(seed, salt, step, micro_step, rank)``: a step's random draws (augmentation,
    crops, masks) repeat exactly on resume and differ between ranks and micro-batches. A CPU generator gives the
    same draws on every device."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(mix_seed(int(seed), salt, int(state["step"]), int(state.get("micro_step", 0)),
                           int(state.get("rank", 0))))
    return g


def key_seed(batch: Mapping) -> int:
    """A seed from a batch's sample keys (``batch["key"]``; stable across processes and passes, unlike ``hash``)."""
    return zlib.crc32("\x00".join(batch["key"]).encode())


def keys_generator(seed: int, salt: int, batch: Mapping, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by ``(seed, salt, the batch's sample keys)``: validation draws (a random window) that are
    the same in every pass, whatever the batching of the other samples."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(mix_seed(int(seed), salt, key_seed(batch)))
    return g


class Task:
    """One training method; every method but ``build_model``, ``build_dataset`` and ``training_step`` has a
    working default. All receive the full config dict ``cfg`` (task options under ``cfg["task"]``).

    Class attributes: ``name``; ``config_keys``: the keys the task reads in the trainer's sections, with their
    types as in :data:`evforge.trainer.config.TYPES` (``{"data": {"path": "str", ...}, "schedules":
    {"ema_momentum": "any"}}``; the trainer refuses every other key there, and a task without a ``schedules``
    entry accepts any schedule name); ``option_defaults``: every ``cfg["task"]`` option with its default
    (:meth:`options` merges and checks them), ``open_options``: free-form option subtrees (e.g.
    ``("task.model.kwargs",)``); ``default_metric``: the validation metric checkpoint selection maximises.
    """

    name: str = ""
    config_keys: dict = {}
    option_defaults: dict = {}
    open_options: tuple = ()
    default_metric: str = "loss"
    cfg: dict = {}

    # ----------------------------------------------------------------------------------------------- options
    def options(self, cfg: dict | None = None) -> dict:
        """``cfg["task"]`` (default: the config of :meth:`build_model`) over :attr:`option_defaults`; unknown
        keys are errors with a did-you-mean, then :meth:`check_options` checks the values."""
        given = (self.cfg if cfg is None else cfg).get("task", {}) or {}
        check_option_keys(given, self.option_defaults, "task", self.open_options)
        opts = merge(self.option_defaults, given)
        self.check_options(opts)
        return opts

    def check_options(self, opts: dict) -> None:
        """Check option values (raise :class:`~evforge.trainer.config.ConfigError`); default: nothing."""

    @staticmethod
    def require_choice(opts: dict, key: str, allowed) -> None:
        """``opts[key]`` (dotted for nested keys) must be one of ``allowed``."""
        v = opts
        for part in key.split("."):
            v = v[part]
        if v not in allowed:
            raise ConfigError(f"task.{key}: expected one of {tuple(allowed)}, got {v!r}")

    # --------------------------------------------------------------------------------------- model and data
    def build_model(self, cfg: dict) -> nn.Module:
        """The module whose parameters are optimised (an EMA teacher may live inside it, excluded from the
        optimizer by :meth:`param_groups`)."""
        raise NotImplementedError(f"{type(self).__name__}.build_model")

    def build_dataset(self, cfg: dict, split: str) -> Dataset | None:
        """The dataset of a split (``"train"``, ``"val"``; None: no validation); items are collated by
        :meth:`collate`."""
        raise NotImplementedError(f"{type(self).__name__}.build_dataset")

    def collate(self, items: list) -> Any:
        """Batch items on the CPU; the trainer moves tensors to the device. Default: torch's default collate."""
        return default_collate(items)

    def param_groups(self, model: nn.Module, cfg: dict) -> list[dict]:
        """Optimizer parameter groups: dicts with ``params`` and optional ``lr_scale``, ``weight_decay`` (``0``
        for biases and norms), ``name``. Default: ``cfg["optim"]``'s weight decay, ``lr_scales``, ``no_decay``."""
        o = cfg["optim"]
        return default_param_groups(model, o["weight_decay"], o.get("lr_scales"), o.get("no_decay", ()))

    # ------------------------------------------------------------------------------------------------ steps
    def training_step(self, model: nn.Module, batch: Any, state: StepState) -> tuple[torch.Tensor, dict]:
        """Loss (scalar tensor) and logs (floats or scalar tensors) of one micro-batch. ``model`` is the
        Fabric-wrapped module: call ``model(...)`` so that DDP synchronises gradients and autocast applies."""
        raise NotImplementedError(f"{type(self).__name__}.training_step")

    def before_gradient_clip(self, model: nn.Module, state: StepState) -> None:
        """After the backward pass(es), before gradient clipping (e.g. ECDDP's public order, which drops the
        prototype gradients before the norm is taken). ``model`` is the plain module."""

    def before_optimizer_step(self, model: nn.Module, state: StepState) -> None:
        """After gradient clipping, before each optimizer step (e.g. zeroing the gradients of prototype layers
        during the first epoch). ``model`` is the plain module."""

    def after_optimizer_step(self, model: nn.Module, state: StepState) -> None:
        """After each optimizer step (EMA teacher update, prototype freezing, ...); ``state.step`` counts it."""

    def step_generator(self, state: Mapping, salt: int, device: torch.device | str = "cpu") -> torch.Generator:
        """:func:`step_generator` with the run's ``seed``."""
        return step_generator(int(self.cfg.get("seed", 0)), salt, state, device)

    # ------------------------------------------------------------------------------------------- validation
    def validation_step(self, model: nn.Module, batch: Any, state: StepState) -> dict:
        """Additive statistics of one validation batch: a dict of tensors (sums, counts, histograms, confusion
        matrices) that the trainer sums over batches and ranks before :meth:`validation_metrics`
        (:mod:`evforge.trainer.metrics`). ``model`` is the plain module in eval mode. Default: none."""
        return {}

    def validation_metrics(self, stats: dict) -> dict[str, float]:
        """The metrics of the summed statistics (called once per validation pass, on every rank). Default:
        each ``<name>.sum`` / ``<name>.count`` pair as the mean ``name``."""
        return mean_metrics(stats)

    # ---------------------------------------------------------------------------------- state and evaluation
    def state_dict(self) -> dict:
        """State outside the model, checkpointed with it (e.g. the backbone spec evaluation rebuilds from)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output."""

    def backbone_tensors(self, state: dict, cfg: dict, which: str, with_neck: bool) -> tuple[dict, dict]:
        """A pretraining method's backbone file (:mod:`evforge.models.backbone_file`): tensors under timm's keys
        and metadata, from a checkpoint's model ``state`` and config (``evforge export-backbone``). Default:
        the method has no backbone to export."""
        raise NotImplementedError(f"task {self.name!r} has no backbone to export")

    def test_split(self, cfg: dict) -> str:
        """The split :func:`evforge.finetune.evaluate.evaluate` reports on."""
        return (cfg.get("data") or {}).get("test_split") or "test"

    def write_reports(self, out: dict, out_dir, *, split: str | None = None) -> list:
        """Task-specific report files of an evaluation (default: none)."""
        return []
