"""The realism statistics of one event source: :func:`event_stats` -> a JSON-ready dict.

Every number is defined here (``T`` = duration in s = (t_last - t_first + 1) us / 1e6; a pixel's count ``c`` =
its number of events, ON and OFF):

* **event rate over time**: events per bin divided by the bin length; the duration is cut into equal bins of
  about ``rate_bin_us`` (default: T / 100, at least 1 ms; ``rate_bin_us`` in the result is the exact width);
  scalars ``event_rate_hz`` (N / T), ``rate_cv`` (std / mean of the binned series), ``peak_rate_hz``.
* **ON fraction**: ON events / N.
* **per-pixel rate**: ``c / T`` per pixel; ``active_pixel_fraction`` (c > 0), the mean over all pixels, the
  median and 99th percentile over active pixels, and a histogram over log-spaced bins (0.01 Hz .. 100 kHz).
* **per-pixel inter-event interval (IEI)**: differences of consecutive timestamps of one pixel (either
  polarity); median, 1st percentile (``iei_p1_us``: the short-interval edge, where a refractory period shows
  as a floor) and minimum, the share of 0 us intervals, and a histogram over log-spaced bins 1 us .. 100 s.
* **background activity in quiet regions**: the sensor is cut into ``tile`` x ``tile`` tiles; the quiet tiles
  are those whose per-pixel count is at most the ``quiet_quantile`` (10 %) quantile over tiles; ``ba_rate_hz``
  = events in quiet tiles / (their pixels x T), per pixel.
* **hot pixels**: ``c > mean(c) + hot_std * std(c)`` over all pixels (MEM's ``RemoveHotPixels`` rule, 10 std);
  ``hot_pixel_fraction`` of all pixels and ``hot_event_fraction`` of all events.
* **event-frame spatial autocorrelation**: count frames of ``frame_us`` (10 ms; the first ``max_frames``),
  mean removed, autocorrelation by FFT with zero padding (the biased estimator), normalised to 1 at lag 0;
  ``autocorr[k]`` = mean of the horizontal and vertical lag-``k`` values, averaged over frames, k = 1..8.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["StatsConfig", "event_stats", "pixel_counts", "per_pixel_intervals", "RATE_EDGES_HZ", "IEI_EDGES_US"]

RATE_EDGES_HZ = np.logspace(-2, 5, 36)  # 5 bins a decade
IEI_EDGES_US = np.logspace(0, 8, 41)


@dataclass
class StatsConfig:
    rate_bin_us: int | None = None
    tile: int = 16
    quiet_quantile: float = 0.1
    hot_std: float = 10.0
    frame_us: int = 10_000
    max_frames: int = 50
    max_lag: int = 8


def pixel_counts(events: np.ndarray, sensor_size) -> np.ndarray:
    """(H, W) event counts."""
    w, h = sensor_size
    idx = events["y"].astype(np.int64) * w + events["x"]
    return np.bincount(idx, minlength=w * h).reshape(h, w)


def per_pixel_intervals(events: np.ndarray, sensor_size) -> np.ndarray:
    """All per-pixel inter-event intervals (us, int64), in pixel-then-time order."""
    w = sensor_size[0]
    pix = events["y"].astype(np.int64) * w + events["x"]
    order = np.lexsort((events["t"], pix))
    t, pix = events["t"][order], pix[order]
    same = pix[1:] == pix[:-1]
    return (t[1:] - t[:-1])[same]


def _hist(values, edges) -> list[int]:
    return np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)[0].tolist()


def event_stats(events: np.ndarray, sensor_size, cfg: StatsConfig | None = None) -> dict:
    """The statistics above for ``events`` (EVENT_DTYPE, t sorted) on a ``sensor_size`` (W, H) sensor."""
    cfg = cfg or StatsConfig()
    w, h = (int(v) for v in sensor_size)
    n = len(events)
    t = events["t"]
    t0 = int(t[0])
    dur_us = int(t[-1]) - t0 + 1
    T = dur_us / 1e6
    out: dict = {"num_events": n, "duration_s": T, "sensor_size": [w, h], "config": asdict(cfg)}

    # rate over time
    nbins = max(1, round(dur_us / (cfg.rate_bin_us or max(1000, dur_us // 100))))
    bin_us = dur_us / nbins  # equal bins that tile the duration exactly (no short last bin)
    idx = np.minimum(((t - t0) / bin_us).astype(np.int64), nbins - 1)
    series = np.bincount(idx, minlength=nbins) / (bin_us / 1e6)
    out.update(event_rate_hz=n / T, rate_bin_us=bin_us, rate_series_hz=series.tolist(),
               rate_cv=float(series.std() / series.mean()) if series.mean() > 0 else 0.0,
               peak_rate_hz=float(series.max()))
    out["on_fraction"] = float((events["p"] > 0).mean())

    # per-pixel rates
    counts = pixel_counts(events, (w, h))
    rates = counts / T
    active = counts > 0
    out.update(active_pixel_fraction=float(active.mean()), pixel_rate_mean_hz=float(rates.mean()),
               pixel_rate_median_active_hz=float(np.median(rates[active])),
               pixel_rate_p99_active_hz=float(np.percentile(rates[active], 99)),
               pixel_rate_hist=_hist(rates[active], RATE_EDGES_HZ), pixel_rate_edges_hz=RATE_EDGES_HZ.tolist())

    # inter-event intervals
    iei = per_pixel_intervals(events, (w, h))
    if len(iei):
        out.update(num_intervals=int(len(iei)), iei_median_us=float(np.median(iei)),
                   iei_p1_us=float(np.percentile(iei, 1)), iei_min_us=int(iei.min()),
                   iei_zero_fraction=float((iei == 0).mean()))
    else:
        out.update(num_intervals=0, iei_median_us=None, iei_p1_us=None, iei_min_us=None, iei_zero_fraction=None)
    out.update(iei_hist=_hist(iei[iei > 0], IEI_EDGES_US), iei_edges_us=IEI_EDGES_US.tolist())

    # background activity in quiet tiles
    ty, tx = -(-h // cfg.tile), -(-w // cfg.tile)
    tile_ev = np.zeros((ty, tx))
    tile_px = np.zeros((ty, tx))
    rows, cols = np.arange(h) // cfg.tile, np.arange(w) // cfg.tile
    np.add.at(tile_ev, (rows[:, None], cols[None, :]), counts)
    np.add.at(tile_px, (rows[:, None], cols[None, :]), 1)
    per_px = tile_ev / tile_px
    quiet = per_px <= np.quantile(per_px, cfg.quiet_quantile)
    out.update(quiet_tile_fraction=float(quiet.mean()),
               ba_rate_hz=float(tile_ev[quiet].sum() / (tile_px[quiet].sum() * T)))

    # hot pixels
    c = counts.astype(np.float64)
    hot = c > c.mean() + cfg.hot_std * c.std()
    out.update(hot_pixels=int(hot.sum()), hot_pixel_fraction=float(hot.mean()),
               hot_event_fraction=float(c[hot].sum() / n))

    # spatial autocorrelation of event frames
    out["autocorr"], out["autocorr_frames"] = _autocorr(events, (w, h), cfg)
    out["autocorr_lag1"] = out["autocorr"][0] if out["autocorr"] else None
    return out


def _autocorr(events, sensor_size, cfg: StatsConfig) -> tuple[list[float], int]:
    w, h = sensor_size
    t = events["t"]
    k = (t - t[0]) // cfg.frame_us
    bounds = np.searchsorted(k, np.arange(min(int(k[-1]) + 1, cfg.max_frames) + 1))
    acc, used = np.zeros(cfg.max_lag), 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - a < 2:
            continue
        f = pixel_counts(events[a:b], (w, h)).astype(np.float64)
        f -= f.mean()
        spec = np.fft.rfft2(f, s=(2 * h, 2 * w))
        ac = np.fft.irfft2(spec * spec.conj(), s=(2 * h, 2 * w))
        if ac[0, 0] <= 0:
            continue
        lags = np.arange(1, cfg.max_lag + 1)
        horiz = ac[0, lags % (2 * w)] if w > cfg.max_lag else np.zeros(cfg.max_lag)
        vert = ac[lags % (2 * h), 0] if h > cfg.max_lag else np.zeros(cfg.max_lag)
        acc += (horiz + vert) / 2 / ac[0, 0]
        used += 1
    return ((acc / used).tolist() if used else []), used
