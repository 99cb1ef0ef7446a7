"""Model configs from plain dicts: unknown keys are errors naming them (a typo in ``task.model`` must not be
silently ignored). Low in the flow so that model files need nothing from the trainer."""

from __future__ import annotations

import dataclasses

from ..errors import ConfigError

__all__ = ["check_fields", "ConfigError"]


def check_fields(cls, given: dict, where: str) -> None:
    """Reject keys of ``given`` that are not fields of the dataclass ``cls`` (a model config), naming them."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(given) - known
    if unknown:
        raise ConfigError(f"{where}: unknown options {sorted(unknown)} (known: {sorted(known)})")
