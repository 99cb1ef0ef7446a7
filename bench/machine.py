"""The machine a benchmark ran on, for result files: CPU, cores, memory, torch threads, GPU, load, commit."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def slug(text: str) -> str:
    """A file-name-safe tag from a CPU or GPU name ("AMD EPYC 7B13" -> "amd-epyc-7b13")."""
    text = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$", " ", text, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cpuinfo() -> dict:
    """CPU model, physical cores (from /proc/cpuinfo), logical and usable CPUs, memory."""
    model, cores = None, set()
    phys = core = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = (s.strip() for s in line.partition(":"))
            if key == "model name" and model is None:
                model = val
            elif key == "physical id":
                phys = val
            elif key == "core id":
                core = val
            elif not key and core is not None:
                cores.add((phys, core))
                phys = core = None
        if core is not None:
            cores.add((phys, core))
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    mem_gib = None
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem_gib = round(kb / 2**20, 1)
    except (OSError, AttributeError):
        pass
    return {"cpu_model": model or platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
            "usable_cpus": usable, "physical_cores": len(cores) or None, "memory_gib": mem_gib}


def git_commit() -> str | None:
    """The checked-out commit, read from .git without running git (None outside a plain checkout)."""
    try:
        git = REPO / ".git"
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(None, 1)[1]
        if (git / ref).exists():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except (OSError, IndexError):
        pass
    return None


def machine_info(threads: int | None = None, **extra) -> dict:
    """Everything a result file records about the machine; ``extra`` adds script-specific versions."""
    info = {**cpuinfo(), "torch": torch.__version__, "torch_threads": threads or torch.get_num_threads(),
            "numpy": np.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cuda": None, "gpu": None, "evforge_commit": git_commit(), **extra}
    try:
        info["load_avg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if torch.cuda.is_available():
        prop = torch.cuda.get_device_properties(0)
        info["cuda"] = torch.version.cuda
        info["gpu"] = {"name": prop.name, "memory_gib": round(prop.total_memory / 2**30, 1),
                       "capability": f"{prop.major}.{prop.minor}", "count": torch.cuda.device_count()}
    return info


def machine_tag(device: str, info: dict) -> str:
    """``cuda-<gpu>`` or ``cpu-<model>-<N>cpu``: the suffix of result file names."""
    if device == "cuda":
        return "cuda-" + slug(info["gpu"]["name"])
    return f"cpu-{slug(info['cpu_model'])}-{info['usable_cpus']}cpu"
