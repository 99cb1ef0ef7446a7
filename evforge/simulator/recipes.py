"""Data recipes: how a paper turned a frame dataset into event samples, as one named, documented setting.

A :class:`Recipe` fixes the time base (sensor seconds per source-frame interval), the pixel model, the output
resolution, the upsampling between source frames, and which intervals become samples. ``evforge simulate
--recipe NAME`` and ``evforge convert tartanair SRC --simulate --recipe NAME`` use it, and so can Python::

    from evforge.simulator.recipes import get_recipe
    recipe = get_recipe("ecddp")
    cfg = recipe.simulate_config(seed=0)              # a SimulateConfig; discover sources with fps=recipe.fps

``ecddp`` is E-TartanAir as the public ECDDP code makes it (``generate_data/``, commit fedd0a8):

* **Time base.** ``generate_event.py`` interpolates 30 frames per TartanAir interval with EMA-VFI and writes
  them as a 30 fps video, so one interval lasts 1 s of sensor time (TartanAir itself is 10 Hz); ``split_event.py``
  cuts the events at ``i * 1e6`` us. Here every source frame is 1 s after the previous one (``fps = 1``).
* **Pixel model.** v2e ``--dvs640 --pos_thres 0.2 --neg_thres 0.2 --sigma_thres 0.03 --cutoff_hz 30
  --leak_rate_hz 0.1 --shot_noise_rate_hz U(0, 0.25)`` drawn once per trajectory: the ``ecddp`` preset, at
  640x480, with the rate drawn from each trajectory's seed (reproducible; the reference's
  ``np.random.uniform`` is unseeded) and stored in its stream file.
* **Upsampling.** The reference has 30 EMA-VFI frames per interval, then v2e's SuperSloMo
  (``--auto_timestamp_resolution``) upsamples every video frame pair by the same integer factor, at least 2,
  such that the largest SuperSloMo flow is at most 1 px per frame (v2e ``slomo.py``): 60 steps per interval,
  or 30 x ceil(max flow / 30 px) when the scene moves faster. evforge makes the same number of steps:
  flow-guided frames from TartanAir's ground-truth ``flow/`` (log-linear where the flow is masked or absent),
  ``min_steps=60, step_multiple=30, max_px_step=1``, at most 600 (v2e has no cap). The steps are uniform in
  the interval, and the photoreceptor low-pass adds none of its own (as in v2e, it runs at the frame steps).
* **Samples.** One per interval; interval 0 is dropped, and every interval whose own file or the previous
  interval's file in the reference layout is under 100 KiB (``get_file_path.py``; see
  :mod:`evforge.dataset_builder.converters.etartanair_intervals`). The reference never simulates a
  trajectory's last interval (``generate_event.py`` needs the frame after it to smooth its end frame), so
  its file is empty but for events stamped exactly at the last frame: it is dropped here too
  (``drop_last_interval``).
* **Splits.** hospital, gascola, neighborhood held out (``data/ETartanAir_dataset.py``).

What cannot be the same: EMA-VFI and SuperSloMo are learned interpolators whose weights would have to be
downloaded (evforge warps with the ground-truth flow instead: motion is linear within an interval, and
disocclusions blend rather than hallucinate); the DIVX video between them is lossy and 8-bit (evforge feeds
the lossless PNG frames); v2e stamps all events of a step at shared "pillar" times (evforge stamps each
event where its pixel crosses the threshold), so the same scene compresses differently in the reference's
file layout; the public code keeps ``t`` as float32 microseconds (``float32_time`` reproduces that rounding).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .params import get_preset, parse_resolution
from .settings import SimulateConfig, UpsampleConfig

__all__ = ["Recipe", "RECIPES", "get_recipe"]


@dataclass(frozen=True)
class Recipe:
    """A named data recipe: simulation settings plus the rule that picks the samples (module docstring)."""

    name: str
    summary: str
    preset: str
    resolution: str | None  # None/"native", a name such as "dvs640", or "WxH"
    interval_s: float  # sensor seconds per source-frame interval: the time base
    upsample: UpsampleConfig = field(default_factory=UpsampleConfig)
    drop_first_interval: bool = True
    drop_last_interval: bool = False
    min_interval_bytes: int = 0  # keep rule: own and previous interval's reference-layout file >= this
    min_interval_events: int | None = None  # when set, the keep rule counts events instead of bytes
    float32_time: bool = False  # round event times to float32 us since the first frame (the public code)
    test_envs: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.interval_s > 0:
            raise ValueError(f"recipe {self.name!r}: interval_s must be > 0, got {self.interval_s}")
        if self.min_interval_bytes < 0 or (self.min_interval_events is not None and self.min_interval_events < 0):
            raise ValueError(f"recipe {self.name!r}: min_interval_bytes and min_interval_events must be >= 0")
        get_preset(self.preset)  # an unknown preset fails here
        parse_resolution(self.resolution)

    @property
    def fps(self) -> float:
        """Source frames per sensor second: what the sources are discovered with (``fps=``)."""
        return 1.0 / self.interval_s

    @property
    def interval_us(self) -> int:
        return int(round(self.interval_s * 1e6))

    def replace(self, **options) -> "Recipe":
        """This recipe with some fields replaced (``None`` values are ignored, so CLI defaults pass through)."""
        options = {k: v for k, v in options.items() if v is not None}
        if isinstance(options.get("upsample"), dict):
            options["upsample"] = dataclasses.replace(self.upsample, **options["upsample"])
        if "test_envs" in options:
            options["test_envs"] = tuple(options["test_envs"])
        unknown = set(options) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"recipe {self.name!r} has no option(s) {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **options)

    def simulate_config(self, **overrides) -> SimulateConfig:
        """The :class:`SimulateConfig` of this recipe; ``overrides`` (SimulateConfig fields, ``None`` ignored)
        replace its values, e.g. ``seed``, ``device``, ``batch`` or a smaller ``resolution`` for a quick look."""
        values = {"preset": self.preset, "resolution": self.resolution, "upsample": self.upsample,
                  "recipe": self.name}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return SimulateConfig(**values)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["test_envs"] = list(self.test_envs)
        return d


RECIPES: dict[str, Recipe] = {
    "ecddp": Recipe(
        name="ecddp",
        summary="E-TartanAir as the public ECDDP code makes it: 1 s per TartanAir interval, v2e --dvs640 "
                "(thresholds 0.2, sigma 0.03, cutoff 30 Hz, leak 0.1 Hz, shot noise U(0, 0.25) Hz per "
                "trajectory), one sample per interval, interval 0, the last interval and intervals under "
                "100 KiB (own or previous) dropped, hospital/gascola/neighborhood held out",
        preset="ecddp",
        resolution="dvs640",
        interval_s=1.0,
        upsample=UpsampleConfig(mode="flow", max_px_step=1.0, max_lowpass_eps=0.0, min_steps=60, step_multiple=30,
                                max_steps=600),
        drop_first_interval=True,
        drop_last_interval=True,
        min_interval_bytes=100 * 1024,
        min_interval_events=None,
        float32_time=False,
        test_envs=("hospital", "gascola", "neighborhood"),
    ),
}


def get_recipe(name: str | Recipe, **options) -> Recipe:
    """A recipe by name (or a Recipe itself), with fields replaced by ``options`` (see :meth:`Recipe.replace`)."""
    if isinstance(name, Recipe):
        return name.replace(**options)
    try:
        recipe = RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}") from None
    return recipe.replace(**options)
