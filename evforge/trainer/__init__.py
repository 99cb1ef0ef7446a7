"""The shared trainer (Lightning Fabric): configs, schedules, parameter groups, checkpoints, logs, the loop.

``Trainer`` is imported lazily (it pulls in Lightning Fabric); the rest is light.
"""

from __future__ import annotations

from .checkpoint import CheckpointManager, load_checkpoint, save_checkpoint
from .config import DEFAULTS, ConfigError, config_hash, load_config, save_config
from .optim import apply_schedules, build_optimizer, default_param_groups
from .schedules import Schedule, Schedules, make_schedule
from .task import StepState, Task, step_generator

__all__ = ["Trainer", "Task", "StepState", "step_generator", "ConfigError", "DEFAULTS", "load_config", "save_config",
           "config_hash", "Schedule",
           "Schedules", "make_schedule", "default_param_groups", "build_optimizer", "apply_schedules",
           "save_checkpoint", "load_checkpoint", "CheckpointManager"]


def __getattr__(name):
    if name == "Trainer":
        from .trainer import Trainer

        return Trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
