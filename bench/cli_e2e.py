"""``evforge simulate`` end to end from a PNG folder, against v2e's emulator core on the same frames.

The command is timed from the outside, as a user runs it: decode the PNG frames, simulate, write the stream
file. Its start-up (importing torch, loading the compiled kernels, opening the output) is measured apart as
the same command on a folder of the first 2 frames, and the end-to-end time per frame is
``(T(N frames) - T(2 frames)) / (N - 2)``. v2e's core is timed in process on the same frames as 8-bit gray
arrays in memory (no decoding, no writing): ``generate_events`` for frames 1..N-1 after the first.
``evforge --help`` is timed too (the parser alone). Used by ``bench/simulator.py`` (``--cli-frames``).
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def evforge_command() -> list[str]:
    """The ``evforge`` console script of this environment, else ``python -m evforge.cli``."""
    script = Path(sys.executable).with_name("evforge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "evforge.cli"]


def preset_flags(spec: str) -> list[str]:
    """``NAME+field=value+...`` as ``evforge simulate`` flags: ``--preset NAME --field value ...``."""
    name, *fields = spec.split("+")
    flags = ["--preset", name]
    for item in fields:
        key, _, value = item.partition("=")
        flags += ["--" + key.replace("_", "-"), value]
    return flags


def write_pngs(folder: Path, rgb: np.ndarray) -> None:
    """Frames (N, H, W, 3) uint8 as ``000000.png``, ... (8-bit RGB, what a decoded video gives)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(rgb):
        Image.fromarray(frame).save(folder / f"{i:06d}.png", compress_level=1)


def _wall(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    return seconds


def help_seconds(repeats: int = 5) -> list[float]:
    """Wall times of ``evforge --help`` (the first run warms the OS file cache and is not counted)."""
    cmd = evforge_command() + ["--help"]
    _wall(cmd, REPO)
    return [_wall(cmd, REPO) for _ in range(repeats)]


def measure(rgb: np.ndarray, gray_u8: np.ndarray, fps: float, preset: str, v2e=None, v2e_kwargs=None,
            repeats: int = 3, extra_args: tuple = (), workdir: Path | None = None) -> dict:
    """Time ``evforge simulate`` on the N frames ``rgb`` (written as PNGs) and on their first 2, interleaved
    ``repeats`` times, and v2e's core on ``gray_u8`` (N, H, W) in between. Returns every time and the
    per-frame figures."""
    n = len(rgb)
    tmp = Path(tempfile.mkdtemp(prefix="evforge-cli-", dir=workdir))
    try:
        full, start = tmp / "frames" / "clip", tmp / "frames2" / "clip"
        write_pngs(full, rgb)
        start.mkdir(parents=True)
        for name in sorted(p.name for p in full.iterdir())[:2]:
            shutil.copy(full / name, start / name)
        base = evforge_command() + ["simulate", *preset_flags(preset), "--upsample", "none", "--device", "cpu",
                                    "--fps", f"{fps:g}", "--quiet", "--overwrite", *extra_args]
        runs = {"evforge_n": [], "evforge_2": [], "v2e": []}
        times_s = np.arange(n) / fps
        _wall(base + [str(full.parent), "--out", str(tmp / "out")], tmp)  # warm-up: OS caches, kernel cache
        for _ in range(repeats):
            runs["evforge_n"].append(_wall(base + [str(full.parent), "--out", str(tmp / "out")], tmp))
            runs["evforge_2"].append(_wall(base + [str(start.parent), "--out", str(tmp / "out2")], tmp))
            if v2e is not None:
                runs["v2e"].append(v2e.time(v2e_kwargs, gray_u8, times_s, settle=0)["seconds"])
        out_file = tmp / "out" / "clip.h5"
        events = _events_in(out_file)
        size = out_file.stat().st_size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    per_frame = [(a - b) / (n - 2) for a, b in zip(runs["evforge_n"], runs["evforge_2"])]
    res = {"frames": n, "fps": fps, "preset": preset, "size": list(rgb.shape[2:0:-1]), "runs": runs,
           "evforge_s_per_frame": statistics.median(per_frame), "evforge_per_frame_all": per_frame,
           "startup_s": statistics.median(runs["evforge_2"]), "total_s": statistics.median(runs["evforge_n"]),
           "events": events, "file_bytes": size, "command": " ".join(base[1:] + ["FOLDER", "--out", "OUT"])}
    if runs["v2e"]:
        v2e_per_frame = [s / (n - 1) for s in runs["v2e"]]
        res["v2e_s_per_frame"] = statistics.median(v2e_per_frame)
        res["ratio"] = res["v2e_s_per_frame"] / res["evforge_s_per_frame"]
        res["ratio_per_repeat"] = [v / e for v, e in zip(v2e_per_frame, per_frame)]
    return res


def _events_in(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f.attrs["num_events"])
