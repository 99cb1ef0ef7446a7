"""``evforge simulate`` with 1 and 2 CPU worker processes: frames/s of the whole command on procedural scenes.

Writes ``--sequences`` procedural TartanAir-layout trajectories of ``--frames`` frames at ``--size`` (once, into
a temp folder), then times ``evforge simulate`` from the outside, as a user runs it, for each ``--devices``
setting (default ``cpu`` = one process with every core, ``cpu:1`` = one worker process, ``cpu:2`` = two worker
processes with half the cores each), each into a fresh output folder, ``--repeats`` times; prints frames/s
(median) and the speedup over the first setting, and checks that every setting wrote the same event columns.
The start-up of the command (importing torch, spawning workers, loading the compiled kernels) is included:
it is what a user pays. Results as JSON with ``--json PATH``.

    .venv/bin/python bench/simulate_workers.py
    .venv/bin/python bench/simulate_workers.py --sequences 8 --frames 60 --size 346x260 --devices cpu,cpu:2,cpu:4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (the stream files' zstd filter)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cli_e2e import evforge_command  # noqa: E402


def _columns(out: Path) -> dict:
    got = {}
    for f in sorted(out.rglob("*.h5")):
        with h5py.File(f, "r") as h:
            got[f.relative_to(out).as_posix()] = [h[f"events/{c}"][()].tobytes() for c in "xypt"]
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--size", default="346x260", help="WxH of the scenes (also the output size)")
    ap.add_argument("--devices", default="cpu,cpu:1,cpu:2", help="comma list of --devices settings to compare "
                                                                 "('cpu' = one process)")
    ap.add_argument("--preset", default="noisy")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    from bench.machine import machine_info, machine_lines
    from evforge.simulator.scenes import SceneSpec, make_dataset

    info = machine_info()  # before the runs: the load average at start

    w, h = (int(v) for v in args.size.lower().split("x"))
    settings = []
    for item in args.devices.split(","):  # "cpu:2" is one setting, "cpu" another
        settings.append(item.strip())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        per_env = max(1, args.sequences // 2)
        make_dataset(tmp / "in", envs=("bench_a", "bench_b"), trajectories=per_env,
                     spec=SceneSpec(width=w, height=h, frames=args.frames, speed_px=2.0, seed=0))
        frames = 2 * per_env * args.frames
        rows, reference = [], None
        for devices in settings:
            seconds = []
            for r in range(args.repeats):
                out = tmp / f"out-{devices.replace(':', '_')}-{r}"
                cmd = [*evforge_command(), "simulate", str(tmp / "in"), "--out", str(out), "--preset", args.preset,
                       "--batch", str(args.batch), "--device", "cpu", "--quiet"]
                if devices != "cpu":
                    cmd += ["--devices", devices]
                t0 = time.perf_counter()
                done = subprocess.run(cmd, capture_output=True, text=True)
                seconds.append(time.perf_counter() - t0)
                if done.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
                cols = _columns(out)
                reference = reference or cols
                if cols != reference:
                    raise SystemExit(f"--devices {devices}: event columns differ from --devices {settings[0]}")
            med = statistics.median(seconds)
            rows.append({"devices": devices, "seconds": seconds, "frames": frames, "frames_per_s": frames / med})
        base = rows[0]["frames_per_s"]
        lines = [f"# evforge simulate with worker processes ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
                 *machine_lines(info),
                 f"- {frames} frames ({2 * per_env} sequences x {args.frames}) at {w}x{h}, preset {args.preset}, "
                 f"batch {args.batch}, {args.repeats} repeats (medians); the whole command timed from outside, "
                 "start-up included; identical event columns in every setting", "",
                 "| --devices | median s | frames/s | vs first |", "|---|---|---|---|"]
        for row in rows:
            lines.append(f"| {row['devices']} | {statistics.median(row['seconds']):.2f} | "
                         f"{row['frames_per_s']:.1f} | {row['frames_per_s'] / base:.2f}x |")
        print("\n".join(lines))
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "machine": info, "rows": rows}, indent=1)
                                       + "\n")
            Path(args.json).with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
