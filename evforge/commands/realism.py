"""``evforge compare`` and ``evforge calibrate``: realism reports and camera files from real recordings."""

from __future__ import annotations

from pathlib import Path


def add_compare(sub) -> None:
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
    from ..realism.compare import compare_sources

    size = _sensor_size(args.sensor_size)
    labels = args.labels.split(",", 1) if args.labels else None
    report = compare_sources(args.a, args.b, args.out, labels=labels, max_events=args.max_events, sensor_size=size,
                             split=args.split)
    verdict = "identical" if report["difference"]["identical"] else "different"
    print(f"{report['a']['label']} vs {report['b']['label']}: {verdict} -> {Path(args.out) / 'report.md'}")
    return 0


def add_calibrate(sub) -> None:
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
    from ..realism.calibrate import calibrate, write_camera_file

    size = _sensor_size(args.sensor_size)
    cal = calibrate(args.recording, base=args.base, max_events=args.max_events, sensor_size=size)
    write_camera_file(cal, args.out, command="evforge " + " ".join(args.argv))
    for name, e in cal.estimates.items():
        sd = "" if e.uncertainty is None else f" +- {e.uncertainty:.3g}"
        print(f"{name}: {e.value:.4g}{sd}{'' if e.determined else ' (not determined)'}")
    print(f"not determined: {', '.join(cal.not_determined)} -> {args.out}")
    return 0


def _sensor_size(text: str | None) -> tuple[int, ...] | None:
    """``--sensor-size WIDTHxHEIGHT`` as (width, height); None when not given."""
    return tuple(int(v) for v in text.lower().split("x")) if text else None
