"""The run's process-level controls: RNG seeding and forking, the run folder's lock, stop signals."""

from __future__ import annotations

import random
import signal
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..errors import LockedError, OutputError
from ..locks import FolderLock

__all__ = ["seed_all", "fork_rng", "lock_run_folder", "stop_signals"]


def seed_all(seed: int) -> None:
    """Seed torch, numpy's global and Python's ``random`` streams."""
    torch.manual_seed(seed)
    np.random.seed(seed % (1 << 32))
    random.seed(seed)


@contextmanager
def fork_rng(device: torch.device):
    """Run a block without touching the RNG streams of training (validation must not change training)."""
    devices = [device] if device.type == "cuda" else []
    n, p = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            np.random.set_state(n)
            random.setstate(p)


def lock_run_folder(out_dir: Path, command: str | None, fabric, is_main: bool, world_size: int) -> FolderLock | None:
    """Rank 0 takes ``out_dir``'s lock (:mod:`evforge.locks`): a second run into the folder is refused, as a
    ``convert`` into a dataset folder is. Every rank learns the outcome, so all of them stop together."""
    lock, error = None, None
    if is_main:
        lock = FolderLock(out_dir, command)
        try:
            lock.acquire()
        except OutputError as err:
            lock, error = None, err
        if lock is not None and lock.stale:
            warnings.warn(f"{out_dir}: took over the lock of a run that is gone (pid "
                          f"{lock.stale.get('pid')}, {lock.stale.get('command')!r})", stacklevel=4)
    message = str(error) if error else None
    if world_size > 1:
        message = fabric.broadcast(message, src=0)
    if error is not None:
        raise error
    if message:
        raise LockedError(out_dir, f"rank 0 could not lock the run folder ({message})")
    return lock


@contextmanager
def stop_signals(names, handler):
    """Install ``handler`` for the signals ``names`` (e.g. ``["SIGUSR1"]``) in the main thread, restoring the
    previous handlers on exit; an unknown name is a warning."""
    installed = []
    if threading.current_thread() is threading.main_thread():
        for name in names or []:
            sig = getattr(signal, str(name), None)
            if sig is None:
                warnings.warn(f"trainer.stop_signals: no signal {name!r} on this platform", stacklevel=4)
                continue
            installed.append((sig, signal.signal(sig, handler)))
    try:
        yield
    finally:
        for sig, prev in installed:
            signal.signal(sig, prev)
