"""The counter hash on Python ints: stream keys and per-sequence draws, without torch.

:mod:`evforge.simulator.rng` applies the same hash to tensors; the host-side part lives here so that
modules that only need a key or one number per sequence (the parameter presets, the CLI's parser) do not
import torch. The mixing function is Chris Wellons' ``lowbias32``.
"""

from __future__ import annotations

import zlib

M32 = 0xFFFFFFFF


def mix32(x: int) -> int:
    """lowbias32 on a Python int, every step masked to 32 bits."""
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def purpose_id(name: str) -> int:
    """A stable 32-bit id for a named random stream (e.g. ``"shot"``, ``"thres_pos"``)."""
    return zlib.crc32(name.encode())


def stream_key(seed: int, purpose: str, step: int = 0) -> tuple[int, int]:
    """Two 32-bit words identifying the stream ``(seed, purpose, step)``."""
    k = mix32(seed & M32)
    k = mix32(k ^ (seed >> 32) & M32)
    k = mix32(k ^ purpose_id(purpose))
    k1 = mix32(k ^ (step & M32))
    k2 = mix32(k1 ^ (step >> 32) & M32 ^ 0x9E3779B9)
    return k1, k2


def uniform_scalar(seed: int, purpose: str) -> float:
    """One U(0, 1) number for per-sequence choices (e.g. a shot-noise rate drawn from a range)."""
    k1, k2 = stream_key(seed, purpose)
    return ((mix32(mix32(k1) ^ k2) >> 9) + 0.5) / 8388608.0


NORMAL_TABLE_BITS = 12  # the leak jitter's normal draw: the top 12 bits of a hash index a table of quantiles


def normal_quantiles(bits: int = NORMAL_TABLE_BITS):
    """float32 N(0, 1) quantiles at ``(k + 1/2) / 2**bits`` (numpy array): a normal draw by table lookup.

    The simulator draws the leak jitter (one normal per pixel per source interval) as ``table[hash >> 20]``:
    no inverse CDF per pixel, and the same bits on every device, since the table is made once on the host.
    With 4096 levels the draws are within 3.7 standard deviations and their spacing near 0 is 6e-4, far
    below what a 10 % rate jitter can show; the variance is 0.9997.
    """
    from statistics import NormalDist

    import numpy as np  # here, so that importing this module stays cheap

    n = 1 << bits
    inv = NormalDist().inv_cdf
    return np.array([inv((k + 0.5) / n) for k in range(n)], dtype=np.float32)
