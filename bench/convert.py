"""Dataset conversion and reading speed: ATIS decode vs tonic, shard build, sample reads, training loader.

Four measurements, one table:

(a) **decode**: N-Caltech101 ``.bin`` files decoded by ``evforge.formats.decoders.read_atis_bin`` and
    by ``tonic.io.read_mnist_file`` (tonic's own N-Caltech101 reader, with tonic's N-Caltech101 dtype), the
    same files, interleaved, median of ``--repeats`` passes over all files, in events/s. Both outputs are
    checked to be the same events. Files: ``--ncaltech DIR`` (the real ``Caltech101`` event folder), else
    synthetic files of N-Caltech101 size (``--decode-events`` events over 300 ms, 240x180) written with
    ``write_atis_bin``. Without tonic installed the comparison is skipped (nothing is reimplemented).
(b) **shard build**: ``--samples`` samples of ``--events`` events each (procedural moving edges + 20 % noise,
    240x180, 300 ms; a pool of 8 distinct samples is generated up front, untimed) written with
    ``RollingShardWriter`` (default 256 MiB raw target, zstd), including the fsync and rename of each shard.
(c) **sample reads**: random samples of those shards: *cold-ish* = a fresh ``ShardReader`` per read (opens
    the file, loads the index; the OS page cache is warm, HDF5's chunk cache is not), *warm* = one open
    reader per shard, other random samples. Median, p95 (ms).
(d) **loader**: ``EventDataset`` over a manifest of those shards, ``make_loader`` (shuffle, batch
    ``--batch``, ``collate_events``) with 0 and 2 workers, ``--loader-samples`` samples (epochs repeat as
    needed); samples/s after the first batch (the time to the first batch, with worker start-up, is reported
    separately). Batches are consumed as they come (no model), so this is the loader's ceiling.

Usage::

    python bench/convert.py            # full run (a few minutes on 2 cores; ~1.5 GB in a temp dir)
    python bench/convert.py --quick    # smoke run (< 30 s), results in $TMPDIR/evforge-bench/
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import harness
import numpy as np
from harness import Row, markdown_head, markdown_table
from machine import machine_info, machine_tag

from evforge import EventDataset, make_events, make_loader
from evforge.formats.decoders import read_atis_bin, write_atis_bin
from evforge.formats.manifest import MANIFEST_NAME, build_manifest, make_provenance
from evforge.formats.shards import RAW_EVENT_BYTES, RollingShardWriter, ShardReader

SENSOR = (240, 180)  # N-Caltech101's ATIS crop
DURATION_US = 300_000  # an N-Caltech101 sample: three 100 ms saccades
FULL = dict(samples=2000, events=100_000, decode_files=50, decode_events=115_000, repeats=5, reads=500,
            loader_samples=4000, batch=32)
QUICK = dict(samples=200, events=100_000, decode_files=10, decode_events=115_000, repeats=5, reads=100,
             loader_samples=480, batch=32)
TARGETS = {"decode_speedup": 3.0, "build_mev_s": 30.0}


# --------------------------------------------------------------------------------------------- machine
def convert_machine_info() -> dict:
    import h5py
    import hdf5plugin
    extra = dict(h5py=h5py.__version__, hdf5=h5py.version.hdf5_version, hdf5plugin=hdf5plugin.version,
                 blosc_nthreads=os.environ.get("BLOSC_NTHREADS"))
    try:
        import tonic
        extra["tonic"] = tonic.__version__
    except ImportError:
        extra["tonic"] = None
    info = machine_info(**extra)
    info["machine"] = machine_tag("cpu", info)  # as bench/simulator.py's CPU tag
    return info


# ---------------------------------------------------------------------------------------- synthetic data
def realistic_events(n: int, seed: int, size=SENSOR, duration_us: int = DURATION_US) -> np.ndarray:
    """Events that compress like recorded ones: a few moving edges (ON ahead, OFF behind) plus 20 % noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    t = np.sort(rng.integers(0, duration_us, n))
    noise = rng.random(n) < 0.2
    k = 6
    edge = rng.integers(0, k, n)
    x0, y0 = rng.uniform(0.2 * w, 0.8 * w, k), rng.uniform(0.2 * h, 0.8 * h, k)
    vx, vy = rng.uniform(-200, 200, k) * 1e-6, rng.uniform(-150, 150, k) * 1e-6  # px/us
    length, angle = rng.uniform(10, 50, k), rng.uniform(0, np.pi, k)
    s = rng.uniform(-0.5, 0.5, n) * length[edge]
    side = rng.choice([-1.0, 1.0], n)
    x = x0[edge] + vx[edge] * t + s * np.cos(angle[edge]) + side * rng.exponential(1.0, n) * np.sin(angle[edge])
    y = y0[edge] + vy[edge] * t + s * np.sin(angle[edge]) - side * rng.exponential(1.0, n) * np.cos(angle[edge])
    x = np.where(noise, rng.integers(0, w, n), np.clip(np.rint(x), 0, w - 1)).astype(np.int64)
    y = np.where(noise, rng.integers(0, h, n), np.clip(np.rint(y), 0, h - 1)).astype(np.int64)
    p = np.where(noise, rng.choice([-1, 1], n), side)
    return make_events(x, y, t, p)


def _stats_ms(seconds: list[float]) -> dict:
    a = np.asarray(seconds) * 1e3
    return {"median_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95)), "min_ms": float(a.min()),
            "n": len(a)}


# --------------------------------------------------------------------------------------------- (a) decode
def bench_decode(work: Path, cfg: dict, ncaltech: Path | None) -> dict:
    if ncaltech:
        files = sorted(Path(ncaltech).rglob("*.bin"))[: cfg["decode_files"]]
        if not files:
            raise SystemExit(f"{ncaltech}: no .bin files")
        source = f"real N-Caltech101 files from {ncaltech}"
    else:
        folder = work / "ncaltech"
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for i in range(cfg["decode_files"]):
            n = int(cfg["decode_events"] * np.random.default_rng(i).uniform(0.5, 1.5))
            path = folder / f"image_{i:04d}.bin"
            write_atis_bin(path, realistic_events(n, 1000 + i))
            files.append(path)
        source = f"synthetic ATIS files, {cfg['decode_events']:,} events mean (0.5-1.5x), 300 ms"
    try:
        import tonic
        from tonic.io import read_mnist_file
        tonic_dtype = tonic.datasets.NCALTECH101.dtype
    except ImportError:
        tonic, read_mnist_file = None, None
    n_events = sum(len(read_atis_bin(f)) for f in files)  # also warms the page cache for both
    agree = None
    if read_mnist_file is not None:
        agree = True
        for f in files[:5]:
            a, b = read_atis_bin(f), read_mnist_file(str(f), dtype=tonic_dtype)
            b = b[np.argsort(b["t"], kind="stable")]
            agree &= bool(np.array_equal(a["x"], b["x"]) and np.array_equal(a["y"], b["y"])
                          and np.array_equal(a["t"], b["t"]) and np.array_equal(a["p"] > 0, b["p"] > 0))
    decoders = {"evforge": read_atis_bin}  # the page cache is warm (read above): no warm-up pass
    if read_mnist_file is not None:
        decoders["tonic"] = lambda f: read_mnist_file(str(f), dtype=tonic_dtype)
    rows = {name: Row(name) for name in decoders}

    def decode_all(fn) -> None:
        for f in files:
            fn(f)

    harness.interleave([(rows[name], lambda warm, fn=fn: harness.timed(lambda: decode_all(fn))[0])
                        for name, fn in decoders.items()], cfg["repeats"], warmup=0)
    out = {"files": len(files), "events": n_events, "source": source, "repeats": cfg["repeats"],
           "tonic_version": getattr(tonic, "__version__", None), "outputs_agree": agree}
    for name, row in rows.items():
        ts, s = row.values("seconds"), row.stats("seconds")
        out[name] = {"median_s": s["median"], "min_s": s["min"], "max_s": s["max"], "runs_s": ts,
                     "mev_s": n_events / s["median"] / 1e6, "mev_s_min": n_events / s["max"] / 1e6,
                     "mev_s_max": n_events / s["min"] / 1e6, "ms_per_file": s["median"] / len(files) * 1e3}
    if "tonic" in out:
        out["speedup_per_repeat"] = harness.paired_ratios(rows["tonic"].values("seconds"),
                                                          rows["evforge"].values("seconds"))
        # the figure quoted (table and target): the median of the per-repeat ratios, as every benchmark quotes
        out["speedup"] = harness.stats(out["speedup_per_repeat"])["median"]
    return out


# ---------------------------------------------------------------------------------------------- (b) build
def bench_build(work: Path, cfg: dict, compression: str) -> dict:
    pool = [realistic_events(cfg["events"], 2000 + i) for i in range(8)]
    folder = work / f"shards-{compression}"
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    with RollingShardWriter(folder, prefix="train", sensor_size=SENSOR, compression=compression) as w:
        for i in range(cfg["samples"]):
            w.add_sample(pool[i % len(pool)], key=f"class{i % 10}/image_{i:05d}", label=i % 10)
    seconds = time.perf_counter() - t0
    n = cfg["samples"] * cfg["events"]
    size = sum(p.stat().st_size for p in w.paths)
    return {"compression": compression, "samples": cfg["samples"], "events": n, "seconds": seconds,
            "mev_s": n / seconds / 1e6, "shards": len(w.paths), "bytes": size,
            "ratio": n * RAW_EVENT_BYTES / size, "paths": [str(p) for p in w.paths]}


# ---------------------------------------------------------------------------------------------- (c) reads
def bench_reads(paths: list[str], cfg: dict, seed: int = 0) -> dict:
    """Cold-ish pass first (no other handle open: HDF5 shares a file's chunk cache between handles), then a
    warm pass over different random samples with one open reader per shard."""
    sizes = [len(ShardReader(p)) for p in paths]  # the index only; no handle stays open
    where = [(s, i) for s, n in enumerate(sizes) for i in range(n)]
    rng = np.random.default_rng(seed)
    cold, warm, events = [], [], 0
    for s, i in (where[k] for k in rng.integers(0, len(where), cfg["reads"])):
        t0 = time.perf_counter()
        with ShardReader(paths[s]) as r:
            r.events(i)
        cold.append(time.perf_counter() - t0)
    readers = [ShardReader(p) for p in paths]
    for r in readers:
        r.events(0, 0, 1)  # open the handles before timing
    for s, i in (where[k] for k in rng.integers(0, len(where), cfg["reads"])):
        t0 = time.perf_counter()
        ev = readers[s].events(i)
        warm.append(time.perf_counter() - t0)
        events += len(ev)
    for r in readers:
        r.close()
    mean_events = events / cfg["reads"]
    return {"reads": cfg["reads"], "events_per_sample": mean_events, "cold": _stats_ms(cold),
            "warm": _stats_ms(warm), "warm_mev_s": mean_events / np.median(warm) / 1e6}


# --------------------------------------------------------------------------------------------- (d) loader
def bench_loader(paths: list[str], work: Path, cfg: dict) -> list[dict]:
    root = Path(paths[0]).parent
    prov = make_provenance(converter="bench", command="bench/convert.py")
    build_manifest(root, name="bench", shards={"train": paths}, classes=[f"class{i}" for i in range(10)],
                   provenance=prov).save(root / MANIFEST_NAME)
    rows = []
    for workers in (0, 2):
        ds = EventDataset(root, "train")
        loader = make_loader(ds, batch_size=cfg["batch"], shuffle=True, seed=0, num_workers=workers)
        want = cfg["loader_samples"]
        t0 = time.perf_counter()
        it = iter(loader)
        first = next(it)
        t_first = time.perf_counter() - t0
        seen, events = len(first["key"]), int(first["offsets"][-1])
        t1 = time.perf_counter()
        while seen < want:
            try:
                batch = next(it)
            except StopIteration:  # next epoch (persistent workers are reused)
                it = iter(loader)
                continue
            seen += len(batch["key"])
            events += int(batch["offsets"][-1])
        steady = time.perf_counter() - t1
        steady_samples = seen - len(first["key"])
        rows.append({"workers": workers, "batch": cfg["batch"], "samples": seen, "first_batch_s": t_first,
                     "samples_s": steady_samples / steady if steady > 0 else None,
                     "mev_s": (events - int(first["offsets"][-1])) / steady / 1e6 if steady > 0 else None})
        del it, loader
    return rows


# ---------------------------------------------------------------------------------------------- report
def table(res: dict) -> str:
    d = res["decode"]
    mev = lambda r: f"{r['mev_s']:.1f} [{r['mev_s_min']:.1f}-{r['mev_s_max']:.1f}]"  # noqa: E731
    rows = [["evforge read_atis_bin", mev(d["evforge"]), f"{d['evforge']['ms_per_file']:.2f}",
             harness.ratio({**harness.stats(d["speedup_per_repeat"]), "per_repeat": d["speedup_per_repeat"]})
             if "speedup" in d else "-"]]
    if "tonic" in d:
        rows.append([f"tonic {d['tonic_version']} read_mnist_file", mev(d["tonic"]),
                     f"{d['tonic']['ms_per_file']:.2f}", "1.0x"])
    else:
        rows.append(["tonic read_mnist_file", "skipped (tonic not installed)", "", ""])
    lines = [f"(a) ATIS .bin decode: {d['files']} files, {d['events']:,} events ({d['source']}), "
             f"median of {d['repeats']} interleaved passes [min-max]", "",
             markdown_table(["decoder", "Mev/s [min-max]", "ms/file", "speed-up [min-max]"], rows), ""]
    if d.get("outputs_agree") is not None:
        lines += [f"outputs agree: {'yes' if d['outputs_agree'] else 'NO'}", ""]
    rows = [[b["compression"], f"{b['samples']:,}", f"{b['events']:,}", f"{b['seconds']:.2f}", f"{b['mev_s']:.1f}",
             str(b["shards"]), f"{b['bytes'] / 1e6:.1f}", f"{b['ratio']:.2f}"] for b in res["build"]]
    lines += ["(b) shard build (RollingShardWriter, 256 MiB raw target, fsync + rename included)", "",
              markdown_table(["compression", "samples", "events", "seconds", "Mev/s", "shards", "MB", "ratio"],
                             rows), ""]
    r = res["reads"]
    rows = [[label, f"{r[mode]['median_ms']:.2f}", f"{r[mode]['p95_ms']:.2f}", f"{r[mode]['min_ms']:.2f}"]
            for mode, label in (("cold", "cold-ish (new ShardReader per read)"), ("warm", "warm (open reader)"))]
    lines += [f"(c) random sample reads ({r['reads']} reads, {r['events_per_sample']:,.0f} events/sample, "
              f"{res['build'][0]['compression']})", "",
              markdown_table(["mode", "median ms", "p95 ms", "min ms"], rows), "",
              f"warm read throughput: {r['warm_mev_s']:.1f} Mev/s", ""]
    rows = [[str(ld["workers"]), str(ld["batch"]), str(ld["samples"]), f"{ld['first_batch_s']:.2f}",
             f"{ld['samples_s']:.0f}" if ld["samples_s"] else "-", f"{ld['mev_s']:.1f}" if ld["mev_s"] else "-"]
            for ld in res["loader"]]
    lines += ["(d) loader: EventDataset + make_loader(shuffle) + collate_events", "",
              markdown_table(["workers", "batch", "samples", "first batch s", "samples/s", "Mev/s"], rows)]
    return "\n".join(lines)


def targets(res: dict) -> list[str]:
    out = []
    d = res["decode"]
    if "speedup" in d:
        ok = d["speedup"] >= TARGETS["decode_speedup"]
        out.append(f"- decode vs tonic >= {TARGETS['decode_speedup']:g}x: {d['speedup']:.1f}x "
                   f"({'met' if ok else 'NOT met'})")
    zstd = [b for b in res["build"] if b["compression"] == "zstd"]
    if zstd:
        ok = zstd[0]["mev_s"] >= TARGETS["build_mev_s"]
        out.append(f"- shard build (zstd) >= {TARGETS['build_mev_s']:g} Mev/s: {zstd[0]['mev_s']:.1f} Mev/s "
                   f"({'met' if ok else 'NOT met'})")
    return out


def markdown(doc: dict) -> list[str]:
    info = doc["machine"]
    md = markdown_head("Conversion and loading benchmark" + (", quick" if doc["config"]["quick"] else ""),
                       doc["date"], info, doc["config"]["command"],
                       [f"- h5py {info['h5py']} (HDF5 {info['hdf5']}), hdf5plugin {info['hdf5plugin']}, "
                        f"tonic {info['tonic']}"])
    md += [table(doc), ""]
    goals = targets(doc)
    if goals:
        md += ["Targets:", "", *goals, ""]
    return md + [f"Total time {doc['elapsed_s']:.0f} s.", ""]


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_bench_args(p, quick="small sizes, well under 30 s on 2 cores", devices=None)
    p.add_argument("--samples", type=int, help=f"shard build: samples (default {FULL['samples']})")
    p.add_argument("--events", type=int, help=f"shard build: events per sample (default {FULL['events']:,})")
    p.add_argument("--compressions", default=None, help="shard build compressions (default zstd,lz4; quick zstd)")
    p.add_argument("--decode-files", type=int, help=f"decode: files (default {FULL['decode_files']})")
    p.add_argument("--decode-events", type=int, help="decode: mean events per synthetic file")
    p.add_argument("--ncaltech", type=Path, default=None, help="decode real N-Caltech101 .bin files under DIR")
    p.add_argument("--repeats", type=int, help="decode repeats (median; default 5)")
    p.add_argument("--reads", type=int, help=f"random sample reads (default {FULL['reads']})")
    p.add_argument("--loader-samples", type=int, help=f"samples per loader run (default {FULL['loader_samples']})")
    p.add_argument("--batch", type=int, help=f"loader batch size (default {FULL['batch']})")
    p.add_argument("--workdir", type=Path, default=None, help="where the shards are written (default: temp dir)")
    p.add_argument("--out", action=argparse.BooleanOptionalAction, default=True,
                   help="write JSON + Markdown results (default on)")
    p.add_argument("--results-dir", type=Path, default=None,
                   help="where results go (default bench/results; with --quick $TMPDIR/evforge-bench)")
    a = p.parse_args(argv)
    base = QUICK if a.quick else FULL
    a.cfg = {k: getattr(a, k) if getattr(a, k, None) is not None else v for k, v in base.items()}
    if a.cfg["repeats"] < 1:
        p.error("--repeats must be >= 1")
    a.compressions = (a.compressions or ("zstd" if a.quick else "zstd,lz4")).split(",")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    info = convert_machine_info()
    clock = harness.Clock()
    with harness.work_dir("evforge-bench-convert-", a.workdir) as work:
        print(f"machine {info['machine']}, work dir {work}", flush=True)
        config = {**a.cfg, "quick": a.quick, "compressions": a.compressions,
                  "command": harness.command_line("convert.py", argv)}
        res = {"decode": bench_decode(work, a.cfg, a.ncaltech)}
        clock.say("decode done")
        res["build"] = [bench_build(work, a.cfg, c) for c in a.compressions]
        clock.say("build done")
        first = res["build"][0]["paths"]
        res["reads"] = bench_reads(first, a.cfg)
        res["loader"] = bench_loader(first, work, a.cfg)
        for b in res["build"]:
            b.pop("paths")
        res["elapsed_s"] = clock.elapsed()
    doc = {"benchmark": "convert", "date": harness.utc_now(), "machine": info, "config": config, **res}
    print()
    print(table(doc))
    for line in targets(doc):
        print(line)
    print(f"total {res['elapsed_s']:.0f} s")
    if a.out:
        folder = a.results_dir or harness.results_folder(a.quick)
        path = folder / f"convert-{info['machine']}{'-quick' if a.quick else ''}.json"
        harness.write_results(path, info, config, None, benchmark="convert", date=doc["date"], markdown=markdown,
                              **res)
        print(f"results: {path} (+ .md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
