"""``evforge convert``, ``inspect``, ``verify`` and ``preview``: parsers and calls into the dataset tools."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError, output_error
from .common import err


def add_preview(sub) -> None:
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
    from ..dataset_builder.inspect import file_format

    path = Path(args.file)
    if file_format(path) in ("dataset", "shard"):
        from ..preview.shards import render_shard_preview

        out = Path(args.out) if args.out else (path / "preview.png" if path.is_dir() else path.with_suffix(".png"))
        print(render_shard_preview(path, out, samples=args.samples, split=args.split, seed=args.seed))
        return 0
    from ..preview.streams import render_stream_preview

    out = Path(args.out) if args.out else path.with_suffix(".png")
    try:
        print(render_stream_preview(path, out, windows=args.windows))
    except (OSError, KeyError) as err:  # HDF5 names no file when a damaged chunk fails to decompress
        if isinstance(err, OSError) and output_error(err) is not None:
            raise  # the output's fault (read-only, full)
        raise InputError(path, f"cannot read ({err})") from None
    return 0


def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="counts, classes, splits and event statistics of a dataset or file")
    p.add_argument("path", help="dataset folder, manifest.json, shard file or stream file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args) -> int:
    import json

    from ..dataset_builder.inspect import format_report, inspect_path

    report = inspect_path(args.path)
    print(json.dumps(report, indent=1, default=str) if args.json else format_report(report))
    return 1 if report.get("problems") else 0  # e.g. unreadable shards


def add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check checksums, counts and event invariants; exit 1 on any fault")
    p.add_argument("path", help="dataset folder, manifest.json, shard file or stream file")
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args) -> int:
    from ..dataset_builder.inspect import verify_dataset

    faults = verify_dataset(args.path)
    for fault in faults:
        print(fault)
    print("OK" if not faults else f"{len(faults)} fault(s)")
    return 1 if faults else 0


def add_convert(sub) -> None:
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

    from ..dataset_builder.build import build_dataset

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
        err(f"{report.num_errors} samples failed, see {report.errors_path}")
    return report.exit_code
