"""Backbone files: a pretrained backbone as timm-compatible safetensors plus JSON metadata; writing, reading,
building the timm model they describe.

The file holds the backbone's weights under timm's own keys (``patch_embed.*``, ``layers.*``, ``norm.*``)
so ``timm.create_model(arch, in_chans=..., num_classes=0)`` loads them strictly, plus metadata (JSON strings)
saying how to build that model: ``arch``, ``in_chans``, ``timm_kwargs``, ``norm_eps``, the method, which
network (``which``) and the source checkpoint. Keys under :data:`NON_TIMM_PREFIXES` (ECDDP's per-stage output
norms and fusion neck) are extra. Each pretraining method makes its own tensors and metadata
(``evforge.pretrain.<method>.export``); this module is the format they share, low in the flow so that
finetuning reads backbone files without importing any pretraining method.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from evforge.formats.atomic import atomic_output

from ..errors import InputError, OutputError, output_error

__all__ = ["FORMAT", "SWIN_ARCH", "NON_TIMM_PREFIXES", "write_backbone", "read_backbone", "backbone_weights",
           "timm_model", "check_fits", "load_backbone"]

FORMAT = "evforge-backbone/1"
SWIN_ARCH = "swin_tiny_patch4_window7_224"  # timm's Swin entry point; the widths come from timm_kwargs
NON_TIMM_PREFIXES = ("ecddp_neck.", "stage_norms.")  # keys of a backbone file that timm's model does not have


def write_backbone(out, tensors: dict, meta: dict) -> Path:
    """Write ``tensors`` and ``meta`` (JSON-able values) to ``out`` atomically; a full or read-only disk is an
    :class:`OutputError` naming the file."""
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


def timm_model(meta: dict, *, num_classes: int = 0, in_chans: int | None = None, **timm_overrides) -> nn.Module:
    """The timm model the metadata describes (random weights), with evforge's Swin blocks when it says so."""
    import timm

    from .swin import use_pad_first_blocks

    kwargs = {**meta.get("timm_kwargs", {}), **timm_overrides}
    for k in ("img_size", "window_size", "depths", "num_heads"):
        if isinstance(kwargs.get(k), list):
            kwargs[k] = tuple(kwargs[k])
    model = timm.create_model(meta["arch"], pretrained=False, num_classes=num_classes,
                              in_chans=in_chans or meta["in_chans"],
                              norm_layer=partial(nn.LayerNorm, eps=meta.get("norm_eps", 1e-5)), **kwargs)
    blocks = meta.get("swin_blocks") or {}
    if blocks.get("pad_first"):
        use_pad_first_blocks(model, mask_padded_keys=bool(blocks.get("mask_padded_keys", True)))
    return model


def check_fits(path, tensors: dict, meta: dict) -> None:
    """Strictly load the timm part (and the stage norms' shapes) into the model of ``meta``, else InputError."""
    model = timm_model(meta)
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
    model = timm_model(meta, num_classes=num_classes, in_chans=in_chans, **timm_overrides)
    missing, unexpected = model.load_state_dict(backbone_weights(tensors), strict=False)
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise InputError(path, f"weights do not fit {meta['arch']}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model
