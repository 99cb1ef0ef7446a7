"""Exact evaluation metrics: accuracy, top-k, mean class accuracy, confusion matrices, IoU.

Everything is computed from integer counts (a confusion matrix or correct counts), so results are exact and do
not depend on batching. Conventions shared by classification and segmentation:

* ``confusion_matrix(pred, target, K)[t, p]`` counts items (pixels) of true class ``t`` predicted as ``p``
  (rows = truth, columns = prediction), as int64.
* A class that is absent from the data gets ``nan`` in per-class results (accuracy needs a true sample; IoU
  needs the class in the truth or the prediction) and is left out of the means (``nanmean``): an absent class
  neither helps nor hurts. Everything empty gives ``nan``.
* ``ignore_index`` (e.g. 255 in segmentation) drops those targets before counting.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["confusion_matrix", "accuracy", "topk_correct", "topk_accuracy", "mean_class_accuracy",
           "accuracy_from_confusion", "class_accuracy_from_confusion", "mean_class_accuracy_from_confusion",
           "iou_from_confusion",
           "mean_iou_from_confusion", "nanmean", "Confusion", "ClassificationMetrics", "SegmentationMetrics"]


def _valid(target: Tensor, ignore_index: int | None) -> Tensor:
    keep = torch.ones_like(target, dtype=torch.bool)
    if ignore_index is not None:
        keep &= target != ignore_index
    return keep


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = None) -> Tensor:
    """``(K, K)`` int64 counts, ``[true, predicted]``, of same-shape integer ``pred`` / ``target`` (any shape).

    Targets equal to ``ignore_index`` are skipped; any other target or prediction outside ``[0, K)`` is an
    error (ValueError) rather than silently miscounted.
    """
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    keep = _valid(target, ignore_index)
    p, t = pred[keep].reshape(-1).long(), target[keep].reshape(-1).long()
    bad = (t < 0) | (t >= num_classes) | (p < 0) | (p >= num_classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"class out of range [0, {num_classes}): target {int(t[i])}, prediction {int(p[i])}")
    counts = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu()


def nanmean(values: Tensor) -> float:
    """Mean of the non-nan entries (``nan`` when there are none)."""
    v = values[~torch.isnan(values)]
    return float(v.mean()) if v.numel() else math.nan


# ---------------------------------------------------------------------------------- from a confusion matrix
def accuracy_from_confusion(cm: Tensor) -> float:
    """Overall accuracy (pixel accuracy in segmentation): ``trace / total``; ``nan`` when empty."""
    cm = torch.as_tensor(cm, dtype=torch.float64)
    total = float(cm.sum())
    return float(cm.diagonal().sum()) / total if total else math.nan


def class_accuracy_from_confusion(cm: Tensor) -> Tensor:
    """Per-class accuracy (recall) ``cm[c, c] / cm[c].sum()`` as float64; ``nan`` for classes with no sample."""
    cm = torch.as_tensor(cm, dtype=torch.float64)
    support = cm.sum(1)
    out = cm.diagonal() / support.clamp(min=1)
    return torch.where(support > 0, out, torch.full_like(out, math.nan))


def mean_class_accuracy_from_confusion(cm: Tensor) -> float:
    """Mean of the per-class accuracies over the classes present in the truth."""
    return nanmean(class_accuracy_from_confusion(cm))


def iou_from_confusion(cm: Tensor) -> Tensor:
    """Per-class IoU ``tp / (tp + fp + fn)`` as float64; ``nan`` for classes neither true nor predicted."""
    cm = torch.as_tensor(cm, dtype=torch.float64)
    tp = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - tp
    out = tp / union.clamp(min=1)
    return torch.where(union > 0, out, torch.full_like(out, math.nan))


def mean_iou_from_confusion(cm: Tensor) -> float:
    """mIoU: mean IoU over the classes that occur (in the truth or the prediction)."""
    return nanmean(iou_from_confusion(cm))


# ------------------------------------------------------------------------------------------ from outputs
def accuracy(pred: Tensor, target: Tensor, ignore_index: int | None = None) -> float:
    """Fraction of ``pred == target`` over the non-ignored targets. ``pred`` may be class ids (same shape as
    ``target``) or scores ``(N, K)`` (argmax taken); ``nan`` when nothing is counted."""
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.dim() == target.dim() + 1:
        pred = pred.argmax(-1)
    keep = _valid(target, ignore_index)
    n = int(keep.sum())
    return int((pred[keep] == target[keep]).sum()) / n if n else math.nan


def topk_correct(scores: Tensor, target: Tensor, k: int) -> Tensor:
    """Bool ``(N,)``: the target is among the ``k`` highest scores (``k`` capped at the class count).

    Ties are broken as ``torch.topk`` does; with float scores exact ties are rare and only matter at the k-th place.
    """
    k = max(1, min(int(k), scores.shape[-1]))
    top = scores.topk(k, dim=-1).indices
    return (top == target.reshape(-1, 1)).any(-1)


def topk_accuracy(scores: Tensor, target: Tensor, ks=(1, 5)) -> dict[int, float]:
    """``{k: fraction of samples whose target is among the top-k scores}`` for scores ``(N, K)``; ``nan`` for N=0."""
    scores, target = torch.as_tensor(scores), torch.as_tensor(target)
    n = target.numel()
    return {int(k): (int(topk_correct(scores, target, k).sum()) / n if n else math.nan) for k in ks}


def mean_class_accuracy(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = None) -> float:
    """Mean per-class accuracy (balanced accuracy) of class ids or ``(N, K)`` scores; absent classes left out."""
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.dim() == target.dim() + 1:
        pred = pred.argmax(-1)
    return mean_class_accuracy_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))


# ------------------------------------------------------------------------ metric objects (trainer validation)
class Confusion:
    """A confusion matrix ``stats[name]`` (``[true, predicted]``) as an additive validation statistic
    (:mod:`evforge.trainer.metrics`): ``update`` adds a batch's counts, ``compute`` reads the summed matrix
    (``matrix``) and gives its metrics, exact over the split on any number of ranks."""

    def __init__(self, num_classes: int, name: str = "confusion", ignore_index: int | None = None):
        self.num_classes, self.name, self.ignore_index = int(num_classes), name, ignore_index

    def update(self, stats: dict, pred: Tensor, target: Tensor) -> dict:
        cm = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        stats[self.name] = stats[self.name] + cm if self.name in stats else cm
        return stats

    def matrix(self, stats: dict) -> Tensor:
        """The summed matrix (int64; zeros when nothing was counted)."""
        cm = stats.get(self.name)
        if cm is None:
            return torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        return torch.as_tensor(cm).cpu().round().long()

    def compute(self, stats: dict) -> dict[str, float]:
        raise NotImplementedError


class ClassificationMetrics(Confusion):
    """``top1`` (trace / total) and ``mean_class_acc`` (mean per-class accuracy over the classes present)."""

    def compute(self, stats: dict) -> dict[str, float]:
        cm = self.matrix(stats)
        return {"top1": accuracy_from_confusion(cm), "mean_class_acc": mean_class_accuracy_from_confusion(cm)}


class SegmentationMetrics(Confusion):
    """``mIoU``, ``mAcc``, ``aAcc`` and each class's ``iou/<class>`` (nan for a class neither true nor
    predicted)."""

    def __init__(self, num_classes: int, class_names=None, name: str = "confusion", ignore_index: int | None = None):
        super().__init__(num_classes, name, ignore_index)
        self.class_names = list(class_names or [])

    def compute(self, stats: dict) -> dict[str, float]:
        cm = self.matrix(stats)
        names = [self.class_names[i] if i < len(self.class_names) else str(i) for i in range(self.num_classes)]
        out = {"mIoU": mean_iou_from_confusion(cm), "mAcc": mean_class_accuracy_from_confusion(cm),
               "aAcc": accuracy_from_confusion(cm)}
        out.update({f"iou/{n}": float(v) for n, v in zip(names, iou_from_confusion(cm).tolist())})
        return out
