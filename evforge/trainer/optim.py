"""Optimizer parameter groups (no decay on biases/norms/tokens, per-group lr scale), the optimizer, and applying
scheduled lr / weight decay to the groups."""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from .config import ConfigError

__all__ = ["NO_DECAY_NAMES", "default_param_groups", "build_optimizer", "apply_schedules"]

# Parameters named like these never get weight decay (position tables and learned tokens), as in timm/DINO.
NO_DECAY_NAMES = ("pos_embed", "absolute_pos_embed", "cls_token", "mask_token", "dist_token", "register_tokens",
                  "relative_position_bias_table")


def _lr_scale(name: str, lr_scales: dict[str, float]) -> float:
    """The scale of the first pattern (regex, searched: a plain substring works) matching ``name``; else 1."""
    for pattern, scale in lr_scales.items():
        if re.search(pattern, name):
            return float(scale)
    return 1.0


def default_param_groups(model: nn.Module, weight_decay: float = 0.05, lr_scales: dict[str, float] | None = None,
                         no_decay: Iterable[str] = ()) -> list[dict]:
    """Groups of the trainable parameters by (decay, lr scale).

    Weight decay is 0 for biases, every parameter with at most one dimension (norm weights), and names matching
    :data:`NO_DECAY_NAMES` or ``no_decay`` (regexes). ``lr_scales`` maps a regex (or substring) searched in the
    parameter name to an lr multiplier (e.g. ``{"patch_embed": 0.2}``); the first match wins. Frozen parameters
    (``requires_grad=False``, e.g. an EMA teacher) are left out. Group order is deterministic (first appearance).
    """
    lr_scales = dict(lr_scales or {})
    for pattern in [*lr_scales, *no_decay]:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"optim: bad name pattern {pattern!r}: {e}") from None
    skip = [*NO_DECAY_NAMES, *no_decay]
    groups: dict[tuple[bool, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or name.endswith(".bias") or name == "bias"
                     or any(re.search(s, name) for s in skip))
        scale = _lr_scale(name, lr_scales)
        key = (decay, scale)
        if key not in groups:
            tag = ("decay" if decay else "no_decay") + ("" if scale == 1.0 else f"_lr{scale:g}")
            groups[key] = {"params": [], "weight_decay": float(weight_decay) if decay else 0.0,
                           "lr_scale": scale, "name": tag, "param_names": []}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def build_optimizer(groups: list[dict], cfg_optim: dict, lr: float) -> torch.optim.Optimizer:
    """AdamW, Adam or SGD over ``groups`` (``cfg_optim`` = ``cfg["optim"]``), starting at lr ``lr * lr_scale``.

    Each group remembers whether it decays (``apply_weight_decay``: its weight decay was not 0), so that scheduled
    weight decay only reaches those groups (see :func:`apply_schedules`).
    """
    if not groups:
        raise ConfigError("optim: the model has no trainable parameters")
    out = []
    for g in groups:
        g = dict(g)
        g.setdefault("lr_scale", 1.0)
        g.setdefault("weight_decay", float(cfg_optim.get("weight_decay", 0.0)))
        g.pop("param_names", None)  # names are for people; the optimizer state should stay lean
        g["apply_weight_decay"] = float(g["weight_decay"]) != 0.0
        g["lr"] = lr * float(g["lr_scale"])
        out.append(g)
    name = str(cfg_optim.get("name", "adamw")).lower()
    if name in ("adamw", "adam"):
        kwargs = {"betas": tuple(cfg_optim.get("betas", (0.9, 0.999))), "eps": float(cfg_optim.get("eps", 1e-8))}
        if cfg_optim.get("fused") is not None:
            kwargs["fused"] = bool(cfg_optim["fused"])
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        return cls(out, lr=lr, **kwargs)
    if name == "sgd":
        return torch.optim.SGD(out, lr=lr, momentum=float(cfg_optim.get("momentum", 0.9)),
                               nesterov=bool(cfg_optim.get("nesterov", False)))
    raise ConfigError(f"optim.name: unknown optimizer {name!r} (known: adamw, adam, sgd)")


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float | None) -> None:
    """Set every group's lr to ``lr * lr_scale`` and, on groups that decay, the weight decay to ``weight_decay``."""
    for g in optimizer.param_groups:
        g["lr"] = lr * float(g.get("lr_scale", 1.0))
        if weight_decay is not None and g.get("apply_weight_decay", g.get("weight_decay", 0.0) != 0.0):
            g["weight_decay"] = weight_decay
