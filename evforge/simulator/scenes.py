"""Small procedural video sequences written in TartanAir v1's on-disk layout.

``evforge demo`` and the tests use these instead of downloading real data. A pinhole camera flies past a few
textured, fronto-parallel planes; images, z-depth, optical flow, flow masks and poses all come from the same
analytic ray casting, so the ground truth is exact (up to interpolation and 8-bit rounding)::

    P000/image_left/000000_left.png          RGB uint8, HxWx3
    P000/depth_left/000000_left_depth.npy    float32 HxW, z depth in metres
    P000/flow/000000_000001_flow.npy         float32 HxWx2, (dx, dy) pixels, frame i -> i+1
    P000/flow/000000_000001_mask.npy         uint8 HxW, MASK_* values below
    P000/pose_left.txt                       tx ty tz qx qy qz qw per frame, NED (x forward, y right, z down)

Internally the world uses the camera convention of computer vision (x right, y down, z forward); poses are
converted to NED only when written.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

# Flow mask values, as written by TartanAir's generator (tartanair_tools flow_and_warping_error.py:
# CROSS_OCC = 1, SELF_OCC = 10, OUT_OF_FOV = 100; a pixel gets the largest that applies).
MASK_VALID = 0
MASK_CROSS_OCCLUDED = 1  # hidden in frame i+1 behind a surface that frame i does not see there
MASK_SELF_OCCLUDED = 10  # hidden in frame i+1 behind a surface that frame i also sees
MASK_OUT_OF_VIEW = 100  # the point projects outside frame i+1

_TILE = 256  # texture tile size in texels (a texel is about an image pixel); textures repeat with this period
_OCTAVES = ((64, 0.4), (32, 0.3), (16, 0.2), (8, 0.1))  # value noise: (lattice cell in texels, amplitude)


@dataclass(frozen=True)
class SceneSpec:
    """What to generate: image size, length, number of planes, motion and flicker; all defaults small and fast."""

    width: int = 160
    height: int = 120
    frames: int = 12
    planes: int = 3  # including the background plane that fills the view
    speed_px: float = 3.0  # typical image motion per frame, in pixels
    flicker: float = 0.0  # relative amplitude of a global brightness modulation over time (0 = none)
    seed: int = 0


@dataclass(frozen=True)
class Plane:
    """A fronto-parallel plane at world depth ``z``; ``rect`` = (x0, x1, y0, y1) in metres, None = unbounded.

    World point (x, y) shows texel (x * f / z, y * f / z) + ``offset`` of the periodic ``texture`` (T, T, 3),
    so one texel is about one image pixel.
    """

    z: float
    rect: tuple | None
    texture: np.ndarray
    offset: np.ndarray


@dataclass(frozen=True)
class Scene:
    """Planes (farthest first) and the camera trajectory: per-frame position (N, 3) and roll (N,)."""

    spec: SceneSpec
    planes: tuple
    positions: np.ndarray
    rolls: np.ndarray
    flicker_freq: float  # cycles per frame
    flicker_phase: float

    @property
    def focal(self) -> float:
        return self.spec.width / 2.0  # fx = fy = W/2, a 90 degree horizontal field of view like TartanAir

    @property
    def center(self) -> tuple[float, float]:
        return self.spec.width / 2.0, self.spec.height / 2.0


# ---------------------------------------------------------------------------------------------- scene set-up


def _interp_matrix(size: int, cell: int) -> np.ndarray:
    """(size, size // cell) weights that smoothly (smoothstep, C1) interpolate a periodic lattice onto texels."""
    n = size // cell
    t = np.arange(size) / cell
    i0 = np.floor(t).astype(np.int64)
    w = (t - i0) ** 2 * (3 - 2 * (t - i0))
    m = np.zeros((size, n))
    m[np.arange(size), i0 % n] += 1 - w
    m[np.arange(size), (i0 + 1) % n] += w
    return m


def _coverage(signed_dist: np.ndarray) -> np.ndarray:
    """Fraction of a texel inside a sharp edge (signed distance in texels, > 0 inside): a 1-texel anti-aliased edge."""
    return np.clip(0.5 + signed_dist, 0.0, 1.0)


def _random_texture(rng: np.random.Generator) -> np.ndarray:
    """A periodic (T, T, 3) float32 texture: coloured multi-scale value noise under sharp-edged shapes and stripes.

    Colours reach from near black (< 20) to near white, so that both extremes are always present.
    """
    # Value noise of each octave is separable on the texel grid: texture = M @ lattice @ M^T, per channel.
    noise = 0.0
    for cell, amp in _OCTAVES:
        m = _interp_matrix(_TILE, cell)
        lattice = rng.uniform(0.0, 1.0, (3, _TILE // cell, _TILE // cell))
        noise = noise + amp * (m @ lattice @ m.T).transpose(1, 2, 0)
    lum = np.clip((noise[..., :1] - 0.5) * 2.5 + 0.5, 0.0, 1.0)  # stretch: summed octaves cluster near 0.5
    dark, bright = rng.uniform(0.0, 15.0, 3), rng.uniform(120.0, 255.0, 3)
    bright[rng.integers(3)] = rng.uniform(215.0, 255.0)  # at least one strong channel
    hue = 80.0 * (noise[..., [1, 0, 2]] - noise[..., [2, 1, 0]])  # channel-wise variation, zero where lum is 0
    rgb = dark + ((bright - dark) + hue) * lum

    for k in range(12):
        colour = rng.uniform(0.0, 255.0, 3)
        if k == 0:
            colour = rng.uniform(0.0, 12.0, 3)  # a guaranteed dark region
        elif k == 1:
            colour = rng.uniform(225.0, 255.0, 3)  # a guaranteed bright region
        centre, (a, b), angle = rng.uniform(0.0, _TILE, 2), rng.uniform(6.0, 26.0, 2), rng.uniform(0.0, np.pi)
        # Shade only a window around the shape (wrapping around the tile), in the shape's rotated frame.
        r = int(np.hypot(a, b)) + 2
        cols = np.arange(int(centre[0]) - r, int(centre[0]) + r + 1)
        rows = np.arange(int(centre[1]) - r, int(centre[1]) + r + 1)
        du, dv = cols[None, :] - centre[0], rows[:, None] - centre[1]
        ru, rv = np.cos(angle) * du + np.sin(angle) * dv, -np.sin(angle) * du + np.cos(angle) * dv
        if k % 3 == 0:  # disc of radius a
            cover = _coverage(a - np.hypot(ru, rv))
        else:  # rectangle of half sides a, b
            cover = _coverage(np.minimum(a - np.abs(ru), b - np.abs(rv)))
        if k % 3 == 2:  # filled with stripes; sin(2 pi x / P) has slope 2 pi / P at its zeros, so the
            period = rng.uniform(5.0, 12.0)  # distance to a stripe edge is about sin * P / (2 pi)
            stripe = _coverage(np.sin(2 * np.pi * ru / period) * period / (2 * np.pi))[..., None]
            colour = rng.uniform(0.0, 255.0, 3) * (1 - stripe) + colour * stripe
        window = np.ix_(rows % _TILE, cols % _TILE)
        rgb[window] += (colour - rgb[window]) * cover[..., None]
    return rgb.astype(np.float32)


def build_scene(spec: SceneSpec) -> Scene:
    """Lay out planes and a smooth camera path from ``spec.seed``; everything else is derived from this."""
    if spec.width < 8 or spec.height < 8 or spec.frames < 2 or spec.planes < 1 or spec.flicker < 0:
        raise ValueError(f"SceneSpec needs width, height >= 8, frames >= 2, planes >= 1, flicker >= 0; got {spec}")
    rng = np.random.default_rng(spec.seed)
    f = spec.width / 2.0
    n = spec.frames

    # Depths: a background at 7-10 m, nearer planes at 0.4-0.75 of that, one per equal slice of that range
    # (jittered within the middle 60% of the slice, so that no two planes are nearly at the same depth).
    z_far = rng.uniform(7.0, 10.0)
    k = spec.planes - 1
    slices = (np.arange(k)[::-1] + 0.5 + rng.uniform(-0.3, 0.3, k)) / max(k, 1)
    depths = [z_far] + list((0.4 + 0.35 * slices) * z_far)

    # Lateral step that moves the background (most of the view) by speed_px per frame, as u = f * x / z;
    # nearer planes move 1.3-2.5 times as fast (parallax).
    step = spec.speed_px * z_far / f
    t = np.arange(n - 1)
    heading = rng.uniform(0, 2 * np.pi) + 0.5 * np.sin(2 * np.pi * t / rng.uniform(10, 20) + rng.uniform(0, 2 * np.pi))
    # A little forward/backward motion (about 0.5 px of zoom at the image corners) and roll about the optical axis.
    forward = 0.15 * step * np.sin(2 * np.pi * t / rng.uniform(8, 16) + rng.uniform(0, 2 * np.pi))
    velocity = np.stack([step * np.cos(heading), step * np.sin(heading), forward], axis=1)
    positions = np.concatenate([np.zeros((1, 3)), np.cumsum(velocity, axis=0)])
    rolls = 0.02 * np.sin(2 * np.pi * np.arange(n) / rng.uniform(12, 24) + rng.uniform(0, 2 * np.pi))

    # Near planes are rectangles placed within the view from the middle of the path (at depth s the view spans
    # x in +-s * (W/2)/f = +-s and y in +-s * H/W).
    mid = positions[n // 2]
    planes = [Plane(z_far, None, _random_texture(rng), rng.uniform(0.0, _TILE, 2))]
    for z in depths[1:]:
        s = z - mid[2]
        half = np.array([s, s * spec.height / spec.width])
        centre = mid[:2] + rng.uniform(-0.5, 0.5, 2) * half
        size = rng.uniform(0.2, 0.45, 2) * half
        rect = (centre[0] - size[0], centre[0] + size[0], centre[1] - size[1], centre[1] + size[1])
        planes.append(Plane(z, tuple(float(r) for r in rect), _random_texture(rng), rng.uniform(0.0, _TILE, 2)))
    return Scene(spec, tuple(planes), positions, rolls, rng.uniform(0.1, 0.3), rng.uniform(0, 2 * np.pi))


# --------------------------------------------------------------------------------------------- geometry


def _cast(scene: Scene, i: int, u: np.ndarray, v: np.ndarray):
    """Ray-cast pixel coordinates (u, v) of frame ``i``: visible plane index, world point (..., 3), z depth."""
    c, roll = scene.positions[i], scene.rolls[i]
    cx, cy = scene.center
    dx, dy = (u - cx) / scene.focal, (v - cy) / scene.focal  # camera ray (dx, dy, 1)
    cos, sin = np.cos(roll), np.sin(roll)
    wx, wy = cos * dx - sin * dy, sin * dx + cos * dy  # world ray; roll is about z, so its z stays 1
    pid = np.zeros(u.shape, dtype=np.int64)
    for k, plane in enumerate(scene.planes[1:], start=1):  # farthest first, so nearer hits overwrite
        s = plane.z - c[2]  # ray parameter = z depth, because the ray's z component is 1
        x, y = c[0] + s * wx, c[1] + s * wy
        x0, x1, y0, y1 = plane.rect
        pid[(x >= x0) & (x < x1) & (y >= y0) & (y < y1)] = k
    z = np.array([p.z for p in scene.planes])[pid]
    depth = z - c[2]
    return pid, np.stack([c[0] + depth * wx, c[1] + depth * wy, z], axis=-1), depth


def _project(scene: Scene, i: int, points: np.ndarray):
    """Project world points (..., 3) into frame ``i``: pixel coordinates u, v (the points are in front)."""
    rel = points - scene.positions[i]
    cos, sin = np.cos(scene.rolls[i]), np.sin(scene.rolls[i])
    x, y = cos * rel[..., 0] + sin * rel[..., 1], -sin * rel[..., 0] + cos * rel[..., 1]  # R^T rel
    cx, cy = scene.center
    return scene.focal * x / rel[..., 2] + cx, scene.focal * y / rel[..., 2] + cy


def _in_view(scene: Scene, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """True where (u, v) rounds to a pixel of the image (TartanAir's test)."""
    w, h = scene.spec.width, scene.spec.height
    return (u >= -0.5) & (u < w - 0.5) & (v >= -0.5) & (v < h - 0.5)


def _grid(scene: Scene):
    return np.meshgrid(np.arange(scene.spec.width, dtype=np.float64), np.arange(scene.spec.height, dtype=np.float64))


# ---------------------------------------------------------------------------------------------- shading


def _sample(texture: np.ndarray, tu: np.ndarray, tv: np.ndarray) -> np.ndarray:
    """Bilinear lookup (wrapping around) in a periodic texture; texel (row j, column i) sits at (i, j)."""
    i0, j0 = np.floor(tu), np.floor(tv)
    a, b = (tu - i0)[..., None], (tv - j0)[..., None]
    i0, j0 = i0.astype(np.int64) % _TILE, j0.astype(np.int64) % _TILE
    i1, j1 = (i0 + 1) % _TILE, (j0 + 1) % _TILE
    top = texture[j0, i0] * (1 - a) + texture[j0, i1] * a
    return top * (1 - b) + (texture[j1, i0] * (1 - a) + texture[j1, i1] * a) * b


def _render_float(scene: Scene, i: int):
    """Frame ``i`` as float RGB (before flicker and rounding) and its z depth."""
    u, v = _grid(scene)
    pid, points, depth = _cast(scene, i, u, v)
    rgb = np.empty(u.shape + (3,))
    for k, plane in enumerate(scene.planes):
        sel = pid == k
        scale = scene.focal / plane.z  # texels per metre on this plane
        tu, tv = points[sel, 0] * scale + plane.offset[0], points[sel, 1] * scale + plane.offset[1]
        rgb[sel] = _sample(plane.texture, tu, tv)
    return rgb, depth


def render_frame(scene: Scene, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame ``i``: RGB uint8 (H, W, 3) with flicker applied, and float32 z depth (H, W) in metres."""
    rgb, depth = _render_float(scene, i)
    gain = 1.0 + scene.spec.flicker * np.sin(2 * np.pi * scene.flicker_freq * i + scene.flicker_phase)
    return np.clip(np.rint(rgb * gain), 0, 255).astype(np.uint8), depth.astype(np.float32)


def flow_and_mask(scene: Scene, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Optical flow frame i -> i+1 (float32 (H, W, 2), dx dy) and its TartanAir mask (uint8 (H, W))."""
    u, v = _grid(scene)
    pid, points, _ = _cast(scene, i, u, v)
    u1, v1 = _project(scene, i + 1, points)  # where each visible point of frame i lands in frame i+1
    flow = np.stack([u1 - u, v1 - v], axis=-1).astype(np.float32)

    inside = _in_view(scene, u1, v1)
    # Occluded: frame i+1 sees another (nearer) plane where the point lands.
    pid1, points1, _ = _cast(scene, i + 1, u1, v1)
    occluded = inside & (pid1 != pid)
    # Self-occlusion if frame i sees that occluding point too (two frame-i pixels collide), else cross-occlusion.
    uo, vo = _project(scene, i, points1)
    self_occluded = occluded & _in_view(scene, uo, vo) & (_cast(scene, i, uo, vo)[0] == pid1)
    mask = np.select([~inside, self_occluded, occluded], [MASK_OUT_OF_VIEW, MASK_SELF_OCCLUDED, MASK_CROSS_OCCLUDED])
    return flow, mask.astype(np.uint8)


def poses_ned(scene: Scene) -> np.ndarray:
    """Camera poses (N, 7) as TartanAir writes them: tx ty tz qx qy qz qw in NED (x forward, y right, z down)."""
    c = scene.positions
    # NED = P @ (x right, y down, z forward) with P a cyclic permutation; roll about the optical axis (our z)
    # becomes a rotation about NED x, i.e. the quaternion (sin(a/2), 0, 0, cos(a/2)).
    half = scene.rolls / 2
    zeros = np.zeros_like(half)
    return np.stack([c[:, 2], c[:, 0], c[:, 1], np.sin(half), zeros, zeros, np.cos(half)], axis=1)


# ---------------------------------------------------------------------------------------------- writing


def make_sequence(out_dir, spec: SceneSpec = SceneSpec()) -> Path:
    """Write one trajectory (``out_dir`` is the P00k folder itself, created if needed) and return its path."""
    out = Path(out_dir)
    scene = build_scene(spec)
    for sub in ("image_left", "depth_left", "flow"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for i in range(spec.frames):
        rgb, depth = render_frame(scene, i)
        Image.fromarray(rgb).save(out / "image_left" / f"{i:06d}_left.png", compress_level=1)
        np.save(out / "depth_left" / f"{i:06d}_left_depth.npy", depth)
        if i + 1 < spec.frames:
            flow, mask = flow_and_mask(scene, i)
            np.save(out / "flow" / f"{i:06d}_{i + 1:06d}_flow.npy", flow)
            np.save(out / "flow" / f"{i:06d}_{i + 1:06d}_mask.npy", mask)
    np.savetxt(out / "pose_left.txt", poses_ned(scene), fmt="%.9e")
    return out


def trajectory_seed(seed: int, env: str, index: int) -> int:
    """Seed of trajectory ``index`` of ``env``: a fixed hash of (seed, env, index), stable across runs."""
    return int(np.random.SeedSequence([seed, zlib.crc32(env.encode()), index]).generate_state(1)[0])


def make_dataset(
    root, envs=("demo_office", "demo_garden"), trajectories: int = 2, spec: SceneSpec = SceneSpec(),
    difficulty: str = "Easy",
) -> list[Path]:
    """Write ROOT/ENV/<difficulty>/P000.. for every env; return the trajectory folders in order."""
    root = Path(root)
    return [
        make_sequence(root / env / difficulty / f"P{k:03d}", replace(spec, seed=trajectory_seed(spec.seed, env, k)))
        for env in envs
        for k in range(trajectories)
    ]
