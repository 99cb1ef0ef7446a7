"""``evforge simulate`` end to end from a PNG folder, against v2e's emulator core on the same frames.

The command is timed from the outside, as a user runs it: decode the PNG frames, simulate, write the stream
file. Its start-up (importing torch, loading the compiled kernels, opening the output) is measured apart as
the same command on a folder of the first 2 frames, and the end-to-end time per frame is
``(T(N frames) - T(2 frames)) / (N - 2)``. v2e's core is timed in process on the same frames as 8-bit gray
arrays in memory (no decoding, no writing): ``generate_events`` for frames 1..N-1 after the first.
``evforge --help`` is timed too (the parser alone). Used by ``bench/simulator.py`` (``--cli-frames``); run alone
(``python bench/cli_e2e.py``) it times the same on a rendered textured pan and writes
``bench/results/cli-e2e-<machine tag>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import harness
import numpy as np
from harness import REPO, Row, interleave, stats, work_dir


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
    with work_dir("evforge-cli-", workdir) as tmp:
        full, start = tmp / "frames" / "clip", tmp / "frames2" / "clip"
        write_pngs(full, rgb)
        start.mkdir(parents=True)
        for name in sorted(p.name for p in full.iterdir())[:2]:
            shutil.copy(full / name, start / name)
        base = evforge_command() + ["simulate", *preset_flags(preset), "--upsample", "none", "--device", "cpu",
                                    "--fps", f"{fps:g}", "--quiet", "--overwrite", *extra_args]
        times_s = np.arange(n) / fps
        rows = {name: Row(name) for name in ("evforge_n", "evforge_2", "v2e")}

        def command(folder: Path, out: str, warms: bool):  # the warm-up: OS caches, kernel cache
            return lambda warm: None if warm and not warms else _wall(base + [str(folder), "--out", str(tmp / out)],
                                                                      tmp)

        contenders = [(rows["evforge_n"], command(full.parent, "out", True)),
                      (rows["evforge_2"], command(start.parent, "out2", False))]
        if v2e is not None:
            contenders.append((rows["v2e"], lambda warm: None if warm else
                               v2e.time(v2e_kwargs, gray_u8, times_s, settle=0)["seconds"]))
        interleave(contenders, repeats)
        out_file = tmp / "out" / "clip.h5"
        events = _events_in(out_file)
        size = out_file.stat().st_size
    runs = {name: row.values("seconds") for name, row in rows.items()}
    per_frame = [(a - b) / (n - 2) for a, b in zip(runs["evforge_n"], runs["evforge_2"])]
    res = {"frames": n, "fps": fps, "preset": preset, "size": list(rgb.shape[2:0:-1]), "runs": runs,
           "evforge_s_per_frame": stats(per_frame)["median"], "evforge_per_frame_all": per_frame,
           "startup_s": stats(runs["evforge_2"])["median"], "total_s": stats(runs["evforge_n"])["median"],
           "events": events, "file_bytes": size, "command": " ".join(base[1:] + ["FOLDER", "--out", "OUT"])}
    if runs["v2e"]:
        v2e_per_frame = [s / (n - 1) for s in runs["v2e"]]
        res["v2e_s_per_frame"] = stats(v2e_per_frame)["median"]
        res["ratio_per_repeat"] = [v / e for v, e in zip(v2e_per_frame, per_frame)]
        # the figure quoted (table and target): the median of the paired per-repeat ratios
        res["ratio"] = stats(res["ratio_per_repeat"])["median"]
    return res


def _events_in(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f.attrs["num_events"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_bench_args(p, quick="24 frames at 160x120, 1 repeat", devices=None,
                           out="bench/results/cli-e2e-<machine tag>.json")
    p.add_argument("--frames", type=int, default=None, help="PNG frames (default 300, at least 3)")
    p.add_argument("--size", default=None, help="WxH of the frames (default 640x480)")
    p.add_argument("--presets", default="noisy", help="comma-separated, each NAME or NAME+field=value+...")
    p.add_argument("--fps", type=float, default=1000.0, help="source frame rate (default 1000: one step a frame)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3)")
    p.add_argument("--speed", type=float, default=240.0, help="image motion of the scene, pixels/s")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--v2e-root", default=None, help="v2e source tree (default ../shared/reference/v2e)")
    p.add_argument("--v2e-python", default=None, help="run v2e under this interpreter instead of in process")
    p.add_argument("--no-v2e", action="store_true", help="skip v2e (no ratio)")
    a = p.parse_args(argv)
    frames = a.frames or (24 if a.quick else 300)
    w, h = (int(v) for v in (a.size or ("160x120" if a.quick else "640x480")).lower().split("x"))
    repeats = a.repeats or (1 if a.quick else 3)
    if frames < 3 or repeats < 1:
        p.error("--frames >= 3 and --repeats >= 1 please")

    import simulator  # the scene rendering, preset parsing, v2e loading and report lines of the simulator bench
    from machine import cpuinfo, machine_info
    from v2e_emulator import emulator_kwargs

    threads = cpuinfo()["usable_cpus"] or 1
    info = machine_info(threads)
    harness.announce(info, "cpu", ["cpu"])
    clip = simulator.render_rgb({"c": (w, h, 1, min(frames, 61), a.speed / a.fps, a.seed)}, 1)["c"][:, 0]
    rgb = clip[[simulator.pingpong(i, len(clip) - 1) for i in range(frames)]]
    gray = simulator.gray_8bit(rgb[:, None])[:, 0, 0].numpy().astype(np.uint8)
    v2e = simulator.open_v2e(a, threads)
    clis = []
    for spec in harness.csv(a.presets):
        kw = emulator_kwargs(simulator.preset_params(spec))
        clis.append(measure(rgb, gray, a.fps, spec, v2e, kw, repeats=repeats))
        print("\n".join(simulator.cli_lines(clis[-1])), flush=True)
    help_s = help_seconds()
    print(simulator.help_line(help_s), flush=True)
    config = {"command": harness.command_line("cli_e2e.py", argv), "quick": a.quick, "frames": frames,
              "size": [w, h], "repeats": repeats, "v2e": v2e.describe() if v2e else None}
    path = next(iter(harness.result_paths("cli-e2e", ["cpu"], info, a.quick, a.out)))
    harness.write_results(path, info, config, clis, benchmark="cli-e2e", rows_key="cli", help_s=help_s,
                          markdown=lambda doc: [*harness.markdown_head("evforge simulate end to end", doc["date"],
                                                                       info, config["command"]),
                                                *[x for c in clis for x in simulator.cli_lines(c)],
                                                simulator.help_line(help_s)])
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
