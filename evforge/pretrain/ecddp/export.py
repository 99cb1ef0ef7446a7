"""ECDDP's backbone files (:mod:`evforge.models.backbone_file`): from an evforge ECDDP training checkpoint's model
state and config (:func:`export_tensors`), or from the authors' released checkpoints (:func:`import_public`:
architecture inferred from the weights, names mapped by :mod:`.public_layout`). Both give the same kind of file:
the Swin under timm's keys, every stage's output norm (``stage_norms.{0..3}.*``, which dense finetuning applies
to the 4 feature maps; timm's ``norm`` is ``stage_norms.3`` again), the window semantics (``swin_blocks``) and,
with ``with_neck``, the pretraining-only fusion neck (``ecddp_neck.*``).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch

from ...errors import InputError
from ...models.backbone_file import SWIN_ARCH, check_fits
from ...models.swin import TINY_SWIN_KWARGS
from ...trainer.checkpoint import load_checkpoint
from .model import ECDDPConfig
from .public_layout import public_backbone_shape, public_to_evforge

__all__ = ["export_tensors", "import_public", "backbone_tensors", "model_options"]


def model_options(model_cfg: dict) -> dict:
    """The backbone fields of an ECDDP ``task.model`` config, presets and defaults resolved.

    :class:`~evforge.pretrain.ecddp.model.ECDDPConfig` resolves them; a config it no longer accepts (an old
    checkpoint with a removed option) falls back to the raw values over the dataclass defaults, which is all
    the backbone needs."""
    try:
        cfg = ECDDPConfig.from_dict(model_cfg)
        return {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    except (ValueError, TypeError):
        out = {f.name: getattr(ECDDPConfig(), f.name) for f in fields(ECDDPConfig)}
        if model_cfg.get("preset") == "tiny" or model_cfg.get("tiny"):
            out.update(ECDDPConfig.tiny_defaults())
        out.update({k: v for k, v in model_cfg.items() if k in out})
        return out


def backbone_tensors(state: dict, opts: dict, which: str, with_neck: bool) -> tuple[dict, dict]:
    """Backbone tensors (timm keys, stage norms, optionally the neck) and metadata from an ECDDPModel state
    dict (``{which}.backbone.*``) and the resolved model options (:func:`model_options`)."""
    if which not in ("student", "teacher"):
        raise ValueError(f"which must be 'student' or 'teacher', not {which!r}")
    prefix = f"{which}.backbone."
    tensors = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name.startswith("swin."):
            tensors[name[len("swin."):]] = value
        elif name.startswith("stage_norms."):
            tensors[name] = value  # every stage's output norm: dense finetuning uses all 4
            if name.startswith("stage_norms.3."):  # ... and the last one is timm's final ``norm``
                tensors["norm." + name.split(".")[-1]] = value
        elif with_neck and name.startswith(("fuse.", "mask_token")):
            tensors["ecddp_neck." + name] = value
    if not tensors:
        raise ValueError(f"no '{prefix}' weights in the checkpoint (which must be 'teacher' or 'student')")
    timm_kwargs = dict(TINY_SWIN_KWARGS) if opts.get("tiny") else {}
    timm_kwargs.update(opts.get("backbone_kwargs") or {})
    # img_size fixes Swin's window sizes when always_partition is False (timm shrinks windows on small maps)
    timm_kwargs["img_size"] = int(opts.get("img_size", 224))
    timm_kwargs["always_partition"] = bool(opts.get("always_partition", False))
    meta = {"arch": opts.get("variant") or SWIN_ARCH, "in_chans": int(opts.get("in_chans", 6)),
            "timm_kwargs": timm_kwargs, "norm_eps": 1e-6, "fused_dim": int(opts.get("fused_dim", 768)),
            "swin_blocks": {"pad_first": True, "mask_padded_keys": bool(opts.get("mask_padded_keys", True))}}
    return tensors, meta


def export_tensors(state: dict, cfg: dict, which: str, with_neck: bool) -> tuple[dict, dict]:
    """Backbone tensors and metadata of an ECDDP run's model state and config (``which``: teacher / student)."""
    return backbone_tensors(state, model_options(cfg.get("task", {}).get("model", {}) or {}), which,
                           with_neck)


def import_public(path, which: str, with_neck: bool) -> tuple[dict, dict]:
    """An ECDDP checkpoint in the authors' layout (trainer/base_trainer.py ``save``) -> backbone tensors + meta.

    The architecture comes from the weights (patch size, widths, depths, heads, window, MLP ratio, qkv bias,
    input channels); the block options are the public code's (``always_partition``, no padded-key masking:
    model/network/swin_pretrain.py and model/swin_model.py), LayerNorm eps 1e-6 as its ``norm_layer``.
    ``img_size`` 224 is only timm's nominal size (with ``always_partition`` it changes nothing)."""
    if which not in ("student", "teacher"):
        raise ValueError(f"which must be 'student' or 'teacher', not {which!r}")
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise InputError(path, f"not an ECDDP checkpoint: holds a {type(ckpt).__name__}, expected a dict with "
                               f"'model'")
    state = ckpt.get("model")
    if not isinstance(state, dict):
        raise InputError(path, f"not an ECDDP checkpoint: no 'model' state dict (keys: "
                               f"{', '.join(map(str, list(ckpt)[:6])) or 'none'})")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(path, "'model' is not a state dict of tensors")
    prefix = f"{which}.backbone."
    if any(k.startswith(prefix + "swin.") for k in state):
        raise InputError(path, "an evforge training checkpoint, not the authors' layout: use 'evforge export-backbone'")
    if not any(k.startswith(prefix) for k in state):
        nets = sorted({k.split(".backbone.")[0] for k in state if ".backbone." in k})
        raise InputError(path, f"no '{prefix}*' weights (backbones found: {', '.join(nets) or 'none'})")
    if any(k.startswith(prefix + "absolute_pos_embed") for k in state):
        raise InputError(path, "the Swin uses absolute position embeddings (ape), which timm's Swin has not")
    if prefix + "patch_embed.norm.weight" not in state:
        raise InputError(path, "the Swin has no patch-embedding norm (patch_norm=False), which timm's Swin has")
    try:
        shape = public_backbone_shape(state, prefix)
        fc1 = state[f"{prefix}layers.0.blocks.0.mlp.fc1.weight"]
        mapped = public_to_evforge({k: v for k, v in state.items() if k.startswith(prefix)}, networks=(which,))
    except KeyError as e:
        raise InputError(path, f"not the public ECDDP Swin layout ({e.args[0]})") from None
    if not shape["depths"] or shape["window_size"] is None:
        raise InputError(path, f"no Swin stages under '{prefix}layers.*'")
    if with_neck and shape["fused_dim"] is None:
        raise InputError(path, f"no fusion neck ('{prefix}fpns.*') to export with with_neck")
    backbone_kwargs = {"patch_size": shape["patch_size"], "embed_dim": shape["embed_dim"],
                       "depths": shape["depths"], "num_heads": shape["num_heads"],
                       "window_size": shape["window_size"], "mlp_ratio": fc1.shape[0] / shape["embed_dim"]}
    if f"{prefix}layers.0.blocks.0.attn.qkv.bias" not in state:
        backbone_kwargs["qkv_bias"] = False
    opts = {"variant": SWIN_ARCH, "in_chans": shape["in_chans"], "img_size": 224, "tiny": False,
            "fused_dim": shape["fused_dim"] or 8 * shape["embed_dim"], "backbone_kwargs": backbone_kwargs,
            "always_partition": True, "mask_padded_keys": False}
    tensors, meta = backbone_tensors(mapped, opts, which, with_neck)
    check_fits(path, tensors, meta)
    epoch = ckpt.get("current_epoch")
    meta.update({"method": "ecddp", "which": which, "source_format": "ecddp-public",
                 "source_checkpoint": str(Path(path).resolve()), "step": -1,
                 "current_epoch": int(epoch) if isinstance(epoch, (int, float)) else None})
    return tensors, meta
