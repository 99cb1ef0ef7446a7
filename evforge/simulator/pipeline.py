"""Frame sequences on disk -> one stream file per sequence, batched on one device.

Sequences with the same output size share a :class:`~evforge.simulator.engine.BatchEngine`; each of its B
slots simulates one sequence and takes the next pending one when it finishes, so batches stay full.
Frames are decoded (and on the CPU turned into the simulator's gray input) by a thread pool a few frames
ahead of the simulation. Every stream file is written atomically; a rerun skips sequences whose file is
complete, and a sequence with a bad frame or flow file fails alone (its partial output is removed) while
the others are done.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import platform
import threading
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..errors import InputError, OutputError
from ..events import make_events
from ..streamfile import StreamWriter, is_complete_stream
from . import cpu_frames
from .engine import BatchEngine, resolve_device
from .hashing import mix32
from .params import DVSParams, parse_resolution
from .resample import prepare_frames, resize_flow, rgb_to_gray
from .settings import SimulateConfig, UpsampleConfig  # noqa: F401  (re-exported: defined without torch)
from .sources import FrameSequence
from .upsample import FrameInterpolator


@dataclass
class SequenceResult:
    name: str
    path: Path
    status: str  # "done", "skipped" or "failed"
    events: int = 0
    frames: int = 0
    steps: int = 0
    error: str | None = None


def sequence_seed(seed: int, name: str) -> int:
    """Per-sequence seed from the run seed and the sequence name (independent of order and batching)."""
    return mix32(mix32(seed & 0xFFFFFFFF) ^ zlib.crc32(name.encode())) & 0x7FFFFFFF


def output_path(out_dir, name: str) -> Path:
    return Path(out_dir) / f"{name}.h5"


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


def _stream_attrs(cfg: SimulateConfig, seq: FrameSequence, params: DVSParams, seed: int, size, device) -> dict:
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
                       progress: bool = True, interpolator: FrameInterpolator | None = None,
                       log=print) -> list[SequenceResult]:
    """Simulate ``sequences`` into ``out_dir/<name>.h5``; returns one result per sequence (input order).

    Failures are reported in the results (and through ``log``) rather than raised, so one bad sequence
    never stops the others.
    """
    device = resolve_device(cfg.device)
    size = parse_resolution(cfg.resolution)
    base_params = cfg.params()
    results = {s.name: SequenceResult(s.name, output_path(out_dir, s.name), "pending") for s in sequences}
    todo = []
    for seq in sequences:
        r = results[seq.name]
        if not cfg.overwrite and is_complete_stream(r.path):
            r.status = "skipped"
        else:
            todo.append(seq)
    groups: dict[tuple[int, int], list[FrameSequence]] = {}
    for seq in todo:
        try:
            out_size = size or seq.size
        except InputError as e:
            _fail(results[seq.name], e, log)
            continue
        groups.setdefault(tuple(out_size), []).append(seq)

    total = sum(len(s) for g in groups.values() for s in g)
    bar = tqdm(total=total, unit="frame", desc="simulate", disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
        for (w, h), seqs in groups.items():
            _run_group(seqs, (w, h), size, cfg, base_params, device, pool, results, bar, interpolator, log)
    bar.close()
    return [results[s.name] for s in sequences]


def _fail(result: SequenceResult, err: Exception, log) -> None:
    result.status = "failed"
    result.error = str(err) if isinstance(err, InputError) else f"{result.name}: {type(err).__name__}: {err}"
    log(f"failed: {result.error}")


def _run_group(seqs, out_size, size, cfg, base_params, device, pool, results, bar, interpolator, log):
    w, h = out_size
    B = max(1, min(cfg.batch, len(seqs)))
    engine = BatchEngine(B, h, w, device, cfg.upsample, interpolator)
    want_flow = cfg.upsample.mode == "flow"
    pending = list(seqs)
    slots: list[_Slot | None] = [None] * B

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
        while pending:
            seq = pending.pop(0)
            r = results[seq.name]
            seed = sequence_seed(cfg.seed, seq.name)
            params = base_params.resolve(seed)
            try:
                for stale in glob.glob(glob.escape(str(r.path)) + ".tmp-*"):
                    os.remove(stale)  # left by a run that was killed
                ts = seq.timestamps_us
                writer = StreamWriter(r.path, width=w, height=h, t_offset=int(ts[0]), t_end=int(ts[-1]),
                                      attrs=_stream_attrs(cfg, seq, params, seed, out_size, device),
                                      compression=cfg.compression, save_frames=cfg.save_frames)
            except OutputError:
                abort_all()
                raise
            except (InputError, OSError, ValueError) as e:
                _fail(r, e, log)
                continue
            slot = _Slot(seq, r, writer, _FrameReader(seq), params=params, seed=seed)
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
            _fail(slot.result, err, log)
            bar.update(len(slot.seq) - slot.index)
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
            bar.update(1)
            if slot.index >= len(slot.seq):
                close_slot(b)
        bar.set_postfix(events=sum(r.events for r in results.values()), refresh=False)


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
