"""Backbone files: export a pretrained backbone (or import the authors' released one) as timm-compatible
safetensors, and load it back.

The file holds the backbone's weights under timm's own keys (``patch_embed.*``, ``layers.*``, ``norm.*``)
so ``timm.create_model(arch, in_chans=..., num_classes=0)`` loads them strictly, plus metadata (JSON strings)
saying how to build that model: ``arch``, ``in_chans``, ``timm_kwargs``, ``norm_eps``, the method, which
network (``which``) and the source checkpoint. ECDDP files also carry

* ``stage_norms.{0..3}.*``: the LayerNorm of every stage output, which dense finetuning applies to the 4 feature
  maps (the public code loads them as its ``norm0..norm3``); timm's ``norm`` is ``stage_norms.3`` again;
* ``swin_blocks`` (metadata): the window semantics the backbone was trained with (``pad_first``,
  ``mask_padded_keys``; ``always_partition`` is in ``timm_kwargs``), so finetuning rebuilds the same network
  (:mod:`evforge.models.swin`);
* with ``with_neck``, the fusion neck (``ecddp_neck.fuse.*``, ``ecddp_neck.mask_token``), pretraining-only.

Two sources:

* :func:`export_backbone` reads an evforge training checkpoint (``evforge export-backbone``);
* :func:`import_checkpoint` reads a checkpoint in a method's public layout (``evforge import-checkpoint ecddp``):
  the authors' ``{"model": PretrainModel.state_dict(), "optimizer", "current_epoch"}``. Its architecture is
  inferred from the weights, its parameter names mapped by :mod:`evforge.pretrain.ecddp.public_layout`, and the
  same writer as the export is used, so both give the same kind of file.
"""

from __future__ import annotations

import json
from dataclasses import fields
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_output
from .errors import InputError, OutputError, output_error
from .trainer.checkpoint import load_checkpoint

__all__ = ["FORMAT", "export_backbone", "import_checkpoint", "read_backbone", "load_backbone", "backbone_weights",
           "IMPORTERS"]

FORMAT = "evforge-backbone/1"
SWIN_ARCH = "swin_tiny_patch4_window7_224"  # timm's Swin entry point; the widths come from timm_kwargs
NON_TIMM_PREFIXES = ("ecddp_neck.", "stage_norms.")  # keys of a backbone file that timm's model does not have


# ------------------------------------------------------------------------------------------------- reading
def _torch_load(path):
    """:func:`~evforge.trainer.checkpoint.load_checkpoint` (``weights_only=True``, one-line errors) of a file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such checkpoint")
    return load_checkpoint(path)


def _looks_public_ecddp(ckpt) -> bool:
    model = ckpt.get("model") if isinstance(ckpt, dict) else None
    return isinstance(model, dict) and any(str(k).startswith(("student.backbone.", "teacher.backbone."))
                                           and ".backbone.swin." not in str(k) for k in model)


def _load_checkpoint(path) -> dict:
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        if _looks_public_ecddp(ckpt):
            raise InputError(path, "an ECDDP checkpoint in the authors' layout, not an evforge training checkpoint: "
                                   "use 'evforge import-checkpoint ecddp'")
        raise InputError(path, "not an evforge training checkpoint (no model/config)")
    return ckpt


# --------------------------------------------------------------------------------------------------- ECDDP
def _ecddp_model_options(model_cfg: dict) -> dict:
    """The backbone fields of an ECDDP ``task.model`` config, presets and defaults resolved.

    :class:`~evforge.pretrain.ecddp.model.ECDDPConfig` resolves them; a config it no longer accepts (an old
    checkpoint with a removed option) falls back to the raw values over the dataclass defaults, which is all
    the backbone needs."""
    from .pretrain.ecddp.model import ECDDPConfig

    try:
        cfg = ECDDPConfig.from_dict(model_cfg)
        return {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    except (ValueError, TypeError):
        out = {f.name: getattr(ECDDPConfig(), f.name) for f in fields(ECDDPConfig)}
        if model_cfg.get("preset") == "tiny" or model_cfg.get("tiny"):
            out.update(ECDDPConfig.tiny_defaults())
        out.update({k: v for k, v in model_cfg.items() if k in out})
        return out


def _ecddp_backbone(state: dict, opts: dict, which: str, with_neck: bool) -> tuple[dict, dict]:
    """Backbone tensors (timm keys, stage norms, optionally the neck) and metadata from an ECDDPModel state
    dict (``{which}.backbone.*``) and the resolved model options (:func:`_ecddp_model_options`)."""
    from .models.swin import TINY_SWIN_KWARGS

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


def _export_ecddp(state: dict, cfg: dict, which: str, with_neck: bool) -> tuple[dict, dict]:
    return _ecddp_backbone(state, _ecddp_model_options(cfg.get("task", {}).get("model", {}) or {}), which,
                           with_neck)


def _mem_backbone(state: dict, cfg: dict, which: str, with_neck: bool) -> tuple[dict, dict]:
    """MEM's ViT (``vit.*`` of :class:`~evforge.pretrain.mem.model.MEMModel`) under timm's keys; the mask token
    and the MIM head are pretraining-only. MEM has one network, so ``which`` does not apply."""
    from .pretrain.mem.task import mem_model_config

    if with_neck:
        raise ValueError("MEM has no neck to export (with_neck is for ECDDP)")
    tensors = {key[len("vit."):]: value for key, value in state.items() if key.startswith("vit.")}
    if not tensors:
        raise ValueError("no 'vit.' weights in the checkpoint (not a MEM model)")
    model_cfg = mem_model_config(cfg)
    meta = {"arch": model_cfg.variant, "in_chans": int(model_cfg.in_chans), "timm_kwargs": model_cfg.timm_kwargs(),
            "norm_eps": 1e-6}  # timm's ViT LayerNorms use eps 1e-6
    return tensors, meta


EXPORTERS = {"ecddp": _export_ecddp, "mem": _mem_backbone}


def _write(out, tensors: dict, meta: dict) -> Path:
    out = Path(out)
    meta = {"format": FORMAT, **meta}
    try:
        with atomic_output(out) as tmp:
            save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(tmp),
                      metadata={k: json.dumps(v) for k, v in meta.items()})
    except Exception as err:  # safetensors reports a full or read-only disk as its own error type
        problem = output_error(err, out)
        if problem is None:
            raise
        raise OutputError(out, problem.problem) from err
    return out


def export_backbone(ckpt_path, out, *, which: str = "teacher", with_neck: bool = False) -> Path:
    """Write the backbone of an evforge pretraining checkpoint to ``out`` (.safetensors); returns the path.

    ``which``: the EMA ``teacher`` (default; what DINO-style methods evaluate) or the ``student`` (what the
    public ECDDP code finetunes: its ``SWINPad`` loads ``student.backbone.*`` unless ``load_teacher``).
    """
    ckpt = _load_checkpoint(ckpt_path)
    cfg = json.loads(ckpt["config"]) if isinstance(ckpt["config"], str) else ckpt["config"]
    method = cfg.get("task", {}).get("name")
    if method not in EXPORTERS:
        raise InputError(ckpt_path, f"no backbone exporter for task {method!r} (known: {sorted(EXPORTERS)})")
    tensors, meta = EXPORTERS[method](ckpt["model"], cfg, which, with_neck)
    if method == "ecddp":  # only a student/teacher method has a choice to record
        meta["which"] = which
    meta.update({"method": method, "source_checkpoint": str(Path(ckpt_path).resolve()),
                 "step": int(ckpt.get("progress", {}).get("step", -1)) if isinstance(ckpt.get("progress"), dict)
                 else -1})
    return _write(out, tensors, meta)


# ------------------------------------------------------------------------------------------------- import
def _public_ecddp(path, which: str, with_neck: bool) -> tuple[dict, dict]:
    """An ECDDP checkpoint in the authors' layout (trainer/base_trainer.py ``save``) -> backbone tensors + meta.

    The architecture comes from the weights (patch size, widths, depths, heads, window, MLP ratio, qkv bias,
    input channels); the block options are the public code's (``always_partition``, no padded-key masking:
    model/network/swin_pretrain.py and model/swin_model.py), LayerNorm eps 1e-6 as its ``norm_layer``.
    ``img_size`` 224 is only timm's nominal size (with ``always_partition`` it changes nothing)."""
    from .pretrain.ecddp.public_layout import public_backbone_shape, public_to_evforge

    if which not in ("student", "teacher"):
        raise ValueError(f"which must be 'student' or 'teacher', not {which!r}")
    ckpt = _torch_load(path)
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
    tensors, meta = _ecddp_backbone(mapped, opts, which, with_neck)
    _check_fits(path, tensors, meta)
    epoch = ckpt.get("current_epoch")
    meta.update({"method": "ecddp", "which": which, "source_format": "ecddp-public",
                 "source_checkpoint": str(Path(path).resolve()), "step": -1,
                 "current_epoch": int(epoch) if isinstance(epoch, (int, float)) else None})
    return tensors, meta


IMPORTERS = {"ecddp": _public_ecddp}


def import_checkpoint(method: str, path, out, *, which: str = "student", with_neck: bool = False) -> Path:
    """Write the backbone of a checkpoint in ``method``'s public layout to ``out`` (.safetensors).

    ``"ecddp"``: the authors' released checkpoints (``{"model": {"student.backbone.*", "teacher.backbone.*",
    heads...}, "optimizer", "current_epoch"}``), loaded with ``weights_only=True``. ``which``: the ``student``
    (default: what the public finetuning code loads) or the ``teacher``. Anything else (not a dict, no
    ``model``, no such network, an unknown parameter, shapes that do not fit the inferred Swin) is an
    :class:`~evforge.errors.InputError` naming the file."""
    if method not in IMPORTERS:
        raise ValueError(f"no importer for {method!r} (known: {', '.join(sorted(IMPORTERS))})")
    tensors, meta = IMPORTERS[method](path, which, with_neck)
    return _write(out, tensors, meta)


# ---------------------------------------------------------------------------------------------- loading back
def read_backbone(path) -> tuple[dict, dict]:
    """(tensors, metadata) of a backbone file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such backbone file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise InputError(path, f"not a safetensors backbone ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise InputError(path, f"not an evforge backbone (format {meta.get('format')!r}, expected {FORMAT!r})")
    return tensors, meta


def backbone_weights(tensors: dict) -> dict:
    """The tensors of a backbone file that timm's model holds (no stage norms, no neck)."""
    return {k: v for k, v in tensors.items() if not k.startswith(NON_TIMM_PREFIXES)}


def _timm_model(meta: dict, *, num_classes: int = 0, in_chans: int | None = None, **timm_overrides) -> nn.Module:
    """The timm model the metadata describes (random weights), with evforge's Swin blocks when it says so."""
    import timm

    kwargs = {**meta.get("timm_kwargs", {}), **timm_overrides}
    for k in ("img_size", "window_size", "depths", "num_heads"):
        if isinstance(kwargs.get(k), list):
            kwargs[k] = tuple(kwargs[k])
    model = timm.create_model(meta["arch"], pretrained=False, num_classes=num_classes,
                              in_chans=in_chans or meta["in_chans"],
                              norm_layer=partial(nn.LayerNorm, eps=meta.get("norm_eps", 1e-5)), **kwargs)
    blocks = meta.get("swin_blocks") or {}
    if blocks.get("pad_first"):
        from .models.swin import use_pad_first_blocks

        use_pad_first_blocks(model, mask_padded_keys=bool(blocks.get("mask_padded_keys", True)))
    return model


def _check_fits(path, tensors: dict, meta: dict) -> None:
    """Strictly load the timm part (and the stage norms' shapes) into the model of ``meta``, else InputError."""
    model = _timm_model(meta)
    try:
        model.load_state_dict(backbone_weights(tensors), strict=True)
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise InputError(path, f"weights do not fit the Swin inferred from them ({first})") from None
    dims = [int(info["num_chs"]) for info in model.feature_info]
    for i, d in enumerate(dims):
        w = tensors.get(f"stage_norms.{i}.weight")
        if w is None or tuple(w.shape) != (d,):
            raise InputError(path, f"stage {i} output norm is {None if w is None else tuple(w.shape)}, expected ({d},)")


def load_backbone(path, *, num_classes: int = 0, in_chans: int | None = None, **timm_overrides) -> nn.Module:
    """A timm model built as the metadata says, with the exported weights loaded strictly (the classifier
    head, when ``num_classes > 0``, stays freshly initialised). ``in_chans`` other than the exported one is
    the finetuning code's business (patch-embedding adaptation), not done here."""
    tensors, meta = read_backbone(path)
    model = _timm_model(meta, num_classes=num_classes, in_chans=in_chans, **timm_overrides)
    missing, unexpected = model.load_state_dict(backbone_weights(tensors), strict=False)
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise InputError(path, f"weights do not fit {meta['arch']}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model
