"""Simulator throughput: evforge's batched BatchEngine against the real v2e EventEmulator on the same frames.

Measures frames/s and events/s of :class:`evforge.simulator.engine.BatchEngine` for presets ``ideal`` and
``noisy``, at 346x260 and 640x480, batch 1/8/32, on the CPU and (when torch sees one) on CUDA, next to v2e's
own ``EventEmulator`` (:mod:`bench.v2e_emulator`; batch 1: it has no batching) with the same parameters, on
the same frames, on the same device, in the same run, with the speed-up as a ratio column. On the CPU it also
times ``evforge simulate`` end to end from a PNG folder (:mod:`bench.cli_e2e`) against v2e's core on the same
frames, and ``evforge --help``. Prints a table and writes JSON + Markdown under ``bench/results/`` named after
the machine.

Input frames are procedural moving textured scenes (:mod:`evforge.simulator.scenes`: a textured pan),
rendered once up front at the target resolution (not timed), one distinct scene per batch element,
converted to 8-bit gray and kept in memory: as float32 on the device for evforge, as uint8 arrays for v2e
(what its own pipeline hands the emulator). A run longer than the rendered clip plays it back and forth
("ping-pong"), so the motion stays continuous while the timestamps keep increasing.

Rows:

* ``evforge`` / upsample ``none``: one simulated step per source frame, source at ``--source-hz`` (default
  1 kHz, i.e. frames already upsampled): the per-step comparison with v2e.
* ``evforge-torch``: the same step as torch ops (``kernels="torch"``) instead of the fused kernels (numba on
  the CPU, Triton on CUDA), at the smallest batch.
* ``v2e``: v2e's EventEmulator on the same frames of batch element 0.
* ``evforge`` / upsample ``linear``: end to end from a ``--e2e-hz`` (default 30 Hz) source with the default
  adaptive log-linear upsampling; frames/s counts source frames, steps/s the simulated sub-steps.

frames/s = batch * frames / seconds. Every measurement starts from a fresh engine (or emulator) and first
simulates ``--settle-frames`` frame pairs untimed (default 4; 1 for the end-to-end rows), for evforge and v2e
alike, so the timed frames show the steady state of a long sequence rather than the page faults of fresh
buffers. Each measurement is repeated ``--repeats`` times (after a warm-up), interleaved across the rows of a
(device, resolution, preset) group so that slow drifts of a shared machine hit all rows alike; tables quote
the median with [min-max], and ratios the median of the per-repeat ratios. Events are copied to the host as
one array per step (as the dataset pipeline does; v2e returns host arrays too) unless ``--events device``.

Usage::

    python bench/simulator.py                 # full run, CPU (+ CUDA if available)
    python bench/simulator.py --device cuda   # CUDA only
    python bench/simulator.py --v2e-root ~/src/v2e        # a v2e clone elsewhere
    python bench/simulator.py --quick         # smoke test (~1 min on 2 cores), results in the temp dir
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import cli_e2e
import harness
import numpy as np
import torch
from harness import REPO, Clock, Row, csv, markdown_head, markdown_table, num, ratio_stats, spread, stats, sync
from machine import MemoryProbe, cpuinfo, machine_info
from v2e_emulator import V2E, emulator_kwargs, find_root

from evforge import BatchEngine, UpsampleConfig, get_preset
from evforge.simulator.resample import rgb_to_gray
from evforge.simulator.scenes import SceneSpec, build_scene, render_frame

# Frames per measurement for batch 1, per device and resolution; batch B runs ceil(N / B**BATCH_SCALING)
# frames per slot (at least MIN_FRAMES), so that measurements take comparable times whatever the batch.
# v2e runs its own count (V2E_FRAMES): it is 10-100x slower. Chosen so that the full default CPU run stays
# under ~20 minutes on 2 cores.
DEFAULT_FRAMES = {"cpu": {(346, 260): 200, (640, 480): 100}, "cuda": {(346, 260): 600, (640, 480): 400}}
V2E_FRAMES = {"cpu": {(346, 260): 64, (640, 480): 32}, "cuda": {(346, 260): 200, (640, 480): 100}}
BATCH_SCALING = {"cpu": 0.5, "cuda": 0.25}  # a GPU gains much more from batching than a CPU
DEFAULT_E2E_FRAMES = {"cpu": {(346, 260): 3, (640, 480): 2}, "cuda": {(346, 260): 60, (640, 480): 40}}
MIN_FRAMES = 4
QUICK = dict(resolutions="346x260", batches="1,8", repeats=1, frames=12, e2e_frames=2, e2e_batch=2, scene_frames=8,
             cli_frames=12, cli_size="160x120")


# --------------------------------------------------------------------------------------------- input frames


def _render_clip(args) -> np.ndarray:
    """One scene as RGB uint8 (N, H, W, 3); runs in a worker process."""
    width, height, n, speed_px, seed = args
    scene = build_scene(SceneSpec(width=width, height=height, frames=n, speed_px=speed_px, seed=seed))
    return np.stack([render_frame(scene, i)[0] for i in range(n)])


def render_rgb(specs: dict, workers: int) -> dict:
    """``specs``: {key: (width, height, scenes, frames, speed_px, seed)} -> {key: RGB uint8 (frames, scenes, H,
    W, 3)}, scene s (seed + s) in column s. Runs before any torch work, so the worker processes can fork."""
    jobs = [(key, (w, h, n, speed, seed + s)) for key, (w, h, S, n, speed, seed) in specs.items() for s in range(S)]
    if workers > 1 and len(jobs) > 1:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
            clips = list(pool.map(_render_clip, [j for _, j in jobs]))
    else:
        clips = [_render_clip(j) for _, j in jobs]
    return {key: np.stack([c for (k, _), c in zip(jobs, clips) if k == key], axis=1) for key in specs}


def gray_8bit(rgb: np.ndarray) -> torch.Tensor:
    """RGB uint8 (n, S, H, W, 3) -> 8-bit gray as float32 (n, S, 1, H, W): evforge's luma, rounded, as an
    8-bit gray video would hold it (both simulators get these values)."""
    n, S, h, w, _ = rgb.shape
    x = torch.from_numpy(rgb.reshape(n * S, h, w, 3)).permute(0, 3, 1, 2).float()
    return rgb_to_gray(x).round().clamp(0, 255).view(n, S, 1, h, w)


def preset_params(spec: str):
    """``NAME`` or ``NAME+field=value+...``: a preset with some DVSParams fields replaced (e.g.
    ``noisy+refractory_period_s=0``, v2e's own noisy preset, which has no refractory period)."""
    name, *fields = spec.split("+")
    overrides = {}
    for item in fields:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"preset {spec!r}: expected NAME+field=value")
        overrides[key] = float(value)
    return get_preset(name, **overrides)


def pingpong(i: int, last: int) -> int:
    """Index of step ``i`` when a clip of frames 0..last is played forward, backward, forward..."""
    j = i % (2 * last)
    return j if j <= last else 2 * last - j


# --------------------------------------------------------------------------------------------- measuring


def run_evforge(clip: torch.Tensor, batch: int, n_frames: int, preset: str, dt_us: int, upsample: UpsampleConfig,
                host_events: bool, device: torch.device, kernels: str = "auto", settle: int = 0) -> dict:
    """Simulate ``settle`` untimed, then ``n_frames`` timed frame pairs for ``batch`` slots; times only the
    advance() loop (with each step's events copied to the host: StepEvents.to_host, one device->host copy
    on CUDA, views on the CPU)."""
    params = preset_params(preset)
    last = clip.shape[0] - 1
    _, _, _, H, W = clip.shape
    with MemoryProbe(device) as mem:
        eng = BatchEngine(batch, H, W, device, upsample, kernels=kernels)
        for b in range(batch):
            eng.start(b, clip[0, b], 0, params, seed=b)
        active = [True] * batch
        for i in range(1, settle + 1):
            eng.advance(clip[pingpong(i, last), :batch], [i * dt_us] * batch, active).to_host()
        settle_steps = sum(eng.substeps)
        events = 0
        sync(device)
        t0 = time.perf_counter()
        for i in range(settle + 1, settle + n_frames + 1):
            ev = eng.advance(clip[pingpong(i, last), :batch], [i * dt_us] * batch, active)
            events += len(ev)
            if host_events and len(ev):
                ev.to_host()
        sync(device)
        seconds = time.perf_counter() - t0
        steps = sum(eng.substeps) - settle_steps
        backend = eng.sim.backend
        del eng, ev
    return {"seconds": seconds, "frames": batch * n_frames, "steps": steps, "events": events,
            "peak_mem_mib": mem.peak_mib, "backend": backend}


def v2e_frames(clip_u8: np.ndarray, n: int) -> np.ndarray:
    """Frames 0..n-1 of the ping-pong sequence of one scene (clip_u8: (frames, H, W) uint8)."""
    last = clip_u8.shape[0] - 1
    return np.stack([clip_u8[pingpong(i, last)] for i in range(n)])


def run_v2e(v2e: V2E, clip_u8: np.ndarray, n_frames: int, preset: str, dt_us: int, device: torch.device,
            settle: int = 0) -> dict:
    """v2e's EventEmulator on scene 0's frames: the first and ``settle`` more untimed, ``n_frames`` timed."""
    frames = v2e_frames(clip_u8, settle + n_frames + 1)
    times_s = np.arange(len(frames)) * dt_us * 1e-6
    with MemoryProbe(device) as mem:
        res = v2e.time(emulator_kwargs(preset_params(preset)), frames, times_s, settle, str(device))
    return {**res, "peak_mem_mib": mem.peak_mib}


@dataclass
class Case:
    """One row of the table: what runs (implementation, batch, frames, upsampling) and its repeats."""

    device: str
    resolution: tuple[int, int]
    preset: str
    impl: str  # "evforge" | "evforge-torch" (kernels="torch") | "v2e"
    upsample: str  # "none" | "linear"
    source_hz: float
    batch: int
    n_frames: int  # frame pairs per slot per measurement
    settle: int = 0  # untimed frame pairs at the start of each measurement
    row: Row = field(default_factory=lambda: Row("case"))

    def run(self, clip, clip_u8, host_events, v2e: V2E | None, warmup: bool = False) -> dict:
        dev = torch.device(self.device)
        dt_us = int(round(1e6 / self.source_hz))
        n = min(self.n_frames, 3 if dev.type == "cpu" else 20) if warmup else self.n_frames
        settle = 0 if warmup else self.settle
        if self.impl == "v2e":
            return run_v2e(v2e, clip_u8, n, self.preset, dt_us, dev, settle)
        return run_evforge(clip, self.batch, n, self.preset, dt_us, UpsampleConfig(mode=self.upsample),
                           host_events, dev, kernels="torch" if self.impl == "evforge-torch" else "auto",
                           settle=settle)

    def summary(self) -> dict:
        row, first = self.row, self.row.runs[0]
        return {"device": self.device, "resolution": f"{self.resolution[0]}x{self.resolution[1]}",
                "preset": self.preset, "impl": self.impl, "upsample": self.upsample, "source_hz": self.source_hz,
                "batch": self.batch, "frames_per_slot": self.n_frames, "repeats": len(row.runs),
                "backend": first.get("backend", "v2e"),
                "frames_per_s": row.rate("frames"), "steps_per_s": row.rate("steps"),
                "events_per_s": row.rate("events"),
                "events_per_frame": first["events"] / first["frames"],
                "steps_per_frame": first["steps"] / first["frames"],
                "ms_per_frame": {"median": 1e3 / row.rate("frames")["median"]},
                "seconds": row.stats("seconds"), "peak_mem_mib": max(row.values("peak_mem_mib")),
                "runs": row.runs}


# --------------------------------------------------------------------------------------------- report


def add_ratios(rows: list[dict]) -> None:
    """evforge frames/s over v2e frames/s, same device, resolution, preset (per-step rows only): the median of
    the per-repeat ratios (repeats are interleaved, so each pair saw the same machine)."""
    refs = {(r["device"], r["resolution"], r["preset"]): r for r in rows if r["impl"] == "v2e"}
    fps = lambda r: [a["frames"] / a["seconds"] for a in r["runs"]]  # noqa: E731
    for r in rows:
        ref = refs.get((r["device"], r["resolution"], r["preset"]))
        r["ratio_vs_v2e"] = None
        if ref and r["impl"].startswith("evforge") and r["upsample"] == "none":
            s = ratio_stats(fps(r), fps(ref))
            r["ratio_per_repeat"], r["ratio_vs_v2e"] = s["per_repeat"], s["median"]


def table(rows: list[dict]) -> str:
    head = ["device", "res", "preset", "impl", "upsample", "src Hz", "batch", "frames/slot", "frames/s [min-max]",
            "ms/frame", "steps/s", "events/s", "ev/frame", "vs v2e [min-max]", "peak mem MiB"]
    lines = []
    for r in rows:
        ratio = "1.0x" if r["impl"] == "v2e" else "-"
        if r.get("ratio_vs_v2e"):
            ratio = harness.ratio({**stats(r["ratio_per_repeat"]), "per_repeat": r["ratio_per_repeat"]})
        impl = r["impl"] if r["impl"] != "evforge" else f"evforge ({r['backend']})"
        cells = [r["device"], r["resolution"], r["preset"], impl, r["upsample"], f"{r['source_hz']:g}",
                 str(r["batch"]), str(r["frames_per_slot"]), spread(r["frames_per_s"]),
                 f"{r['ms_per_frame']['median']:.3g}", num(r["steps_per_s"]["median"]),
                 num(r["events_per_s"]["median"]), num(r["events_per_frame"]), ratio, f"{r['peak_mem_mib']:.0f}"]
        lines.append(cells)
    return markdown_table(head, lines)


def cli_table(cli: dict) -> str:
    ms = lambda v: f"{v:.3g}"  # noqa: E731
    pf = stats(v * 1e3 for v in cli["evforge_per_frame_all"])
    rows = [["evforge simulate, end to end (decode, simulate, write)", spread(pf, ms),
             harness.ratio({**stats(cli["ratio_per_repeat"]), "per_repeat": cli["ratio_per_repeat"]})
             if cli.get("ratio") else "-"]]
    if cli.get("v2e_s_per_frame"):
        pv = stats(s * 1e3 / (cli["frames"] - 1) for s in cli["runs"]["v2e"])
        rows.append(["v2e EventEmulator core alone (frames in memory)", spread(pv, ms), "1.0x"])
    return markdown_table(["", "ms/frame [min-max]", "vs v2e"], rows)


def cli_lines(cli: dict) -> list[str]:
    w, h = cli["size"]
    out = [f"`evforge {cli['command']}` on {cli['frames']} 8-bit RGB PNG frames of {w}x{h} (a textured pan, "
           f"{cli['fps']:g} fps source), {len(cli['runs']['evforge_n'])} interleaved repeats: whole command "
           f"{cli['total_s']:.2f} s median; start-up (the same command on the first 2 frames) "
           f"{cli['startup_s']:.2f} s; end to end per frame = (whole - start-up) / {cli['frames'] - 2}. "
           f"{cli['events']:,} events, {cli['file_bytes'] / 2**20:.1f} MiB stream file.", "", cli_table(cli), ""]
    return out


def help_line(help_s: list[float]) -> str:
    return (f"`evforge --help`: {spread(stats(help_s), lambda v: f'{v:.2f}')} s, median of {len(help_s)} "
            "(start-up of the command line alone: no torch).")


CPU_TARGET_RATIO = 10.0  # CPU: at least 10x v2e's EventEmulator at batch 1, per resolution and preset
CLI_TARGET_RATIO = 5.0  # CPU: evforge simulate end to end at least 5x v2e's core alone (640x480 noisy)
GPU_TARGET_FPS = 20_000.0  # H100: 20,000 frames/s or more at 640x480 with batching
GPU_TARGET_RES = "640x480"


def targets(rows: list[dict], info: dict, clis: list[dict] = ()) -> list[str]:
    """The issue's targets against this run's medians."""
    out = []
    for r in rows:
        if r["impl"] == "evforge" and r["upsample"] == "none" and r["device"] == "cpu" and r["batch"] == 1 \
                and r.get("ratio_vs_v2e"):
            ok = r["ratio_vs_v2e"] >= CPU_TARGET_RATIO
            out.append(f"- cpu {r['resolution']} {r['preset']}, batch 1: {r['ratio_vs_v2e']:.1f}x v2e "
                       f"[{min(r['ratio_per_repeat']):.1f}-{max(r['ratio_per_repeat']):.1f}] "
                       f"(target >= {CPU_TARGET_RATIO:g}x: {'met' if ok else 'NOT met'})")
    for cli in clis:
        if cli.get("ratio"):
            w, h = cli["size"]
            ok = cli["ratio"] >= CLI_TARGET_RATIO
            out.append(f"- cpu evforge simulate end to end, {w}x{h} {cli['preset']}: {cli['ratio']:.1f}x v2e's core "
                       f"[{min(cli['ratio_per_repeat']):.1f}-{max(cli['ratio_per_repeat']):.1f}] "
                       f"(target >= {CLI_TARGET_RATIO:g}x: {'met' if ok else 'NOT met'})")
    best: dict[tuple, dict] = {}
    for r in rows:
        if r["impl"] == "evforge" and r["upsample"] == "none" and r["device"] == "cuda":
            key = (r["resolution"], r["preset"])
            if key not in best or r["frames_per_s"]["median"] > best[key]["frames_per_s"]["median"]:
                best[key] = r
    for (res, preset), r in best.items():
        if res == GPU_TARGET_RES:
            fps = r["frames_per_s"]["median"]
            gpu = (info.get("gpu") or {}).get("name", "?")
            note = "" if "H100" in gpu.upper() else f"; the target is stated for an H100, this is {gpu}"
            ratio = f", {r['ratio_vs_v2e']:.0f}x v2e" if r.get("ratio_vs_v2e") else ""
            out.append(f"- cuda {res} {preset}: {num(fps)} frames/s at batch {r['batch']}{ratio} (target >= "
                       f"{num(GPU_TARGET_FPS)}: {'met' if fps >= GPU_TARGET_FPS else 'NOT met'}{note})")
    return out


def markdown(doc: dict) -> list[str]:
    config, rows, clis, help_s = doc["config"], doc["rows"], doc["cli"], doc["help_s"]
    base = config["v2e"] or "v2e: not found, no ratios"
    md = [*markdown_head("Simulator benchmark", doc["date"], doc["machine"], config["command"],
                         [f"- baseline: {base}"]),
          f"Medians of {config['repeats']} interleaved repeats [min-max]; frames/s = batch x frames / s; per-step "
          f"rows (upsample none) take a {config['source_hz']:g} Hz source, end-to-end rows (upsample linear) a "
          f"{config['e2e_hz']:g} Hz source; 8-bit gray frames of a textured pan; each measurement times its "
          f"frames after {config.get('settle_frames', 0)} untimed ones (1 for end-to-end rows); events "
          f"{'copied to the host' if config['events'] == 'host' else 'left on the device'}. 'vs v2e' = evforge "
          f"frames/s / v2e EventEmulator frames/s with the same parameters, same device, resolution, preset "
          f"and frames (median of the per-repeat ratios).", "", table(rows), ""]
    if clis or help_s:
        md += ["## evforge simulate end to end (CPU)", ""]
        for cli in clis:
            md += cli_lines(cli)
        if help_s:
            md += [help_line(help_s), ""]
    goals = targets(rows, doc["machine"], clis)
    if goals:
        md += ["Targets (medians):", "", *goals, ""]
    return md + [f"Total time {doc['elapsed_s']:.0f} s.", ""]


# --------------------------------------------------------------------------------------------- main


def _resolutions(text: str) -> list[tuple[int, int]]:
    out = []
    for v in text.split(","):
        w, h = (int(x) for x in v.lower().strip().split("x"))
        out.append((w, h))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_bench_args(p, quick="346x260, batch 1 and 8, few frames, 1 repeat",
                           out="bench/results/simulator-<machine tag>.json, one file per device")
    p.add_argument("--presets", default="ideal,noisy",
                   help="comma-separated presets, each NAME or NAME+field=value+... (noisy+refractory_period_s=0)")
    p.add_argument("--resolutions", default=None, help="comma-separated WxH (default 346x260,640x480)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--frames", type=int, default=None,
                   help="frames per slot per measurement at batch 1 (batch B: ceil(N / B**0.5) on the CPU, "
                        "ceil(N / B**0.25) on CUDA); default per device and resolution, see DEFAULT_FRAMES")
    p.add_argument("--v2e-frames", type=int, default=None, help="frames per v2e measurement (see V2E_FRAMES)")
    p.add_argument("--e2e-frames", type=int, default=None, help="source frames per end-to-end measurement")
    p.add_argument("--e2e-batch", type=int, default=None,
                   help="batch of the end-to-end rows (default: largest batch, at most 8 on the CPU)")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end (30 Hz, linear upsampling) rows")
    p.add_argument("--v2e-root", default=None,
                   help="v2e source tree (the folder holding v2ecore/); default ../shared/reference/v2e")
    p.add_argument("--v2e-python", default=None,
                   help="run v2e under this Python interpreter (its own environment) instead of in process")
    p.add_argument("--no-v2e", action="store_true", help="skip the v2e rows (no ratios)")
    p.add_argument("--no-torch-path", action="store_true",
                   help="skip the row that runs the step as torch ops instead of the fused kernels")
    p.add_argument("--cli-frames", type=int, default=None,
                   help="PNG frames for the 'evforge simulate' end-to-end timing on the CPU (default 300; 0 = skip)")
    p.add_argument("--cli-size", default="640x480", help="frame size of that timing")
    p.add_argument("--cli-presets", default="noisy",
                   help="presets of that timing, comma-separated, each NAME or NAME+field=value+...")
    p.add_argument("--repeats", type=int, default=None, help="repeats per measurement (default 5)")
    p.add_argument("--settle-frames", type=int, default=4,
                   help="untimed frame pairs at the start of every measurement, for every implementation "
                        "(1 for the end-to-end rows): the steady state, not a fresh engine's first steps")
    p.add_argument("--source-hz", type=float, default=1000.0, help="source frame rate of the per-step rows")
    p.add_argument("--e2e-hz", type=float, default=30.0, help="source frame rate of the end-to-end rows")
    p.add_argument("--speed", type=float, default=240.0, help="typical image motion of the scenes, pixels/s")
    p.add_argument("--scene-frames", type=int, default=None,
                   help="frames rendered per scene (played back and forth); default 13")
    p.add_argument("--events", choices=["host", "device"], default="host",
                   help="copy each step's events to the host (default, like the pipeline) or leave them")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: usable CPUs)")
    p.add_argument("--seed", type=int, default=1000, help="seed of the first scene (scene s uses seed + s)")
    p.add_argument("--render-workers", type=int, default=None, help="processes rendering scenes (default: CPUs)")
    a = p.parse_args(argv)
    if a.quick:
        a.resolutions = a.resolutions or QUICK["resolutions"]
        a.batches = a.batches or QUICK["batches"]
        a.repeats = a.repeats or QUICK["repeats"]
        a.frames = a.frames or QUICK["frames"]
        a.v2e_frames = a.v2e_frames or QUICK["frames"]
        a.e2e_frames = a.e2e_frames or QUICK["e2e_frames"]
        a.scene_frames = a.scene_frames or QUICK["scene_frames"]
        a.e2e_batch = a.e2e_batch or QUICK["e2e_batch"]
        a.cli_frames = QUICK["cli_frames"] if a.cli_frames is None else a.cli_frames
        a.cli_size = QUICK["cli_size"]
    a.cli_frames = 300 if a.cli_frames is None else a.cli_frames
    a.resolutions = _resolutions(a.resolutions or "346x260,640x480")
    a.cli_size = _resolutions(a.cli_size)[0]
    a.batches = sorted(set(csv(a.batches or "1,8,32", int)))
    a.presets = csv(a.presets)
    a.cli_presets = csv(a.cli_presets)
    for name in [*a.presets, *a.cli_presets]:
        preset_params(name)  # fail early on a typo
    a.repeats = a.repeats or 5
    a.scene_frames = a.scene_frames or 13
    if a.scene_frames < 2 or a.repeats < 1 or min(a.batches) < 1 or 0 < a.cli_frames < 3:
        p.error("--scene-frames >= 2, --repeats >= 1, batches >= 1 and --cli-frames 0 or >= 3 please")
    return a


def frames_for(args, device: str, res, batch: int) -> int:
    n = args.frames or DEFAULT_FRAMES[device].get(tuple(res), max(8, int(100 * 640 * 480 / (res[0] * res[1]))))
    return max(MIN_FRAMES if not args.frames else 1, math.ceil(n / batch ** BATCH_SCALING[device]))


def open_v2e(args, threads: int) -> V2E | None:
    """The v2e baseline, or None (said clearly) when it is absent or cannot be imported."""
    if args.no_v2e:
        print("v2e: skipped (--no-v2e): no ratios", flush=True)
        return None
    root = find_root(args.v2e_root)
    if root is None:
        where = args.v2e_root or "../shared/reference/v2e (default)"
        print(f"v2e: NOT FOUND at {where} (no v2ecore/emulator.py there); pass --v2e-root PATH to a v2e source "
              "tree. Running without the v2e rows: NO RATIOS are printed.", flush=True)
        return None
    os.environ.setdefault("EVFORGE_BENCH_EXTRA_PATH", str(REPO.parent / "ref" / "extra"))
    try:
        v2e = V2E(root, args.v2e_python, threads)
    except Exception as e:  # an import failure of someone else's tree: say so, measure evforge anyway
        print(f"v2e: found at {root} but its import failed ({type(e).__name__}: {e}); try --v2e-python with "
              "v2e's own environment. NO RATIOS are printed.", flush=True)
        return None
    print(v2e.describe(), flush=True)
    return v2e


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads or cpuinfo()["usable_cpus"] or 1  # torch.set_num_threads after rendering
    devices = harness.bench_devices(args.device)
    if devices is None:
        return 2
    info = machine_info(threads)
    harness.announce(info, args.device, devices)

    clock = Clock()
    e2e_batches = {d: args.e2e_batch or (min(max(args.batches), 8) if d == "cpu" else max(args.batches))
                   for d in devices}
    n_scenes = max([*args.batches, *(e2e_batches.values() if not args.no_e2e else [])])
    workers = max(1, args.render_workers or threads)

    # Render everything up front (not timed).
    specs = {}
    for res in args.resolutions:
        specs[res, "step"] = (*res, n_scenes, args.scene_frames, args.speed / args.source_hz, args.seed)
        if not args.no_e2e:
            specs[res, "e2e"] = (*res, max(e2e_batches.values()), min(args.scene_frames, 9), args.speed / args.e2e_hz,
                                 args.seed)
    cli_rgb = None
    if args.cli_frames and "cpu" in devices:  # a clip of up to 61 frames, played back and forth
        specs["cli"] = (*args.cli_size, 1, min(args.cli_frames, 61), args.speed / args.source_hz, args.seed)
    t = time.perf_counter()
    rgb = render_rgb(specs, workers)
    clips = {k: gray_8bit(v) for k, v in rgb.items() if k != "cli"}
    if "cli" in rgb:
        clip = rgb["cli"][:, 0]
        cli_rgb = clip[[pingpong(i, len(clip) - 1) for i in range(args.cli_frames)]]
    torch.set_num_threads(threads)
    print(f"Rendered {sum(c.shape[0] * c.shape[1] for c in rgb.values())} frames in "
          f"{time.perf_counter() - t:.1f} s ({n_scenes} scenes, {workers} workers; not timed)", flush=True)
    v2e = open_v2e(args, threads)

    all_rows: dict[str, list[dict]] = {d: [] for d in devices}
    for device in devices:
        dev_clips = {k: v.to(device) for k, v in clips.items()}
        if device == "cuda":  # context creation and first kernels out of the way
            torch.zeros(1, device=device).sum().item()
        for res in args.resolutions:
            clip_u8 = clips[res, "step"][:, 0, 0].to(torch.uint8).numpy()  # scene 0, for v2e
            for preset in args.presets:
                group: list[Case] = []
                if v2e is not None:
                    n = args.v2e_frames or V2E_FRAMES[device].get(tuple(res), 32)
                    group.append(Case(device, res, preset, "v2e", "none", args.source_hz, 1, n,
                                     settle=args.settle_frames))
                for b in args.batches:
                    group.append(Case(device, res, preset, "evforge", "none", args.source_hz, b,
                                     frames_for(args, device, res, b), settle=args.settle_frames))
                if not args.no_torch_path:  # the same step as torch ops, side by side
                    b = min(args.batches)
                    group.append(Case(device, res, preset, "evforge-torch", "none", args.source_hz, b,
                                     frames_for(args, device, res, b), settle=args.settle_frames))
                if not args.no_e2e:  # an end-to-end frame is a dozen steps: one settles
                    n = args.e2e_frames or DEFAULT_E2E_FRAMES[device].get(tuple(res), 2)
                    group.append(Case(device, res, preset, "evforge", "linear", args.e2e_hz, e2e_batches[device], n,
                                     settle=min(1, args.settle_frames)))
                contenders = []
                for c in group:
                    clip = dev_clips[res, "e2e" if c.upsample != "none" else "step"]
                    contenders.append((c.row, lambda warm, c=c, clip=clip: c.run(
                        clip, clip_u8, args.events == "host", v2e, warmup=warm)))
                harness.interleave(contenders, args.repeats)
                summaries = [r.summary() for r in group]
                add_ratios(summaries)
                all_rows[device].extend(summaries)
                for s in summaries:
                    ratio = f", {s['ratio_vs_v2e']:.1f}x v2e" if s.get("ratio_vs_v2e") else ""
                    clock.say(f"{device} {s['resolution']} {preset} {s['impl']:13s} {s['upsample']:6s} "
                              f"B={s['batch']:<2d}: {spread(s['frames_per_s'])} frames/s, "
                              f"{num(s['events_per_s']['median'])} events/s{ratio}", "  ")
        del dev_clips

    clis, help_s = [], []
    if cli_rgb is not None:
        gray_u8 = gray_8bit(cli_rgb[:, None])[:, 0, 0].to(torch.uint8).numpy()
        for spec in args.cli_presets:
            print(f"evforge simulate end to end: {len(cli_rgb)} PNG frames at {args.cli_size[0]}x{args.cli_size[1]}, "
                  f"{spec} ...", flush=True)
            v2e_kw = emulator_kwargs(preset_params(spec))
            clis.append(cli_e2e.measure(cli_rgb, gray_u8, args.source_hz, spec, v2e, v2e_kw,
                                        repeats=min(args.repeats, 3)))
            print("\n".join(cli_lines(clis[-1])), flush=True)
        help_s = cli_e2e.help_seconds()
        print(help_line(help_s), flush=True)

    elapsed = clock.elapsed()
    config = {"command": harness.command_line("simulator.py", argv),
              "quick": args.quick, "devices": devices, "presets": args.presets,
              "resolutions": [f"{w}x{h}" for w, h in args.resolutions], "batches": args.batches,
              "repeats": args.repeats, "source_hz": args.source_hz, "e2e_hz": args.e2e_hz, "speed_px_s": args.speed,
              "scene_frames": args.scene_frames, "settle_frames": args.settle_frames, "events": args.events,
              "seed": args.seed, "cpu_peak_rss_reset": MemoryProbe.hwm_resettable,
              "v2e": v2e.describe() if v2e else None,
              "v2e_kwargs": {p: emulator_kwargs(preset_params(p)) for p in args.presets}}
    rows = [r for d in devices for r in all_rows[d]]
    print("\n" + table(rows), flush=True)
    goals = targets(rows, info, clis)
    if goals:
        print("\nTargets (medians):\n" + "\n".join(goals))
    print(f"\nTotal {elapsed:.0f} s", flush=True)

    for path, devs in harness.result_paths("simulator", devices, info, args.quick, args.out).items():
        with_cli = "cpu" in devs
        harness.write_results(path, info, config, [r for d in devs for r in all_rows[d]], benchmark="simulator",
                              markdown=markdown, elapsed_s=round(elapsed, 1), cli=clis if with_cli else [],
                              help_s=help_s if with_cli else [])
        print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
