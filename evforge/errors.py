"""Errors for bad input: one line that names the file and the problem."""

from __future__ import annotations

import os


class InputError(Exception):
    """A file or folder given to evforge is missing, unreadable or malformed.

    ``str(err)`` is ``"<path>: <problem>"``, a single line fit for a CLI or an ``errors.jsonl`` report.
    """

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = " ".join(str(problem).split())  # always one line
        super().__init__(f"{self.path}: {self.problem}")
