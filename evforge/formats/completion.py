"""The dataset folder's completeness marker: readers refuse a dataset whose build has not finished.

A build writes ``OUT/.evforge-incomplete`` (atomically) before it touches the first shard and removes it only
after ``manifest.json`` is written. While the marker exists the shards and the manifest may disagree (a rebuild
with other options killed half way has new shards under the old manifest), so :meth:`Manifest.load` -- and with
it ``EventDataset``, ``verify``, ``inspect`` and training -- refuses the folder with one line that says how to
finish it. A successful rerun of the build removes the marker.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from evforge.formats.atomic import atomic_write_text, fsync_dir

__all__ = ["INCOMPLETE_NAME", "mark_incomplete", "mark_complete", "incomplete_problem"]

INCOMPLETE_NAME = ".evforge-incomplete"


def mark_incomplete(root, command: str) -> Path:
    """Write the marker (the command that builds, its pid and start time) atomically into ``root``."""
    info = {"command": command, "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return atomic_write_text(Path(root) / INCOMPLETE_NAME, json.dumps(info) + "\n")


def mark_complete(root) -> None:
    """Remove the marker (the manifest is written) and make the removal durable."""
    (Path(root) / INCOMPLETE_NAME).unlink(missing_ok=True)
    fsync_dir(root)


def incomplete_problem(root) -> str | None:
    """Why the dataset in ``root`` must not be read (a build started and did not finish), or None."""
    marker = Path(root) / INCOMPLETE_NAME
    if not marker.exists():
        return None
    try:
        command = json.loads(marker.read_text(encoding="utf-8")).get("command") or "the convert command"
    except (OSError, ValueError, AttributeError):
        command = "the convert command"
    return (f"incomplete dataset: a build ({command}) started and has not finished, so shards and manifest may "
            f"disagree; rerun that command to finish it (this folder's {INCOMPLETE_NAME} marks it)")
