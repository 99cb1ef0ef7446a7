"""``evforge simulate`` and ``evforge scenes``: the parsers and the calls into :mod:`evforge.simulator`."""

from __future__ import annotations


def add_simulate(sub) -> None:
    from ..simulator.params import PRESETS, RESOLUTIONS
    from ..simulator.recipes import RECIPES

    p = sub.add_parser("simulate", help="turn RGB video / image folders / TartanAir into DVS event streams",
                       description="Simulate a DVS on every sequence found under INPUT and write one HDF5 "
                                   "stream file per sequence to OUT, and a run summary OUT/simulate.json. A rerun "
                                   "does only what is missing; a finished file made with other settings is "
                                   "refused (redo it with --overwrite).")
    p.add_argument("input", help="TartanAir v1/v2 root, environment or trajectory; image folder; video file")
    p.add_argument("--out", required=True, help="output folder (one <sequence>.h5 per sequence)")
    p.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                   help="a data recipe: its time base (--fps), preset, resolution and upsampling, which the flags "
                        "given here replace; ecddp = E-TartanAir (1 s per TartanAir interval)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="pixel-model preset (v2e's defaults, ideal, clean, noisy, ecddp; default: default, or the "
                        "recipe's)")
    p.add_argument("--params", default=None, metavar="CAMERA_YAML",
                   help="pixel-model values from a camera file (evforge calibrate): over the preset, under the flags")
    g = p.add_argument_group("pixel model (v2e names; override the preset)")
    for name, help_ in [("pos_thres", "ON threshold, log units"), ("neg_thres", "OFF threshold, log units"),
                        ("sigma_thres", "threshold mismatch std"), ("cutoff_hz", "photoreceptor cutoff, 0 = off"),
                        ("leak_rate_hz", "leak event rate per pixel"),
                        ("shot_noise_rate_hz", "shot noise rate per pixel"),
                        ("refractory_period_s", "refractory period, seconds"),
                        ("leak_jitter_fraction", "leak rate jitter"),
                        ("noise_rate_cov_decades", "leak rate spread across pixels, decades")]:
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=float, default=None, help=help_)
    p.add_argument("--resolution", default=None,
                   help=f"native (default), {', '.join(sorted(RESOLUTIONS))}, or WxH (area resampling)")
    p.add_argument("--upsample", default=None, choices=["none", "linear", "flow"],
                   help="frames between source frames: none, log-linear (default), flow-guided")
    p.add_argument("--max-steps", type=int, default=None,
                   help="most simulation steps per source frame pair (default 16)")
    p.add_argument("--fps", type=float, default=None,
                   help="source frame rate (TartanAir: 10 unless given, or 1 / the recipe's interval)")
    p.add_argument("--timestamps", default=None, help="timestamps file for an image folder")
    p.add_argument("--timestamps-unit", default="s", choices=["s", "ms", "us", "ns"])
    p.add_argument("--camera", default="lcam_front", help="TartanAir v2 camera")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--devices", default=None,
                   help="one worker process per device over a shared queue of sequences, longest first: "
                        "cuda:0,cuda:1,... or cpu:N (N CPU workers); with --executor ray: the device inside "
                        "each task (cuda or cpu)")
    p.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="ray: one task per batch of sequences on a Ray cluster (GPU tasks for cuda)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--gpus-per-task", type=float, default=None,
                   help="Ray: GPUs each task asks for (default 1 for a CUDA device, else 0)")
    p.add_argument("--batch", type=int, default=4, help="sequences simulated at once on the device")
    p.add_argument("--workers", type=int, default=2, help="frame-decoding threads")
    p.add_argument("--compression", default="zstd", choices=["zstd", "lz4", "gzip"])
    p.add_argument("--no-frames", action="store_true", help="do not store the gray frames in the stream files")
    p.add_argument("--overwrite", action="store_true", help="redo sequences whose output already exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_simulate)


def simulate_config_from_args(args):
    """The SimulateConfig of ``evforge simulate``: the recipe's settings (if any) under the flags given."""
    import dataclasses

    from ..simulator.recipes import get_recipe
    from ..simulator.settings import SimulateConfig, UpsampleConfig

    names = ("pos_thres", "neg_thres", "sigma_thres", "cutoff_hz", "leak_rate_hz", "shot_noise_rate_hz",
             "refractory_period_s", "leak_jitter_fraction", "noise_rate_cov_decades")
    overrides = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if getattr(args, "params", None):
        from ..realism.calibrate import read_camera_params

        overrides = {**read_camera_params(args.params), **overrides}
    run = dict(overrides=overrides, seed=args.seed, device=args.device, batch=args.batch, workers=args.workers,
               compression=args.compression, save_frames=not args.no_frames, overwrite=args.overwrite)
    upsample = {k: v for k, v in (("mode", args.upsample), ("max_steps", args.max_steps)) if v is not None}
    if args.recipe:
        recipe = get_recipe(args.recipe)
        return recipe.simulate_config(preset=args.preset, resolution=args.resolution,
                                      upsample=dataclasses.replace(recipe.upsample, **upsample), **run)
    return SimulateConfig(preset=args.preset or "default", resolution=args.resolution or "native",
                          upsample=UpsampleConfig(**upsample), **run)


def _cmd_simulate(args) -> int:
    from ..simulator.pipeline import simulate_sequences
    from ..simulator.recipes import get_recipe
    from ..simulator.sources import discover_sequences

    cfg = simulate_config_from_args(args)
    cfg.params()  # bad parameter values fail before any work
    fps = args.fps
    if args.recipe and fps is None and args.timestamps is None:
        fps = get_recipe(args.recipe).fps  # the recipe's time base: one source frame per interval_s
    seqs = discover_sequences(args.input, fps=fps, timestamps=args.timestamps,
                              timestamps_unit=args.timestamps_unit, camera=args.camera)
    results = simulate_sequences(seqs, args.out, cfg, devices=args.devices, executor=args.executor,
                                 address=args.address, ray_gpus=args.gpus_per_task, progress=not args.quiet,
                                 command="evforge " + " ".join(args.argv))
    done = [r for r in results if r.status == "done"]
    skipped = [r for r in results if r.status == "skipped"]
    failed = [r for r in results if r.status == "failed"]
    print(f"{len(done)} simulated ({sum(r.events for r in done):,} events), {len(skipped)} already done, "
          f"{len(failed)} failed -> {args.out}")
    return 1 if failed else 0


def add_scenes(sub) -> None:
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
    from ..simulator.params import parse_resolution
    from ..simulator.scenes import SceneSpec, make_dataset

    w, h = parse_resolution(args.size)
    spec = SceneSpec(width=w, height=h, frames=args.frames, speed_px=args.speed, seed=args.seed)
    paths = make_dataset(args.out, envs=tuple(e for e in args.envs.split(",") if e),
                         trajectories=args.trajectories, spec=spec)
    print(f"{len(paths)} sequences -> {args.out}")
    return 0
