"""A simulate run's bookkeeping: per-sequence results and seeds, the plan (what is done, what differs from the
request, what to simulate in which order), the progress bar, and the summary ``OUT/simulate.json``.

:func:`stored_differences` compares a finished stream file with the request: equal is skipped, different is
refused in one line naming ``--overwrite``. The loop that simulates is :mod:`evforge.simulator.pipeline`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import re
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from evforge.formats.atomic import atomic_write_text
from evforge.formats.streamfile import StreamFile, is_complete_stream

from .. import __version__
from ..errors import InputError
from ..fingerprint import differences
from .engine import resolve_device
from .hashing import mix32
from .params import DVSParams, parse_resolution
from .settings import SimulateConfig
from .sources import FrameSequence

logger = logging.getLogger(__name__)

SUMMARY_NAME = "simulate.json"
_TMP_RE = re.compile(r".+\.h5\.tmp-\d+")  # StreamWriter's temp files (<name>.h5.tmp-<pid>)
# stream-file attrs that describe how a file was made, not what it holds: not compared on a rerun
_RUN_ATTRS = ("created", "device", "torch_version", "python", "evforge_version", "source")
_REQUEST_KEYS = ("preset", "recipe", "overrides", "resolution", "run_seed", "upsample", "num_frames", "native_size")


@dataclass
class SequenceResult:
    name: str
    path: Path
    status: str  # "done", "skipped" or "failed" ("pending" while a run goes on or when it was stopped)
    events: int = 0
    frames: int = 0
    steps: int = 0
    error: str | None = None
    device: str = ""  # where it was simulated (for "skipped": where the existing file was)
    seconds: float = 0.0  # wall time from opening its slot to closing its file


def sequence_seed(seed: int, name: str) -> int:
    """Per-sequence seed from the run seed and the sequence name (independent of order and batching)."""
    return mix32(mix32(seed & 0xFFFFFFFF) ^ zlib.crc32(name.encode())) & 0x7FFFFFFF


def output_path(out_dir, name: str) -> Path:
    return Path(out_dir) / f"{name}.h5"


def stream_attrs(cfg: SimulateConfig, seq: FrameSequence, params: DVSParams, seed: int, size, device) -> dict:
    attrs = {
        "simulator": "evforge", "evforge_version": __version__, "sequence": seq.name, "source": str(seq.source),
        "preset": cfg.preset, "overrides": dict(cfg.overrides), "seed": seed, "run_seed": cfg.seed,
        "resolution": list(size), "native_size": list(seq.size), "upsample": dataclasses.asdict(cfg.upsample),
        "device": str(device), "torch_version": torch.__version__, "python": platform.python_version(),
        "num_frames": len(seq), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if cfg.recipe:
        attrs["recipe"] = cfg.recipe
    attrs.update(params.to_dict())  # every pixel-model parameter under its v2e name
    return attrs


def _plain(value):
    """Attrs as JSON values (tuples as lists, numpy scalars as Python ones), so stored and requested compare."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def stored_differences(path, cfg: SimulateConfig, seq: FrameSequence, out_size) -> tuple[list[str], dict]:
    """How the finished stream file ``path`` differs from what ``cfg`` would make of ``seq`` now.

    Returns ``(differences, info)``: ``differences`` in words (:func:`evforge.fingerprint.differences`, empty
    when the file is what the request would write; a changed frame count or frame times count too) and
    ``info`` = the file's ``events`` and ``device``. Run details (time, device, versions, source path) are not
    compared: the CPU and CUDA paths make the same events, and a moved input is the same input.
    """
    seed = sequence_seed(cfg.seed, seq.name)
    want = _plain({k: v for k, v in stream_attrs(cfg, seq, cfg.params().resolve(seed), seed, out_size, "")
                   .items() if k not in _RUN_ATTRS})
    try:
        with StreamFile(path) as sf:
            have = _plain({k: v for k, v in sf.attrs.items() if k not in _RUN_ATTRS})
            info = {"events": sf.num_events, "device": str(sf.attrs.get("device", ""))}
            same_times = np.array_equal(sf.frame_times, np.asarray(seq.timestamps_us, dtype=np.int64))
    except InputError as err:
        return [f"unreadable ({err.problem})"], {"events": 0, "device": ""}
    # what the user asked for first (preset, seed, ...), then the pixel-model values that follow from it
    first = [k for k in _REQUEST_KEYS if k in have or k in want]
    pick = lambda d, keys: {k: d[k] for k in keys if k in d}
    rest = [k for k in set(have) | set(want) if k not in first]
    diffs = [d for d in differences(pick(have, first), pick(want, first), limit=99) + differences(
        pick(have, rest), pick(want, rest), limit=99)]
    diffs = diffs[:4] + (["..."] if len(diffs) > 4 else [])
    if not diffs and not same_times:
        diffs = ["frame times: stored ones differ from the input's timestamps"]
    return diffs, info


def parse_devices(devices, default: str = "auto") -> list[str]:
    """``"cuda:0,cuda:1"`` -> one worker per device; ``"cpu:4"`` -> 4 CPU workers; None -> ``[default]``."""
    if devices is None:
        return [default]
    if isinstance(devices, str):
        devices = [d.strip() for d in devices.split(",") if d.strip()]
    out = []
    for d in devices:
        m = re.fullmatch(r"cpu:(\d+)", str(d))
        if m:
            if int(m.group(1)) < 1:
                raise ValueError(f"devices: {d!r} asks for no CPU worker")
            out += ["cpu"] * int(m.group(1))
        else:
            dev = resolve_device(d)  # an unknown name, or CUDA without a GPU, fails before any work
            if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ValueError(f"devices: {d!r}, but torch sees {torch.cuda.device_count()} CUDA device(s)")
            out.append(str(d))
    if not out:
        raise ValueError("devices: none given")
    return out


def remove_temp_files(out_dir) -> None:
    """Delete ``<name>.h5.tmp-<pid>`` files of killed runs below ``out_dir`` (the caller holds its lock)."""
    for root, _, names in os.walk(out_dir):
        for name in names:
            if _TMP_RE.fullmatch(name):
                Path(root, name).unlink(missing_ok=True)


def plan_run(sequences, out_dir, cfg: SimulateConfig) -> tuple[dict, list]:
    """The results (finished files ``skipped``, sequences that cannot start ``failed``) and the work to do:
    ``(sequence, output size)`` pairs, grouped by size (most frames first) and longest first in a group.

    A finished file made with other settings is refused (:class:`InputError` naming it and the first
    differences) unless ``cfg.overwrite``; it is never silently kept or silently redone.
    """
    size = parse_resolution(cfg.resolution)
    cfg.params()  # bad parameters fail before any work
    results = {s.name: SequenceResult(s.name, output_path(out_dir, s.name), "pending") for s in sequences}
    todo, changed = [], []
    for seq in sequences:
        r = results[seq.name]
        try:
            out_size = tuple(size or seq.size)
            complete = not cfg.overwrite and is_complete_stream(r.path)
            if complete:
                diffs, info = stored_differences(r.path, cfg, seq, out_size)
        except InputError as e:
            fail(r, e)
            log_failure(r)
            continue
        if not complete:
            todo.append((seq, out_size))
        elif diffs:
            changed.append((r.path, diffs))
        else:
            r.status, r.events, r.frames, r.device = "skipped", info["events"], len(seq), info["device"]
    if changed:
        path, diffs = changed[0]
        more = f"; {len(changed) - 1} more file(s) differ too" if len(changed) > 1 else ""
        raise InputError(path, f"made with other settings ({'; '.join(diffs)}){more}: rerun with --overwrite to "
                               f"simulate again, or write into another folder")
    frames_by_size: dict = {}
    for seq, out_size in todo:
        frames_by_size[out_size] = frames_by_size.get(out_size, 0) + len(seq)
    todo.sort(key=lambda item: (-frames_by_size[item[1]], item[1], -len(item[0])))  # stable: input order
    return results, todo


def write_summary(out_dir, results: list[SequenceResult], cfg: SimulateConfig, *, started: float, executor: str,
                  devices: list[str], command: str | None) -> Path:
    """``out_dir/simulate.json`` (atomically): the run's settings, totals and one line per sequence."""
    out_dir = Path(out_dir)
    rows = []
    for r in results:
        try:
            rel = r.path.relative_to(out_dir).as_posix()
        except ValueError:
            rel = str(r.path)
        rows.append({"sequence": r.name, "file": rel, "status": r.status, "device": r.device, "events": r.events,
                     "frames": r.frames, "steps": r.steps, "seconds": round(r.seconds, 3), "error": r.error})
    count = lambda status: sum(r.status == status for r in results)
    summary = {
        "evforge_version": __version__, "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - started, 3),
        "executor": executor, "devices": devices,
        "config": _plain({k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("device", "overwrite")}),
        "totals": {"sequences": len(results), "done": count("done"), "skipped": count("skipped"),
                   "failed": count("failed"), "pending": count("pending"),
                   "events": sum(r.events for r in results if r.status in ("done", "skipped")),
                   "frames_simulated": sum(r.frames for r in results if r.status == "done")},
        "sequences": rows,
    }
    return atomic_write_text(out_dir / SUMMARY_NAME, json.dumps(summary, indent=1) + "\n")


class Progress:
    """One progress bar over the run (frames, with sequences done and events/s) and the results by name;
    every executor reports here (:meth:`advance` as frames are simulated, :meth:`finish` per sequence)."""

    def __init__(self, results: dict, total_frames: int, total_seqs: int, show: bool):
        self.results, self.total_seqs, self.finished, self.events = results, total_seqs, 0, 0
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=total_frames, unit="frame", desc="simulate", disable=not show, dynamic_ncols=True)

    def advance(self, frames: int, events: int) -> None:
        self.events += events
        self.bar.update(frames)

    def finish(self, result: SequenceResult) -> None:
        if result.status == "failed":  # logged here, in the run's own process and thread, never in a worker
            log_failure(result)
        self.results[result.name] = result
        self.finished += 1
        rate = self.events / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix(seq=f"{self.finished}/{self.total_seqs}", ev_s=f"{rate:.3g}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def fail(result: SequenceResult, err: Exception) -> None:
    """Mark ``result`` failed with ``err`` as its one-line error (logged when the run's report receives it)."""
    result.status = "failed"
    result.error = str(err) if isinstance(err, InputError) else f"{result.name}: {type(err).__name__}: {err}"
    result.error = " ".join(result.error.split())  # one line


def log_failure(result: SequenceResult) -> None:
    """A failed sequence's line, ``failed: <error>``, at WARNING: the run goes on without it."""
    logger.warning("failed: %s", result.error)


# the loggers of a run's failure lines: a failed sequence (here), a worker process that died (the executor's)
_FAILURE_LOGGERS = (__name__, "evforge.simulator.executor")


class _OtherThreads(logging.Filter):
    """Passes the records of every thread but one."""

    def __init__(self, thread: int):
        super().__init__()
        self.thread = thread

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread


@contextlib.contextmanager
def quiet_failures():
    """Within the block, the failure lines of runs made by this thread are not logged: for a caller that
    records the failed results itself (the TartanAir converter's errors.jsonl). Other threads still log."""
    only_others = _OtherThreads(threading.get_ident())
    loggers = [logging.getLogger(name) for name in _FAILURE_LOGGERS]
    for lg in loggers:
        lg.addFilter(only_others)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(only_others)
