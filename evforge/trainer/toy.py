"""A tiny :class:`~evforge.trainer.task.Task`: tests and smoke runs of the trainer.

An MLP student (with LayerNorm and dropout, so RNG state matters) regresses fixed random targets from noisy
inputs (noise drawn per item from the global RNG: a random augmentation), plus an auxiliary term towards an
EMA teacher weighted by a scheduled scalar ``aux_weight``; the teacher follows ``ema_momentum``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import Dataset

from .metrics import Mean
from .task import Task

__all__ = ["ToyDataset", "ToyModel", "ToyTask", "toy_config"]


class ToyDataset(Dataset):
    """``n`` items ``{"x", "y", "index"}``: fixed random (x, y) pairs, x plus fresh noise on every read."""

    def __init__(self, n: int = 40, dim: int = 8, out: int = 2, seed: int = 0, noise: float = 0.1):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, dim, generator=g), torch.randn(n, out, generator=g)
        self.noise = noise

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i] + self.noise * torch.randn(self.x.shape[1]), "y": self.y[i], "index": i}


class ToyModel(nn.Module):
    """Student MLP and its EMA teacher (frozen); ``forward`` returns the training loss."""

    def __init__(self, dim: int = 8, hidden: int = 16, out: int = 2, dropout: float = 0.1):
        super().__init__()
        self.student = nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Dropout(dropout),
                                     nn.Linear(hidden, out))
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)

    def forward(self, x, y, aux_weight: float = 0.0):
        pred = self.student(x)
        with torch.no_grad():
            target = self.teacher(x)
        return nn.functional.mse_loss(pred, y) + aux_weight * nn.functional.mse_loss(pred, target)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)


class ToyTask(Task):
    """The toy task; options under ``cfg["task"]`` (n, n_val, dim, hidden, dropout, noise). Records seen indices."""

    name = "toy"
    # what it reads besides the trainer's keys (check_config): two scheduled scalars
    config_keys = {"schedules": {"ema_momentum": "number|dict", "aux_weight": "number|dict"}}
    option_defaults = {"name": "toy", "n": 40, "n_val": 12, "dim": 8, "hidden": 16, "dropout": 0.1, "noise": 0.1}

    def __init__(self, fail_at_step: int | None = None):
        self.seen: list[list[int]] = []
        self.fail_at_step = fail_at_step  # raise in training_step at this step: a crash between checkpoints

    def build_model(self, cfg: dict) -> nn.Module:
        self.cfg = cfg
        o = self.options(cfg)
        return ToyModel(o["dim"], o["hidden"], 2, o["dropout"])

    def build_dataset(self, cfg: dict, split: str):
        o = self.options(cfg)
        n = o["n"] if split == "train" else o["n_val"]
        return ToyDataset(n, o["dim"], 2, seed=0 if split == "train" else 1, noise=o["noise"])

    def collate(self, items: list) -> dict:
        return {"x": torch.stack([it["x"] for it in items]), "y": torch.stack([it["y"] for it in items]),
                "index": torch.tensor([it["index"] for it in items])}

    def training_step(self, model, batch, state):
        if self.fail_at_step is not None and state["step"] == self.fail_at_step:
            raise RuntimeError(f"toy crash at step {state['step']}")
        self.seen.append(batch["index"].tolist())
        loss = model(batch["x"], batch["y"], state.get("aux_weight", 0.0))
        return loss, {"x_mean": batch["x"].mean()}

    def after_optimizer_step(self, model, state) -> None:
        model.update_teacher(state.get("ema_momentum", 0.99))

    def validation_step(self, model, batch, state) -> dict:
        err = (model.student(batch["x"]) - batch["y"]).pow(2)
        return Mean("mse").update({}, err, count=None)  # the mean over every value of the split


def toy_config(**trainer) -> dict:
    """A small complete config for :class:`ToyTask` on the CPU; ``trainer`` keys override ``cfg["trainer"]``."""
    return {
        "seed": 0,
        "task": {"n": 40, "n_val": 12, "dim": 8, "hidden": 16, "dropout": 0.1, "noise": 0.1},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 12, "log_every_n_steps": 1, "grad_clip": 1.0,
                    "stop_signals": [], **trainer},
        "data": {"batch_size": 4, "num_workers": 0},
        "optim": {"name": "adamw", "lr_scales": {"student\\.0\\.": 0.5}},
        "schedules": {
            "lr": {"warmup_cosine": {"start": 0.0, "peak": 0.01, "end": 1.0e-4, "warmup_steps": 3}},
            "weight_decay": {"cosine": {"start": 0.04, "end": 0.4}},
            "ema_momentum": {"cosine": {"start": 0.9, "end": 1.0}},
            "aux_weight": {"linear": {"start": 0.0, "end": 0.5, "epochs": 1}},
        },
        "checkpoint": {"every_n_steps": None, "every_n_epochs": 1},
        "log": {"jsonl": True, "tensorboard": False, "progress": False},
    }
