"""DVS pixel-model parameters, with v2e's names, defaults and presets.

Defaults are v2e's command-line defaults. Presets ``clean`` and ``noisy`` are v2e's ``--dvs_params``;
``ideal`` switches every non-ideality off (v2e/ESIM ideal mode); ``ecddp`` is the setting ECDDP used to
make E-TartanAir (v2e CLI with thresholds 0.2, sigma 0.03, cutoff 30 Hz, leak 0.1 Hz, and a shot-noise rate
drawn per trajectory from U(0, 0.25) Hz).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .hashing import uniform_scalar

LIN_LOG_THRESHOLD = 20.0  # v2e's lin-log: linear below this intensity, natural log above
SHOT_NOISE_INTEN_FACTOR = 0.25  # v2e: shot noise on a white pixel is this fraction of the dark rate


@dataclass(frozen=True)
class DVSParams:
    """Parameters of the v2e pixel model (log-intensity units are natural log).

    ``shot_noise_rate_hz`` may be a ``(low, high)`` range: each sequence then draws its rate uniformly from
    it using its own seed (see :meth:`resolve`).
    """

    pos_thres: float = 0.2  # nominal ON threshold (log units)
    neg_thres: float = 0.2  # nominal OFF threshold (log units)
    sigma_thres: float = 0.03  # std of the per-pixel threshold mismatch (log units)
    cutoff_hz: float = 300.0  # photoreceptor 3 dB cutoff at full white; 0 disables the low-pass
    leak_rate_hz: float = 0.01  # leak (ON) event rate per pixel
    shot_noise_rate_hz: float | tuple[float, float] = 0.001  # ON+OFF shot noise rate per pixel (dark)
    refractory_period_s: float = 0.0005
    leak_jitter_fraction: float = 0.1  # per-frame relative jitter of the leak rate
    noise_rate_cov_decades: float = 0.1  # per-pixel log-normal spread of the leak rate (decades)

    def resolve(self, seed: int) -> "DVSParams":
        """The parameters one sequence is simulated with: a shot-noise range is drawn from the seed."""
        rate = self.shot_noise_rate_hz
        if isinstance(rate, (tuple, list)):
            lo, hi = rate
            return dataclasses.replace(self, shot_noise_rate_hz=lo + (hi - lo) * uniform_scalar(seed, "shot_rate"))
        return self

    def validate(self) -> "DVSParams":
        if self.pos_thres <= 0 or self.neg_thres <= 0:
            raise ValueError(f"thresholds must be > 0, got pos_thres={self.pos_thres}, neg_thres={self.neg_thres}")
        for name in ("sigma_thres", "cutoff_hz", "leak_rate_hz", "refractory_period_s", "leak_jitter_fraction",
                     "noise_rate_cov_decades"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        rate = self.shot_noise_rate_hz
        lo, hi = rate if isinstance(rate, (tuple, list)) else (rate, rate)
        if not 0 <= lo <= hi:
            raise ValueError(f"shot_noise_rate_hz must be >= 0 (or a range low <= high), got {rate}")
        return self

    @property
    def is_ideal(self) -> bool:
        return (self.sigma_thres == 0 and self.cutoff_hz == 0 and self.leak_rate_hz == 0
                and self.shot_noise_rate_hz == 0 and self.refractory_period_s == 0)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(d["shot_noise_rate_hz"], tuple):
            d["shot_noise_rate_hz"] = list(d["shot_noise_rate_hz"])
        return d


_OFF = dict(sigma_thres=0.0, cutoff_hz=0.0, leak_rate_hz=0.0, shot_noise_rate_hz=0.0, refractory_period_s=0.0,
            leak_jitter_fraction=0.0, noise_rate_cov_decades=0.0)

PRESETS: dict[str, DVSParams] = {
    "default": DVSParams(),
    "ideal": DVSParams(pos_thres=0.2, neg_thres=0.2, **_OFF),
    "clean": DVSParams(pos_thres=0.2, neg_thres=0.2, **{**_OFF, "sigma_thres": 0.02}),
    "noisy": DVSParams(pos_thres=0.2, neg_thres=0.2, sigma_thres=0.05, cutoff_hz=30.0, leak_rate_hz=0.1,
                       shot_noise_rate_hz=5.0, refractory_period_s=0.01, leak_jitter_fraction=0.1,
                       noise_rate_cov_decades=0.1),
    "ecddp": DVSParams(pos_thres=0.2, neg_thres=0.2, sigma_thres=0.03, cutoff_hz=30.0, leak_rate_hz=0.1,
                       shot_noise_rate_hz=(0.0, 0.25)),
}


def get_preset(name: str, **overrides) -> DVSParams:
    """A preset by name, with any field overridden (``get_preset("noisy", cutoff_hz=100)``)."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown DVS preset {name!r}; choose one of {sorted(PRESETS)}") from None
    return dataclasses.replace(base, **overrides).validate()


# Output resolutions by name, (width, height); "native" keeps the input size.
RESOLUTIONS: dict[str, tuple[int, int]] = {"dvs128": (128, 128), "dvs240": (240, 180), "dvs346": (346, 260),
                                           "dvs640": (640, 480), "dvs1024": (1024, 768)}


def parse_resolution(spec: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"native"``/None -> None, a name from :data:`RESOLUTIONS`, ``"WxH"`` or ``(W, H)`` -> ``(W, H)``."""
    if spec is None or spec == "native":
        return None
    if isinstance(spec, (tuple, list)):
        w, h = spec
    elif spec in RESOLUTIONS:
        return RESOLUTIONS[spec]
    else:
        try:
            w, h = (int(v) for v in str(spec).lower().split("x"))
        except ValueError:
            raise ValueError(f"bad resolution {spec!r}: use native, one of {sorted(RESOLUTIONS)}, or WxH") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"bad resolution {spec!r}: width and height must be positive")
    return int(w), int(h)
