"""Backbone files: export a pretrained backbone (or import the authors' released one) as timm-compatible
safetensors, and load it back (the format: :mod:`evforge.models.backbone_file`; its names are re-exported here).

The file holds the backbone's weights under timm's own keys plus metadata saying how to build that model; each
pretraining method's task makes its own tensors and metadata (``Task.backbone_tensors``; ECDDP's in
:mod:`evforge.pretrain.ecddp.export`: the Swin, every stage's output norm, the window semantics and, with
``with_neck``, the fusion neck).

Two sources:

* :func:`export_backbone` reads an evforge training checkpoint (``evforge export-backbone``);
* :func:`import_checkpoint` reads a checkpoint in a method's public layout (``evforge import-checkpoint ecddp``):
  the authors' ``{"model": PretrainModel.state_dict(), "optimizer", "current_epoch"}``. Its architecture is
  inferred from the weights, its parameter names mapped by :mod:`evforge.pretrain.ecddp.public_layout`, and the
  same writer as the export is used, so both give the same kind of file.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError
from .models.backbone_file import (
    FORMAT,
    NON_TIMM_PREFIXES,
    SWIN_ARCH,
    backbone_weights,
    load_backbone,
    read_backbone,
    write_backbone,
)
from .pretrain import TASKS, get_task
from .pretrain.ecddp.export import import_public
from .trainer.checkpoint import load_checkpoint
from .trainer.task import Task

__all__ = ["FORMAT", "export_backbone", "import_checkpoint", "read_backbone", "load_backbone", "backbone_weights",
           "IMPORTERS", "NON_TIMM_PREFIXES", "SWIN_ARCH"]

# Each pretraining method's task exports its own backbone (Task.backbone_tensors); a method may also read its
# authors' released checkpoints:
IMPORTERS = {"ecddp": import_public}


# ------------------------------------------------------------------------------------------------- reading
def _looks_public_ecddp(ckpt) -> bool:
    model = ckpt.get("model") if isinstance(ckpt, dict) else None
    return isinstance(model, dict) and any(str(k).startswith(("student.backbone.", "teacher.backbone."))
                                           and ".backbone.swin." not in str(k) for k in model)


def _load_checkpoint(path) -> dict:
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        if _looks_public_ecddp(ckpt):
            raise InputError(path, "an ECDDP checkpoint in the authors' layout, not an evforge training checkpoint: "
                                   "use 'evforge import-checkpoint ecddp'")
        raise InputError(path, "not an evforge training checkpoint (no model/config)")
    return ckpt


# ---------------------------------------------------------------------------------------------------- export
def export_backbone(ckpt_path, out, *, which: str = "teacher", with_neck: bool = False) -> Path:
    """Write the backbone of an evforge pretraining checkpoint to ``out`` (.safetensors); returns the path.

    ``which``: the EMA ``teacher`` (default; what DINO-style methods evaluate) or the ``student`` (what the
    public ECDDP code finetunes: its ``SWINPad`` loads ``student.backbone.*`` unless ``load_teacher``).
    """
    ckpt = _load_checkpoint(ckpt_path)
    cfg = json.loads(ckpt["config"]) if isinstance(ckpt["config"], str) else ckpt["config"]
    method = cfg.get("task", {}).get("name")
    try:
        if method not in TASKS:
            raise NotImplementedError
        tensors, meta = get_task(method).backbone_tensors(ckpt["model"], cfg, which, with_neck)
    except NotImplementedError:
        known = sorted(m for m in TASKS if type(get_task(m)).backbone_tensors is not Task.backbone_tensors)
        raise InputError(ckpt_path, f"no backbone exporter for task {method!r} (known: {known})") from None
    if method == "ecddp":  # only a student/teacher method has a choice to record
        meta["which"] = which
    meta.update({"method": method, "source_checkpoint": str(Path(ckpt_path).resolve()),
                 "step": int(ckpt.get("progress", {}).get("step", -1)) if isinstance(ckpt.get("progress"), dict)
                 else -1})
    return write_backbone(out, tensors, meta)


# ---------------------------------------------------------------------------------------------------- import
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
    return write_backbone(out, tensors, meta)
