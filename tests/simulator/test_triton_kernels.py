"""The Triton kernels give exactly what the CPU path gives: lin-log, whole steps, an engine run.

On the CPU they run through Triton's interpreter (numpy on CPU tensors, switched on by ``TRITON_INTERPRET=1``
before Triton is imported), so each check runs in a fresh Python with it set; the interpreter is slow, so the
frames are small. With a GPU the same checks also run compiled on CUDA (``-m cuda``). The checks themselves
are in ``triton_checks.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evforge.simulator import cpu_kernels

HERE = Path(__file__).resolve().parent

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(not cpu_kernels.AVAILABLE, reason="numba kernels not available")]


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


needs_triton = pytest.mark.skipif(not _has_triton(), reason="Triton is not installed")


def interpret(*checks: str) -> None:
    """Run ``triton_checks.<check>("cpu")`` for each check in a fresh Python under Triton's interpreter."""
    code = "; ".join(["import sys", f"sys.path.insert(0, {str(HERE)!r})", "import triton_checks as c",
                      *(f"c.{name}('cpu')" for name in checks)])
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]


@needs_triton
def test_lin_log_and_steps_equal_the_cpu_kernels_through_the_interpreter():
    """lin-log, ideal steps with an idle slot, and noisy steps with every part of the model."""
    interpret("check_lin_log", "check_ideal", "check_noisy")


@needs_triton
def test_kernels_compile_for_cuda_without_fused_multiply_adds():
    """Every kernel variant compiles for sm_80 and sm_90 (no GPU needed), with IEEE float32 division and no
    FMA contraction (the compiled GPU code rounds as the CPU does)."""
    sys.path.insert(0, str(HERE))
    import triton_checks

    triton_checks.check_compiles()


@needs_triton
@pytest.mark.slow
def test_other_presets_and_an_engine_run_through_the_interpreter():
    interpret("check_presets", "check_engine")


@needs_triton
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("check", ["check_lin_log", "check_ideal", "check_noisy", "check_presets", "check_engine"])
def test_compiled_kernels_on_cuda_equal_the_cpu_kernels(check):
    sys.path.insert(0, str(HERE))
    import triton_checks

    getattr(triton_checks, check)("cuda")
