"""numba plumbing shared by the CPU kernels: the import (optional), the decorators and the index type.

Every kernel is a module-level function compiled with ``cache=True``, so its machine code is cached next to
its module when that folder is writable.
"""

from __future__ import annotations

import math
import os

import numpy as np

try:  # numba is a dependency; the torch path still works without it
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised only where numba is not installed
    numba = njit = None
    prange = range

F32 = np.float32
U = np.uint64  # array index: numba adds negative-index wrap-around to every signed index, not to unsigned ones
TWO_PI = np.float32(2 * math.pi)  # torch multiplies a float32 tensor by a Python float in float32
AVAILABLE = njit is not None and os.environ.get("EVFORGE_KERNELS", "auto") != "torch"


def jit(fn):
    """A serial kernel: no GIL, numpy's float semantics (inf / nan, no exceptions on division)."""
    return njit(cache=True, nogil=True, error_model="numpy")(fn) if njit is not None else fn


def pjit(fn):
    """A kernel whose ``prange`` loops run on numba's threads."""
    return njit(cache=True, nogil=True, error_model="numpy", parallel=True)(fn) if njit is not None else fn
