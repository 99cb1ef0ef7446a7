"""Atomic file output: write a temp file next to the target, fsync it, rename it into place, fsync the folder.

A crash at any moment leaves either the previous file or the complete new one at the path, never a partial
one. Temp files are named ``<name>.tmp-<pid>``; builds and reruns remove such leftovers of killed runs.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["temp_path", "fsync_dir", "commit", "atomic_output", "atomic_write_text", "Transaction",
           "AtomicWriter"]


def temp_path(path) -> Path:
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def fsync_dir(directory) -> None:
    """Make a rename durable (best effort: not every platform or file system can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(tmp, path) -> Path:
    """fsync ``tmp``, rename it to ``path`` and fsync the folder."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)
    return Path(path)


@contextmanager
def atomic_output(path) -> Iterator[Path]:
    """Yield a temp path to write; on success it becomes ``path``, on an exception it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str) -> Path:
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    return Path(path)


class Transaction:
    """A writer used in a ``with`` block: a normal exit calls :meth:`close` (commit), an exception :meth:`abort`."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def close(self) -> None:  # pragma: no cover (each writer finalises its own format)
        raise NotImplementedError

    def abort(self) -> None:  # pragma: no cover
        raise NotImplementedError


class AtomicWriter(Transaction):
    """Base of the incremental writers (stream files, shards): the file is written at ``self._tmp`` through the
    open handle ``self._file`` and appears at ``self.path`` only on :meth:`close`; :meth:`abort` leaves nothing
    at ``path`` or in the temp file."""

    path: Path
    _tmp: Path
    _file = None

    def abort(self) -> None:
        """Discard the file being written."""
        self._discard_temp()

    def _discard_temp(self) -> None:
        """Close the handle quietly (after a failed write it may raise too) and remove the temp file; a folder
        that cannot be written had no temp file created in it."""
        if self._file is not None:
            try:
                self._file.close()
            except Exception:
                pass
            self._file = None
        try:
            self._tmp.unlink(missing_ok=True)
        except OSError:
            pass
