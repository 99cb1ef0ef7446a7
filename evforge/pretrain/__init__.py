"""Self-supervised pretraining methods, each a Task for the shared trainer (:mod:`evforge.trainer`).

A config's ``task.name`` picks the method; tasks are imported only when asked for (they pull in timm).
"""

from __future__ import annotations

from ..registry import Registry

TASKS = Registry("pretraining task", {
    "ecddp": "evforge.pretrain.ecddp.task:ECDDPTask",
    "mem_dvae": "evforge.pretrain.mem.task:MEMDVAETask",
    "mem": "evforge.pretrain.mem.task:MEMTask",
})


def get_task(name: str):
    """A new task object for ``name`` (ValueError naming the known ones otherwise)."""
    return TASKS.get(name)()
