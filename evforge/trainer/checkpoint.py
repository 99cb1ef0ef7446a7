"""Checkpoints: atomic writes, loading with ``weights_only=True`` only, RNG states as tensors, rotation.

A checkpoint is a dict of plain containers, numbers, strings and tensors (no pickled objects), so it loads with
``torch.load(path, weights_only=True)``: the trainer stores the model and optimizer state dicts, the grad scaler's,
progress counters (ints), every rank's RNG states (:func:`rng_state`) and the config as a JSON string.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from evforge.formats.atomic import atomic_output

from ..errors import InputError

__all__ = ["save_checkpoint", "load_checkpoint", "read_trainer_checkpoint", "TRAINER_FORMAT", "rng_state",
           "set_rng_state", "CheckpointManager", "LAST"]

LAST = "last.ckpt"
TRAINER_FORMAT = "evforge-trainer/1"  # the "format" entry of the trainer's checkpoints


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically: a temp file in the same folder, fsync, then ``os.replace``.

    A crash or error at any point leaves the previous file at ``path`` untouched (and no temp file behind). A
    write that fails (a full disk) raises the ``OSError`` itself, naming the file, not the ``RuntimeError`` torch
    turns it into (``[enforce fail at inline_container.cc:...] unexpected pos``).
    """
    path = Path(path)
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(state, f)
        except RuntimeError as err:
            cause = err.__cause__ or err.__context__
            if isinstance(cause, OSError):
                if not cause.filename:
                    cause.filename = os.fspath(path)
                raise cause from err
            raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu", *, mmap: bool = False, hint: str = "") -> dict:
    """A checkpoint file (evforge's or another's) loaded with ``weights_only=True`` (no code runs): the one reader.

    Any failure is one :class:`InputError` line naming the file: missing, truncated or damaged, or holding pickled
    Python objects (evforge never runs code from a checkpoint; torch's advice to pass ``weights_only=False`` is
    not passed on). ``hint`` ends the line of an unreadable file (what to do instead); ``mmap`` maps the file
    rather than reading it (a quick look at the progress or config of a large checkpoint)."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise InputError(path, "no such checkpoint") from None
    except pickle.UnpicklingError as err:
        if pickled_object(err):
            raise InputError(path, "holds pickled Python objects, which evforge does not load (checkpoints are "
                                   "read with weights_only=True); it was not written by evforge's trainer") from None
        raise InputError(path, f"not a readable checkpoint: truncated or damaged ({_first_line(err)}){hint}") from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise InputError(path, f"not a readable checkpoint: truncated or damaged ({_first_line(err)}){hint}") from None


def read_trainer_checkpoint(path: str | os.PathLike, *, mmap: bool = False, hint: str = "") -> tuple[dict, dict]:
    """``(checkpoint, config)`` of a trainer checkpoint (:data:`TRAINER_FORMAT`; the config parsed from its JSON),
    or an :class:`InputError` naming the file when it is another kind of file."""
    ck = load_checkpoint(path, mmap=mmap, hint=hint)
    fmt = ck.get("format") if isinstance(ck, dict) else None
    if fmt != TRAINER_FORMAT or "config" not in ck:
        raise InputError(path, f"not an evforge trainer checkpoint (format {fmt!r})")
    cfg = json.loads(ck["config"]) if isinstance(ck["config"], str) else ck["config"]
    return ck, cfg


def pickled_object(err: BaseException) -> str | None:
    """The class a ``weights_only`` load refused (``fractions.Fraction``), or None when ``err`` is another failure
    (torch words both as "Weights only load failed", a damaged file included)."""
    m = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    return m.group(1) if m else None


def _first_line(err: BaseException, limit: int = 100) -> str:
    """``Type: first sentence`` of an error, at most ``limit`` characters (torch's messages run to paragraphs)."""
    text = " ".join(str(err).split()).split(". ")[0]
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# ---------------------------------------------------------------------------------------------------- RNG
def rng_state(cuda: bool | None = None) -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors: torch CPU (and CUDA current device), numpy's global, python ``random``.

    Fixed shapes per key, so ranks' states can be all-gathered into one checkpoint.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    assert kind == "MT19937"
    version, internal, gauss_next = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos_gauss": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([gauss], dtype=torch.float64),
        "python": torch.tensor([version, *internal], dtype=torch.int64),
        "python_gauss": torch.tensor([0.0 if gauss_next is None else 1.0, gauss_next or 0.0], dtype=torch.float64),
    }
    if cuda is None:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_state` returned (CUDA only when present on both sides)."""
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    pos, has_gauss = (int(v) for v in state["numpy_pos_gauss"])
    np.random.set_state(("MT19937", state["numpy_keys"].cpu().numpy().astype(np.uint32), pos, has_gauss,
                         float(state["numpy_gauss"][0])))
    py = [int(v) for v in state["python"]]
    has_next, gauss_next = (float(v) for v in state["python_gauss"])
    random.setstate((py[0], tuple(py[1:]), gauss_next if has_next else None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu().to(torch.uint8))


# ------------------------------------------------------------------------------------------------ rotation
class CheckpointManager:
    """``<dir>/last.ckpt`` (always the newest) plus optional ``step-<N>.ckpt`` copies, the newest ``keep_last`` kept."""

    _STEP = re.compile(r"^step-(\d+)\.ckpt$")

    def __init__(self, directory: str | os.PathLike, keep_last: int | None = None):
        self.dir = Path(directory)
        self.keep_last = keep_last

    @property
    def last(self) -> Path:
        return self.dir / LAST

    def latest(self) -> Path | None:
        """``last.ckpt`` when present, else the newest ``step-<N>.ckpt``, else None."""
        if self.last.is_file():
            return self.last
        steps = self.step_checkpoints()
        return steps[-1] if steps else None

    def step_checkpoints(self) -> list[Path]:
        """The kept ``step-<N>.ckpt`` files, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := self._STEP.match(p.name))]
        return [p for _, p in sorted(found)]

    def save(self, state: dict, step: int, keep: bool = False) -> Path:
        """Write ``last.ckpt``; with ``keep`` also ``step-<step>.ckpt`` (a hard link, else a copy), then prune."""
        save_checkpoint(state, self.last)
        if keep:
            target = self.dir / f"step-{step:08d}.ckpt"
            tmp = target.with_name(f".{target.name}.tmp.{os.getpid()}")
            try:
                try:
                    os.link(self.last, tmp)
                except OSError:
                    shutil.copyfile(self.last, tmp)
                os.replace(tmp, target)
            finally:
                if tmp.exists():
                    tmp.unlink()
            if self.keep_last:
                for old in self.step_checkpoints()[: -self.keep_last]:
                    old.unlink(missing_ok=True)
        return self.last
