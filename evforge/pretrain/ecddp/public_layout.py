"""The public ECDDP code's parameter names <-> evforge's :class:`~.model.ECDDPModel` names.

The authors' checkpoints (``torch.save({"model": PretrainModel.state_dict(), "optimizer": ..., "current_epoch":
...})``, trainer/base_trainer.py) name the networks ``student`` / ``teacher``, each with ``backbone`` (their
``SWIN``), ``dino_head``, ``cluster_head`` and ``ibot_head``. evforge's model holds the same tensors under other
names: a timm Swin inside :class:`~.backbone.FusedSwin` (``swin.*``; timm puts a stage's patch merging at the
start of the next stage), ``stage_norms``/``fuse`` for the public ``norm{i}``/``fpns``, ``image_head`` /
``context_head`` / ``patch_head`` for the three heads, parametrised weight norm (``original0`` = g, ``original1``
= v) for the old ``weight_g`` / ``weight_v``, and its own AttPool names. The mapping is exact (same shapes, same
values); buffers that are recomputed (``relative_position_index``, the loss centres, the crop grid) are dropped.
"""

from __future__ import annotations

import re

import torch

__all__ = ["HEADS", "public_to_evforge", "evforge_to_public", "public_backbone_shape"]

# public head name -> evforge head name
HEADS = {"dino_head": "image_head", "cluster_head": "context_head", "ibot_head": "patch_head"}
_FUSE = {"fpns.0.1.": "fuse.0.1.", "fpns.1.1.": "fuse.1.1.", "fpns.2.0.": "fuse.2.", "fpns.3.0.": "fuse.3."}
_HEAD_PARTS = [  # (public, evforge) suffix pairs inside a head
    ("last_layer.weight_g", "last_layer.parametrizations.weight.original0"),
    ("last_layer.weight_v", "last_layer.parametrizations.weight.original1"),
    ("att.cls_token", "att.query"),
    ("att.absolute_pos_embed", "att.pos_embed"),
]
_DROPPED = re.compile(r"(relative_position_index|attn_mask)$")


def _backbone_key(name: str) -> str | None:
    """A public ``SWIN`` parameter name -> the evforge ``FusedSwin`` name (None: recomputed buffer)."""
    if _DROPPED.search(name):
        return None
    m = re.match(r"layers\.(\d+)\.downsample\.(.*)$", name)
    if m:  # public: merging at the end of stage i; timm: at the start of stage i + 1
        return f"swin.layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
    if name.startswith(("layers.", "patch_embed.")):
        return "swin." + name
    m = re.match(r"norm(\d+)\.(weight|bias)$", name)
    if m:
        return f"stage_norms.{m.group(1)}.{m.group(2)}"
    for old, new in _FUSE.items():
        if name.startswith(old):
            return new + name[len(old):]
    if name == "mask_token":
        return name
    raise KeyError(f"unknown public ECDDP backbone parameter {name!r}")


def _head_key(name: str) -> str:
    for old, new in _HEAD_PARTS:
        if name == old:
            return new
    m = re.match(r"att\.blocks\.(\d+)\.(.*)$", name)
    if m:
        i, rest = m.groups()
        rest = re.sub(r"^attn\.(q|k|v|proj)\.", r"\1.", rest)
        rest = rest.replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.2.")
        return f"att.blocks.{i}.{rest}"
    return name  # mlp.*, att.norm.*: same names


def public_to_evforge(state: dict, networks=("student", "teacher")) -> dict:
    """Map a public ``PretrainModel`` state dict to :class:`~.model.ECDDPModel` keys.

    Keys of other networks than ``networks``, and the public buffers that evforge recomputes (loss centres, the
    crop grid, relative position indices) are left out. Raises KeyError for a parameter it does not know."""
    out = {}
    for key, value in state.items():
        net, _, rest = key.partition(".")
        if net not in networks:
            continue
        part, _, name = rest.partition(".")
        if part == "backbone":
            new = _backbone_key(name)
            if new is not None:
                out[f"{net}.backbone.{new}"] = value
        elif part in HEADS:
            out[f"{net}.{HEADS[part]}.{_head_key(name)}"] = value
        else:
            raise KeyError(f"unknown public ECDDP module {net}.{part!r}")
    return out


def evforge_to_public(state: dict, networks=("student", "teacher")) -> dict:
    """The inverse of :func:`public_to_evforge` (for writing checkpoints in the authors' layout)."""
    inverse_heads = {v: k for k, v in HEADS.items()}
    out = {}
    for key, value in state.items():
        net, _, rest = key.partition(".")
        if net not in networks:
            continue
        part, _, name = rest.partition(".")
        if part == "backbone":
            out[f"{net}.backbone.{_public_backbone_key(name)}"] = value
        elif part in inverse_heads:
            out[f"{net}.{inverse_heads[part]}.{_public_head_key(name)}"] = value
        else:
            raise KeyError(f"unknown evforge ECDDP module {net}.{part!r}")
    return out


def _public_backbone_key(name: str) -> str:
    m = re.match(r"swin\.layers\.(\d+)\.downsample\.(.*)$", name)
    if m:
        return f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
    if name.startswith("swin."):
        return name[len("swin."):]
    m = re.match(r"stage_norms\.(\d+)\.(weight|bias)$", name)
    if m:
        return f"norm{m.group(1)}.{m.group(2)}"
    for old, new in _FUSE.items():
        if name.startswith(new):
            return old + name[len(new):]
    if name == "mask_token":
        return name
    raise KeyError(f"unknown evforge ECDDP backbone parameter {name!r}")


def _public_head_key(name: str) -> str:
    for old, new in _HEAD_PARTS:
        if name == new:
            return old
    m = re.match(r"att\.blocks\.(\d+)\.(.*)$", name)
    if m:
        i, rest = m.groups()
        rest = re.sub(r"^(q|k|v|proj)\.", r"attn.\1.", rest)
        rest = rest.replace("mlp.0.", "mlp.fc1.").replace("mlp.2.", "mlp.fc2.")
        return f"att.blocks.{i}.{rest}"
    return name


def public_backbone_shape(state: dict, prefix: str) -> dict:
    """Architecture of a public ``SWIN`` from its weights under ``prefix`` (e.g. ``"student.backbone."``):
    ``in_chans``, ``embed_dim``, ``depths``, ``num_heads``, ``window_size``, ``patch_size``, ``fused_dim``.
    Raises KeyError when ``prefix`` holds no Swin."""
    w = state.get(prefix + "patch_embed.proj.weight")
    if w is None:
        raise KeyError(f"no '{prefix}patch_embed.proj.weight'")
    depths, heads, window = [], [], None
    stage = 0
    while any(k.startswith(f"{prefix}layers.{stage}.blocks.") for k in state):
        n = 0
        while f"{prefix}layers.{stage}.blocks.{n}.norm1.weight" in state:
            n += 1
        table = state[f"{prefix}layers.{stage}.blocks.0.attn.relative_position_bias_table"]
        depths.append(n)
        heads.append(int(table.shape[1]))
        window = int(round((table.shape[0] ** 0.5 + 1) / 2))
        stage += 1
    fpn = state.get(prefix + "fpns.3.0.weight")
    return {"in_chans": int(w.shape[1]), "embed_dim": int(w.shape[0]), "patch_size": int(w.shape[-1]),
            "depths": depths, "num_heads": heads, "window_size": window,
            "fused_dim": int(fpn.shape[1]) if isinstance(fpn, torch.Tensor) else None}
