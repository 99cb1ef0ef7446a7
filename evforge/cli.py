"""The ``evforge`` command: parses arguments, then calls library functions usable from Python on their own.

Exit codes: 0 done; 1 done, but some inputs failed (listed: convert's errors.jsonl, simulate's failed sequences,
verify's faults, inspect's unreadable shards); 2 usage or an unusable input (one line naming it); 3 the
environment (disk full, read-only or non-folder output, locked by another run; one line naming the path);
130 interrupted. Finished work is kept in every case: rerun the command to resume.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .errors import InputError, OutputError, output_error


def _add_simulate(sub) -> None:
    from .simulator.params import PRESETS, RESOLUTIONS
    from .simulator.recipes import RECIPES

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

    from .simulator.recipes import get_recipe
    from .simulator.settings import SimulateConfig, UpsampleConfig

    names = ("pos_thres", "neg_thres", "sigma_thres", "cutoff_hz", "leak_rate_hz", "shot_noise_rate_hz",
             "refractory_period_s", "leak_jitter_fraction", "noise_rate_cov_decades")
    overrides = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if getattr(args, "params", None):
        from .realism.calibrate import read_camera_params

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
    from .simulator.pipeline import simulate_sequences
    from .simulator.recipes import get_recipe
    from .simulator.sources import discover_sequences

    cfg = simulate_config_from_args(args)
    cfg.params()  # bad parameter values fail before any work
    fps = args.fps
    if args.recipe and fps is None and args.timestamps is None:
        fps = get_recipe(args.recipe).fps  # the recipe's time base: one source frame per interval_s
    seqs = discover_sequences(args.input, fps=fps, timestamps=args.timestamps,
                              timestamps_unit=args.timestamps_unit, camera=args.camera)
    results = simulate_sequences(seqs, args.out, cfg, devices=args.devices, executor=args.executor,
                                 address=args.address, ray_gpus=args.gpus_per_task, progress=not args.quiet,
                                 log=_err, command="evforge " + " ".join(args.argv))
    done = [r for r in results if r.status == "done"]
    skipped = [r for r in results if r.status == "skipped"]
    failed = [r for r in results if r.status == "failed"]
    print(f"{len(done)} simulated ({sum(r.events for r in done):,} events), {len(skipped)} already done, "
          f"{len(failed)} failed -> {args.out}")
    return 1 if failed else 0


def _add_preview(sub) -> None:
    p = sub.add_parser("preview", help="PNG preview of a stream file, a shard or a dataset",
                       description="A stream file: event frames beside the source frames and the event rate. "
                                   "A shard or dataset folder: a grid of event frames of random samples.")
    p.add_argument("file", help="stream file, shard file, or dataset folder / manifest.json")
    p.add_argument("--out", default=None, help="PNG path (default: next to FILE)")
    p.add_argument("--windows", type=int, default=4, help="stream files: frame intervals shown")
    p.add_argument("--samples", type=int, default=8, help="shards/datasets: samples shown")
    p.add_argument("--split", default=None, help="datasets: draw samples from this split")
    p.add_argument("--seed", type=int, default=0, help="shards/datasets: which random samples")
    p.set_defaults(func=_cmd_preview)


def _cmd_preview(args) -> int:
    from .dataset_builder.inspect import file_format

    path = Path(args.file)
    if file_format(path) in ("dataset", "shard"):
        from .dataset_builder.preview import render_shard_preview

        out = Path(args.out) if args.out else (path / "preview.png" if path.is_dir() else path.with_suffix(".png"))
        print(render_shard_preview(path, out, samples=args.samples, split=args.split, seed=args.seed))
        return 0
    from .preview import render_stream_preview

    out = Path(args.out) if args.out else path.with_suffix(".png")
    try:
        print(render_stream_preview(path, out, windows=args.windows))
    except (OSError, KeyError) as err:  # HDF5 names no file when a damaged chunk fails to decompress
        if isinstance(err, OSError) and output_error(err) is not None:
            raise  # the output's fault (read-only, full)
        raise InputError(path, f"cannot read ({err})") from None
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="counts, classes, splits and event statistics of a dataset or file")
    p.add_argument("path", help="dataset folder, manifest.json, shard file or stream file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args) -> int:
    import json

    from .dataset_builder.inspect import format_report, inspect_path

    report = inspect_path(args.path)
    print(json.dumps(report, indent=1, default=str) if args.json else format_report(report))
    return 1 if report.get("problems") else 0  # e.g. unreadable shards


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check checksums, counts and event invariants; exit 1 on any fault")
    p.add_argument("path", help="dataset folder, manifest.json, shard file or stream file")
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args) -> int:
    from .dataset_builder.inspect import verify_dataset

    faults = verify_dataset(args.path)
    for fault in faults:
        print(fault)
    print("OK" if not faults else f"{len(faults)} fault(s)")
    return 1 if faults else 0


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
    p.add_argument("--method", default="ecddp", choices=["ecddp", "mem"],
                   help="pretraining stage: ECDDP on the streams, or MEM (tokenizer + masked modelling) on "
                        "the classification set")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, device=args.device, method=args.method, progress=not args.quiet)
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a dataset (or simulated streams) into HDF5 shards + manifest",
                       description="Convert SRC with converter NAME into shards and a manifest under OUT. Work is "
                                   "cut into units (one shard each); a rerun skips units whose shard verifies. "
                                   "Bad samples are listed in OUT/errors.jsonl; the exit code is 1 if there are "
                                   "any, unless --allow-errors.")
    p.add_argument("name", help="ncaltech101, ncars, nimagenet, dsec, tartanair or recordings (raw camera files)")
    p.add_argument("src", help="the dataset's root folder (tartanair: a folder of stream files)")
    p.add_argument("--out", required=True, help="dataset folder (shards, manifest.json, errors.jsonl)")
    p.add_argument("--workers", type=int, default=1, help="local worker processes (joblib)")
    p.add_argument("--executor", default="local", choices=["local", "ray"])
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--allow-errors", action="store_true", help="exit 0 even if some samples failed")
    p.add_argument("--overwrite", action="store_true",
                   help="redo every unit (a rerun otherwise redoes only units whose sources or options changed)")
    p.add_argument("--split-file", default=None, help="split definition (MEM's train|val/<class>/<name> lines)")
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified split and label subsets")
    p.add_argument("--percents", default="2,5,10,20,50", help="label-efficiency subsets of train, in percent")
    p.add_argument("--samples-per-unit", type=int, default=None, help="samples per shard (default: by size)")
    p.add_argument("--shard-mb", type=float, default=256, help="target raw size of a shard, MiB")
    p.add_argument("--compression", default="zstd", choices=["zstd", "lz4", "gzip"])
    p.add_argument("--split-copy-dir", default=None,
                   help="where the copy of the split goes (default: ./manifests/ if that folder exists)")
    g = p.add_argument_group("converter options (only passed when given)")
    g.add_argument("--val-fraction", type=float, help="ncaltech101: validation share of the seeded split")
    g.add_argument("--unsorted", choices=["error", "sort"], help="samples with unsorted timestamps: error or sort")
    g.add_argument("--class-list", help="nimagenet: class list file")
    g.add_argument("--mini", action="store_const", const=True, help="nimagenet: the 100-class mini subset")
    g.add_argument("--mini-list", help="nimagenet: the mini subset's class list")
    g.add_argument("--train-list", help="nimagenet: train_list.txt")
    g.add_argument("--val-list", help="nimagenet: val_list.txt")
    g.add_argument("--events-per-label", type=int, help="dsec: events before each label time (500000)")
    g.add_argument("--rectify", action="store_const", const=True, help="dsec: rectify event coordinates")
    g.add_argument("--label-set", help="dsec: 11classes or 19classes")
    g.add_argument("--test-envs", help="tartanair: held-out environments (hospital,gascola,neighborhood)")
    g.add_argument("--recipe", help="tartanair: a data recipe (ecddp: E-TartanAir, one sample per 1 s interval "
                                     "kept by the public code's rule); with --simulate it also sets the simulation")
    g.add_argument("--simulate", action="store_const", const=True,
                   help="tartanair: SRC is TartanAir frames; simulate first (see --recipe/--preset/--resolution)")
    g.add_argument("--preset", help="tartanair --simulate: pixel-model preset")
    g.add_argument("--resolution", help="tartanair --simulate: output resolution")
    g.add_argument("--device", help="tartanair --simulate: device")
    g.add_argument("--devices", help="tartanair --simulate: one worker process per device (cuda:0,cuda:1 or "
                                     "cpu:N) for each unit's sequences; with --executor ray each unit is a Ray "
                                     "task (with a GPU for --device cuda)")
    g.add_argument("--keep-streams", action="store_const", const=True,
                   help="tartanair --simulate: keep the stream files in OUT/_streams (default: each unit's streams "
                        "are deleted once its shard is written)")
    g.add_argument("--sample-ms", type=float, help="recordings: sample window length in ms (100)")
    g.add_argument("--min-events", type=int, help="recordings: fewest events a window needs to be a sample (1000)")
    g.add_argument("--part-events", type=int, help="recordings: events per part of a long recording (2000000)")
    g.add_argument("--sensor-size", help="recordings: WIDTHxHEIGHT (default: from the files' headers)")
    g.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="any other converter option (value parsed as JSON when it can be)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_convert)


_CONVERTER_FLAGS = ("val_fraction", "unsorted", "class_list", "mini", "mini_list", "train_list", "val_list",
                    "events_per_label", "rectify", "label_set", "test_envs", "recipe", "simulate", "preset",
                    "resolution", "device", "devices", "keep_streams", "sample_ms", "min_events", "part_events",
                    "sensor_size")


def _cmd_convert(args) -> int:
    import json

    from .dataset_builder.build import build_dataset

    options = {k: getattr(args, k) for k in _CONVERTER_FLAGS if getattr(args, k) is not None}
    for item in args.opt:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--opt {item!r}: expected KEY=VALUE")
        try:
            options[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.replace("-", "_")] = value
    split_copy = args.split_copy_dir or ("manifests" if Path("manifests").is_dir() else None)
    report = build_dataset(args.name, args.src, args.out, workers=args.workers, executor=args.executor,
                           address=args.address, allow_errors=args.allow_errors, split_file=args.split_file,
                           seed=args.seed, samples_per_unit=args.samples_per_unit,
                           target_bytes=int(args.shard_mb * 2**20), compression=args.compression,
                           percents=tuple(float(v) for v in args.percents.split(",") if v),
                           progress=not args.quiet, command="evforge " + " ".join(args.argv),
                           split_copy_dir=split_copy, overwrite=args.overwrite, **options)
    splits = ", ".join(f"{k} {v}" for k, v in sorted(report.splits.items()))
    print(f"{report.num_samples:,} samples ({splits}), {report.num_events:,} events in {report.num_units} shards "
          f"({report.units_skipped} already done) -> {report.manifest_path}")
    if report.num_errors:
        _err(f"{report.num_errors} samples failed, see {report.errors_path}")
    return report.exit_code


def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="self-supervised pretraining (ECDDP, MEM) on the shared trainer",
                       description="Train with a YAML config (task.name picks the method). Multi-GPU: "
                                   "--set trainer.devices=N, or launch under torchrun / srun.")
    _add_train_args(p, "configs/pretrain/ecddp_tiny.yaml")
    p.set_defaults(func=_cmd_pretrain)


def _add_train_args(p, example: str) -> None:
    """The arguments ``pretrain`` and ``finetune`` share: the config, overrides, run folder and resume."""
    p.add_argument("config_pos", nargs="?", metavar="CONFIG", help="YAML config (or use --config)")
    p.add_argument("--config", default=None, help=f"YAML config, e.g. {example}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.batch_size=32 (repeatable)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", default="auto", help="auto (resume from OUT if it has a checkpoint), none, or a .ckpt")


def resolve_config(path: str) -> str:
    """A config path as given, or else the packaged copy (``configs/pretrain/x.yaml`` works anywhere)."""
    if Path(path).exists():
        return path
    packaged = Path(__file__).resolve().parent / path
    if not packaged.exists() and Path(path).parts[:1] == ("configs",):
        packaged = Path(__file__).resolve().parent / "configs" / Path(*Path(path).parts[1:])
    return str(packaged) if packaged.exists() else path


def _train(args, command: str, get_task, init: str | None = None) -> int:
    """The body of ``pretrain`` and ``finetune``: config (+ overrides) -> task -> Trainer.fit."""
    from .trainer.config import load_config
    from .trainer.trainer import Trainer

    config = args.config or args.config_pos
    if not config:
        raise ValueError(f"{command}: give a config (CONFIG or --config)")
    config = resolve_config(config)
    cfg = load_config(config, args.overrides)
    if init:
        if not Path(init).is_file():
            raise InputError(init, "no such backbone file")
        cfg.setdefault("task", {})["init"] = str(init)  # set directly: a path is not YAML to parse
    task = get_task(cfg.get("task", {}).get("name", ""))
    out = args.out or str(Path("runs") / Path(config).stem)
    with Trainer(cfg, task, out_dir=out, resume=None if args.resume == "none" else args.resume,
                 command="evforge " + " ".join(args.argv)) as trainer:
        summary = trainer.fit()
    if summary.get("checkpoint"):
        print(f"{summary['stopped']} at step {summary['step']}: checkpoint {summary['checkpoint']}")
    return 0


def _cmd_pretrain(args) -> int:
    from .pretrain import get_task

    return _train(args, "pretrain", get_task)


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="finetune a pretrained backbone: classification or DSEC segmentation",
                       description="Train with a YAML config (task.name: classification or segmentation), "
                                   "initialised from an exported backbone (--init).")
    _add_train_args(p, "configs/finetune/ncaltech101_vit_s.yaml")
    p.add_argument("--init", default=None, help="backbone .safetensors from 'evforge export-backbone'")
    p.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args) -> int:
    from .finetune import get_task

    return _train(args, "finetune", get_task, init=args.init)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a finetuning checkpoint (or a run's best one): JSON, Markdown, PNGs")
    p.add_argument("ckpt", help="a .ckpt, or a run folder (its best validation checkpoint is used)")
    p.add_argument("--split", default=None, help="split to report (default: test if the dataset has one, else val)")
    p.add_argument("--out", default=None, help="report folder (default: next to the checkpoint)")
    p.add_argument("--metric", default=None, help="metric that picks the best checkpoint of a run folder")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    from .finetune.evaluate import evaluate

    res = evaluate(args.ckpt, split=args.split, out_dir=args.out, metric=args.metric, device=args.device)
    print(Path(res["files"]["markdown"]).read_text())
    print(f"reports: {Path(res['files']['json']).parent}")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export-backbone", help="pretrained backbone -> timm-compatible .safetensors",
                       description="Write the backbone of an evforge pretraining checkpoint (timm keys, ECDDP's "
                                   "per-stage output norms, the Swin window options as metadata).")
    p.add_argument("ckpt", help="a pretraining checkpoint (runs/<name>/checkpoints/last.ckpt)")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--which", default="teacher", choices=["teacher", "student"],
                   help="ECDDP network (default teacher; the public finetuning code loads the student)")
    p.add_argument("--with-neck", action="store_true", help="also store ECDDP's fusion neck (ecddp_neck.*)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from .export import export_backbone

    print(export_backbone(args.ckpt, args.out, which=args.which, with_neck=args.with_neck))
    return 0


def _add_import(sub) -> None:
    p = sub.add_parser("import-checkpoint", help="a method's released checkpoint -> an evforge backbone file",
                       description="Turn a checkpoint in a method's public layout (ecddp: the authors' "
                                   "{'model': {'student.backbone.*', 'teacher.backbone.*', heads...}, 'optimizer', "
                                   "'current_epoch'}) into the backbone file 'finetune --init' reads; the "
                                   "architecture is inferred from the weights.")
    p.add_argument("method", choices=["ecddp"], help="the layout of the checkpoint")
    p.add_argument("ckpt", help="the released checkpoint (.pt), loaded with weights_only=True")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--which", default="student", choices=["student", "teacher"],
                   help="network to import (default student, what the public finetuning code loads)")
    p.add_argument("--with-neck", action="store_true", help="also store ECDDP's fusion neck (ecddp_neck.*)")
    p.set_defaults(func=_cmd_import)


def _cmd_import(args) -> int:
    from .export import import_checkpoint

    print(import_checkpoint(args.method, args.ckpt, args.out, which=args.which, with_neck=args.with_neck))
    return 0


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="realism report of two event sources (e.g. a real recording vs a simulation)",
                       description="Statistics of A and B side by side (event rate over time, ON fraction, per-pixel "
                                   "rate and inter-event intervals, background activity, hot pixels, spatial "
                                   "autocorrelation): OUT/report.md, report.json (every number), report.png.")
    p.add_argument("a", help="recording (.aedat4 .raw .dat), stream file, shard, dataset folder or ATIS .bin")
    p.add_argument("b", help="the same kinds as A")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--labels", default=None, help="LABEL_A,LABEL_B (default: the file names)")
    p.add_argument("--split", default="train", help="the split of a dataset source")
    p.add_argument("--max-events", type=int, default=5_000_000, help="events taken from each source (the first)")
    p.add_argument("--sensor-size", default=None, help="WIDTHxHEIGHT for sources that state none")
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args) -> int:
    from .realism.compare import compare_sources

    size = tuple(int(v) for v in args.sensor_size.lower().split("x")) if args.sensor_size else None
    labels = args.labels.split(",", 1) if args.labels else None
    report = compare_sources(args.a, args.b, args.out, labels=labels, max_events=args.max_events, sensor_size=size,
                             split=args.split)
    verdict = "identical" if report["difference"]["identical"] else "different"
    print(f"{report['a']['label']} vs {report['b']['label']}: {verdict} -> {Path(args.out) / 'report.md'}")
    return 0


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="estimate the pixel model's noise parameters from a real recording",
                       description="Estimate leak rate, shot-noise rate, refractory period, ON/OFF threshold ratio and "
                                   "hot pixels from RECORDING, each with an uncertainty and a statement of what the "
                                   "recording could not determine; write them as camera.yaml for "
                                   "`evforge simulate --params` (estimators: docs/CALIBRATION.md).")
    p.add_argument("recording", help="recording (.aedat4 .raw .dat), stream file, shard or dataset folder")
    p.add_argument("--out", required=True, help="the camera file to write, e.g. camera.yaml")
    p.add_argument("--base", default="default", help="preset whose values are kept where the recording says nothing")
    p.add_argument("--max-events", type=int, default=20_000_000, help="events used (the first)")
    p.add_argument("--sensor-size", default=None, help="WIDTHxHEIGHT for sources that state none")
    p.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(args) -> int:
    from .realism.calibrate import calibrate, write_camera_file

    size = tuple(int(v) for v in args.sensor_size.lower().split("x")) if args.sensor_size else None
    cal = calibrate(args.recording, base=args.base, max_events=args.max_events, sensor_size=size)
    write_camera_file(cal, args.out, command="evforge " + " ".join(args.argv))
    for name, e in cal.estimates.items():
        sd = "" if e.uncertainty is None else f" +- {e.uncertainty:.3g}"
        print(f"{name}: {e.value:.4g}{sd}{'' if e.determined else ' (not determined)'}")
    print(f"not determined: {', '.join(cal.not_determined)} -> {args.out}")
    return 0


def _err(msg: str) -> None:
    print(f"evforge: {msg}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evforge",
                                     description=__doc__.splitlines()[0].replace("The ``evforge`` command", "evforge"))
    parser.add_argument("--version", action="version", version=f"evforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_demo, _add_scenes, _add_simulate, _add_convert, _add_inspect, _add_verify, _add_preview,
                _add_pretrain, _add_export, _add_import, _add_finetune, _add_eval, _add_compare,
                _add_calibrate):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return int(args.func(args) or 0)
    except InputError as e:
        _err(f"error: {e}")
        return 2
    except OutputError as e:
        _err(f"error: {e}")
        return 3
    except (OSError, RuntimeError) as e:  # a full disk, a read-only folder, a file where a folder belongs
        env = output_error(e)
        if env is not None:
            _err(f"error: {env}")
            return 3
        if isinstance(e, FileNotFoundError):
            _err(f"error: {' '.join(str(e).split())}")
            return 2
        if isinstance(e, OSError):
            where = f"{e.filename}: " if e.filename else ""
            _err(f"error: {where}{' '.join((e.strerror or str(e)).split())}")
            return 3
        raise
    except ValueError as e:
        _err(f"error: {' '.join(str(e).split())}")
        return 2
    except KeyboardInterrupt:
        _err("interrupted (finished files are kept; rerun to resume)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
