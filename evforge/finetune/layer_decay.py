"""Layer-wise learning-rate decay (BEiT / MAE finetuning) for timm ViT and Swin, with the usual no-decay rules.

Layers are numbered from the input: 0 = patch embedding and position / class tokens, then one id per
transformer block (ViT ``blocks.i`` -> ``i + 1``; Swin ``layers.s.blocks.j`` -> the block's global index + 1,
a stage's ``downsample`` sharing the id of that stage's first block, as timm's Swin ``group_matcher`` does), and
``L - 1`` for everything after the last block (final norm, ``fc_norm``, head). A parameter of layer ``i`` gets
``lr_scale = layer_decay ** (L - 1 - i)``: the head trains at the full lr, the patch embedding at
``layer_decay ** (L - 1)``. Weight decay is 0 for biases, 1-d parameters (norms) and position tables / tokens
(:data:`evforge.trainer.optim.NO_DECAY_NAMES` plus ``no_decay`` regexes).

BEiT (timm ``Beit``) numbers as ViT; a shared ``rel_pos_bias`` table gets the last id, as in BEiT/MEM's
``get_num_layer_for_vit`` (``mem/optim_factory.py:31-42``). MEM's own groups decay every 2-d parameter but
``pos_embed`` and ``cls_token`` (its ``no_weight_decay``: relative position tables and the mask token decay):
``skip_names=("pos_embed", "cls_token")`` reproduces them (checked against the reference's groups).
"""

from __future__ import annotations

import re
from typing import Iterable

from torch import nn

from ..trainer.optim import NO_DECAY_NAMES

__all__ = ["num_layers", "layer_id", "layer_decay_groups"]

_VIT_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_SWIN_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
_SWIN_DOWN = re.compile(r"^layers\.(\d+)\.downsample\.")
_EMBED = ("patch_embed", "pos_embed", "cls_token", "reg_token", "dist_token", "mask_token", "absolute_pos_embed")


def _swin_depths(model: nn.Module) -> list[int]:
    return [len(stage.blocks) for stage in model.layers]


def num_layers(model: nn.Module) -> int:
    """``L``: the number of layer ids, blocks + 2 (embedding and head)."""
    if hasattr(model, "blocks"):
        return len(model.blocks) + 2
    if hasattr(model, "layers"):
        return sum(_swin_depths(model)) + 2
    raise ValueError(f"layer decay supports timm ViT (blocks) and Swin (layers.*.blocks); got {type(model).__name__}")


def layer_id(name: str, model: nn.Module) -> int:
    """The layer id of parameter ``name`` of ``model`` (see the module docstring)."""
    last = num_layers(model) - 1
    if name.startswith(_EMBED):
        return 0
    m = _VIT_BLOCK.match(name)
    if m and hasattr(model, "blocks"):
        return int(m.group(1)) + 1
    if hasattr(model, "layers"):
        starts = [0]
        for d in _swin_depths(model):
            starts.append(starts[-1] + d)
        m = _SWIN_BLOCK.match(name)
        if m:
            return starts[int(m.group(1))] + int(m.group(2)) + 1
        m = _SWIN_DOWN.match(name)
        if m:
            return starts[int(m.group(1))] + 1
    return last


def _no_decay(name: str, p, patterns: Iterable[str]) -> bool:
    return p.ndim <= 1 or name.endswith(".bias") or any(re.search(s, name) for s in patterns)


def layer_decay_groups(model: nn.Module, *, weight_decay: float, layer_decay: float = 1.0,
                       no_decay: Iterable[str] = (), prefix: str = "",
                       skip_names: Iterable[str] | None = None) -> list[dict]:
    """Optimizer groups of ``model``'s trainable parameters by (layer, decay), each with ``lr_scale``,
    ``weight_decay`` and ``param_names`` (``prefix`` + name, for people). ``layer_decay=1`` gives plain
    decay / no-decay groups; frozen parameters are left out. Group order: by layer, decay first.
    ``skip_names``: the names never decayed besides biases and 1-d parameters (regexes, searched; None =
    :data:`~evforge.trainer.optim.NO_DECAY_NAMES`), plus ``no_decay``."""
    if not 0 < float(layer_decay) <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    L = num_layers(model)
    patterns = [*(NO_DECAY_NAMES if skip_names is None else skip_names), *no_decay]
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        i = layer_id(name, model)
        decay = not _no_decay(name, p, patterns)
        key = (i, decay)
        if key not in groups:
            groups[key] = {"params": [], "param_names": [], "weight_decay": float(weight_decay) if decay else 0.0,
                           "lr_scale": float(layer_decay) ** (L - 1 - i),
                           "name": f"layer{i}_{'decay' if decay else 'no_decay'}"}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(prefix + name)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]
