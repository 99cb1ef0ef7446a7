"""Import the public ECDDP modules by file path, without their package ``__init__`` (which needs the training
stack) and without ``torch_scatter`` (no wheel here): a ``scatter_mean`` equal to torch_scatter's for the
one call the reference makes (index (B, N) over dim 1 of a (B, N, D) source, ``dim_size = index.max() + 1``)
is installed in its place. Nothing of the reference is copied; the modules are read from the checkout.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import torch


def scatter_mean(src: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """torch_scatter.scatter_mean(src, index, dim) for ``index`` broadcast over src's trailing dims: the output
    has ``index.max() + 1`` rows along ``dim`` (over the whole tensor), empty rows are 0."""
    size = int(index.max()) + 1
    idx = index
    while idx.dim() < src.dim():
        idx = idx.unsqueeze(-1)
    idx = idx.expand_as(src)
    shape = list(src.shape)
    shape[dim] = size
    total = torch.zeros(shape, dtype=src.dtype, device=src.device).scatter_add_(dim, idx, src)
    count = torch.zeros(shape, dtype=src.dtype, device=src.device).scatter_add_(dim, idx, torch.ones_like(src))
    return total / count.clamp(min=1)


def load_reference(root: str | Path, modules: list[str]) -> dict[str, types.ModuleType]:
    """Import ``modules`` (dotted paths under the checkout, e.g. ``"model.pretrain_model"``) as packages named
    ``ref_<top>``, with relative imports working. Returns {dotted path: module}."""
    root = Path(root).resolve()
    if not (root / "model" / "pretrain_model.py").is_file():
        raise SystemExit(f"{root}: not a checkout of Yan98/Event-Camera-Data-Dense-Pre-training")
    shim = types.ModuleType("torch_scatter")
    shim.scatter_mean = scatter_mean
    sys.modules.setdefault("torch_scatter", shim)
    loaded = {}
    for dotted in modules:
        parts = dotted.split(".")
        for i in range(1, len(parts)):  # namespace packages for every parent, without running __init__
            pkg_name = "ref_" + ".".join(parts[:i])
            if pkg_name not in sys.modules:
                pkg = types.ModuleType(pkg_name)
                pkg.__path__ = [str(root.joinpath(*parts[:i]))]
                sys.modules[pkg_name] = pkg
        loaded[dotted] = importlib.import_module("ref_" + dotted)
    return loaded
