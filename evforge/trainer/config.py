"""YAML configs: loading with ``_base_`` inheritance and ``--set a.b=value`` overrides, defaults, checks, saving.

Configs are plain nested dicts. :data:`DEFAULTS` holds every key the trainer reads; :func:`load_config` merges
them under the file so ``--set trainer.precision=bf16-mixed`` works even when the file has no ``trainer:``.

No mistake passes silently. :func:`check_config` (run by the trainer before anything else) refuses unknown
top-level keys and unknown keys in every section, naming the closest known one, and checks each value's type
(:data:`TYPES`); a task adds the keys it reads in ``data``, ``optim`` and ``schedules`` through its
``config_keys`` attribute (:class:`~evforge.trainer.task.Task`); ``task`` itself is checked by the task.
:func:`load_config` refuses an override of a value that a schedule replaces (``--set optim.lr=0.5`` when the
config has ``schedules.lr``), naming the schedule to change instead.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from evforge.formats.atomic import atomic_write_text

from ..errors import ConfigError, InputError
from ..models.options import check_fields  # noqa: F401 (re-exported: the old import path)

__all__ = ["ConfigError", "DEFAULTS", "TYPES", "STRICT_SECTIONS", "SCHEDULED", "load_config", "load_yaml",
           "parse_value", "apply_override", "merge", "with_defaults", "check_keys", "check_config", "check_value",
           "save_config", "dump_config", "config_hash"]


# Every key the trainer reads, with its default. Every section is strict (check_config); tasks add their own
# keys of "data", "optim" and "schedules" through their ``config_keys``.
DEFAULTS: dict = {
    "seed": 0,
    "trainer": {
        "accelerator": "auto",          # auto | cpu | cuda | gpu | mps
        "devices": "auto",              # auto | int | list of GPU ids
        "num_nodes": "auto",            # auto (from torchrun / SLURM) | int
        "strategy": "auto",             # auto | ddp | ddp_find_unused_parameters_true | ...
        "precision": "32-true",         # 32-true | bf16-mixed | 16-mixed (aliases: 32, fp32, bf16, 16, fp16)
        "epochs": None,                 # training length in epochs ...
        "max_steps": None,              # ... or in optimizer steps (wins when both are set)
        "accumulate_grad_batches": 1,   # micro-batches per optimizer step
        "grad_clip": None,              # max global L2 norm of the gradients; null = no clipping
        "log_every_n_steps": 10,
        "val_every_n_steps": None,
        "val_every_n_epochs": None,     # validation runs only when one of these is set (and at the end)
        "limit_val_batches": None,      # validate on at most this many batches per rank
        "stop_signals": ["SIGUSR1"],    # on these: checkpoint at the next step and return (SLURM --signal)
        "float32_matmul_precision": None,  # highest | high | medium (TF32 on Ampere+)
    },
    "data": {
        "batch_size": 32,               # per device and micro-batch; global = batch_size*world*accumulate
        "val_batch_size": None,         # null = batch_size
        "num_workers": 0,
        "shuffle": True,
        "drop_last": True,              # train only; validation never drops
        "pin_memory": None,             # null = when CUDA is used
        "persistent_workers": True,
        "prefetch_factor": None,
        "multiprocessing_context": None,  # fork | spawn | forkserver
        "seed_items": True,             # seed the RNGs per item from (seed, epoch, index): exact resume
    },
    "optim": {
        "name": "adamw",                # adamw | adam | sgd
        "lr": 1.0e-3,                   # used when schedules has no "lr"
        "weight_decay": 0.05,           # used when schedules has no "weight_decay"
        "betas": [0.9, 0.999],
        "eps": 1.0e-8,
        "momentum": 0.9,                # sgd
        "nesterov": False,              # sgd
        "fused": None,                  # adam(w): torch's fused kernels (CUDA); null = torch's choice
        "lr_scales": {},                # {regex searched in the parameter name: lr multiplier}, first match
        "no_decay": [],                 # extra name patterns excluded from weight decay
    },
    "schedules": {},                    # {name: schedule spec}; "lr" and "weight_decay" drive the optimizer
    "checkpoint": {
        "every_n_steps": None,          # refresh last.ckpt every N optimizer steps
        "every_n_epochs": 1,            # ... and at the end of every N-th epoch
        "keep_every_n_steps": None,     # also keep step-<N>.ckpt copies every N steps
        "keep_last": None,              # ... at most this many of them (null = all)
    },
    "log": {
        "jsonl": True,                  # <out_dir>/log.jsonl
        "tensorboard": True,            # <out_dir>/tb (skipped with a warning if tensorboard is missing)
        "progress": "auto",             # auto (only on a terminal) | true | false
    },
}
STRICT_SECTIONS = ("trainer", "data", "optim", "checkpoint", "log")

# The type of every key in DEFAULTS: "|"-separated type names (int, number = int or float, bool, str, list, dict,
# null, any); any other word is a literal value (e.g. "auto").
TYPES: dict = {
    "seed": "int",
    "trainer": {
        "accelerator": "str", "devices": "int|str|list", "num_nodes": "int|auto", "strategy": "str",
        "precision": "str|int", "epochs": "number|null", "max_steps": "int|null", "accumulate_grad_batches": "int",
        "grad_clip": "number|null", "log_every_n_steps": "int|null", "val_every_n_steps": "int|null",
        "val_every_n_epochs": "int|null", "limit_val_batches": "int|null", "stop_signals": "list|null",
        "float32_matmul_precision": "highest|high|medium|null",
    },
    "data": {
        "batch_size": "int", "val_batch_size": "int|null", "num_workers": "int", "shuffle": "bool",
        "drop_last": "bool", "pin_memory": "bool|null", "persistent_workers": "bool", "prefetch_factor": "int|null",
        "multiprocessing_context": "fork|spawn|forkserver|null", "seed_items": "bool",
    },
    "optim": {
        "name": "str", "lr": "number", "weight_decay": "number", "betas": "list", "eps": "number",
        "momentum": "number", "nesterov": "bool", "fused": "bool|null", "lr_scales": "dict", "no_decay": "list",
    },
    "schedules": {"lr": "number|dict", "weight_decay": "number|dict"},
    "checkpoint": {"every_n_steps": "int|null", "every_n_epochs": "int|null", "keep_every_n_steps": "int|null",
                   "keep_last": "int|null"},
    "log": {"jsonl": "bool", "tensorboard": "bool", "progress": "auto|bool"},
}
# Values a schedule replaces: overriding them while the schedule is configured would change nothing.
SCHEDULED = {"optim.lr": "lr", "optim.weight_decay": "weight_decay"}


# ---------------------------------------------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``5e-4`` as a float (PyYAML's YAML 1.1 floats need a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_value(text: str) -> Any:
    """A ``--set`` value as YAML: ``3`` -> int, ``1e-3`` -> float, ``true`` -> bool, ``[1, 2]`` -> list, ``null``."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text  # e.g. "a: b: c" -- keep the raw string


def load_yaml(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    """One YAML file as a dict, its ``_base_`` files (a path or a list, relative to it) merged underneath."""
    path = Path(path)
    if path.resolve() in _seen:
        raise InputError(path, f"_base_ cycle: {' -> '.join(str(p) for p in (*_seen, path.resolve()))}")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(path, "no such config file") from None
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise InputError(path, f"invalid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(path, f"a config must be a mapping at the top level, found {type(data).__name__}")
    bases = data.pop("_base_", None)
    if bases is None:
        return data
    out: dict = {}
    for base in [bases] if isinstance(bases, (str, os.PathLike)) else list(bases):
        out = merge(out, load_yaml(path.parent / base, (*_seen, path.resolve())))
    return merge(out, data)


def merge(base: dict, over: dict) -> dict:
    """Deep merge: mappings merge key by key, anything else (lists included) in ``over`` replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def with_defaults(cfg: dict, defaults: dict | None = None) -> dict:
    """``cfg`` merged over the trainer's :data:`DEFAULTS` (or ``defaults``)."""
    return merge(DEFAULTS if defaults is None else defaults, cfg)


def _suggest(key: str, choices: Iterable[str]) -> str:
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(key, choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return hint + (f" (have: {', '.join(sorted(choices))})" if choices and len(choices) <= 30 else "")


def apply_override(cfg: dict, item: str) -> None:
    """Apply one ``a.b.c=value`` in place; the parents (``a``, ``a.b``) must exist as mappings, the leaf may be new."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE (e.g. trainer.max_steps=100)")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override {item!r}: empty name in key {key!r}")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if part not in node:
            raise ConfigError(f"{key}: no section {where!r} in the config{_suggest(part, node.keys())}")
        if not isinstance(node[part], dict):
            raise ConfigError(f"{key}: {where!r} is a {type(node[part]).__name__}, not a section")
        node = node[part]
    node[parts[-1]] = parse_value(text.strip())


def load_config(path: str | os.PathLike, overrides: Iterable[str] = (), *, defaults: dict | None = None) -> dict:
    """The config: :data:`DEFAULTS` (or ``defaults``; ``{}`` for none) < ``_base_`` files < the file < ``overrides``.

    An override of a value that a configured schedule replaces (:data:`SCHEDULED`) is a :class:`ConfigError`
    naming the schedule: it would change nothing."""
    cfg = with_defaults(load_yaml(path), defaults)
    keys = []
    for item in overrides or ():
        apply_override(cfg, item)
        keys.append(item.partition("=")[0].strip())
    schedules = cfg.get("schedules") if isinstance(cfg.get("schedules"), dict) else {}
    for key in keys:
        name = SCHEDULED.get(key)
        if name is not None and schedules.get(name) is not None:
            raise ConfigError(f"{key}: this config schedules it (schedules.{name} = {schedules[name]!r}), which "
                              f"replaces {key}; override the schedule instead (e.g. --set schedules.{name}=VALUE "
                              f"for a constant, or one of its fields)")
    return cfg


_TYPE_NAMES = {"int", "number", "bool", "str", "list", "dict", "null", "any"}


def _is_type(value, name: str) -> bool:
    if name == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "bool":
        return isinstance(value, bool)
    if name == "str":
        return isinstance(value, str)
    if name == "list":
        return isinstance(value, (list, tuple))
    if name == "dict":
        return isinstance(value, dict)
    if name == "null":
        return value is None
    return name == "any"


def check_value(key: str, value, spec: str) -> None:
    """:class:`ConfigError` naming ``key`` unless ``value`` fits ``spec`` (see :data:`TYPES`)."""
    options = spec.split("|")
    if any(_is_type(value, o) if o in _TYPE_NAMES else value == o for o in options):
        return
    words = {"int": "an integer", "number": "a number", "bool": "true or false", "str": "a string",
             "list": "a list", "dict": "a mapping", "null": "null"}
    want = " or ".join(words.get(o, repr(o)) for o in options)
    raise ConfigError(f"{key}: expected {want}, got {value!r}")


def check_config(cfg: dict, task_keys: dict | None = None) -> None:
    """Refuse unknown keys (with the closest known one) and values of the wrong type, in every section.

    ``task_keys`` (a task's ``config_keys``): ``{"data": {key: type}, "optim": {...}, "schedules": {name: type}}``,
    the keys the task reads besides the trainer's. The ``task`` section is the task's to check; ``schedules`` names
    are checked when the task declares its schedules (otherwise any name is accepted, for tasks that do not).
    """
    task_keys = task_keys or {}
    known = {**TYPES, "task": "dict|null"}
    for key, value in cfg.items():
        if key not in known:
            raise ConfigError(f"{key}: unknown top-level key{_suggest(key, known)}")
        spec = known[key]
        if isinstance(spec, str):
            check_value(key, value, spec)
            continue
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), found {type(value).__name__}")
        section = {**spec, **task_keys.get(key, {})}
        open_names = key == "schedules" and "schedules" not in task_keys
        for k, v in value.items():
            if k not in section:
                if open_names:
                    check_value(f"{key}.{k}", v, "number|dict|null")
                    continue
                raise ConfigError(f"{key}.{k}: unknown key{_suggest(k, section)}")
            check_value(f"{key}.{k}", v, section[k])


def check_keys(cfg: dict, sections: Iterable[str] = STRICT_SECTIONS, defaults: dict | None = None) -> None:
    """Reject keys of the strict ``sections`` that the defaults do not know (typos), naming them."""
    defaults = DEFAULTS if defaults is None else defaults
    for sec in sections:
        val = cfg.get(sec)
        if val is None:
            continue
        if not isinstance(val, dict):
            raise ConfigError(f"{sec}: expected a section (mapping), found {type(val).__name__}")
        for k in val:
            if k not in defaults[sec]:
                raise ConfigError(f"{sec}.{k}: unknown key{_suggest(k, defaults[sec].keys())}")


def check_option_keys(given: dict, defaults: dict, where: str, open_paths: Iterable[str] = ()) -> None:
    """Reject option names that ``defaults`` does not know (typos) in ``given`` and its nested sections,
    naming the closest known one; the sections at ``open_paths`` (e.g. ``task.model.kwargs``) are free-form."""
    for k, v in given.items():
        if k not in defaults:
            close = difflib.get_close_matches(k, list(defaults), n=1)
            raise ConfigError(f"{where}.{k}: unknown option" + (f"; did you mean {close[0]!r}?" if close else ""))
        if isinstance(v, dict) and isinstance(defaults[k], dict) and f"{where}.{k}" not in open_paths:
            check_option_keys(v, defaults[k], f"{where}.{k}", open_paths)


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (empty dicts kept as values)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_int(cfg: dict, sec: str, key: str, minimum: int, optional: bool = True):
    """``cfg[sec][key]`` checked to be an integer >= ``minimum`` (or None when ``optional``)."""
    v = cfg[sec][key]
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{sec}.{key}: expected an integer >= {minimum}{' or null' if optional else ''}, got {v!r}")
    return v


def dump_config(cfg: dict) -> str:
    """YAML text of a config (keys in their order)."""
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=120)


def save_config(cfg: dict, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML, atomically (temp file + rename)."""
    atomic_write_text(path, dump_config(cfg))


def config_hash(cfg: dict) -> str:
    """16 hex digits identifying a config's content (independent of key order)."""
    text = json.dumps(cfg, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
