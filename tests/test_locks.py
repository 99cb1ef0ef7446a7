"""One lock per output folder (evforge.locks): refused while held by another process, free again when that
process dies however it dies (``kill -9``), its holder line named as stale, and the same without ``flock``."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from evforge import locks
from evforge.errors import LockedError, OutputError
from evforge.locks import LOCK_NAME, FolderLock, holder_of

HOLD = textwrap.dedent("""
    import sys, time
    from evforge.locks import FolderLock
    lock = FolderLock(sys.argv[1], "evforge convert (held by a test)").acquire()
    print("held", flush=True)
    time.sleep(60)
""")


def _holder(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_is_refused_while_held_and_free_after_kill_9(tmp_path):
    proc = _holder(tmp_path / "out")
    try:
        with pytest.raises(LockedError) as info:
            FolderLock(tmp_path / "out", "evforge pretrain").acquire()
        message = str(info.value)
        assert message.startswith(f"{tmp_path / 'out'}: locked by another evforge run (pid {proc.pid} on ")
        assert "'evforge convert (held by a test)'" in message and "\n" not in message
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lock = FolderLock(tmp_path / "out", "evforge pretrain").acquire()  # the OS released the dead run's lock
    assert lock.stale["pid"] == proc.pid  # and its holder line is recognised as stale
    assert holder_of(tmp_path / "out")["pid"] == os.getpid()
    lock.release()
    assert holder_of(tmp_path / "out") is None  # released: no holder line left to mistake for a live one


def test_lock_is_not_reentrant_and_releases(tmp_path):
    with FolderLock(tmp_path / "out", "first"):
        with pytest.raises(LockedError, match="'first'.* in this process"):
            FolderLock(tmp_path / "out", "second").acquire()
    with FolderLock(tmp_path / "out", "third") as lock:
        assert lock.held and (tmp_path / "out" / LOCK_NAME).exists()


def test_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        FolderLock(tmp_path / "f").acquire()


def test_without_flock_the_holder_line_is_the_lock(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    folder = tmp_path / "out"
    folder.mkdir()
    # a live holder on this host (another process: this test's parent) -> refused
    (folder / LOCK_NAME).write_text(f'{{"pid": {os.getppid()}, "host": "{locks.socket.gethostname()}", '
                                    f'"command": "evforge convert", "started": "now"}}\n')
    with pytest.raises(LockedError, match="no flock on this file system"):
        FolderLock(folder).acquire()
    # a dead holder -> taken over, named stale
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    time.sleep(0.05)
    (folder / LOCK_NAME).write_text(f'{{"pid": {dead.pid}, "host": "{locks.socket.gethostname()}"}}\n')
    lock = FolderLock(folder).acquire()
    assert lock.stale["pid"] == dead.pid
    lock.release()
