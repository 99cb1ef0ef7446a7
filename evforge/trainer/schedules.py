"""Scalar schedules from plain config data (lr, weight decay, EMA momentum, teacher temperature, ...).

A spec is one of::

    0.05                                                       # constant
    {constant: 0.05}  /  {constant: {value: 5e-4, batch_ref: 256}}
    {linear:  {start: 0.04, end: 0.07, epochs: 30}}            # then constant at end
    {cosine:  {start: 0.992, end: 1.0}}                        # over the whole run by default
    {warmup_cosine: {start: 0, peak: 5e-4, end: 1e-6, warmup_epochs: 10, batch_ref: 256}}
    {exponential: {start: 2e-4, factor: 0.99, every_epochs: 1}}  # x factor once per period (ExponentialLR)

Durations are ``total_steps`` or ``epochs`` (default: the whole run) and, for ``warmup_cosine``, ``warmup_steps``
or ``warmup_epochs`` (part of the total; a warmup longer than the run just never peaks); epochs become
optimizer steps with ``steps_per_epoch`` (rounded).
``linear`` and ``cosine`` go from ``start`` at step 0 to ``end`` at step = their duration, and stay there.
``warmup_cosine`` rises linearly from ``start`` (step 0) to ``peak`` (step ``warmup``), then follows a half cosine
to ``end`` at the total; with ``warmup_linspace: true`` the rise is ``np.linspace(start, peak, warmup)``, at
``peak`` one step earlier (BEiT/MEM's ``utils.cosine_scheduler``). ``exponential`` multiplies ``start`` by ``factor``
at steps ``offset, offset + every, ...`` (``every_steps`` or ``every_epochs``; ``offset_steps`` defaults to one
period: the decay at each period's end, as an ``ExponentialLR`` stepped per epoch; MEM's tokenizer steps it
after the first step of each epoch, ``offset_steps: 1``), never below ``end`` (default 0). ``batch_ref: B``
applies the linear scaling rule: the peak (``warmup_cosine``), ``start``
(``linear``/``cosine``) or ``value`` (``constant``) is multiplied by ``global_batch / B``; ends are not scaled
(as in DINO/ECDDP: ``lr = 5e-4 * B / 256``, ``min_lr = 1e-6``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ConfigError

__all__ = ["Schedule", "Schedules", "make_schedule"]

_KEYS = {
    "constant": {"value", "batch_ref"},
    "linear": {"start", "end", "total_steps", "epochs", "batch_ref"},
    "cosine": {"start", "end", "total_steps", "epochs", "batch_ref"},
    "warmup_cosine": {"start", "peak", "end", "warmup_steps", "warmup_epochs", "total_steps", "epochs",
                      "batch_ref", "warmup_linspace"},
    "exponential": {"start", "factor", "every_steps", "every_epochs", "offset_steps", "end", "batch_ref"},
}
_REQUIRED = {"constant": {"value"}, "linear": {"start", "end"}, "cosine": {"start", "end"},
             "warmup_cosine": {"peak", "end"}, "exponential": {"start", "factor"}}


@dataclass(frozen=True)
class Schedule:
    """A scalar of the optimizer step: ``kind`` in constant/linear/cosine/warmup_cosine, durations in steps."""

    kind: str
    start: float
    end: float
    peak: float = 0.0
    warmup: int = 0
    total: int = 0
    factor: float = 1.0    # exponential
    every: int = 1         # exponential: steps per decay
    offset: int = 1        # exponential: step of the first decay
    linspace: bool = False  # warmup_cosine: np.linspace warmup (peak at step warmup - 1)

    def value(self, step: int) -> float:
        """The value for optimizer step ``step`` (0-based; steps past the duration keep the end value)."""
        if self.kind == "constant":
            return self.start
        if self.kind == "exponential":
            k = 0 if step < self.offset else (step - self.offset) // self.every + 1
            return max(self.start * self.factor ** k, self.end)
        if self.kind == "warmup_cosine":
            if step < self.warmup:
                den = self.warmup - 1 if self.linspace else self.warmup
                return self.start + (self.peak - self.start) * step / den if den > 0 else self.peak
            span = self.total - self.warmup
            t = 1.0 if span <= 0 else min(max(step - self.warmup, 0) / span, 1.0)
            return self.end + (self.peak - self.end) * 0.5 * (1.0 + math.cos(math.pi * t))
        t = 1.0 if self.total <= 0 else min(max(step, 0) / self.total, 1.0)
        if self.kind == "linear":
            return self.start + (self.end - self.start) * t
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * t))  # cosine

    __call__ = value


def _number(name: str, key: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{name}.{key}: expected a number, got {v!r}")
    return float(v)


def _steps(name: str, spec: dict, steps_key: str, epochs_key: str, steps_per_epoch: int | None,
           default: int | None) -> int:
    """A duration in optimizer steps from ``steps_key`` or ``epochs_key`` (not both), else ``default``."""
    if steps_key in spec and epochs_key in spec:
        raise ConfigError(f"{name}: give {steps_key} or {epochs_key}, not both")
    if epochs_key in spec:
        if not steps_per_epoch:
            raise ConfigError(f"{name}.{epochs_key}: epochs need steps_per_epoch (unknown here)")
        return int(round(_number(name, epochs_key, spec[epochs_key]) * steps_per_epoch))
    if steps_key in spec:
        v = spec[steps_key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{name}.{steps_key}: expected a non-negative integer, got {v!r}")
        return v
    if default is None:
        raise ConfigError(f"{name}: needs {steps_key} or {epochs_key} (the run's length is unknown here)")
    return int(default)


def make_schedule(spec, *, name: str = "schedule", steps_per_epoch: int | None = None,
                  total_steps: int | None = None, global_batch: int | None = None) -> Schedule:
    """A :class:`Schedule` from its config spec (see the module doc); ``name`` prefixes error messages."""
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return Schedule("constant", float(spec), float(spec))
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{name}: expected a number or one of {{{', '.join(_KEYS)}: {{...}}}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind not in _KEYS:
        raise ConfigError(f"{name}: unknown schedule {kind!r} (known: {', '.join(_KEYS)})")
    name = f"{name}.{kind}"
    if kind == "constant" and not isinstance(args, dict):
        args = {"value": args}
    if not isinstance(args, dict):
        raise ConfigError(f"{name}: expected a mapping of options, got {args!r}")
    for k in args:
        if k not in _KEYS[kind]:
            raise ConfigError(f"{name}.{k}: unknown option (known: {', '.join(sorted(_KEYS[kind]))})")
    for k in _REQUIRED[kind]:
        if k not in args:
            raise ConfigError(f"{name}: missing {k}")
    scale = 1.0
    if args.get("batch_ref") is not None:
        if not global_batch:
            raise ConfigError(f"{name}.batch_ref: the global batch size is unknown here")
        scale = global_batch / _number(name, "batch_ref", args["batch_ref"])
    if kind == "constant":
        v = _number(name, "value", args["value"]) * scale
        return Schedule("constant", v, v)
    if kind == "exponential":
        period = {k: v for k, v in args.items() if k in ("every_steps", "every_epochs") and v is not None}
        every = _steps(name, period, "every_steps", "every_epochs", steps_per_epoch, None)
        if every < 1:
            raise ConfigError(f"{name}: the decay period must be at least one step, got {every}")
        offset = args.get("offset_steps", every)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ConfigError(f"{name}.offset_steps: expected a non-negative integer, got {offset!r}")
        return Schedule(kind, _number(name, "start", args["start"]) * scale, _number(name, "end", args.get("end", 0.0)),
                        factor=_number(name, "factor", args["factor"]), every=every, offset=offset)
    total = _steps(name, args, "total_steps", "epochs", steps_per_epoch, total_steps)
    end = _number(name, "end", args["end"])
    if kind == "warmup_cosine":
        warmup = _steps(name, args, "warmup_steps", "warmup_epochs", steps_per_epoch, 0)
        return Schedule(kind, _number(name, "start", args.get("start", 0.0)), end,
                        peak=_number(name, "peak", args["peak"]) * scale, warmup=warmup, total=total,
                        linspace=bool(args.get("warmup_linspace", False)))
    return Schedule(kind, _number(name, "start", args["start"]) * scale, end, total=total)


class Schedules:
    """Every scalar of ``cfg["schedules"]``: ``at(step) -> {name: value}``."""

    def __init__(self, specs: dict | None, *, steps_per_epoch: int | None = None, total_steps: int | None = None,
                 global_batch: int | None = None, defaults: dict | None = None):
        specs = {**(defaults or {}), **(specs or {})}
        self.schedules = {k: make_schedule(v, name=f"schedules.{k}", steps_per_epoch=steps_per_epoch,
                                           total_steps=total_steps, global_batch=global_batch)
                          for k, v in specs.items()}

    def at(self, step: int) -> dict[str, float]:
        return {k: s.value(step) for k, s in self.schedules.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.schedules

    def __getitem__(self, name: str) -> Schedule:
        return self.schedules[name]
