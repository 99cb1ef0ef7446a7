"""Frame sequences on disk -> one stream file per sequence: a whole run, and the batched loop on one device.

:func:`simulate_sequences` is a run: it holds ``OUT/.evforge.lock``, removes the temp files of killed runs,
compares every finished stream file with the request (:func:`stored_differences`: skipped when equal, refused
in one line naming ``--overwrite`` when not), simulates the rest longest first on one device, on worker
processes (one per device) or on Ray (:mod:`evforge.simulator.executor`), and writes ``OUT/simulate.json``
(the results, plan and summary: :mod:`evforge.simulator.run_plan`).

:func:`simulate_on_device` is the loop on one device: sequences with the same output size share a
:class:`~evforge.simulator.engine.BatchEngine`; each of its B slots simulates one sequence and pulls the next
pending one from a feed when it finishes, so batches stay full. Frames are decoded (and on the CPU turned into
the simulator's gray input) by a thread pool a few frames ahead of the simulation. Every stream file is
written atomically, and a sequence with a bad frame or flow file fails alone (its partial output is removed)
while the others are done. A sequence's events depend only on its frames and :func:`sequence_seed`, not on the
batch, the device or the process, so every partition of a run writes the same event columns.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from evforge.formats.events import make_events
from evforge.formats.streamfile import StreamWriter

from ..errors import InputError, OutputError
from ..locks import FolderLock
from . import cpu_frames
from .engine import BatchEngine, resolve_device
from .params import DVSParams, parse_resolution
from .resample import prepare_frames, resize_flow, rgb_to_gray
from .run_plan import (  # noqa: F401  (re-exported)
    SUMMARY_NAME,
    Progress,
    SequenceResult,
    fail,
    output_path,
    parse_devices,
    plan_run,
    quiet_failures,
    remove_temp_files,
    sequence_seed,
    stored_differences,
    stream_attrs,
    write_summary,
)
from .settings import SimulateConfig, UpsampleConfig  # noqa: F401  (re-exported: defined without torch)
from .sources import FrameSequence
from .upsample import FrameInterpolator

logger = logging.getLogger(__name__)

class _FrameReader:
    """Frames of one sequence by index, from worker threads: image files are decoded in parallel (random
    access); a video is decoded in order through one iterator, frames read ahead kept until asked for."""

    def __init__(self, seq: FrameSequence):
        self.seq = seq
        self._lock = threading.Lock()
        self._iter = None if seq.frame_files is not None else seq.iter_frames()
        self._next = 0
        self._ahead: dict[int, np.ndarray] = {}

    def read(self, i: int) -> np.ndarray:
        if self._iter is None:
            return self.seq.read_frame(i)
        with self._lock:
            while i not in self._ahead:
                self._ahead[self._next] = next(self._iter)
                self._next += 1
            return self._ahead.pop(i)


@dataclass
class _Slot:
    seq: FrameSequence
    result: SequenceResult
    writer: StreamWriter | None = None
    reader: _FrameReader | None = None
    queued: deque = field(default_factory=deque)  # futures of the next frames, in order
    submitted: int = 0  # frames submitted for reading
    index: int = 0  # index of the frame the first queued future delivers
    params: DVSParams | None = None
    seed: int = 0
    t0: float = 0.0  # when the slot was opened (perf_counter)


def _read_frame(slot: _Slot, i: int, want_flow: bool, prepare_size, want_u8: bool):
    """On a worker thread: decode frame ``i`` of the slot (and the flow into it, when asked). With
    ``prepare_size`` (a CPU engine; the output size or None) it is also turned into the simulator's gray
    input here, and with ``want_u8`` into the 8-bit frame the stream file stores."""
    frame = slot.reader.read(i)
    flow = valid = None
    if want_flow and i > 0 and slot.seq.has_flow:
        flow = slot.seq.read_flow(i - 1)
        valid = slot.seq.read_flow_mask(i - 1)
    x = gray_u8 = None
    if prepare_size is not False:
        native = prepare_size is None or tuple(prepare_size) == frame.shape[1::-1]
        if native and frame.dtype == np.uint8 and frame.ndim == 3 and cpu_frames.AVAILABLE:
            gray, gray_u8 = cpu_frames.luma(frame, want_u8)  # the input and its 8-bit copy in one pass
            return frame, torch.from_numpy(gray)[None], gray_u8, flow, valid
        x = prepare_frames([frame], prepare_size, "cpu")[0]
        if want_u8:
            gray_u8 = x[0].round().clamp(0, 255).to(torch.uint8).numpy()
    return frame, x, gray_u8, flow, valid


def simulate_sequences(sequences: list[FrameSequence], out_dir, cfg: SimulateConfig = SimulateConfig(), *,
                       devices=None, executor: str = "local", address: str | None = None,
                       ray_gpus: float | None = None, progress: bool = True,
                       interpolator: FrameInterpolator | None = None,
                       command: str | None = None, lock: bool = True,
                       summary: bool = True) -> list[SequenceResult]:
    """Simulate ``sequences`` into ``out_dir/<name>.h5``; returns one result per sequence (input order).

    ``devices`` (default ``[cfg.device]``; see :func:`parse_devices`): one device runs in this process, several
    run as one worker process each over a shared queue (longest sequences first). ``executor="ray"`` runs tasks
    of up to ``cfg.batch`` sequences on Ray instead (``address``: a cluster, default a local Ray; ``ray_gpus``:
    the GPUs a task asks for, default 1 when the device is CUDA). Failures are reported in the results (and
    logged at WARNING, ``failed: <error>``, by ``evforge.simulator.run_plan``; see :func:`quiet_failures`) rather
    than raised, so one bad sequence never stops the others. Raises
    :class:`~evforge.errors.LockedError` when another run writes into ``out_dir``, and :class:`InputError` when
    a finished file was made with other settings (unless ``cfg.overwrite``). Writes ``out_dir/simulate.json``
    (unless ``summary=False``). ``lock=False``: the caller holds a lock over ``out_dir`` and may run several of
    these into it at once (on other sequences), so neither the folder lock nor the temp-file cleanup is done.
    """
    from . import executor as executors

    if executor not in ("local", "ray"):
        raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")
    if executor == "ray":
        device_list = [str(devices or cfg.device)]
        if device_list[0] not in ("auto", "cpu", "cuda"):
            raise ValueError(f"devices {device_list[0]!r}: with executor 'ray' give the device inside each task "
                             f"(cuda, cpu or auto); Ray places the tasks on the cluster's GPUs")
    else:
        device_list = parse_devices(devices, cfg.device)
    out_dir = Path(out_dir)
    started = time.time()
    with FolderLock(out_dir, command) if lock else contextlib.nullcontext():
        if lock:
            remove_temp_files(out_dir)  # left by killed runs; only the lock holder may do this
        results, todo = plan_run(sequences, out_dir, cfg)
        total = sum(len(seq) for seq, _ in todo)
        logger.debug("%s: %d sequence(s) to simulate (%d frames), %d already done, %d failed to start; on %s",
                     out_dir, len(todo), total, sum(r.status == "skipped" for r in results.values()),
                     sum(r.status == "failed" for r in results.values()), ", ".join(device_list))
        report = Progress(results, total, len(todo), progress)
        try:
            if executor == "ray":
                executors.run_ray(todo, out_dir, cfg, device_list[0], report, address=address, gpus=ray_gpus,
                                  interpolator=interpolator)
            elif len(device_list) == 1:
                simulate_on_device(ListFeed(todo), out_dir, cfg, device_list[0], interpolator=interpolator,
                                   report=report)
            else:
                executors.run_workers(todo, out_dir, cfg, device_list, report, interpolator=interpolator)
        except BaseException:
            report.close()
            try:  # what finished is on record even when the run stops (Ctrl-C, a full disk)
                if summary:
                    write_summary(out_dir, [results[s.name] for s in sequences], cfg, started=started,
                                  executor=executor, devices=device_list, command=command)
            except OSError:
                pass
            raise
        report.close()
        if summary:
            write_summary(out_dir, [results[s.name] for s in sequences], cfg, started=started, executor=executor,
                          devices=device_list, command=command)
    return [results[s.name] for s in sequences]


class ListFeed:
    """The sequences for one device, from a list of ``(sequence, output size)`` pairs (this process)."""

    def __init__(self, items):
        self.items = list(items)

    def pull(self, size=None):
        """The next ``(sequence, size)`` with output size ``size`` (any size when None), or None."""
        for i, item in enumerate(self.items):
            if size is None or item[1] == size:
                return self.items.pop(i)
        return None

    def remaining(self, size) -> int:
        return sum(item[1] == size for item in self.items)


class _Report:
    """What :func:`simulate_on_device` tells about its work: frames simulated and sequences finished."""

    def advance(self, frames: int, events: int) -> None:  # pragma: no cover - an interface
        pass

    def finish(self, result: SequenceResult) -> None:  # pragma: no cover - an interface
        pass


def simulate_on_device(feed, out_dir, cfg: SimulateConfig, device, *, interpolator: FrameInterpolator | None = None,
                       report=None) -> None:
    """Simulate every sequence ``feed.pull`` gives on ``device``, batched (see the module docstring).

    ``feed``: ``pull(size)`` -> the next ``(sequence, output size)`` (of that size, or any when None) or None,
    and ``remaining(size)`` -> at most how many more of that size it has. ``report``: ``advance(frames, events)``
    and ``finish(result)`` (which logs a failed one: :class:`Progress` does; this loop logs nothing, so worker
    processes print no line of their own). The output is written whatever is there (the caller decided what to do).
    """
    device = resolve_device(device)
    size = parse_resolution(cfg.resolution)
    report = report or _Report()
    base_params = cfg.params()
    with ThreadPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
        while (first := feed.pull(None)) is not None:
            _run_group(first, feed, size, cfg, base_params, device, pool, report, interpolator, out_dir)


def _run_group(first, feed, size, cfg, base_params, device, pool, report, interpolator, out_dir):
    """Simulate ``first`` and every further sequence of its output size that the feed gives, B at a time."""
    w, h = out_size = first[1]
    B = max(1, min(cfg.batch, 1 + feed.remaining(out_size)))
    engine = BatchEngine(B, h, w, device, cfg.upsample, interpolator)
    want_flow = cfg.upsample.mode == "flow"
    slots: list[_Slot | None] = [None] * B
    firsts = [first]

    # frames decoded ahead per slot: enough to keep every worker busy, at least 2
    depth = max(2, -(-max(1, cfg.workers) // B) + 1)
    channels = engine.channels
    # a CPU engine with a gray interpolator gets its input prepared on the worker threads too
    prep_size = size if engine.device.type == "cpu" and channels == 1 else False

    def submit(slot: _Slot) -> None:
        while len(slot.queued) < depth and slot.submitted < len(slot.seq):
            slot.queued.append(pool.submit(_read_frame, slot, slot.submitted, want_flow, prep_size,
                                           cfg.save_frames))
            slot.submitted += 1

    def abort_all() -> None:  # a full or read-only disk stops the run (exit 3): no slot leaves a temp file
        for slot in slots:
            if slot is not None:
                slot.writer.abort()
                for future in slot.queued:
                    future.cancel()

    def open_slot(b: int) -> None:
        while (item := (firsts.pop() if firsts else feed.pull(out_size))) is not None:
            seq = item[0]
            r = SequenceResult(seq.name, output_path(out_dir, seq.name), "pending", device=str(engine.device))
            t0 = time.perf_counter()
            seed = sequence_seed(cfg.seed, seq.name)
            params = base_params.resolve(seed)
            try:
                ts = seq.timestamps_us
                writer = StreamWriter(r.path, width=w, height=h, t_offset=int(ts[0]), t_end=int(ts[-1]),
                                      attrs=stream_attrs(cfg, seq, params, seed, out_size, engine.device),
                                      compression=cfg.compression, save_frames=cfg.save_frames)
            except OutputError:
                abort_all()
                raise
            except (InputError, OSError, ValueError) as e:
                fail(r, e)
                report.advance(len(seq), 0)
                report.finish(r)
                continue
            slot = _Slot(seq, r, writer, _FrameReader(seq), params=params, seed=seed, t0=t0)
            submit(slot)
            slots[b] = slot
            return
        slots[b] = None

    def close_slot(b: int, err: Exception | None = None) -> None:
        slot = slots[b]
        if isinstance(err, OutputError):
            abort_all()
            raise err
        if err is None:
            try:
                slot.writer.close()
            except OutputError:
                abort_all()
                raise
            slot.result.status = "done"
        else:
            slot.writer.abort()
            for future in slot.queued:
                future.cancel()
            fail(slot.result, err)
            report.advance(len(slot.seq) - slot.index, 0)
        slot.result.seconds = time.perf_counter() - slot.t0
        report.finish(slot.result)
        open_slot(b)

    for b in range(B):
        open_slot(b)
    while any(s is not None for s in slots):
        frames = torch.zeros(B, channels, h, w, device=engine.device)
        flows = torch.zeros(B, 2, h, w, device=engine.device) if want_flow else None
        valid = torch.ones(B, 1, h, w, dtype=torch.bool, device=engine.device) if want_flow else None
        active, starting, t_now, gray_u8 = [False] * B, [], [0] * B, [None] * B
        for b, slot in enumerate(slots):
            if slot is None:
                continue
            try:
                frame, x, gray_u8[b], flow, fvalid = slot.queued.popleft().result()
                if x is None:
                    x = prepare_frames([frame], size, engine.device, gray=channels == 1)[0]
            except Exception as e:  # a bad frame or flow file fails this sequence only
                close_slot(b, e)
                continue
            i = slot.index
            t_now[b] = int(slot.seq.timestamps_us[i])
            if i == 0:
                engine.start(b, x, t_now[b], slot.params, slot.seed)
                starting.append(b)
            else:
                frames[b] = x
                active[b] = True
                if flow is not None:
                    flows[b] = resize_flow(torch.from_numpy(np.asarray(flow)).permute(2, 0, 1)[None].to(
                        engine.device), size)[0]
                    if fvalid is not None:
                        valid[b] = _resize_mask(fvalid, (w, h), engine.device)
            if cfg.save_frames and gray_u8[b] is None:  # the simulator's input, as 8 bits
                gray = x if channels == 1 else rgb_to_gray(x[None])[0]
                gray_u8[b] = gray[0].round().clamp(0, 255).to(torch.uint8).cpu().numpy()
            slot.index += 1
            submit(slot)
        ev = engine.advance(frames, t_now, active, flow=flows, flow_valid=valid)
        by_slot = _split_by_slot(ev, B)
        for b, slot in enumerate(slots):
            if slot is None or not (active[b] or b in starting):
                continue
            try:
                if b in by_slot:
                    slot.writer.append(by_slot[b])
                    slot.result.events += len(by_slot[b])
                slot.writer.add_frame(t_now[b], gray_u8[b])
            except Exception as e:
                close_slot(b, e)
                continue
            slot.result.frames += 1
            slot.result.steps = engine.substeps[b]
            report.advance(1, len(by_slot[b]) if b in by_slot else 0)
            if slot.index >= len(slot.seq):
                close_slot(b)


def _resize_mask(mask: np.ndarray, size, device) -> torch.Tensor:
    """A validity mask at the output size: an output pixel is valid only where all its inputs are."""
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None].to(device)
    from .resample import area_resize
    return area_resize(m, size)[0] >= 0.999


def _split_by_slot(ev, B: int) -> dict[int, np.ndarray]:
    """StepEvents sorted by slot -> {slot: event array} (at most one device->host copy)."""
    if len(ev) == 0:
        return {}
    b_, x, y, t, p = ev.to_host()
    bounds = np.searchsorted(b_, np.arange(B + 1), "left")
    out = {}
    for b in range(B):
        lo, hi = bounds[b], bounds[b + 1]
        if hi > lo:
            out[b] = make_events(x[lo:hi], y[lo:hi], t[lo:hi], p[lo:hi])
    return out
