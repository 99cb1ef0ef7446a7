"""Moved to :mod:`evforge.watchdog` (the simulator's worker processes use it too); kept for old imports."""

from evforge.watchdog import EXIT_ORPHANED, watch_parent  # noqa: F401

__all__ = ["watch_parent", "EXIT_ORPHANED"]
