"""The machine a benchmark runs on (CPU, cores, memory, torch threads, GPU, load, commit) and peak-memory probes.

Machine facts only: timing, stats, result files and options are in :mod:`harness`."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import platform
import re
import resource
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


def machine_lines(info: dict) -> list[str]:
    """The machine as Markdown bullet lines (also printed at the start of a run)."""
    gpu = info.get("gpu")
    libs = [f"{name.replace('_', '-')} {info[name]}" for name in ("timm", "lightning_fabric") if info.get(name)]
    out = [f"- CPU: {info['cpu_model']}, {info['physical_cores'] or '?'} physical cores, "
           f"{info['logical_cpus']} logical CPUs ({info['usable_cpus']} usable), {info['memory_gib']} GiB RAM",
           f"- torch {info['torch']} ({info['torch_threads']} threads), "
           + "".join(f"{lib}, " for lib in libs)
           + f"numpy {info['numpy']}, Python {info['python']}, {info['platform']}"]
    if gpu:
        out.append(f"- GPU: {gpu['name']} ({gpu['memory_gib']} GiB, sm {gpu['capability']}), CUDA {info['cuda']}")
    else:
        out.append("- GPU: none")
    if info.get("load_avg_at_start"):
        out.append(f"- load average at start: {info['load_avg_at_start']}")
    if info.get("evforge_commit"):
        out.append(f"- evforge commit: {info['evforge_commit']}")
    return out


def machine_tag(device: str, info: dict) -> str:
    """``cuda-<gpu>`` or ``cpu-<model>-<N>cpu``: the suffix of result file names."""
    if device == "cuda":
        return "cuda-" + slug(info["gpu"]["name"])
    return f"cpu-{slug(info['cpu_model'])}-{info['usable_cpus']}cpu"


def _rss_kib(field_name: str) -> int | None:
    try:
        m = re.search(rf"{field_name}:\s+(\d+)", Path("/proc/self/status").read_text())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS (glibc), so that the next block's RSS growth shows its memory."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


class MemoryProbe:
    """Peak memory over a block, as a delta in MiB from its start.

    CPU: peak RSS. Freed heap pages are returned first (glibc malloc_trim) and the kernel's peak-RSS mark is
    reset (/proc/self/clear_refs) where Linux allows it; otherwise getrusage's process-lifetime peak is used,
    which undercounts blocks smaller than an earlier one. CUDA: torch.cuda.max_memory_allocated.
    """

    hwm_resettable: bool | None = None

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            if MemoryProbe.hwm_resettable is not False:
                try:
                    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
                    MemoryProbe.hwm_resettable = True
                except OSError:
                    MemoryProbe.hwm_resettable = False
            self.before = _rss_kib("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self.before) / 2**20
        else:
            peak = (_rss_kib("VmHWM") if MemoryProbe.hwm_resettable else None) \
                or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
            self.peak_mib = max(0, peak - self.before) / 1024
        return False
