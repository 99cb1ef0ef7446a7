"""The benchmarks' one harness: rows of repeats, timing, interleaved contenders, stats, tables, result files.

Every script under ``bench/`` measures with these pieces, so that the conventions of ``bench/README.md`` hold in
one place: repeats after a warm-up, contenders interleaved (A B A B ...) with ratios paired per repeat, medians
with [min-max], JSON (every repeat) + a Markdown table written atomically under ``bench/results/`` (``--quick``:
the temp dir), temp work dirs that are removed whatever happens, and the ``--quick`` / ``--out`` / ``--device``
options. Machine facts and the memory probe live in :mod:`machine`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # evforge from this checkout, installed or not
    sys.path.insert(0, str(REPO))

from machine import machine_lines, machine_tag  # noqa: E402

from evforge.formats.atomic import atomic_write_text  # noqa: E402

RESULTS = REPO / "bench" / "results"


# --------------------------------------------------------------------------------------------- timing


def sync(device) -> None:
    """Wait for a CUDA device before a clock is read (a no-op elsewhere)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], repeats: int = 1, warmup: int = 0,
          sync: Callable[[], None] | None = None) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones; ``sync`` (e.g. a CUDA
    synchronize) runs before each clock read, so queued device work is counted where it was issued."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        out.append(time.perf_counter() - t0)
    return out


@dataclass
class Row:
    """One measured thing: its name, one dict per timed repeat (``seconds`` plus counts) and descriptive fields."""

    name: str
    runs: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def add(self, run) -> None:
        """Record one repeat: a dict with ``seconds``, or plain seconds."""
        self.runs.append(run if isinstance(run, dict) else {"seconds": float(run)})

    def values(self, what) -> list[float]:
        """``what`` of every repeat: a run key, or a function of the run."""
        return [what(r) if callable(what) else r[what] for r in self.runs]

    def stats(self, what) -> dict:
        return stats(self.values(what))

    def rate(self, key: str) -> dict:
        """``key`` per second over the repeats (e.g. frames/s): median, min, max."""
        return self.stats(lambda r: r[key] / r["seconds"])


def interleave(contenders: Sequence[tuple[Row, Callable[[bool], object]]], repeats: int, warmup: int = 1,
               progress: Callable[[int, list[Row]], None] | None = None) -> list[str]:
    """Measure several contenders with their repeats interleaved (A B C A B C ...), so that slow drifts of a shared
    machine hit all alike and ratios can be paired per repeat.

    Each contender is ``(row, fn)``; ``fn(warm)`` runs one measurement and returns a run for :meth:`Row.add`
    (or None to record nothing). First every contender runs ``warmup`` times with ``warm=True`` (results
    dropped), then ``repeats`` rounds with ``warm=False``. ``progress(repeat, rows)`` is called after each
    round. Returns the names in the order they were measured."""
    for _ in range(warmup):
        for _row, fn in contenders:
            fn(True)
    order = []
    for k in range(repeats):
        for row, fn in contenders:
            run = fn(False)
            if run is not None:
                row.add(run)
            order.append(row.name)
        if progress is not None:
            progress(k, [row for row, _ in contenders])
    return order


# --------------------------------------------------------------------------------------------- stats


def stats(values: Sequence[float]) -> dict:
    """Median, min and max (the tables' ``median [min-max]``)."""
    values = list(values)
    if not values:
        raise ValueError("no values: nothing was measured")
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def paired_ratios(num: Sequence[float], den: Sequence[float], kind: str = "ratio") -> list[float]:
    """Per-repeat ratios of two interleaved contenders: ``ratio`` a/b, ``change`` (a/b - 1) in %, ``share``
    a/b in %. The repeats pair up in order; unequal counts are an error (a lost repeat would shift them)."""
    num, den = list(num), list(den)
    if len(num) != len(den):
        raise ValueError(f"cannot pair {len(num)} repeats with {len(den)}")
    out = []
    for a, b in zip(num, den):
        r = a / b
        out.append({"ratio": r, "change": (r - 1.0) * 100.0, "share": r * 100.0}[kind])
    return out


def ratio_stats(num: Sequence[float], den: Sequence[float], kind: str = "ratio") -> dict | None:
    """:func:`stats` of :func:`paired_ratios`, with ``per_repeat``; None when nothing was measured."""
    pairs = paired_ratios(num, den, kind)
    return {**stats(pairs), "per_repeat": pairs} if pairs else None


# --------------------------------------------------------------------------------------------- formatting


def num(x: float) -> str:
    """3 significant digits with a k / M / G suffix."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def spread(s: dict, fmt: Callable[[float], str] = num) -> str:
    """``median [min-max]``."""
    return f"{fmt(s['median'])} [{fmt(s['min'])}-{fmt(s['max'])}]"


def pct(s: dict | None, sign: bool = True) -> str:
    """A percentage's ``median % [min to max]`` (``-`` when None)."""
    if not s:
        return "-"
    f = "{:+.1f}" if sign else "{:.0f}"
    return f"{f.format(s['median'])} % [{f.format(s['min'])} to {f.format(s['max'])}]"


def ratio(s: dict | None) -> str:
    """A ratio's ``median x [min-max]`` (``-`` when None)."""
    if not s:
        return "-"
    out = f"{s['median']:.1f}x"
    return out + (f" [{s['min']:.1f}-{s['max']:.1f}]" if len(s.get("per_repeat", ())) > 1 else "")


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (cells as ``str``; a ``|`` inside a cell is escaped)."""
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cell(h) for h in head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


class Clock:
    """Progress lines stamped with the seconds since the run started."""

    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, message: str, indent: str = "") -> None:
        print(f"{indent}[{self.elapsed():6.0f} s] {message}", flush=True)


# --------------------------------------------------------------------------------------------- results


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_results(path, info: dict, config: dict, rows, *, benchmark: str, markdown, rows_key: str = "rows",
                  date: str | None = None, **fields) -> dict:
    """Write ``path`` (JSON: benchmark, date, machine, config, ``fields``, and every row with every repeat) and
    the Markdown next to it (``.md``), each atomically (temp file, then rename). ``markdown`` is the text or a
    function of the JSON document giving it (a list of lines is joined). ``rows`` None leaves the key out.
    Returns the document."""
    path = Path(path)
    doc = {"benchmark": benchmark, "date": date or utc_now(), "machine": info, "config": config, **fields}
    if rows is not None:
        doc[rows_key] = rows
    text = markdown(doc) if callable(markdown) else markdown
    if not isinstance(text, str):
        text = "\n".join(text)
    atomic_write_text(path, json.dumps(doc, indent=1, default=_jsonable) + "\n")
    atomic_write_text(path.with_suffix(".md"), text.rstrip("\n") + "\n")
    return doc


def _jsonable(o):
    """numpy scalars as numbers; anything else (a Path, a dtype) as text: never lose a run to a stray object."""
    item = getattr(o, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    return str(o)


def markdown_head(title: str, date: str, info: dict, command: str | None = None,
                  notes: Sequence[str] = ()) -> list[str]:
    """The opening lines every result's Markdown shares: title with date, the machine (plus ``notes``, more
    bullet lines), the command."""
    out = [f"# {title} ({date})", "", *machine_lines(info), *notes, ""]
    return out + ([f"Command: `{command}`", ""] if command else [])


def command_line(script: str, argv=None) -> str:
    """How the script was run (for the result files)."""
    return " ".join(["python", f"bench/{script}", *(sys.argv[1:] if argv is None else argv)])


def results_folder(quick: bool) -> Path:
    """bench/results, or for a --quick smoke run $TMPDIR/evforge-bench (smoke results are not kept)."""
    return Path(tempfile.gettempdir()) / "evforge-bench" if quick else RESULTS


def result_paths(name: str, devices: list[str], info: dict, quick: bool, out: Path | None = None) -> dict:
    """{JSON path: devices it holds}: ``out`` for all devices, else one ``<name>[-quick]-<machine tag>.json``
    per device in :func:`results_folder`."""
    if out is not None:
        return {Path(out): list(devices)}
    prefix = f"{name}-quick-" if quick else f"{name}-"
    return {results_folder(quick) / f"{prefix}{machine_tag(d, info)}.json": [d] for d in devices}


@contextmanager
def work_dir(prefix: str = "evforge-bench-", parent=None) -> Iterator[Path]:
    """A fresh temp folder (under ``parent`` if given), removed on the way out, exception or not."""
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------- options


def add_bench_args(p: argparse.ArgumentParser, *, quick: str, out: str | None = None,
                   devices: Sequence[str] | None = ("cpu", "cuda", "all"), device_default: str | None = "all") -> None:
    """The options every benchmark shares: ``--quick`` (``quick`` says what the smoke run does; its results go
    to the temp dir), ``--out PATH`` (``out`` names the default; None: no such option) and ``--device``
    (``devices`` its choices; None: no such option)."""
    p.add_argument("--quick", action="store_true", help=f"smoke test: {quick}; results in $TMPDIR/evforge-bench/")
    if devices:
        note = " (all = cpu, plus cuda when torch sees a GPU)" if "all" in devices else ""
        p.add_argument("--device", choices=list(devices), default=device_default,
                       help=f"where to run{note}; default {device_default or 'all'}")
    if out is not None:
        p.add_argument("--out", type=Path, default=None,
                       help=f"JSON path (a .md table is written next to it); default {out}")


def bench_devices(choice: str) -> list[str] | None:
    """The devices of ``--device cpu|cuda|all`` (all: the CPU, plus CUDA when torch sees it); None, after an
    error line, when CUDA is asked for and torch sees none."""
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return None
    if choice in ("cpu", "cuda"):
        return [choice]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def announce(info: dict, choice: str, devices: list[str]) -> None:
    """Print the machine at the start of a run, and say when ``--device all`` found no GPU."""
    print("Machine:\n" + "\n".join(machine_lines(info)), flush=True)
    if choice == "all" and devices == ["cpu"]:
        print("(no CUDA device: CPU only)", flush=True)


def csv(text: str | None, cast=str) -> list:
    """A comma-separated option's values (empty items dropped)."""
    return [cast(v.strip()) for v in str(text or "").split(",") if v.strip()]
