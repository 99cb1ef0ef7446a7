"""Shared assertion of the simulator tests (importable by name: pytest puts this folder on sys.path)."""

import torch


def assert_near(actual, expected, atol: float, rtol: float = 0.0):
    """Element-wise |actual - expected| <= atol + rtol |expected| (a light torch.testing.assert_close, whose
    first call imports torch.distributed and costs about a second)."""
    a, e = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert a.shape == e.shape, (a.shape, e.shape)
    err = (a - e).abs()
    assert bool((err <= atol + rtol * e.abs()).all()), f"max abs error {err.max().item():.3g}"
