"""Shared helpers of the trainer tests: launching multi-process (gloo) runs in a subprocess with a timeout."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120


def run_processes(cmd: list[str], cwd: Path, timeout: int = TIMEOUT) -> str:
    """Run ``cmd`` (e.g. a script whose Trainer launches 2 ranks) in its own process group; fail the test with
    the clues of its output when it fails or hangs (the whole group is killed). Returns the output."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS"):
        env.pop(k, None)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: rank 0 and the ranks it started
        out, _ = proc.communicate()
        pytest.fail(f"DDP run hung for {timeout} s:\n{out[-3000:]}")
    if proc.returncode != 0:
        clues = [line for line in out.splitlines()
                 if any(w in line for w in ("Error", "error:", "Traceback", "terminate", "what()", "Signal"))]
        pytest.fail(f"exit status {proc.returncode}; clues:\n" + "\n".join(clues[:40]) + f"\n...\n{out[-3000:]}")
    return out


@pytest.fixture
def launch():
    """:func:`run_processes` as a fixture."""
    return run_processes
