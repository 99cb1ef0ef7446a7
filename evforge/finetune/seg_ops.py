"""Segmentation's tensor operations: CE + Dice loss, the joint random affine of inputs and labels, ECDDP's resize,
test-time augmentation, and the metrics of a confusion matrix."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .metrics import (
    accuracy_from_confusion,
    class_accuracy_from_confusion,
    iou_from_confusion,
    mean_class_accuracy_from_confusion,
    mean_iou_from_confusion,
)
from .seg_model import resize_logits

__all__ = ["IGNORE_INDEX", "BORDERS", "dice_loss", "segmentation_loss", "random_affine", "warp_pair", "resize_sample",
           "predict_logits", "segmentation_metrics"]

IGNORE_INDEX = 255


# ------------------------------------------------------------------------------------------------------- loss
def dice_loss(logits: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX,
              smooth: float = 1.0, p: int = 2) -> torch.Tensor:
    """ECDDP's multi-class Dice: per class ``1 - (2 sum(P T) + s) / (sum(P^p + T^p) + s)`` over the whole batch
    (softmax P, one-hot T, ignored pixels zeroed in both), averaged over the classes."""
    valid = (target != ignore_index).unsqueeze(1)
    probs = logits.float().softmax(1) * valid
    onehot = F.one_hot(torch.where(valid[:, 0], target, 0), num_classes).permute(0, 3, 1, 2).float() * valid
    dims = (0, 2, 3)
    num = 2 * (probs * onehot).sum(dims) + smooth
    den = (probs.pow(p) + onehot.pow(p)).sum(dims) + smooth
    return (1 - num / den).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, num_classes: int,
                      ignore_index: int = IGNORE_INDEX, dice_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """CE (mean over non-ignored pixels; 0 when there are none) + ``dice_weight`` x :func:`dice_loss`."""
    valid = (target != ignore_index).sum().clamp(min=1)
    ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum") / valid
    dice = dice_loss(logits, target, num_classes, ignore_index) if dice_weight else logits.new_zeros(())
    return ce + dice_weight * dice, {"ce": ce.detach(), "dice": dice.detach()}


# ---------------------------------------------------------------------------------------------- augmentation
def random_affine(n: int, in_hw, out_hw, *, generator: torch.Generator, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                  hflip: float = 0.0, rotate_deg: float = 0.0, rotate_prob: float = 0.0, pad_to=None,
                  shift: float = 0.0, scale_jitter: float = 0.0) -> torch.Tensor:
    """``(n, 2, 3)`` ``affine_grid`` matrices mapping an ``out_hw`` output onto random crops of an ``in_hw`` input.

    Per sample: crop area ``scale`` x the canvas area, crop aspect ``ratio`` x the output aspect (log-uniform;
    clamped to the canvas), uniform position on the canvas, horizontal flip with probability ``hflip``; then,
    with probability ``rotate_prob``, a rotation about the crop centre by U(-rotate_deg, rotate_deg) together
    with a zoom by U(1 - scale_jitter, 1 + scale_jitter) and a shift of the output by U(-shift, shift) of its
    size (albumentations' ``ShiftScaleRotate``). The canvas is the input, or with ``pad_to`` [H, W] an area of
    ``max(input, pad_to)`` centred on it (albumentations' ``PadIfNeeded``; what falls outside the input is
    :func:`warp_pair`'s ``border``). The same 7 + 3 uniform draws per sample are taken whatever the options, so
    streams do not shift when options change. ``scale=ratio=(1, 1)`` with ``out_hw == in_hw`` and no flip /
    rotation is the identity.
    """
    (H, W), (Ho, Wo) = in_hw, out_hw
    Hc, Wc = (max(H, int(pad_to[0])), max(W, int(pad_to[1]))) if pad_to else (H, W)
    top, left = (Hc - H) // 2, (Wc - W) // 2  # PadIfNeeded centres the input: int((min_height - rows) / 2)
    dev = generator.device
    u = torch.rand(7, n, generator=generator, device=dev, dtype=torch.float64)
    v = torch.rand(3, n, generator=generator, device=dev, dtype=torch.float64)  # drawn after u: u is unchanged
    s = scale[0] + (scale[1] - scale[0]) * u[0]
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[1]) * (Wo / Ho)
    cw = torch.sqrt(s * Hc * Wc * aspect).clamp(max=Wc)
    ch = torch.sqrt(s * Hc * Wc / aspect).clamp(max=Hc)
    cx = cw / 2 + (Wc - cw) * u[2] - left
    cy = ch / 2 + (Hc - ch) * u[3] - top
    f = torch.where(u[4] < hflip, -1.0, 1.0).to(u)
    ssr = u[5] < rotate_prob
    ang = torch.where(ssr, (2 * u[6] - 1) * math.radians(rotate_deg), 0.0).to(u)
    zoom = torch.where(ssr, 1.0 + scale_jitter * (2 * v[2] - 1), 1.0).to(u)
    tu = torch.where(ssr, 2 * shift * (2 * v[0] - 1), 0.0).to(u)  # in normalised output units (2 = full size)
    tv = torch.where(ssr, 2 * shift * (2 * v[1] - 1), 0.0).to(u)
    cos, sin = torch.cos(ang), torch.sin(ang)
    a, b = cw / 2 * f / zoom, ch / 2 / zoom
    m00, m01, m10, m11 = 2 / W * cos * a, -2 / W * sin * b, 2 / H * sin * a, 2 / H * cos * b
    theta = torch.stack([torch.stack([m00, m01, 2 * cx / W - 1 - (m00 * tu + m01 * tv)], -1),
                         torch.stack([m10, m11, 2 * cy / H - 1 - (m10 * tu + m11 * tv)], -1)], 1)
    return theta.float()


BORDERS = {"zeros": "zeros", "reflect": "reflection"}


def warp_pair(x: torch.Tensor, target: torch.Tensor, theta: torch.Tensor, out_hw, *, mode: str = "nearest",
              ignore_index: int = IGNORE_INDEX, border: str = "zeros") -> tuple[torch.Tensor, torch.Tensor]:
    """Resample input (``mode``) and label (nearest) with ``theta``. Outside the input: ``border="zeros"``
    gives zeros and ``ignore_index``; ``"reflect"`` mirrors both about the input's edges (grid_sample's
    reflection, i.e. OpenCV's BORDER_REFLECT; ECDDP's albumentations pads with BORDER_REFLECT_101, which does
    not repeat the edge pixel)."""
    if border not in BORDERS:
        raise ValueError(f"border must be one of {sorted(BORDERS)}, not {border!r}")
    pad = BORDERS[border]
    grid = F.affine_grid(theta.to(x.device), [x.shape[0], x.shape[1], *out_hw], align_corners=False)
    xo = F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode=pad, align_corners=False)
    t = F.grid_sample((target.float() + 1).unsqueeze(1), grid.float(), mode="nearest", padding_mode=pad,
                      align_corners=False)[:, 0]
    t = t.round().long() - 1
    return xo, torch.where(t < 0, torch.full_like(t, ignore_index), t)


def resize_sample(x: torch.Tensor, target: torch.Tensor, size) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(B, C, H, W)`` and labels ``(B, H, W)`` resized to ``size`` as ECDDP's loader does with
    ``resize: true`` (data/DESC_dataset.py:237-241, 308-311): inputs bilinear with ``align_corners=True``,
    labels nearest as ``cv2.INTER_NEAREST`` (output row ``i`` takes input row ``floor(i * H / H')``)."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    h, w = target.shape[-2:]
    rows = torch.arange(size[0], device=target.device) * h // size[0]
    cols = torch.arange(size[1], device=target.device) * w // size[1]
    return x, target[:, rows[:, None], cols[None, :]]


# ------------------------------------------------------------------------------------------------- inference
def predict_logits(model: nn.Module, x: torch.Tensor, *, out_size=None, resize=None, tta: dict | None = None
                   ) -> torch.Tensor:
    """Logits ``(B, K, *out_size)`` (float32), averaged over test-time augmentations.

    ``tta``: ``{"flip": bool, "scales": [1.0, 1.5, 2.0]}`` (ECDDP's ttach setup: horizontal flip x scales, the
    logits of every view flipped back, resized to ``out_size`` and averaged). Views are scaled from ``resize``
    (default: the input size) with bilinear ``align_corners=True``; ``out_size`` defaults to the input size.
    Call with the model in eval mode (under ``torch.no_grad()`` for inference).
    """
    out_size = tuple(out_size or x.shape[-2:])
    base = tuple(resize or x.shape[-2:])
    tta = tta or {}
    scales = [float(s) for s in (tta.get("scales") or [1.0])]
    flips = [False, True] if tta.get("flip") else [False]
    total = None
    for s in scales:
        size = (int(round(base[0] * s)), int(round(base[1] * s)))
        xs = resize_logits(x, size, align_corners=True)
        for flip in flips:
            out = model(xs.flip(-1) if flip else xs)
            if isinstance(out, (tuple, list)):
                out = out[0]
            out = resize_logits(out.float().flip(-1) if flip else out.float(), out_size, align_corners=True)
            total = out if total is None else total + out
    return total / (len(scales) * len(flips))


# --------------------------------------------------------------------------------------------------- metrics
def segmentation_metrics(cm: torch.Tensor, class_names: Sequence[str] | None = None) -> dict:
    """mIoU, mAcc (mean class accuracy), aAcc (pixel accuracy), per-class IoU / accuracy and the confusion
    matrix ``[true][pred]`` from a summed confusion matrix (fractions in [0, 1]; absent classes nan, left out
    of the means: :mod:`evforge.finetune.metrics`)."""
    cm = torch.as_tensor(cm).cpu().long()
    names = list(class_names) if class_names else [str(k) for k in range(cm.shape[0])]
    iou, acc = iou_from_confusion(cm), class_accuracy_from_confusion(cm)
    return {"mIoU": mean_iou_from_confusion(cm), "mAcc": mean_class_accuracy_from_confusion(cm),
            "aAcc": accuracy_from_confusion(cm), "iou": dict(zip(names, iou.tolist())),
            "acc": dict(zip(names, acc.tolist())), "num_pixels": int(cm.sum()), "confusion": cm.tolist()}
