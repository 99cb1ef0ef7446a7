"""Fabric arguments from ``cfg["trainer"]``, filling ``devices``/``num_nodes`` from torchrun or SLURM when "auto".

Fabric detects torchrun (TorchElastic) and SLURM (``srun``) itself but insists that ``devices`` and
``num_nodes`` match what the launcher started; reading them from the environment lets one config serve a
laptop, ``torchrun --nproc_per_node 4`` and ``srun --ntasks-per-node 8 --nodes 4`` unchanged.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

from .config import ConfigError

__all__ = ["PRECISIONS", "normalize_precision", "fabric_kwargs"]

PRECISIONS = {
    "32": "32-true", "fp32": "32-true", "32-true": "32-true", "float32": "32-true",
    "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed", "bfloat16": "bf16-mixed",
    "16": "16-mixed", "fp16": "16-mixed", "16-mixed": "16-mixed", "float16": "16-mixed",
    "bf16-true": "bf16-true", "16-true": "16-true", "64": "64-true", "64-true": "64-true",
}


def normalize_precision(p) -> str:
    key = str(p).lower()
    if key not in PRECISIONS:
        raise ConfigError(f"trainer.precision: unknown precision {p!r} (use 32-true, bf16-mixed or 16-mixed)")
    return PRECISIONS[key]


def _slurm_used(env: Mapping[str, str]) -> bool:
    """Launched by srun (as Fabric's SLURMEnvironment.detect, minus interactive jobs)."""
    return "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def _first_int(text: str) -> int:
    m = re.match(r"\d+", text)  # SLURM_NTASKS_PER_NODE may read "4(x2)"
    if not m:
        raise ConfigError(f"cannot read a task count from {text!r}")
    return int(m.group())


def fabric_kwargs(tcfg: dict, env: Mapping[str, str] | None = None) -> dict:
    """``Fabric(**fabric_kwargs(cfg["trainer"]))``: accelerator, strategy, devices, num_nodes, precision."""
    env = os.environ if env is None else env
    devices, num_nodes = tcfg.get("devices", "auto"), tcfg.get("num_nodes", "auto")
    if "LOCAL_WORLD_SIZE" in env and "WORLD_SIZE" in env:  # torchrun
        local, world = int(env["LOCAL_WORLD_SIZE"]), int(env["WORLD_SIZE"])
        devices = local if devices == "auto" else devices
        num_nodes = max(world // local, 1) if num_nodes == "auto" else num_nodes
    elif _slurm_used(env):
        if devices == "auto" and "SLURM_NTASKS_PER_NODE" in env:
            devices = _first_int(env["SLURM_NTASKS_PER_NODE"])
        if num_nodes == "auto" and "SLURM_NNODES" in env:
            num_nodes = int(env["SLURM_NNODES"])
    if num_nodes == "auto":
        num_nodes = 1
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ConfigError(f"trainer.num_nodes: expected a positive integer or auto, got {num_nodes!r}")
    return {"accelerator": tcfg.get("accelerator", "auto"), "strategy": tcfg.get("strategy", "auto"),
            "devices": devices, "num_nodes": num_nodes,
            "precision": normalize_precision(tcfg.get("precision", "32-true"))}
