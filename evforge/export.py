"""Export a pretrained backbone from a training checkpoint as timm-compatible safetensors, and load it back.

The file holds the backbone's weights under timm's own keys (``patch_embed.*``, ``layers.*``, ``norm.*``)
so ``timm.create_model(arch, in_chans=..., num_classes=0)`` loads it strictly, plus metadata (JSON strings)
saying how to build that model: ``arch``, ``in_chans``, ``timm_kwargs``, ``norm_eps``, the method and the
source checkpoint. ECDDP's fusion neck (per-stage norms and projections to stride 16) can be included
under ``ecddp_neck.*`` for dense finetuning.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_output
from .errors import InputError

FORMAT = "evforge-backbone/1"


def _load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one line naming it
        raise InputError(path, f"not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise InputError(path, "not an evforge training checkpoint (no model/config)")
    return ckpt


def _ecddp_backbone(state: dict, cfg: dict, which: str, with_neck: bool) -> tuple[dict, dict]:
    from .models.swin import TINY_SWIN_KWARGS

    prefix = f"{which}.backbone."
    model_cfg = cfg.get("task", {}).get("model", {})
    tensors = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name.startswith("swin."):
            tensors[name[len("swin."):]] = value
        elif name.startswith("stage_norms.3."):  # the last stage's norm is timm's final ``norm``
            tensors["norm." + name.split(".")[-1]] = value
        if with_neck and name.startswith(("stage_norms.", "fuse.", "mask_token")):
            tensors["ecddp_neck." + name] = value
    if not tensors:
        raise ValueError(f"no '{prefix}' weights in the checkpoint (which must be 'teacher' or 'student')")
    timm_kwargs = dict(TINY_SWIN_KWARGS) if model_cfg.get("tiny") else {}
    timm_kwargs.update(model_cfg.get("backbone_kwargs", {}))
    # img_size fixes Swin's window sizes (timm shrinks windows on small feature maps): keep the pretraining one
    timm_kwargs["img_size"] = int(model_cfg.get("img_size", 224))
    meta = {"arch": model_cfg.get("variant", "swin_tiny_patch4_window7_224"),
            "in_chans": int(model_cfg.get("in_chans", 6)), "timm_kwargs": timm_kwargs, "norm_eps": 1e-6,
            "fused_dim": int(model_cfg.get("fused_dim", 768))}
    return tensors, meta


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


EXPORTERS = {"ecddp": _ecddp_backbone, "mem": _mem_backbone}


def export_backbone(ckpt_path, out, *, which: str = "teacher", with_neck: bool = False) -> Path:
    """Write the backbone of a pretraining checkpoint to ``out`` (.safetensors); returns the path.

    ``which``: the EMA ``teacher`` (default; what DINO-style methods evaluate) or the ``student``.
    """
    ckpt = _load_checkpoint(ckpt_path)
    cfg = json.loads(ckpt["config"]) if isinstance(ckpt["config"], str) else ckpt["config"]
    method = cfg.get("task", {}).get("name")
    if method not in EXPORTERS:
        raise InputError(ckpt_path, f"no backbone exporter for task {method!r} (known: {sorted(EXPORTERS)})")
    tensors, meta = EXPORTERS[method](ckpt["model"], cfg, which, with_neck)
    if method == "ecddp":  # only a student/teacher method has a choice to record
        meta["which"] = which
    meta.update({"format": FORMAT, "method": method,
                 "source_checkpoint": str(Path(ckpt_path).resolve()),
                 "step": int(ckpt.get("progress", {}).get("step", -1)) if isinstance(ckpt.get("progress"), dict)
                 else -1})
    out = Path(out)
    with atomic_output(out) as tmp:
        save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(tmp),
                  metadata={k: json.dumps(v) for k, v in meta.items()})
    return out


def read_backbone(path) -> tuple[dict, dict]:
    """(tensors, metadata) of an exported backbone file."""
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


def load_backbone(path, *, num_classes: int = 0, in_chans: int | None = None, **timm_overrides) -> nn.Module:
    """A timm model built as the metadata says, with the exported weights loaded strictly (the classifier
    head, when ``num_classes > 0``, stays freshly initialised). ``in_chans`` other than the exported one is
    the finetuning code's business (patch-embedding adaptation), not done here."""
    import timm

    tensors, meta = read_backbone(path)
    kwargs = {**meta.get("timm_kwargs", {}), **timm_overrides}
    model = timm.create_model(meta["arch"], pretrained=False, num_classes=num_classes,
                              in_chans=in_chans or meta["in_chans"],
                              norm_layer=partial(nn.LayerNorm, eps=meta.get("norm_eps", 1e-5)), **kwargs)
    weights = {k: v for k, v in tensors.items() if not k.startswith("ecddp_neck.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise InputError(path, f"weights do not fit {meta['arch']}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model
