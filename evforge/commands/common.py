"""What every command shares: one line on stderr, prefixed ``evforge:``."""

from __future__ import annotations

import sys


def err(msg: str) -> None:
    print(f"evforge: {msg}", file=sys.stderr)
