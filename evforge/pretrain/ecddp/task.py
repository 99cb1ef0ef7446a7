"""ECDDP as a :class:`~evforge.trainer.task.Task`: stream windows -> voxel grids -> crops -> student/teacher.

Data: an evforge stream dataset (``evforge convert tartanair``); each item is ECDDP's sample, the events
between two consecutive source frames. On the device: a ``bins``-bin voxel grid (bilinear in time, OFF
events weighted -1; ``legacy_off_weight_zero`` reproduces the public code, where OFF events weigh 0), a
random ``input_size`` square crop (ECDDP: 320 of 480x640), then :class:`ECDDPModel`'s multi-crop and loss.
Task options live under ``cfg["task"]``; the model's under ``cfg["task"]["model"]`` (:class:`ECDDPConfig`).
"""

from __future__ import annotations

import torch
from torch import nn

from ...dataset_builder.dataset import EventDataset, collate_events
from ...representations import voxel_grid
from ...trainer.sampler import mix_seed
from .model import ECDDPConfig, ECDDPModel


class ECDDPTask:
    """Pretraining with ECDDP on event-stream windows."""

    name = "ecddp"

    def __init__(self):
        self.sensor_size: tuple[int, int] | None = None
        self.cfg: dict = {}

    def _opts(self, cfg: dict) -> dict:
        t = dict(cfg.get("task", {}))
        t.setdefault("input_size", 320)
        t.setdefault("legacy_off_weight_zero", False)
        t.setdefault("freeze_last_layer_epochs", 1)
        return t

    def build_model(self, cfg: dict) -> nn.Module:
        self.cfg = cfg
        return ECDDPModel(ECDDPConfig.from_dict(self._opts(cfg).get("model", {})))

    def build_dataset(self, cfg: dict, split: str):
        data = cfg["data"]
        ds = EventDataset(data["path"], split, window=data.get("window", 1), min_events=data.get("min_events", 1))
        if ds.kind != "streams":
            raise ValueError(f"ECDDP pretrains on event streams; {data['path']} holds {ds.kind}")
        self.sensor_size = tuple(ds.sensor_size)
        return ds

    def collate(self, items: list):
        return collate_events(items)

    def param_groups(self, model: nn.Module, cfg: dict) -> list[dict]:
        return [g for g in model.param_groups() if g["params"]]

    def inputs(self, model: ECDDPModel, batch: dict, cfg: dict, generator: torch.Generator) -> torch.Tensor:
        """Voxel grids of the batch, randomly cropped to ``input_size`` (whole sensor if smaller)."""
        opts = self._opts(cfg)
        W, H = self.sensor_size
        vox = voxel_grid(batch, bins=model.cfg.in_chans, height=H, width=W,
                         off_weight=0.0 if opts["legacy_off_weight_zero"] else -1.0)
        size = min(int(opts["input_size"]), H, W)
        B = vox.shape[0]
        x0 = torch.randint(0, W - size + 1, (B,), generator=generator, device=generator.device)
        y0 = torch.randint(0, H - size + 1, (B,), generator=generator, device=generator.device)
        # an integer window: gather it exactly (no interpolation)
        r = torch.arange(size, device=vox.device)
        rows = (y0.to(vox.device)[:, None] + r)[:, None, :, None]
        cols = (x0.to(vox.device)[:, None] + r)[:, None, None, :]
        b = torch.arange(B, device=vox.device)[:, None, None, None]
        c = torch.arange(vox.shape[1], device=vox.device)[None, :, None, None]
        return vox[b, c, rows, cols]

    def _generator(self, cfg: dict, state: dict, salt: int) -> torch.Generator:
        device = torch.device(state["device"])
        g = torch.Generator(device=device)
        g.manual_seed(mix_seed(int(cfg.get("seed", 0)), salt, state["step"], state.get("micro_step", 0),
                               state.get("rank", 0)))
        return g

    def training_step(self, model: nn.Module, batch, state: dict):
        cfg = self.cfg
        g = self._generator(cfg, state, salt=1)
        core = getattr(model, "module", model)
        vox = self.inputs(core, batch, cfg, g)
        loss, parts = model(vox, teacher_temp=float(state["teacher_temp"]), generator=g)
        return loss, {k: v for k, v in parts.items() if k in ("img_local", "img_global", "context", "patch")}

    def before_optimizer_step(self, model: nn.Module, state: dict) -> None:
        """Freeze the prototype layers during the first epoch(s), as DINO/ECDDP do."""
        if state["epoch"] < self._opts(self.cfg)["freeze_last_layer_epochs"]:
            model.cancel_last_layer_gradients()

    def after_optimizer_step(self, model: nn.Module, state: dict) -> None:
        model.ema_update(float(state["ema_momentum"]))

    @torch.no_grad()
    def validation_step(self, model: nn.Module, batch, state: dict) -> dict:
        cfg = self.cfg
        g = self._generator(cfg, {**state, "step": 0, "micro_step": 0}, salt=2)  # same crops every time
        core = getattr(model, "module", model)
        loss, parts = model(self.inputs(core, batch, cfg, g), teacher_temp=float(state["teacher_temp"]), generator=g)
        return {"loss": float(loss), **{k: float(parts[k]) for k in ("img_local", "img_global", "context", "patch")}}
