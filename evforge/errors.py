"""Errors for bad input and for an unusable environment: one line that names the file and the problem.

Two kinds, because a user fixes them differently (and the CLI exits with a different code, see README):

* :class:`InputError`: what evforge was given is missing, unreadable or malformed (a source file, a config, a
  checkpoint, a dataset). Fix the input.
* :class:`OutputError`: the machine refuses the output: the disk is full, the folder is read-only or is a
  file, or another evforge run holds it (:class:`LockedError`). Fix the environment; finished work is kept.

:func:`environment_problem` recognises the ``OSError`` of a full disk or a read-only folder, also when it comes
from HDF5 (whose errors carry the errno only in the message) or from ``torch.save`` (see
:mod:`evforge.trainer.checkpoint`), so every writer reports it the same way.
"""

from __future__ import annotations

import errno
import os
import re

__all__ = ["InputError", "OutputError", "LockedError", "ConfigError", "environment_problem", "output_error"]


class InputError(Exception):
    """A file or folder given to evforge is missing, unreadable or malformed.

    ``str(err)`` is ``"<path>: <problem>"``, a single line fit for a CLI or an ``errors.jsonl`` report.
    """

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = " ".join(str(problem).split())  # always one line
        super().__init__(f"{self.path}: {self.problem}")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key (``a.b.c``). Raised by the trainer's config
    checks and by model configs (:mod:`evforge.models.options`); the CLI reports it as bad input."""


class OutputError(Exception):
    """An output location cannot be used: disk full, read-only, not a folder, not writable, or locked.

    ``str(err)`` is ``"<path>: <problem>"`` on one line; nothing half-written is left at a final path (writers
    are atomic), so a rerun after fixing the environment resumes.
    """

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.path}: {self.problem}")


class LockedError(OutputError):
    """Another evforge run holds the output folder's lock (see :mod:`evforge.locks`)."""


# errno -> what the user is told; these are the environment's fault, not the input's
_ENV_ERRNOS = {
    errno.ENOSPC: "disk full (no space left on device)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a path component is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.EFBIG: "file too large for this file system",
}
# HDF5 reports the C errno only inside its message: "... errno = 28, error message = 'No space left ...'"
_H5_ERRNO = re.compile(r"errno\s*=\s*(\d+)")
_H5_FILENAME = re.compile(r"(?:file)?name\s*=\s*'([^']+)'")
_MESSAGES = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
             "Read-only file system": errno.EROFS, "Permission denied": errno.EACCES}


def _errno_of(err: BaseException) -> int | None:
    code = getattr(err, "errno", None)
    if isinstance(code, int) and code in _ENV_ERRNOS:
        return code
    text = str(err)
    for m in _H5_ERRNO.finditer(text):
        if int(m.group(1)) in _ENV_ERRNOS:
            return int(m.group(1))
    for message, code in _MESSAGES.items():
        if message in text:
            return code
    return None


def environment_problem(err: BaseException) -> str | None:
    """The environment fault behind ``err`` in words ("disk full (...)", "read-only file system", ...), or None.

    Looks at the exception and its causes (``raise ... from``), so a wrapped ``OSError`` is found too.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        code = _errno_of(err)  # OSError, torch's RuntimeError, safetensors' error: the errno or its text
        if code is not None:
            return _ENV_ERRNOS[code]
        err = err.__cause__ or err.__context__
    return None


def _path_of(err: BaseException) -> str | None:
    while err is not None:
        if getattr(err, "filename", None):
            return os.fspath(err.filename)
        m = _H5_FILENAME.search(str(err))
        if m:
            return m.group(1)
        err = err.__cause__ or err.__context__
    return None


def output_error(err: BaseException, path: str | os.PathLike | None = None) -> OutputError | None:
    """``err`` as an :class:`OutputError` naming the file it concerns (else ``path``), or None when ``err`` is not
    an environment fault. Temp-file names (``x.h5.tmp-123``) are reported as the file they were to become."""
    problem = environment_problem(err)
    if problem is None:
        return None
    where = _path_of(err) or (os.fspath(path) if path is not None else "evforge")
    where = re.sub(r"\.tmp-\d+$", "", where)
    return OutputError(where, problem)
