"""Quick-look PNGs of stream files: gray frames beside event frames, plus the ON/OFF event rate over time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from evforge.formats.atomic import atomic_output
from evforge.formats.streamfile import StreamFile

RATE_BINS = 100
_READ_CHUNK = 1 << 21  # events per read when scanning t and p for the rate plot


def event_frame(events: np.ndarray, width: int, height: int, *, percentile: float = 99.0) -> np.ndarray:
    """Render events as an (H, W, 3) uint8 image: white background, ON red, OFF blue.

    Each pixel takes the sign of its net count (ON - OFF); its colour saturates at the ``percentile`` of the
    non-zero |net counts|, so a few hot pixels do not wash out the rest.
    """
    pix = events["y"].astype(np.int64) * width + events["x"].astype(np.int64)
    on = np.bincount(pix[events["p"] > 0], minlength=width * height)
    off = np.bincount(pix[events["p"] < 0], minlength=width * height)
    net = (on - off).reshape(height, width)
    mag = np.abs(net)
    clip = max(1.0, float(np.percentile(mag[mag > 0], percentile))) if mag.any() else 1.0
    fade = np.rint(255 * (1 - np.minimum(mag / clip, 1.0))).astype(np.uint8)  # 255 = white, 0 = full colour
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    on_px, off_px = net > 0, net < 0
    img[on_px, 1] = img[on_px, 2] = fade[on_px]
    img[off_px, 0] = img[off_px, 1] = fade[off_px]
    return img


def _windows(sf: StreamFile, count: int) -> list[tuple[int, int, int | None]]:
    """Up to ``count`` (t_start, t_end, frame index) windows spread evenly over the sequence.

    Normally each is one source-frame interval; without two frames the event time span is split evenly.
    """
    ft = sf.frame_times
    if len(ft) >= 2:
        picks = np.unique(np.linspace(0, len(ft) - 2, max(1, count)).round().astype(int))
        return [(int(ft[i]), int(ft[i + 1]), int(i)) for i in picks]
    t0, t1 = _time_span(sf)
    edges = np.linspace(t0, t1, max(1, count) + 1).round().astype(np.int64)
    frame = 0 if len(ft) else None
    return [(int(a), int(b), frame) for a, b in zip(edges[:-1], edges[1:])]


def _time_span(sf: StreamFile) -> tuple[int, int]:
    """[start, end) in absolute us covering all frames and events (at least 1 ms long)."""
    t0 = sf.t_offset
    t1 = int(sf.frame_times[-1]) if len(sf.frame_times) else t0
    if sf.num_events:
        t1 = max(t1, int(sf.column("t", sf.num_events - 1)[0]) + 1)
    return t0, max(t1, t0 + 1000)


def _event_rates(sf: StreamFile, t0: int, t1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bin edges (absolute us) and ON / OFF rates in events/s, reading only the t and p columns in chunks."""
    edges = np.linspace(t0, t1, RATE_BINS + 1)
    on = np.zeros(RATE_BINS)
    off = np.zeros(RATE_BINS)
    for start in range(0, sf.num_events, _READ_CHUNK):
        t = sf.column("t", start, start + _READ_CHUNK)
        p = sf.column("p", start, start + _READ_CHUNK)
        on += np.histogram(t[p > 0], edges)[0]
        off += np.histogram(t[p < 0], edges)[0]
    bin_s = (edges[1] - edges[0]) / 1e6
    return edges, on / bin_s, off / bin_s


def render_stream_preview(stream_path, out_png, *, windows: int = 4, dpi: int = 100) -> Path:
    """Write a PNG overview of a stream file (written atomically) and return its path."""
    out_png = Path(out_png)
    with StreamFile(stream_path) as sf:
        wins = _windows(sf, windows)
        panel_w = 4.0
        panel_h = float(np.clip(panel_w * sf.height / sf.width, 1.0, 8.0))
        fig = Figure(figsize=(2 * panel_w + 1, len(wins) * (panel_h + 0.7) + 3.2))
        FigureCanvasAgg(fig)
        grid = fig.add_gridspec(len(wins) + 1, 2, height_ratios=[panel_h + 0.7] * len(wins) + [3.0])
        fig.suptitle(f"{Path(stream_path).name}: {sf.width}x{sf.height}, {sf.num_events} events")

        for row, (t0, t1, frame) in enumerate(wins):
            ax_gray, ax_ev = fig.add_subplot(grid[row, 0]), fig.add_subplot(grid[row, 1])
            gray = sf.gray_frame(frame) if frame is not None else None
            if gray is None:
                ax_gray.text(0.5, 0.5, "no frames stored", ha="center", va="center", transform=ax_gray.transAxes)
                ax_gray.set_title("source frame")
                ax_gray.set_box_aspect(sf.height / sf.width)
            else:
                ax_gray.imshow(gray, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                ax_gray.set_title(f"frame {frame} at {(sf.frame_times[frame] - sf.t_offset) / 1e3:.1f} ms")
            events = sf.between_frames(frame) if len(sf.frame_times) >= 2 else sf.window(t0, t1)
            ax_ev.imshow(event_frame(events, sf.width, sf.height), interpolation="nearest")
            ms0, ms1 = (t0 - sf.t_offset) / 1e3, (t1 - sf.t_offset) / 1e3
            ax_ev.set_title(f"[{ms0:.1f}, {ms1:.1f}) ms: {len(events)} events")
            for ax in (ax_gray, ax_ev):
                ax.set_xticks([])
                ax.set_yticks([])

        ax_rate = fig.add_subplot(grid[-1, :])
        span = _time_span(sf)
        edges, on, off = _event_rates(sf, *span)
        centers_s = ((edges[:-1] + edges[1:]) / 2 - sf.t_offset) / 1e6
        ax_rate.plot(centers_s, on, color="red", label="ON")
        ax_rate.plot(centers_s, off, color="blue", label="OFF")
        ax_rate.set_xlabel("time since t_offset (s)")
        ax_rate.set_ylabel("events/s")
        ax_rate.set_ylim(0, 1.05 * max(1.0, on.max(), off.max()))
        ax_rate.set_title(f"event rate ({sf.num_events} events, {RATE_BINS} bins)")
        ax_rate.legend(loc="upper right")
        fig.tight_layout()

    with atomic_output(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return out_png
