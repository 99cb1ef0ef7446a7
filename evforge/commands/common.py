"""What every command shares: one line on stderr, prefixed ``evforge:``, and the handler that prints the
library's log records as the command line always printed them."""

from __future__ import annotations

import contextlib
import logging
import sys

LOG_LEVELS = ("debug", "info", "warning", "error")


def err(msg: str) -> None:
    print(f"evforge: {msg}", file=sys.stderr)


class CliHandler(logging.Handler):
    """Records of the ``evforge`` loggers as command output: INFO and DEBUG lines on stdout as they are (the
    demo's steps), WARNING and above on stderr as ``evforge: <message>`` (a failed sequence), like :func:`err`.
    The streams are looked up per record, so a redirected ``sys.stdout`` (tests, callers of ``main``) is used."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            if record.levelno >= logging.WARNING:
                stream, msg = sys.stderr, f"evforge: {msg}"
            else:
                stream = sys.stdout
            stream.write(msg + "\n")
            stream.flush()
        except Exception:  # a closed stream: logging's own report, never an exception in the caller
            self.handleError(record)


@contextlib.contextmanager
def cli_logging(level: str = "info"):
    """Within the block, the ``evforge`` logger prints through one :class:`CliHandler` at ``level``; both are
    put back afterwards (``main`` may be called many times in one process). Records still propagate, so a
    Python program's own logging configuration sees them too."""
    logger = logging.getLogger("evforge")
    handler = CliHandler()
    before = logger.level
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)
