"""Worker processes that end with their parent: no orphans writing into a folder after the run died.

joblib's loky workers outlive a parent killed with ``kill -9`` (they finish their unit, then idle for minutes,
each holding its memory), outside the build lock, so a rerun could race them on the same shard. Every worker
runs :func:`watch_parent` on its first unit: a daemon thread that checks twice a second whether the parent
(the build process, whose pid the unit carries) is still its parent, and ends the worker at once
(``os._exit``) when it is not. A shard the worker was writing stays a ``*.tmp-<pid>`` file, which the next build
removes under its lock. ``evforge simulate``'s worker processes (one per device) watch their parent the same way.
"""

from __future__ import annotations

import os
import threading
import time

__all__ = ["watch_parent", "EXIT_ORPHANED"]

EXIT_ORPHANED = 70  # the worker's exit status when its parent is gone
_watched: tuple[int, int] | None = None  # (this process, the parent it watches)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def watch_parent(parent_pid: int, interval: float = 0.5) -> None:
    """End this process when ``parent_pid`` dies or stops being its parent (idempotent per process).

    Does nothing in the parent itself (a sequential build calls it too).
    """
    global _watched
    me = os.getpid()
    if parent_pid == me or _watched == (me, parent_pid):
        return
    _watched = (me, parent_pid)
    direct = os.getppid() == parent_pid  # else (a pool of a pool) only the parent's pid can be watched

    def loop() -> None:
        while (not direct or os.getppid() == parent_pid) and _alive(parent_pid):
            time.sleep(interval)
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=loop, name="evforge-parent-watch", daemon=True).start()
