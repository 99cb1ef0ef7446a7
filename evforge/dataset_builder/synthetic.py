"""A small synthetic event classification set in N-Caltech101's on-disk layout (``<class>/image_XXXX.bin``).

Each sample is a short clip of one moving shape (disc, bar, cross, ring) over a static, optionally textured
background, simulated by the DVS model; so the classes differ in event *structure* (edges, orientation,
holes), not in trivial statistics such as event count alone. Used by ``evforge demo`` and the tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from evforge.formats.decoders import write_atis_bin
from evforge.formats.events import make_events

from ..simulator.engine import BatchEngine
from ..simulator.params import get_preset
from ..simulator.resample import prepare_frames
from ..simulator.upsample import UpsampleConfig

__all__ = ["SHAPES", "make_synthetic_classification", "render_clip", "simulate_clips"]

SHAPES = ("disc", "bar", "cross", "ring")
FRAMES = 10  # source frames per sample
FRAME_DT_US = 10_000  # 100 Hz source: a sample spans 90 ms
UPSAMPLE = UpsampleConfig(mode="linear", max_steps=8)
_BATCH = 64  # samples simulated together in one BatchEngine


def _sdf(shape: str, xx: np.ndarray, yy: np.ndarray, size: float, angle: float) -> np.ndarray:
    """Signed distance (pixels, < 0 inside) of ``shape`` centred at the origin of ``xx, yy``."""
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * xx + s * yy, -s * xx + c * yy  # coordinates in the shape's frame

    def box(hu, hv, u=u, v=v):
        qu, qv = np.abs(u) - hu, np.abs(v) - hv
        return np.hypot(np.maximum(qu, 0), np.maximum(qv, 0)) + np.minimum(np.maximum(qu, qv), 0)

    r = np.hypot(xx, yy)
    if shape == "disc":
        return r - size
    if shape == "ring":
        return np.abs(r - size) - 0.22 * size
    if shape == "bar":
        return box(1.4 * size, 0.25 * size)
    if shape == "cross":
        return np.minimum(box(1.2 * size, 0.22 * size), box(0.22 * size, 1.2 * size))
    raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def _texture(rng: np.random.Generator, width: int, height: int, amplitude: float) -> np.ndarray:
    """Smooth value noise in [-amplitude, amplitude]: a coarse random grid, bilinearly upsampled."""
    gw, gh = width // 8 + 2, height // 8 + 2
    grid = rng.uniform(-1, 1, (gh, gw))
    gx, gy = np.linspace(0, gw - 1.001, width), np.linspace(0, gh - 1.001, height)
    x0, y0 = gx.astype(int), gy.astype(int)
    fx, fy = gx - x0, gy - y0
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return amplitude * (top * (1 - fy[:, None]) + bottom * fy[:, None])


def render_clip(shape: str, rng: np.random.Generator, size=(64, 48), *, frames: int = FRAMES,
                textured: bool = True) -> np.ndarray:
    """(frames, H, W) uint8 gray clip of ``shape`` moving in a straight line, random pose/speed/contrast."""
    width, height = size
    scale = min(width, height) / 48
    radius = rng.uniform(7.0, 9.5) * scale
    angle = rng.uniform(0, np.pi)
    speed = rng.uniform(1.5, 2.5) * scale  # pixels per frame
    heading = rng.uniform(0, 2 * np.pi)
    vx, vy = speed * np.cos(heading), speed * np.sin(heading)
    travel_x, travel_y = vx * (frames - 1), vy * (frames - 1)
    margin = 1.3 * radius
    lo_x, hi_x = margin - min(0, travel_x), width - margin - max(0, travel_x)
    lo_y, hi_y = margin - min(0, travel_y), height - margin - max(0, travel_y)
    cx = rng.uniform(lo_x, hi_x) if hi_x > lo_x else width / 2 - travel_x / 2
    cy = rng.uniform(lo_y, hi_y) if hi_y > lo_y else height / 2 - travel_y / 2
    background = rng.uniform(70, 130)
    contrast = rng.uniform(0.5, 1.0) * rng.choice([-1.0, 1.0])  # log units: brighter or darker object
    bg = background * np.exp(_texture(rng, width, height, 0.25) if textured else 0.0)
    fg = background * np.exp(contrast)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    out = np.empty((frames, height, width), dtype=np.uint8)
    for i in range(frames):
        cover = np.clip(0.5 - _sdf(shape, xx - (cx + vx * i), yy - (cy + vy * i), radius, angle), 0.0, 1.0)
        out[i] = np.clip(np.rint(bg * (1 - cover) + fg * cover), 0, 255).astype(np.uint8)
    return out


def simulate_clips(clips: list[np.ndarray], seeds: list[int], *, preset: str = "clean",
                   frame_dt_us: int = FRAME_DT_US, upsample: UpsampleConfig = UPSAMPLE) -> list[np.ndarray]:
    """Events of each clip, simulated together in one :class:`BatchEngine` (CPU).

    Gives the same events as :func:`evforge.simulator.engine.simulate_frames` on each clip alone (the pixel
    model draws its randomness per sequence seed), at a fraction of the cost for many tiny clips.
    """
    params = get_preset(preset)
    n, (frames, height, width) = len(clips), clips[0].shape
    engine = BatchEngine(n, height, width, "cpu", upsample)
    first = prepare_frames([c[0] for c in clips], None, engine.device)
    for b in range(n):
        engine.start(b, first[b], 0, params, seeds[b])
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for i in range(1, frames):
        ev = engine.advance(prepare_frames([c[i] for c in clips], None, engine.device), [i * frame_dt_us] * n,
                            [True] * n)
        if not len(ev):
            continue
        b = ev.b.numpy()
        cols = make_events(ev.x.numpy(), ev.y.numpy(), ev.t.numpy(), ev.p.numpy())
        bounds = np.searchsorted(b, np.arange(n + 1))  # sorted by slot
        for k in range(n):
            if bounds[k + 1] > bounds[k]:
                parts[k].append(cols[bounds[k]:bounds[k + 1]])
    return [np.concatenate(p) if p else make_events([], [], [], []) for p in parts]


def make_synthetic_classification(root, *, classes=("disc", "bar", "cross", "ring"), per_class: int = 12,
                                  size=(64, 48), seed: int = 0, textured: bool = True,
                                  preset: str = "clean") -> Path:
    """Write ``root/<class>/image_0001.bin ...`` (ATIS .bin, as N-Caltech101) and return ``root``.

    ``classes`` are shape names from :data:`SHAPES`; every sample draws its position, size, orientation,
    heading, speed, contrast sign/strength and background texture from ``(seed, shape, index)``, so the set is
    deterministic and a sample does not depend on which other classes are made.
    """
    root = Path(root)
    width, height = (int(v) for v in size)
    if width > 256 or height >= 240:
        raise ValueError(f"ATIS .bin files hold x < 256 and y < 240; size {width}x{height} is too large")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    bad = [c for c in classes if c not in SHAPES]
    if bad:
        raise ValueError(f"unknown class shape(s) {bad}; choose from {SHAPES}")
    jobs = []  # (class, index, clip, sim seed)
    for shape in classes:
        for i in range(per_class):
            rng = np.random.default_rng([seed, SHAPES.index(shape), i])  # a sample depends on (seed, shape, i)
            jobs.append((shape, i, render_clip(shape, rng, (width, height), textured=textured),
                         int(rng.integers(0, 2**31 - 1))))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(min(threads, 2))  # tiny frames: more threads only add overhead
        for start in range(0, len(jobs), _BATCH):
            chunk = jobs[start:start + _BATCH]
            events = simulate_clips([j[2] for j in chunk], [j[3] for j in chunk], preset=preset)
            for (shape, i, _, _), ev in zip(chunk, events):
                if len(ev) == 0:  # cannot happen with the contrast/speed ranges above; keep files decodable
                    raise RuntimeError(f"synthetic sample {shape}/{i} produced no events")
                (root / shape).mkdir(parents=True, exist_ok=True)
                write_atis_bin(root / shape / f"image_{i + 1:04d}.bin", ev)
    finally:
        torch.set_num_threads(threads)
    return root
