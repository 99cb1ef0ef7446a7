"""Supervised finetuning and evaluation on the shared trainer: classification and segmentation tasks.

A config's ``task.name`` picks the task; tasks are imported only when asked for (they pull in timm).
:func:`evforge.finetune.evaluate.evaluate` scores a checkpoint on a split and writes the reports.
"""

from __future__ import annotations

from ..registry import Registry

TASKS = Registry("finetuning task", {
    "classification": "evforge.finetune.classification:ClassificationTask",
    "segmentation": "evforge.finetune.segmentation:SegmentationTask",
})


def get_task(name: str):
    """A new task object for ``name`` (ValueError naming the known ones otherwise)."""
    return TASKS.get(name)()
