"""The simulator's settings as plain dataclasses: upsampling and a whole ``evforge simulate`` run.

They import no torch, so that code which only describes a simulation (the data recipes, the CLI's argument
parser) starts fast; :mod:`evforge.simulator.upsample` and :mod:`evforge.simulator.pipeline` use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .params import DVSParams, get_preset


@dataclass(frozen=True)
class UpsampleConfig:
    """How many steps to simulate between two source frames, and how to make the frames in between.

    ``mode``: ``none`` (one step per frame pair), ``linear`` (log-linear, default), ``flow`` (flow-guided,
    needs flow files, falls back to log-linear without them). The step count is the largest of
    ``max|dlog| / max_log_step``, ``max|flow| / max_px_step`` (flow mode), with a low-pass
    ``dt * 2 pi cutoff * inten01_max / max_lowpass_eps`` (``max_lowpass_eps = 0`` leaves this term out) and
    ``min_steps``; rounded up to a multiple of ``step_multiple``, then clipped to ``max_steps``.

    ``min_steps`` and ``step_multiple`` model a fixed interpolation in front of an adaptive one: the ECDDP
    recipe's 30 EMA-VFI frames per TartanAir interval, each pair of which v2e's SuperSloMo upsamples by the
    same integer factor (at least 2) so that nothing moves more than a pixel per frame, is ``min_steps=60,
    step_multiple=30, max_px_step=1`` (see :mod:`evforge.simulator.recipes`).
    """

    mode: str = "linear"
    max_log_step: float = 0.4
    max_px_step: float = 1.0
    max_lowpass_eps: float = 0.5
    max_steps: int = 16
    min_steps: int = 1
    step_multiple: int = 1

    def __post_init__(self):
        if self.mode not in ("none", "linear", "flow"):
            raise ValueError(f"unknown upsampling mode {self.mode!r}: use none, linear or flow")
        if self.max_steps < 1 or self.min_steps < 1 or self.step_multiple < 1:
            raise ValueError("max_steps, min_steps and step_multiple must be >= 1")
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps {self.min_steps} is more than max_steps {self.max_steps}")
        if self.mode == "none" and (self.min_steps > 1 or self.step_multiple > 1):
            raise ValueError("mode 'none' simulates one step per frame pair: min_steps and step_multiple must be 1")
        if self.max_lowpass_eps < 0 or self.max_log_step <= 0 or self.max_px_step <= 0:
            raise ValueError("max_log_step and max_px_step must be > 0, max_lowpass_eps >= 0 (0 = no low-pass term)")

    def interpolator(self):
        """The built-in interpolator of ``mode`` (a :class:`~evforge.simulator.upsample.FrameInterpolator`)."""
        from .upsample import FlowInterpolator, LogLinearInterpolator

        return FlowInterpolator() if self.mode == "flow" else LogLinearInterpolator()


@dataclass
class SimulateConfig:
    """Everything that decides the output of ``evforge simulate`` (all of it is stored in each file)."""

    preset: str = "default"
    overrides: dict = field(default_factory=dict)  # DVSParams fields that replace the preset's
    resolution: str | tuple[int, int] | None = None  # None/"native", "dvs346", "dvs640", "WxH"
    upsample: UpsampleConfig = field(default_factory=UpsampleConfig)
    seed: int = 0
    device: str = "auto"
    batch: int = 4
    workers: int = 2  # frame-decoding threads
    compression: str = "zstd"
    save_frames: bool = True
    overwrite: bool = False
    recipe: str | None = None  # the data recipe these settings come from (evforge.simulator.recipes), if any

    def params(self) -> DVSParams:
        return get_preset(self.preset, **self.overrides)
