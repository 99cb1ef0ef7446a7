"""Training logs on rank 0: JSON lines, TensorBoard and a tqdm progress bar.

On resume, records past the resumed step are dropped (JSONL rewritten atomically, TensorBoard ``purge_step``),
so the logs read as if the run had never been interrupted.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path

__all__ = ["JsonlLogger", "TensorBoardLogger", "Progress", "Loggers"]


def _clean(v):
    """JSON-safe numbers: NaN/inf become strings (strict JSON has no such numbers)."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class JsonlLogger:
    """Appends one JSON object per call to a file; each record is a single ``write`` on an ``O_APPEND`` descriptor."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _truncate_after(self, step: int) -> None:
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a killed run
            if int(rec.get("step", 0)) <= step:
                keep.append(line)
        tmp = self.path.with_name(f".{self.path.name}.tmp.{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        line = json.dumps({k: _clean(v) for k, v in record.items()}, separators=(",", ":")) + "\n"
        try:
            os.write(self._fd, line.encode())
        except OSError as err:  # a full disk: name the file (os.write's error does not)
            raise OSError(err.errno, err.strerror, os.fspath(self.path)) from err

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None


class TensorBoardLogger:
    """Scalars to TensorBoard under ``<split>/<name>``."""

    def __init__(self, log_dir: str | os.PathLike, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=None if resume_step is None else resume_step + 1)

    def log(self, record: dict) -> None:
        step, split = int(record["step"]), record.get("split", "train")
        for k, v in record.items():
            if k in ("step", "split", "epoch", "time") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            self.writer.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class Progress:
    """A tqdm bar over optimizer steps. ``enabled="auto"``: the bar on a terminal, else one line per logged step
    (readable in SLURM / nohup logs); ``True``: always the bar; ``False``: nothing."""

    def __init__(self, total: int, initial: int = 0, enabled="auto"):
        self.bar, self.lines, self.total, self.n = None, False, total, initial
        if enabled is False or enabled is None:
            return
        if enabled == "auto" and not sys.stderr.isatty():
            self.lines = True
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0)

    def update(self, n: int = 1, postfix: dict | None = None) -> None:
        self.n += n
        text = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in (postfix or {}).items() if v is not None}
        if self.lines and postfix:
            print(f"step {self.n}/{self.total} " + " ".join(f"{k}={v}" for k, v in text.items()),
                  file=sys.stderr, flush=True)
        if self.bar is None:
            return
        if postfix:
            self.bar.set_postfix(text, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Loggers:
    """The loggers of a run (only rank 0 writes): ``log(record)`` with ``step``, ``split`` and scalars."""

    def __init__(self, out_dir: str | os.PathLike, cfg_log: dict, *, enabled: bool, resume_step: int | None = None):
        self.out = Path(out_dir)
        self.jsonl = self.tb = None
        if not enabled:
            return
        if cfg_log.get("jsonl", True):
            self.jsonl = JsonlLogger(self.out / "log.jsonl", resume_step)
        if cfg_log.get("tensorboard", True):
            try:
                self.tb = TensorBoardLogger(self.out / "tb", resume_step)
            except ImportError as e:
                warnings.warn(f"TensorBoard logging is off: {e}", stacklevel=2)

    def log(self, record: dict) -> None:
        for lg in (self.jsonl, self.tb):
            if lg is not None:
                lg.log(record)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.writer.flush()

    def close(self) -> None:
        for lg in (self.jsonl, self.tb):
            if lg is not None:
                lg.close()
        self.jsonl = self.tb = None
