"""ECDDP as a :class:`~evforge.trainer.task.Task`: stream windows -> voxel grids -> crops -> student/teacher.

Data: an evforge stream dataset (``evforge convert tartanair``); each item is ECDDP's sample, the events
between two consecutive source frames. On the device: a random ``input_size`` square crop (ECDDP: 320 of
480x640) and a ``bins``-bin voxel grid of it (bilinear in time), then :class:`ECDDPModel`'s multi-crop and loss.
Task options live under ``cfg["task"]`` (:data:`TASK_DEFAULTS`, typos are errors); the model's under
``cfg["task"]["model"]`` (:class:`ECDDPConfig`). Options that reproduce the public code
(data/ETartanAir_dataset.py, data/event_utils.py, trainer/pretrain_trainer.py) instead of evforge's defaults:

* ``legacy_off_weight_zero``: OFF events weigh 0 in the voxels (v2e's p in {0, 1} was never remapped);
* ``time_norm: crop`` + ``min_crop_events: 10``: time normalised over the events inside the crop (not the whole
  window), and a crop with fewer than 10 events is all zeros;
* ``input_crop: reference``: the crop corner drawn with ``np.random.randint(0, 480 - 320)`` (the last offset
  is never drawn);
* ``ema_timing: before_forward``: the teacher is updated at the start of each step with that step's momentum
  (public ``PretrainModel.forward``), not after the optimizer step;
* ``freeze_last_layer_before_clip``: the prototype gradients are dropped *before* the gradient norm is clipped
  (Lightning clips inside ``optimizer.step()``), so they do not count in the norm; DINO's order is the reverse.
"""

from __future__ import annotations

import torch
from torch import nn

from evforge.data.augment import crop_events, crop_windows
from evforge.data.collate import collate_events
from evforge.data.dataset import EventDataset
from evforge.data.representations import voxel_grid

from ...trainer.metrics import Mean, batch_count
from ...trainer.task import Task
from .export import export_tensors
from .model import ECDDPConfig, ECDDPModel

TASK_DEFAULTS: dict = {
    "name": "ecddp",
    "input_size": 320,                   # random square crop of the sensor's voxel grid before the multi-crop
    "legacy_off_weight_zero": False,     # public: true
    "time_norm": "window",               # "window" (all events of the sample) or "crop" (public)
    "min_crop_events": 0,                # crops with fewer events are zeroed (public: 10)
    "input_crop": "uniform",             # "uniform" (every offset) or "reference" (the last offset never drawn)
    "ema_timing": "after_step",          # "after_step" or "before_forward" (public)
    "freeze_last_layer_before_clip": False,  # public: true
    "freeze_last_layer_epochs": 1,
    "model": {},
}
OPEN_KEYS = ("task.model",)  # checked by ECDDPConfig itself
CHOICES = {"time_norm": ("window", "crop"), "input_crop": ("uniform", "reference"),
           "ema_timing": ("after_step", "before_forward")}


def task_options(cfg: dict) -> dict:
    """``cfg["task"]`` over :data:`TASK_DEFAULTS`; unknown keys and values outside :data:`CHOICES` are errors."""
    return ECDDPTask().options(cfg)


class ECDDPTask(Task):
    """Pretraining with ECDDP on event-stream windows."""

    name = "ecddp"
    option_defaults = TASK_DEFAULTS
    open_options = OPEN_KEYS
    config_keys = {"data": {"path": "str", "window": "int", "min_events": "int"}, "schedules": {"ema_momentum": "any", "teacher_temp": "any"}}  # noqa: E501 (read besides the trainer's keys: trainer.config.check_config)

    def __init__(self):
        self.sensor_size: tuple[int, int] | None = None
        self.cfg: dict = {}
        self.opts: dict = dict(TASK_DEFAULTS)

    def check_options(self, opts: dict) -> None:
        for key, allowed in CHOICES.items():
            self.require_choice(opts, key, allowed)

    def build_model(self, cfg: dict) -> nn.Module:
        self.cfg, self.opts = cfg, self.options(cfg)  # self.opts: the resolved options the steps read
        return ECDDPModel(ECDDPConfig.from_dict(self.opts["model"]))

    def build_dataset(self, cfg: dict, split: str):
        data = cfg["data"]
        ds = EventDataset(data["path"], split, window=data.get("window", 1), min_events=data.get("min_events", 1))
        if ds.kind != "streams":
            raise ValueError(f"ECDDP pretrains on event streams; {data['path']} holds {ds.kind}")
        self.sensor_size = tuple(ds.sensor_size)
        return ds

    def backbone_tensors(self, state: dict, cfg: dict, which: str, with_neck: bool) -> tuple[dict, dict]:
        """The student's or teacher's Swin, its stage norms and optionally the neck (:mod:`.export`)."""
        return export_tensors(state, cfg, which, with_neck)

    def collate(self, items: list):
        return collate_events(items)

    def param_groups(self, model: nn.Module, cfg: dict) -> list[dict]:
        return [g for g in model.param_groups() if g["params"]]

    def _corners(self, batch_size: int, height: int, width: int, size: int, generator: torch.Generator):
        """Per-sample crop corners (x0, y0): every offset, or the public code's ``randint(0, H - size)``."""
        last = 0 if self.opts["input_crop"] == "reference" else 1
        dev = generator.device
        x0 = torch.randint(0, max(width - size + last, 1), (batch_size,), generator=generator, device=dev)
        y0 = torch.randint(0, max(height - size + last, 1), (batch_size,), generator=generator, device=dev)
        return x0, y0

    def inputs(self, model: ECDDPModel, batch: dict, cfg: dict, generator: torch.Generator) -> torch.Tensor:
        """Voxel grids (B, bins, S, S) of a random ``input_size`` square per sample (whole sensor if smaller)."""
        opts = self.opts
        W, H = self.sensor_size
        bins = model.cfg.in_chans
        off = 0.0 if opts["legacy_off_weight_zero"] else -1.0
        size = min(int(opts["input_size"]), H, W)
        B = int(batch["offsets"].shape[0]) - 1
        x0, y0 = self._corners(B, H, W, size, generator)
        if opts["time_norm"] == "crop":  # the crop's own events set the time range (public)
            boxes = torch.stack((x0, y0, x0 + size, y0 + size), 1)
            crop = crop_events(batch, boxes)
            vox = voxel_grid(crop, bins=bins, height=size, width=size, off_weight=off)
            counts = crop["offsets"][1:] - crop["offsets"][:-1]
        else:
            vox = voxel_grid(batch, bins=bins, height=H, width=W, off_weight=off)
            vox = crop_windows(vox, torch.stack((y0, x0), 1), (size, size))  # an integer window, gathered exactly
            counts = None
        if opts["min_crop_events"] > 0:
            if counts is None:  # events inside each crop
                crop = crop_events(batch, torch.stack((x0, y0, x0 + size, y0 + size), 1))
                counts = crop["offsets"][1:] - crop["offsets"][:-1]
            few = counts.to(vox.device) < int(opts["min_crop_events"])
            vox = vox.masked_fill(few[:, None, None, None], 0.0)
        return vox

    def training_step(self, model: nn.Module, batch, state: dict):
        cfg = self.cfg
        core = getattr(model, "module", model)
        if self.opts["ema_timing"] == "before_forward" and state.get("micro_step", 0) == 0:
            core.ema_update(float(state["ema_momentum"]))  # public: update_teacher(m) opens each step
        g = self.step_generator(state, salt=1, device=state["device"])
        vox = self.inputs(core, batch, cfg, g)
        loss, parts = model(vox, teacher_temp=float(state["teacher_temp"]), generator=g)
        return loss, {k: v for k, v in parts.items() if k in ("img_local", "img_global", "context", "patch")}

    def _freeze_last_layer(self, model: nn.Module, state: dict) -> None:
        if state["epoch"] < self.opts["freeze_last_layer_epochs"]:
            model.cancel_last_layer_gradients()

    def before_gradient_clip(self, model: nn.Module, state: dict) -> None:
        """Public order: the prototype gradients are dropped before the norm is clipped."""
        if self.opts["freeze_last_layer_before_clip"]:
            self._freeze_last_layer(model, state)

    def before_optimizer_step(self, model: nn.Module, state: dict) -> None:
        """Freeze the prototype layers during the first epoch(s), after clipping, as DINO does."""
        if not self.opts["freeze_last_layer_before_clip"]:
            self._freeze_last_layer(model, state)

    def after_optimizer_step(self, model: nn.Module, state: dict) -> None:
        if self.opts["ema_timing"] == "after_step":
            model.ema_update(float(state["ema_momentum"]))

    @torch.no_grad()
    def validation_step(self, model: nn.Module, batch, state: dict) -> dict:
        cfg = self.cfg
        g = self.step_generator({**state, "step": 0, "micro_step": 0}, salt=2, device=state["device"])  # same crops
        core = getattr(model, "module", model)
        loss, parts = model(self.inputs(core, batch, cfg, g), teacher_temp=float(state["teacher_temp"]), generator=g)
        n, stats = batch_count(batch), {}
        for name, v in {"loss": loss, **{k: parts[k] for k in ("img_local", "img_global", "context", "patch")}}.items():
            Mean(name).update(stats, v, n)  # batch means weighted by items: the split's mean
        return stats
