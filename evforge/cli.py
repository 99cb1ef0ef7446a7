"""The ``evforge`` command: parses arguments, then calls library functions usable from Python on their own."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .errors import InputError


def _add_simulate(sub) -> None:
    from .simulator.params import PRESETS, RESOLUTIONS

    p = sub.add_parser("simulate", help="turn RGB video / image folders / TartanAir into DVS event streams",
                       description="Simulate a DVS on every sequence found under INPUT and write one HDF5 "
                                   "stream file per sequence to OUT (reruns skip finished sequences).")
    p.add_argument("input", help="TartanAir v1/v2 root, environment or trajectory; image folder; video file")
    p.add_argument("--out", required=True, help="output folder (one <sequence>.h5 per sequence)")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="pixel-model preset (v2e's defaults, ideal, clean, noisy, ecddp)")
    g = p.add_argument_group("pixel model (v2e names; override the preset)")
    for name, help_ in [("pos_thres", "ON threshold, log units"), ("neg_thres", "OFF threshold, log units"),
                        ("sigma_thres", "threshold mismatch std"), ("cutoff_hz", "photoreceptor cutoff, 0 = off"),
                        ("leak_rate_hz", "leak event rate per pixel"),
                        ("shot_noise_rate_hz", "shot noise rate per pixel"),
                        ("refractory_period_s", "refractory period, seconds"),
                        ("leak_jitter_fraction", "leak rate jitter"),
                        ("noise_rate_cov_decades", "leak rate spread across pixels, decades")]:
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=float, default=None, help=help_)
    p.add_argument("--resolution", default="native",
                   help=f"native, {', '.join(sorted(RESOLUTIONS))}, or WxH (area resampling)")
    p.add_argument("--upsample", default="linear", choices=["none", "linear", "flow"],
                   help="frames between source frames: none, log-linear (default), flow-guided")
    p.add_argument("--max-steps", type=int, default=16, help="most simulation steps per source frame pair")
    p.add_argument("--fps", type=float, default=None, help="source frame rate (TartanAir: 10 unless given)")
    p.add_argument("--timestamps", default=None, help="timestamps file for an image folder")
    p.add_argument("--timestamps-unit", default="s", choices=["s", "ms", "us", "ns"])
    p.add_argument("--camera", default="lcam_front", help="TartanAir v2 camera")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch", type=int, default=4, help="sequences simulated at once on the device")
    p.add_argument("--workers", type=int, default=2, help="frame-decoding threads")
    p.add_argument("--compression", default="zstd", choices=["zstd", "lz4", "gzip"])
    p.add_argument("--no-frames", action="store_true", help="do not store the gray frames in the stream files")
    p.add_argument("--overwrite", action="store_true", help="redo sequences whose output already exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_simulate)


def simulate_config_from_args(args):
    from .simulator.pipeline import SimulateConfig
    from .simulator.upsample import UpsampleConfig

    names = ("pos_thres", "neg_thres", "sigma_thres", "cutoff_hz", "leak_rate_hz", "shot_noise_rate_hz",
             "refractory_period_s", "leak_jitter_fraction", "noise_rate_cov_decades")
    overrides = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    return SimulateConfig(preset=args.preset, overrides=overrides, resolution=args.resolution,
                          upsample=UpsampleConfig(mode=args.upsample, max_steps=args.max_steps), seed=args.seed,
                          device=args.device, batch=args.batch, workers=args.workers,
                          compression=args.compression, save_frames=not args.no_frames, overwrite=args.overwrite)


def _cmd_simulate(args) -> int:
    from .simulator.pipeline import simulate_sequences
    from .simulator.sources import discover_sequences

    cfg = simulate_config_from_args(args)
    cfg.params()  # bad parameter values fail before any work
    seqs = discover_sequences(args.input, fps=args.fps, timestamps=args.timestamps,
                              timestamps_unit=args.timestamps_unit, camera=args.camera)
    results = simulate_sequences(seqs, args.out, cfg, progress=not args.quiet, log=_err)
    done = [r for r in results if r.status == "done"]
    skipped = [r for r in results if r.status == "skipped"]
    failed = [r for r in results if r.status == "failed"]
    print(f"{len(done)} simulated ({sum(r.events for r in done):,} events), {len(skipped)} already done, "
          f"{len(failed)} failed -> {args.out}")
    return 1 if failed else 0


def _add_preview(sub) -> None:
    p = sub.add_parser("preview", help="PNG of event frames beside source frames, and the event rate")
    p.add_argument("file", help="a stream file written by 'evforge simulate'")
    p.add_argument("--out", default=None, help="PNG path (default: FILE with .png)")
    p.add_argument("--windows", type=int, default=4, help="frame intervals shown")
    p.set_defaults(func=_cmd_preview)


def _cmd_preview(args) -> int:
    from .preview import render_stream_preview

    out = Path(args.out) if args.out else Path(args.file).with_suffix(".png")
    print(render_stream_preview(args.file, out, windows=args.windows))
    return 0


def _add_scenes(sub) -> None:
    p = sub.add_parser("scenes", help="write procedural TartanAir-v1-layout sequences (no download)")
    p.add_argument("out")
    p.add_argument("--envs", default="demo_office,demo_garden", help="comma-separated environment names")
    p.add_argument("--trajectories", type=int, default=2, help="trajectories per environment")
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--size", default="160x120", help="WxH")
    p.add_argument("--speed", type=float, default=3.0, help="image motion, pixels per frame")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_scenes)


def _cmd_scenes(args) -> int:
    from .simulator.params import parse_resolution
    from .simulator.scenes import SceneSpec, make_dataset

    w, h = parse_resolution(args.size)
    spec = SceneSpec(width=w, height=h, frames=args.frames, speed_px=args.speed, seed=args.seed)
    paths = make_dataset(args.out, envs=tuple(e for e in args.envs.split(",") if e),
                         trajectories=args.trajectories, spec=spec)
    print(f"{len(paths)} sequences -> {args.out}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run the whole chain on built-in procedural data (CPU, < 2 minutes)")
    p.add_argument("--out", default="evforge_demo", help="output folder (default: ./evforge_demo)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, device=args.device, progress=not args.quiet)
    return 0


def _err(msg: str) -> None:
    print(f"evforge: {msg}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evforge", description=__doc__.splitlines()[0].replace("The ``evforge`` command", "evforge"))
    parser.add_argument("--version", action="version", version=f"evforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_demo, _add_scenes, _add_simulate, _add_preview):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as e:
        _err(f"error: {e}")
        return 2
    except (ValueError, FileNotFoundError) as e:
        _err(f"error: {' '.join(str(e).split())}")
        return 2
    except KeyboardInterrupt:
        _err("interrupted (finished files are kept; rerun to resume)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
