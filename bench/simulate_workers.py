"""``evforge simulate`` with 1 and 2 CPU worker processes: frames/s of the whole command on procedural scenes.

Writes ``--sequences`` procedural TartanAir-layout trajectories of ``--frames`` frames at ``--size`` (once, into
a temp folder), then times ``evforge simulate`` from the outside, as a user runs it, for each ``--devices``
setting (default ``cpu`` = one process with every core, ``cpu:1`` = one worker process, ``cpu:2`` = two worker
processes with half the cores each), each into a fresh output folder, ``--repeats`` times with the settings
interleaved; prints frames/s (median [min-max]) and the speedup over the first setting (median of the per-repeat
ratios), and checks that every setting wrote the same event columns. The start-up of the command (importing
torch, spawning workers, loading the compiled kernels) is included: it is what a user pays. Results:
``bench/results/simulate-workers-<machine tag>.json`` and ``.md`` (``--out``).

    .venv/bin/python bench/simulate_workers.py
    .venv/bin/python bench/simulate_workers.py --sequences 8 --frames 60 --size 346x260 --devices cpu,cpu:2,cpu:4
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import h5py
import harness
import hdf5plugin  # noqa: F401  (the stream files' zstd filter)
from cli_e2e import evforge_command
from harness import Row, markdown_head, markdown_table, ratio_stats
from machine import machine_info

from evforge.simulator.scenes import SceneSpec, make_dataset

QUICK = dict(sequences=2, frames=6, size="160x120", devices="cpu,cpu:2", repeats=1)


def _columns(out: Path) -> dict:
    got = {}
    for f in sorted(out.rglob("*.h5")):
        with h5py.File(f, "r") as h:
            got[f.relative_to(out).as_posix()] = [h[f"events/{c}"][()].tobytes() for c in "xypt"]
    return got


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_bench_args(ap, quick="2 sequences x 6 frames at 160x120, cpu and cpu:2, 1 repeat", devices=None,
                           out="bench/results/simulate-workers-<machine tag>.json")
    ap.add_argument("--sequences", type=int, default=None, help="trajectories (default 4)")
    ap.add_argument("--frames", type=int, default=None, help="frames per trajectory (default 40)")
    ap.add_argument("--size", default=None, help="WxH of the scenes (also the output size; default 346x260)")
    ap.add_argument("--devices", default=None, help="comma list of --devices settings to compare ('cpu' = one "
                                                    "process; default cpu,cpu:1,cpu:2)")
    ap.add_argument("--preset", default="noisy")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None, help="repeats, interleaved across settings (default 2)")
    ap.add_argument("--json", dest="out", type=Path, help="the same as --out (the old name)")
    a = ap.parse_args(argv)
    defaults = QUICK if a.quick else dict(sequences=4, frames=40, size="346x260", devices="cpu,cpu:1,cpu:2",
                                          repeats=2)
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.repeats < 1 or a.sequences < 1 or a.frames < 2:
        ap.error("--repeats, --sequences >= 1 and --frames >= 2 please")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    info = machine_info()  # before the runs: the load average at start
    w, h = (int(v) for v in args.size.lower().split("x"))
    settings = harness.csv(args.devices)  # "cpu:2" is one setting, "cpu" another
    with harness.work_dir("evforge-bench-workers-") as tmp:
        per_env = max(1, args.sequences // 2)
        make_dataset(tmp / "in", envs=("bench_a", "bench_b"), trajectories=per_env,
                     spec=SceneSpec(width=w, height=h, frames=args.frames, speed_px=2.0, seed=0))
        frames = 2 * per_env * args.frames
        reference = {}

        def simulate(devices: str, row: Row):
            def run(warm: bool) -> float:
                out = tmp / f"out-{devices.replace(':', '_')}-{len(row.runs)}"
                cmd = [*evforge_command(), "simulate", str(tmp / "in"), "--out", str(out), "--preset", args.preset,
                       "--batch", str(args.batch), "--device", "cpu", "--quiet"]
                if devices != "cpu":
                    cmd += ["--devices", devices]
                t0 = time.perf_counter()
                done = subprocess.run(cmd, capture_output=True, text=True)
                seconds = time.perf_counter() - t0
                if done.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
                cols = _columns(out)
                reference.setdefault("cols", cols)
                if cols != reference["cols"]:
                    raise SystemExit(f"--devices {devices}: event columns differ from --devices {settings[0]}")
                return seconds
            return run

        rows = {d: Row(d) for d in settings}
        harness.interleave([(rows[d], simulate(d, rows[d])) for d in settings], args.repeats, warmup=0)
    fps = lambda run: frames / run["seconds"]  # noqa: E731
    out_rows = [{"devices": d, "seconds": r.values("seconds"), "frames": frames,
                 "frames_per_s": frames / r.stats("seconds")["median"], "frames_per_s_stats": r.stats(fps),
                 "vs_first": ratio_stats(r.values(fps), rows[settings[0]].values(fps))}
                for d, r in rows.items()]
    config = {"command": harness.command_line("simulate_workers.py", argv), "quick": args.quick}
    args_doc = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}

    def markdown(doc: dict) -> list[str]:
        table = [[r["devices"], f"{harness.stats(r['seconds'])['median']:.2f}",
                  harness.spread(r["frames_per_s_stats"], lambda v: f"{v:.1f}"), harness.ratio(r["vs_first"])]
                 for r in doc["rows"]]
        return [*markdown_head("evforge simulate with worker processes", doc["date"], info, config["command"],
                               [f"- {frames} frames ({2 * per_env} sequences x {args.frames}) at {w}x{h}, preset "
                                f"{args.preset}, batch {args.batch}, {args.repeats} interleaved repeats (medians "
                                "[min-max]); the whole command timed from outside, start-up included; identical "
                                "event columns in every setting"]),
                markdown_table(["--devices", "median s", "frames/s [min-max]", "vs first [min-max]"], table), ""]

    path = next(iter(harness.result_paths("simulate-workers", ["cpu"], info, args.quick, args.out)))
    doc = harness.write_results(path, info, config, out_rows, benchmark="simulate-workers", markdown=markdown,
                                args=args_doc)
    print("\n".join(markdown(doc)))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
