"""One lock per output folder: two evforge runs never write into the same folder at once.

``simulate``, ``convert``, ``pretrain`` and ``finetune`` hold ``OUT/.evforge.lock`` while they run
(``with FolderLock(out, command): ...``). The lock is an exclusive, non-blocking ``flock`` on
that file, so the operating system releases it on any exit, ``kill -9`` included: a lock can never outlive its
process. The file also holds a line about the holder (pid, host, command, start time), which the refusal quotes
and which names a dead holder as stale when its lock is taken over.

On file systems without ``flock`` (some network mounts answer ENOLCK / EOPNOTSUPP) the holder line is the lock
instead: a folder whose holder line names a live process on this host (or any process on another host, which
cannot be checked) is refused; one whose holder is dead is taken over.

The lock is not re-entrant: a second lock of the same folder is refused even within one process (two trainers
into one run folder would mix as badly as two processes would).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from .errors import LockedError, OutputError, output_error

__all__ = ["LOCK_NAME", "FolderLock", "holder_of", "ensure_folder"]

LOCK_NAME = ".evforge.lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}
_held: set[str] = set()  # folders this process holds (the refusal within one process)


def ensure_folder(folder) -> Path:
    """Create ``folder`` (and parents) as an output folder; :class:`OutputError` naming it when that is impossible."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(folder, "is a file, not a folder (give a folder as the output)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise (output_error(err, folder) or OutputError(folder, f"cannot create the folder ({err.strerror or err})")) \
            from None
    return folder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def holder_of(folder) -> dict | None:
    """The holder line of ``folder``'s lock file (pid, host, command, started), or None when absent or unreadable."""
    try:
        text = (Path(folder) / LOCK_NAME).read_text(encoding="utf-8").strip()
        info = json.loads(text) if text else None
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _describe(info: dict | None) -> str:
    if not info:
        return "another evforge run"
    return (f"another evforge run (pid {info.get('pid')} on {info.get('host')}, {info.get('command', '?')!r}, "
            f"since {info.get('started', '?')})")


def _holder_alive(info: dict | None) -> bool:
    if not info or not isinstance(info.get("pid"), int):
        return False
    if info.get("host") != socket.gethostname():
        return True  # cannot be checked from here: assume it runs
    return _pid_alive(info["pid"])


class FolderLock:
    """Hold ``folder/.evforge.lock`` for ``command`` (a context manager; :meth:`acquire` / :meth:`release` too).

    ``acquire`` creates the folder, takes the lock or raises :class:`LockedError` naming the folder and the
    holder; other failures (read-only, disk full, a file in the way) are :class:`OutputError`. ``stale`` is set to
    the holder line of a dead run whose lock was taken over (None otherwise).
    """

    def __init__(self, folder, command: str | None = None):
        self.folder = Path(folder).absolute()
        self.path = self.folder / LOCK_NAME
        self.command = command or " ".join(["evforge", *sys.argv[1:]])
        self.stale: dict | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "FolderLock":
        if self._fd is not None:
            return self
        key = os.fspath(self.folder.resolve()) if self.folder.exists() else os.fspath(self.folder)
        if key in _held:
            raise LockedError(self.folder, f"locked by {_describe(holder_of(self.folder))} in this process")
        ensure_folder(self.folder)
        key = os.fspath(self.folder.resolve())
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise (output_error(err, self.path) or OutputError(self.path, f"cannot open the lock file ({err})")) \
                from None
        previous = holder_of(self.folder)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in _NO_FLOCK:  # EWOULDBLOCK: a live process holds it
                os.close(fd)
                raise LockedError(self.folder, f"locked by {_describe(previous)}; wait for it to finish or use "
                                               f"another folder") from None
            if _holder_alive(previous) and previous.get("pid") != os.getpid():
                os.close(fd)
                raise LockedError(self.folder, f"locked by {_describe(previous)} (no flock on this file "
                                               f"system: delete {self.path} if that run is gone)") from None
        # we hold it: a holder line left behind belongs to a dead run
        self.stale = previous if previous and previous.get("pid") != os.getpid() else None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError as err:
            os.close(fd)
            raise (output_error(err, self.path) or OutputError(self.path, f"cannot write the lock file ({err})")) \
                from None
        self._fd, self._key = fd, key
        _held.add(key)
        return self

    def release(self) -> None:
        """Unlock (idempotent). The holder line is cleared so nobody mistakes it for a live holder."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _held.discard(self._key)
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # a full or read-only disk: the flock itself still goes away with the descriptor
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a lock object dropped without release (e.g. a constructor that raised)
        try:
            self.release()
        except Exception:
            pass
