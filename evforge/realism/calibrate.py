"""Noise calibration: estimate the v2e pixel model's noise parameters from a real recording.

:func:`calibrate` returns a :class:`Calibration`; :func:`write_camera_file` writes it as ``camera.yaml``, whose
``dvs_params`` section ``evforge simulate --params camera.yaml`` reads (:func:`read_camera_params`).

What the pixel model (:mod:`evforge.simulator.pixel`) predicts, and the estimators built on it
-------------------------------------------------------------------------------------------------
Notation: ``T`` the recording's duration; per pixel, ``N_on`` / ``N_off`` its ON / OFF events.

* **Quiet pixels.** The sensor is cut into 16 x 16 tiles; a tile is quiet when its per-pixel event rate is at
  most twice the 25th percentile over tiles (a static scene: every tile; a moving one: the tiles that see no
  motion). Hot pixels (below) are left out. Noise is measured on quiet pixels only, and assumed the same
  elsewhere.
* **Shot noise.** The model's shot noise is a pair of Poisson processes, ON and OFF, each at ``rate / 2 *
  f(I)`` with ``f(I) = 1 - 0.75 (I + 20) / 275`` (``I`` the pixel's brightness, 0..255). Leak events are ON
  only, so on quiet pixels the OFF rate is shot noise alone: ``shot_noise_rate_hz = 2 r_off / mean f(I)``.
  Fewer than 10 OFF events leave it not determined (an upper bound). With frames (a stream file's gray
  frames, or ``frames=``) ``mean f(I)`` is taken over the quiet pixels and
  frames; without, the brightness is unknown and ``f = 1`` (the dark rate) is used, the uncertainty then
  spanning ``f`` from 1 to 0.25 (a white scene). Threshold mismatch raises each polarity's rate by
  ``E[nominal / actual threshold] ~ 1 + (sigma_thres / neg_thres)^2`` (2 % for v2e's 0.03 / 0.2): divided out
  with the base preset's values.
* **Leak.** Leak events are ON events at ``leak_rate_hz * R`` per pixel, ``R`` log-normal with
  ``noise_rate_cov_decades`` (mean ``exp((ln 10 * cov)^2 / 2)``, cov from the base preset: not separable from
  Poisson spread in a short recording). ON minus OFF rate on quiet pixels is the leak:
  ``leak_rate_hz = (r_on - r_off) / E[R]``.
* Both rates are corrected for the refractory dead time (an observed rate ``r`` is ``r / (1 - r tau)`` of
  events before the dead time removed some). Their uncertainties are Poisson (``sqrt(N)``) over the quiet
  pixels' counts, propagated.
* **Refractory period.** No pixel emits two events closer than ``refractory_period_s``; the per-pixel
  inter-event intervals of a Poisson source above a dead time are a shifted exponential, whose maximum-
  likelihood shift is the smallest interval. Estimate: the smallest per-pixel interval ``d_1`` (all pixels,
  hot ones included); uncertainty: the mean spacing of the 10 smallest, ``(d_10 - d_1) / 9``. When ``d_1``
  is within 5 spacings of 0 the data do not show a dead time: the period is not determined (``d_1`` is an
  upper bound; the base preset's value is kept).
* **ON/OFF threshold ratio.** Every signal ON event raises a pixel's memorised level by ``pos_thres``, every
  OFF event lowers it by ``neg_thres``, and the leak lowers it by ``leak * pos_thres`` per event-equivalent;
  over a recording whose brightness ends where it started (on average over pixels: a moving texture, not a
  light switched on), ``(N_on - leak - shot_on) pos_thres = (N_off - shot_off) neg_thres``, so
  ``pos_thres / neg_thres = N_off_signal / N_on_signal`` summed over the non-quiet pixels. Uncertainty:
  Poisson on both counts plus each active pixel's unfinished last crossing (up to one threshold: +-0.5
  events per active pixel, added linearly). Not determined without enough signal (fewer than 200 signal
  events of either polarity) or when the uncertainty exceeds 25 %. ``pos_thres`` keeps the base preset's value
  (the absolute threshold needs the brightness change, i.e. frames); ``neg_thres = pos_thres / ratio``.
* **Shot noise against brightness** (frames given, quiet pixels spanning >= 40 of 255): the quiet pixels are
  binned by brightness quartile; a weighted line through the bins' OFF rates against ``(I + 20) / 275`` gives
  the rate of a white pixel over a dark one (``shot_noise_white_to_dark``; the model fixes it at 0.25), with the
  fit's covariance as uncertainty. Reported (``measured.shot_intensity``), not simulated.
* **Hot pixels**: ``count > mean + 10 std`` over all pixels (the rule of :mod:`.stats`); reported with their
  rates under ``measured``: the pixel model has no hot pixels, so ``simulate`` does not use them.

Not determined from events alone, and kept from the base preset: the absolute thresholds, ``sigma_thres``
(threshold mismatch), ``cutoff_hz`` (photoreceptor bandwidth), the leak jitter and spread. Each is listed in
the file's ``not_determined`` with the reason.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evforge.errors import InputError
from evforge.formats.atomic import atomic_write_text

from .sources import EventSource, load_source
from .stats import per_pixel_intervals, pixel_counts

__all__ = ["Calibration", "calibrate", "calibrate_events", "write_camera_file", "read_camera_params",
           "shot_intensity_factor"]

TILE = 16
QUIET_FACTOR = 2.0  # a quiet tile: per-pixel rate <= QUIET_FACTOR x the tiles' 25th percentile
HOT_STD = 10.0
MIN_SIGNAL = 200


def shot_intensity_factor(intensity) -> np.ndarray:
    """The pixel model's shot-noise factor ``f(I) = 1 - 0.75 (I + 20) / 275`` (``I`` in 0..255)."""
    return 1.0 - 0.75 * (np.asarray(intensity, np.float64) + 20.0) / 275.0


@dataclass
class Estimate:
    value: float
    uncertainty: float | None  # one standard deviation (or the stated bound), same unit as value
    determined: bool
    method: str
    note: str = ""

    def __post_init__(self):  # plain Python numbers (YAML, JSON)
        self.value = float(self.value)
        self.uncertainty = None if self.uncertainty is None else float(self.uncertainty)
        self.determined = bool(self.determined)


@dataclass
class Calibration:
    """The estimates, the DVSParams to simulate with, what could not be determined and what was measured."""

    source: str
    estimates: dict[str, Estimate]
    dvs_params: dict
    not_determined: dict[str, str]
    measured: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"source": self.source, "dvs_params": self.dvs_params,
                "estimates": {k: dataclasses.asdict(v) for k, v in self.estimates.items()},
                "not_determined": self.not_determined, "measured": self.measured}


def calibrate(path, *, frames=None, base: str = "default", max_events: int = 20_000_000,
              sensor_size=None) -> Calibration:
    """Calibrate from any event source (:func:`~.sources.load_source`); a stream file's gray frames are used
    for the brightness when ``frames`` is not given."""
    src = load_source(path, max_events=max_events, sensor_size=sensor_size)
    if frames is None and src.kind == "stream":
        frames = _stream_frames(path)
    return calibrate_events(src, frames=frames, base=base)


def _stream_frames(path) -> np.ndarray | None:
    from evforge.formats.streamfile import StreamFile

    with StreamFile(path) as s:
        n = len(s.frame_times)
        picks = np.unique(np.linspace(0, n - 1, min(n, 50)).astype(int)) if n else []
        got = [s.gray_frame(int(i)) for i in picks]
    got = [g for g in got if g is not None]
    return np.stack(got) if got else None


def calibrate_events(src: EventSource, *, frames=None, base: str = "default") -> Calibration:
    """The estimators of the module docstring on a loaded source (``frames``: (N, H, W) brightness 0..255)."""
    from evforge.simulator.params import get_preset

    preset = get_preset(base)
    ev, (w, h) = src.events, src.sensor_size
    T = src.duration_us / 1e6
    if T <= 0 or len(ev) < 100:
        raise InputError(src.name, f"too few events to calibrate ({len(ev)})")
    on = pixel_counts(ev[ev["p"] > 0], (w, h)).astype(np.float64)
    off = pixel_counts(ev[ev["p"] < 0], (w, h)).astype(np.float64)
    total = on + off
    hot = total > total.mean() + HOT_STD * total.std()
    quiet = _quiet_pixels(total, hot)
    nq = int(quiet.sum())
    est: dict[str, Estimate] = {}
    nd: dict[str, str] = {}

    # refractory period: the smallest per-pixel interval
    iei = np.sort(per_pixel_intervals(ev, (w, h)))
    tau = 0.0
    if len(iei) >= 10:
        d1, spacing = float(iei[0]), float(iei[9] - iei[0]) / 9
        if d1 > 5 * max(spacing, 1.0):
            tau = d1 * 1e-6
            ties = int((iei == iei[0]).sum())
            est["refractory_period_s"] = Estimate(tau, max(spacing, 1.0) * 1e-6, True,
                                                  "smallest per-pixel inter-event interval",
                                                  f"{len(iei)} intervals; spacing of the 10 smallest {spacing:.1f} us "
                                                  f"(1 us, the timestamp resolution, at least); {ties} at the minimum")
        else:
            est["refractory_period_s"] = Estimate(d1 * 1e-6, None, False, "smallest per-pixel inter-event interval",
                                                  f"no dead time resolved: the smallest interval {d1:.0f} us is within "
                                                  f"5 spacings ({spacing:.1f} us) of 0; it is an upper bound")
            nd["refractory_period_s"] = (f"no dead time visible (smallest interval {d1:.0f} us, an upper bound); "
                                         f"kept {preset.refractory_period_s} s from preset {base!r}")
    else:
        nd["refractory_period_s"] = "fewer than 10 per-pixel intervals; kept the preset's value"

    # noise rates on quiet pixels
    cov = preset.noise_rate_cov_decades
    mean_r = math.exp((math.log(10) * cov) ** 2 / 2)
    f_mean, f_range, brightness = _intensity_factor(frames, quiet, (w, h))
    if nq >= 16:
        n_on, n_off = on[quiet].sum(), off[quiet].sum()
        exposure = nq * T
        r_on, r_off = n_on / exposure, n_off / exposure
        dead = 1.0 / max(1e-12, 1.0 - (r_on + r_off) * tau)  # dead-time correction of both rates
        # threshold mismatch raises the OFF rate by E[nominal / actual] ~ 1 + (sigma / theta)^2 (preset's values)
        mismatch = 1.0 + (preset.sigma_thres / preset.neg_thres) ** 2
        shot = 2 * r_off * dead / f_mean / mismatch
        shot_sd = 2 * math.sqrt(max(n_off, 1.0)) / exposure * dead / f_mean / mismatch
        note = ""
        if frames is None:
            note = (f"no frames: brightness unknown, f(I) = 1 assumed (dark); a white scene (f = 0.25) would mean "
                    f"{shot / 0.25:.4g} Hz")
        else:
            note = f"mean f(I) = {f_mean:.3f} over the quiet pixels (brightness {brightness:.1f} of 255)"
        enough = n_off >= 10
        est["shot_noise_rate_hz"] = Estimate(shot, shot_sd, enough, "2 x OFF rate of quiet pixels / mean f(I)",
                                             f"{nq} quiet pixels, {int(n_off)} OFF events; " + note)
        if not enough:
            nd["shot_noise_rate_hz"] = (f"only {int(n_off)} OFF noise events on the quiet pixels: the rate is below "
                                        f"about {shot + 2 * shot_sd:.3g} Hz; kept the preset's value")
        if frames is None:
            est["shot_noise_rate_hz"].uncertainty = float(max(shot_sd, shot * (1 / 0.25 - 1) / 2))
        leak = (r_on - r_off) * dead / mean_r
        leak_sd = math.sqrt(max(n_on + n_off, 1.0)) / exposure * dead / mean_r
        determined = leak > 2 * leak_sd
        est["leak_rate_hz"] = Estimate(max(leak, 0.0), leak_sd, determined, "(ON - OFF rate of quiet pixels) / E[R]",
                                       f"E[R] = {mean_r:.4f} for noise_rate_cov_decades = {cov} (preset {base!r})")
        if not determined:
            nd["leak_rate_hz"] = f"ON and OFF noise rates agree within 2 sigma: leak below {2 * leak_sd:.3g} Hz"
        quiet_counts = (n_on, n_off, r_on * dead, r_off * dead)
    else:
        nd["shot_noise_rate_hz"] = nd["leak_rate_hz"] = (f"only {nq} quiet pixels (tiles without motion): no noise "
                                                         f"floor to measure; kept the preset's values")
        quiet_counts = None

    # the shot noise's brightness dependence, where frames show quiet pixels of different brightness
    if quiet_counts is not None and frames is not None:
        dep = _shot_intensity(np.asarray(frames, np.float64).mean(0), off, quiet, T)
        measured_dep = dep
        if dep.get("determined"):
            est["shot_noise_white_to_dark"] = Estimate(
                dep["white_to_dark"], dep["sd"], True, "weighted line fit of the OFF rate of quiet pixels against "
                "(I + 20) / 275, in 4 brightness bins: rate at 1 over rate at 0",
                "the pixel model's value is fixed at 0.25 (f = 1 - 0.75 (I + 20) / 275): reported, not simulated")
        else:
            nd["shot_noise_white_to_dark"] = dep["reason"]
    else:
        measured_dep = None
        nd["shot_noise_white_to_dark"] = "needs frames (the brightness of each pixel) and a quiet region"

    # ON/OFF threshold ratio from the signal events
    active = ~quiet & ~hot
    if quiet_counts is not None and active.any():
        na = int(active.sum())
        sig_on = on[active].sum() - quiet_counts[2] * na * T
        sig_off = off[active].sum() - quiet_counts[3] * na * T
        if min(sig_on, sig_off) >= MIN_SIGNAL:
            ratio = sig_off / sig_on
            rel = math.sqrt(1 / sig_on + 1 / sig_off) + 0.5 * na / min(sig_on, sig_off)
            ok = rel < 0.25
            est["pos_neg_threshold_ratio"] = Estimate(ratio, ratio * rel, ok, "OFF / ON signal events (noise removed)",
                                                      f"{na} active pixels, {sig_on:.0f} ON and {sig_off:.0f} OFF "
                                                      f"signal events; assumes the brightness ends where it started")
            if not ok:
                nd["pos_neg_threshold_ratio"] = f"too little signal for the ratio (uncertainty {rel:.0%})"
        else:
            nd["pos_neg_threshold_ratio"] = (f"too little signal ({sig_on:.0f} ON, {sig_off:.0f} OFF signal events; "
                                             f"a static scene holds no threshold information)")
    else:
        nd["pos_neg_threshold_ratio"] = ("no pixels with signal beyond the noise floor (a static scene holds no "
                                         "threshold information)")

    # what events alone cannot tell
    nd["pos_thres"] = (f"the absolute threshold needs the brightness change behind the events; kept "
                       f"{preset.pos_thres} from preset {base!r} (neg_thres follows the ratio)")
    nd["sigma_thres"] = "threshold mismatch is not separable from scene texture in events alone; kept the preset's"
    nd["cutoff_hz"] = "photoreceptor bandwidth needs a known brightness step; kept the preset's"
    nd["noise_rate_cov_decades"] = "leak spread across pixels: not separated from Poisson spread; kept the preset's"
    nd["hot_pixels"] = "measured (see measured.hot_pixels), but the pixel model has no hot pixels: not simulated"

    params = preset.to_dict()
    for name in ("leak_rate_hz", "shot_noise_rate_hz", "refractory_period_s"):
        if name in est and est[name].determined:
            params[name] = float(est[name].value)
    if "pos_neg_threshold_ratio" in est and est["pos_neg_threshold_ratio"].determined:
        params["neg_thres"] = float(params["pos_thres"] / est["pos_neg_threshold_ratio"].value)
    ys, xs = np.nonzero(hot)
    measured = {"duration_s": T, "num_events": int(len(ev)), "sensor_size": [w, h], "quiet_pixels": nq,
                "quiet_fraction": nq / (w * h), "brightness_mean": brightness, "shot_factor_range": f_range,
                "shot_intensity": measured_dep,
                "hot_pixels": {"count": int(hot.sum()), "fraction": float(hot.mean()),
                               "pixels": [[int(x), int(y), float(total[y, x] / T)]
                                          for x, y in list(zip(xs, ys))[:1000]]},
                "base_preset": base}
    return Calibration(source=src.name, estimates=est, dvs_params=params, not_determined=nd, measured=measured)


def _shot_intensity(brightness: np.ndarray, off: np.ndarray, quiet: np.ndarray, T: float) -> dict:
    """OFF rate of quiet pixels in 4 brightness-quantile bins and the line through them (see the docstring)."""
    b, n_off = brightness[quiet], off[quiet]
    if b.max() - b.min() < 40 or len(b) < 64:
        return {"determined": False, "reason": f"the quiet pixels span only {b.max() - b.min():.0f} of 255 in "
                                                f"brightness (40 needed) or are too few ({len(b)})"}
    edges = np.quantile(b, [0, 0.25, 0.5, 0.75, 1])
    which = np.clip(np.searchsorted(edges, b, "right") - 1, 0, 3)
    x, r, sd, rows = [], [], [], []
    for k in range(4):
        sel = which == k
        if sel.sum() < 8:
            continue
        cnt, expo = n_off[sel].sum(), sel.sum() * T
        x.append(((b[sel] + 20) / 275).mean())
        r.append(cnt / expo)
        sd.append(max(math.sqrt(cnt), 1.0) / expo)
        rows.append([float(b[sel].mean()), float(r[-1]), float(sd[-1])])
    if len(x) < 3:
        return {"determined": False, "reason": "fewer than 3 brightness bins with 8 quiet pixels", "bins": rows}
    x, r, wgt = np.array(x), np.array(r), 1 / np.array(sd) ** 2
    A = np.stack([np.ones_like(x), x], 1)
    cov = np.linalg.inv(A.T @ (A * wgt[:, None]))
    c0, c1 = cov @ (A.T @ (wgt * r))
    if c0 <= 0:
        return {"determined": False, "reason": "the fitted dark rate is not positive", "bins": rows}
    ratio = (c0 + c1) / c0
    grad = np.array([-c1 / c0**2, 1 / c0])  # d ratio / d (c0, c1)
    ratio_sd = float(math.sqrt(grad @ cov @ grad))
    ok = ratio_sd < 0.5
    return {"determined": ok, "white_to_dark": float(ratio), "sd": ratio_sd, "model_value": 0.25, "bins": rows,
            "reason": "" if ok else f"too uncertain ({ratio_sd:.2f})"}


def _quiet_pixels(total: np.ndarray, hot: np.ndarray) -> np.ndarray:
    h, w = total.shape
    ty, tx = -(-h // TILE), -(-w // TILE)
    tile_of = (np.arange(h)[:, None] // TILE) * tx + np.arange(w)[None, :] // TILE
    good = ~hot
    ev = np.bincount(tile_of[good], weights=total[good], minlength=ty * tx)
    px = np.bincount(tile_of[good], minlength=ty * tx)
    rate = np.where(px > 0, ev / np.maximum(px, 1), np.inf)
    finite = rate[np.isfinite(rate)]
    if not len(finite):
        return np.zeros_like(hot)
    limit = QUIET_FACTOR * np.percentile(finite, 25)
    return (rate[tile_of] <= limit) & good


def _intensity_factor(frames, quiet, size):
    """(mean f(I) over quiet pixels, [min, max] of f there, mean brightness) from frames, or (1, None, None)."""
    if frames is None:
        return 1.0, None, None
    frames = np.asarray(frames, dtype=np.float64)
    w, h = size
    if frames.ndim != 3 or frames.shape[1:] != (h, w):
        raise ValueError(f"frames must be (N, {h}, {w}) brightness images, got {frames.shape}")
    mean_i = frames.mean(0)
    sel = mean_i[quiet] if quiet.any() else mean_i.ravel()
    f = shot_intensity_factor(frames[:, quiet] if quiet.any() else frames)
    return float(f.mean()), [float(f.min()), float(f.max())], float(sel.mean())


# ------------------------------------------------------------------------------------------- camera.yaml
def write_camera_file(cal: Calibration, path, *, command: str | None = None) -> Path:
    """``camera.yaml`` (atomic): ``dvs_params`` for ``evforge simulate --params``, then the evidence."""
    import yaml

    head = ["# evforge camera calibration (evforge.realism.calibrate; estimators: docs/CALIBRATION.md)",
            f"# source: {cal.source}" + (f"; command: {command}" if command else ""),
            "# dvs_params is what `evforge simulate --params` reads; the rest documents it", ""]
    data = _plain(cal.to_dict())
    body = "".join(yaml.safe_dump({k: data[k]}, sort_keys=False, default_flow_style=None if k == "measured" else False,
                                  width=110)
                   for k in data)
    return atomic_write_text(path, "\n".join(head) + body)


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    return v


def read_camera_params(path) -> dict:
    """The ``dvs_params`` of a camera file (DVSParams field names; unknown names are an InputError)."""
    import yaml

    from evforge.simulator.params import DVSParams

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read ({getattr(err, 'strerror', None) or err})") from None
    except yaml.YAMLError as err:
        raise InputError(path, f"not valid YAML ({' '.join(str(err).split())})") from None
    params = data.get("dvs_params") if isinstance(data, dict) else None
    if not isinstance(params, dict):
        raise InputError(path, "no 'dvs_params' mapping (write one with evforge calibrate)")
    known = {f.name for f in dataclasses.fields(DVSParams)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise InputError(path, f"unknown dvs_params {unknown}; known: {sorted(known)}")
    for k, v in params.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, list)):
            raise InputError(path, f"dvs_params.{k} must be a number, got {v!r}")
    return {k: tuple(v) if isinstance(v, list) else float(v) for k, v in params.items()}
