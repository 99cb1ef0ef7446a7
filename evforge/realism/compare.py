"""The realism report of two event sources: :func:`compare_sources` -> ``report.json``, ``report.md``,
``report.png`` in an output folder.

``report.json`` holds every number of both sources (:func:`evforge.realism.stats.event_stats`: series and
histograms included) and the differences: for each scalar ``b - a`` and ``(b - a) / |a|``; for each histogram
(per-pixel rate, inter-event interval) the total-variation distance between the two normalised histograms
(0 = the same distribution, 1 = disjoint); for the autocorrelation curve the largest absolute difference.
``identical`` is true when every difference is 0 (a source compared with itself). ``report.md`` is the scalar
table; ``report.png`` draws both sources side by side (rate over time, per-pixel rate and IEI histograms,
autocorrelation, and an event frame of each).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from evforge.formats.atomic import atomic_write_text, commit, temp_path

from .sources import EventSource, load_source
from .stats import StatsConfig, event_stats, pixel_counts

__all__ = ["SCALARS", "compare_sources", "compare_stats", "write_report"]

# (key, label, unit) of the table's rows
SCALARS = [
    ("num_events", "events", ""), ("duration_s", "duration", "s"), ("event_rate_hz", "event rate", "ev/s"),
    ("rate_cv", "rate over time, CV", ""), ("peak_rate_hz", "peak rate", "ev/s"),
    ("on_fraction", "ON fraction", ""), ("active_pixel_fraction", "active pixels", ""),
    ("pixel_rate_mean_hz", "per-pixel rate, mean", "Hz"),
    ("pixel_rate_median_active_hz", "per-pixel rate, median (active)", "Hz"),
    ("pixel_rate_p99_active_hz", "per-pixel rate, p99 (active)", "Hz"),
    ("iei_median_us", "inter-event interval, median", "us"),
    ("iei_p1_us", "inter-event interval, p1 (short edge)", "us"), ("iei_min_us", "inter-event interval, min", "us"),
    ("ba_rate_hz", "background activity (quiet tiles)", "Hz/px"),
    ("hot_pixel_fraction", "hot pixels (share of pixels)", ""), ("hot_event_fraction", "events from hot pixels", ""),
    ("autocorr_lag1", "event-frame autocorrelation, lag 1", ""),
]
HISTOGRAMS = ("pixel_rate_hist", "iei_hist")


def _tv(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.sum() == 0 or b.sum() == 0:
        return 0.0 if a.sum() == b.sum() else 1.0
    return float(0.5 * np.abs(a / a.sum() - b / b.sum()).sum())


def compare_stats(a: dict, b: dict) -> dict:
    """The differences between two :func:`event_stats` results (see the module docstring)."""
    diff: dict = {}
    for key, _, _ in SCALARS:
        va, vb = a.get(key), b.get(key)
        if va is None or vb is None:
            diff[key] = {"diff": None, "rel": None}
            continue
        d = float(vb) - float(va)
        rel = 0.0 if d == 0 else (d / abs(float(va)) if va else float("inf"))
        diff[key] = {"diff": d, "rel": rel}
    for key in HISTOGRAMS:
        diff[key] = {"tv_distance": _tv(a[key], b[key])}
    ca, cb = a["autocorr"], b["autocorr"]
    diff["autocorr"] = {"max_abs_diff": float(np.max(np.abs(np.subtract(ca, cb)))) if ca and cb else None}
    values = [v.get("diff", v.get("tv_distance", v.get("max_abs_diff"))) for v in diff.values()]
    diff["identical"] = all(v == 0 for v in values if v is not None)
    return diff


def compare_sources(a, b, out, *, labels=None, cfg: StatsConfig | None = None, **load) -> dict:
    """Load two sources (paths or :class:`EventSource`), compute and write the report under ``out``; return it."""
    srcs = [s if isinstance(s, EventSource) else load_source(s, **load) for s in (a, b)]
    labels = list(labels or [srcs[0].name, srcs[1].name])
    if labels[0] == labels[1]:
        labels = [labels[0] + " (A)", labels[1] + " (B)"]
    stats = [event_stats(s.events, s.sensor_size, cfg) for s in srcs]
    report = {"a": {"label": labels[0], "source": srcs[0].name, "kind": srcs[0].kind,
                    "truncated": srcs[0].truncated, **stats[0]},
              "b": {"label": labels[1], "source": srcs[1].name, "kind": srcs[1].kind,
                    "truncated": srcs[1].truncated, **stats[1]},
              "difference": compare_stats(stats[0], stats[1])}
    write_report(report, out, srcs)
    return report


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, (int, np.integer)) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e15):
        return f"{int(v):,}"
    return f"{v:.4g}"


def markdown(report: dict) -> str:
    a, b, d = report["a"], report["b"], report["difference"]
    lines = [f"# Realism report: {a['label']} vs {b['label']}", "",
             f"A: `{a['source']}` ({a['kind']}, {a['sensor_size'][0]}x{a['sensor_size'][1]}); "
             f"B: `{b['source']}` ({b['kind']}, {b['sensor_size'][0]}x{b['sensor_size'][1]}). "
             f"Definitions: `evforge.realism.stats`.", "",
             f"| statistic | A: {a['label']} | B: {b['label']} | B - A | (B - A) / A |",
             "| --- | --- | --- | --- | --- |"]
    for key, label, unit in SCALARS:
        rel = d[key]["rel"]
        lines.append(f"| {label}{f' ({unit})' if unit else ''} | {_fmt(a.get(key))} | {_fmt(b.get(key))} | "
                     f"{_fmt(d[key]['diff'])} | {'-' if rel is None else f'{rel:+.1%}'} |")
    lines += ["", "| distribution | total-variation distance (0 = same) |", "| --- | --- |",
              f"| per-pixel rate | {d['pixel_rate_hist']['tv_distance']:.4f} |",
              f"| per-pixel inter-event interval | {d['iei_hist']['tv_distance']:.4f} |",
              f"| autocorrelation lags 1-8, largest difference | {_fmt(d['autocorr']['max_abs_diff'])} |", "",
              "The sources are identical in every statistic." if d["identical"] else
              "The sources differ (see the table).", ""]
    return "\n".join(lines)


def write_report(report: dict, out, sources) -> None:
    """``report.json``, ``report.md`` and ``report.png`` under ``out`` (each written atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("report.json", json.dumps(report, indent=1) + "\n"), ("report.md", markdown(report))):
        atomic_write_text(out / name, text)
    _plot(report, sources, out / "report.png")


def _plot(report: dict, sources, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = report["a"], report["b"]
    fig, ax = plt.subplots(2, 3, figsize=(15, 8.5))
    colors = ("tab:blue", "tab:orange")
    for st, c in zip((a, b), colors):
        series = np.asarray(st["rate_series_hz"])
        ax[0, 0].plot(np.arange(len(series)) * st["rate_bin_us"] / 1e3, series, color=c, label=st["label"])
        for axis, hk, ek in ((ax[0, 1], "pixel_rate_hist", "pixel_rate_edges_hz"),
                             (ax[0, 2], "iei_hist", "iei_edges_us")):
            h, e = np.asarray(st[hk], float), np.asarray(st[ek])
            axis.stairs(h / max(h.sum(), 1), e, color=c, label=st["label"])
        if st["autocorr"]:
            ax[1, 0].plot(np.arange(1, len(st["autocorr"]) + 1), st["autocorr"], "o-", color=c, label=st["label"])
    ax[0, 0].set(title="event rate over time", xlabel="ms from start", ylabel="events / s")
    ax[0, 1].set(title="per-pixel rate (active pixels)", xlabel="Hz", ylabel="share of pixels", xscale="log")
    ax[0, 2].set(title="per-pixel inter-event interval", xlabel="us", ylabel="share of intervals", xscale="log")
    ax[1, 0].set(title="event-frame spatial autocorrelation", xlabel="lag (px)", ylabel="correlation")
    for axis in (ax[0, 0], ax[0, 1], ax[0, 2], ax[1, 0]):
        axis.legend(fontsize=8)
    for axis, src, st in zip((ax[1, 1], ax[1, 2]), sources, (a, b)):
        ev = src.events
        sel = ev[ev["t"] < ev["t"][0] + 20_000]  # the first 20 ms
        img = pixel_counts(sel[sel["p"] > 0], src.sensor_size) - pixel_counts(sel[sel["p"] < 0], src.sensor_size)
        lim = max(1, np.percentile(np.abs(img[img != 0]), 99)) if (img != 0).any() else 1
        axis.imshow(img, cmap="bwr", vmin=-lim, vmax=lim, interpolation="nearest")
        axis.set(title=f"{st['label']}: first 20 ms", xlabel="ON red, OFF blue", xticks=[], yticks=[])
    fig.suptitle(f"{a['label']} vs {b['label']}")
    fig.tight_layout()
    tmp = temp_path(path)
    fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    commit(tmp, path)
