"""Work units of a dataset build: the plan cut into units (:func:`plan_units`), and one unit converted into its
shard and completion record (:func:`run_unit`, reused on rerun while still valid). The design is in
:mod:`evforge.dataset_builder.build`'s docstring."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from evforge.errors import InputError
from evforge.fingerprint import digest, sources_signature
from evforge.formats.atomic import atomic_write_text
from evforge.formats.shards import DEFAULT_TARGET_BYTES, FORMAT_VERSION, RAW_INDEX_BYTES, ShardWriter, sha256_file
from evforge.watchdog import watch_parent

from .converters import get_converter
from .converters.base import DatasetPlan, SourceItem

__all__ = ["WorkUnit", "UnitResult", "RECORD_SUFFIX", "plan_units", "run_unit", "unit_fingerprint",
           "unit_sources", "record_path"]

RECORD_SUFFIX = ".done.json"


# ------------------------------------------------------------------------------------------- data types
@dataclass(frozen=True)
class WorkUnit:
    """Consecutive items of one split that become one shard, ``<split>/<split>-<index:05d>.h5`` under OUT."""

    unit_id: str  # "<split>-<index:05d>"
    split: str
    index: int
    shard: str  # relative POSIX path under OUT
    items: tuple[SourceItem, ...]

    @property
    def item_keys(self) -> list[str]:
        return [item.key for item in self.items]


@dataclass
class UnitResult:
    """What a unit produced; also the content of its ``.done.json`` record (less ``skipped``)."""

    unit_id: str
    shard: str
    items: list[str]  # the planned item keys
    keys: list[str]  # sample keys written, in shard order
    labels: list[int]
    num_samples: int
    num_events: int
    sha256: str
    bytes: int
    errors: list[dict]  # {"path", "key", "error"} per bad item, sorted by key
    fingerprint: str
    skipped: bool = False  # True: a verified earlier result was reused


class _PartialItem(Exception):
    """An item failed after some of its samples were added: the unit is rewritten without it."""


# ---------------------------------------------------------------------------------------------- planning
def plan_units(plan: DatasetPlan, *, samples_per_unit: int | None = None,
               target_bytes: int = DEFAULT_TARGET_BYTES, size_factor: float = 1.0,
               item_bytes: Callable[[SourceItem], int | None] | None = None) -> list[WorkUnit]:
    """Cut ``plan.items`` into work units (deterministic; see the module docstring).

    With ``samples_per_unit`` every unit holds that many items (the last of a split fewer); otherwise a unit
    grows until the next item would push its estimated raw shard bytes (file size x ``size_factor`` + one index
    row) past ``target_bytes`` (an item larger than that gets a unit of its own; missing files count 0 bytes).
    ``item_bytes``: the converter's estimate of an item's raw bytes where its file does not exist yet (None:
    use the file size).
    """
    if samples_per_unit is not None and samples_per_unit < 1:
        raise ValueError(f"samples_per_unit must be >= 1, got {samples_per_unit}")
    if target_bytes <= 0:
        raise ValueError(f"target_bytes must be positive, got {target_bytes}")
    counts = Counter(item.key for item in plan.items)
    if len(counts) != len(plan.items):
        dup = next(k for k, n in counts.items() if n > 1)
        raise ValueError(f"{plan.name}: the scan produced sample key {dup!r} twice")
    by_split: dict[str, list[SourceItem]] = {}
    for item in sorted(plan.items, key=lambda it: (it.split, it.key)):
        by_split.setdefault(item.split, []).append(item)

    units = []
    for split, items in by_split.items():
        if not split or "/" in split or "\n" in split:
            raise ValueError(f"{plan.name}: split name {split!r} is empty or contains '/' or a newline")
        groups: list[list[SourceItem]] = []
        if samples_per_unit is not None:
            groups = [items[i : i + samples_per_unit] for i in range(0, len(items), samples_per_unit)]
        else:
            size = 0
            for item in items:
                guess = item_bytes(item) if item_bytes is not None else None
                est = (int(_file_size(item.path) * size_factor) if guess is None else int(guess)) + RAW_INDEX_BYTES
                if groups and groups[-1] and size + est <= target_bytes:
                    groups[-1].append(item)
                    size += est
                else:
                    groups.append([item])
                    size = est
        for i, group in enumerate(groups):
            uid = f"{split}-{i:05d}"
            units.append(WorkUnit(unit_id=uid, split=split, index=i, shard=f"{split}/{uid}.h5", items=tuple(group)))
    return units


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


# ------------------------------------------------------------------------------------------ one unit
def unit_fingerprint(converter_name: str, converter_options: dict, plan_params: dict,
                     sources: list | None = None) -> str:
    """sha256 of everything that shapes a unit's shard besides the item keys: converter, options, plan, shard
    format and ``sources`` (the items' source-file signatures, :func:`unit_sources`). A rerun with other settings,
    or after a source file was repaired or replaced, redoes the unit."""
    return digest({"converter": converter_name, "options": converter_options, "plan": plan_params,
                   "format_version": FORMAT_VERSION, "sources": sources or []})


def unit_sources(converter, unit: WorkUnit) -> list:
    """Per item: its key and the size and mtime of its source files (``converter.sources(item)`` when the
    converter reads more than ``item.path``, e.g. DSEC's label images)."""
    files = getattr(converter, "sources", None)
    return [[item.key, sources_signature(files(item) if files else [item.path])] for item in unit.items]


def record_path(shard: Path) -> Path:
    return shard.with_name(shard.name + RECORD_SUFFIX)


def _reusable(unit: WorkUnit, shard: Path, fingerprint: str) -> UnitResult | None:
    """The recorded result of a finished unit if it is still valid (see the module docstring), else None."""
    try:
        record = json.loads(record_path(shard).read_text(encoding="utf-8"))
        result = UnitResult(**record)
    except (OSError, ValueError, TypeError):
        return None
    if (result.unit_id != unit.unit_id or result.shard != unit.shard or result.items != unit.item_keys
            or result.fingerprint != fingerprint or not shard.is_file()):
        return None
    if shard.stat().st_size != result.bytes or sha256_file(shard) != result.sha256:
        return None
    result.skipped = True
    return result


def run_unit(converter_name: str, converter_options: dict, unit: WorkUnit, out_dir, plan_params: dict,
             reuse: bool = True, parent_pid: int | None = None) -> UnitResult:
    """Convert one unit into its shard and completion record; reuse them if a valid record exists (and ``reuse``).

    ``plan_params`` is the plan without its items (``name, kind, sensor_size, classes, params``) plus the shard
    ``compression``; ``converter_options`` are the recorded scan options (part of the fingerprint). Bad input
    never raises: the item is reported in the result's ``errors`` (an item read as ``[]`` simply has no sample;
    stream converters may set ``params["allow_empty"]`` to store samples without events). Other exceptions
    (bugs, a full disk) propagate with the item named; the shard in progress is discarded and, its record being
    gone, the unit is redone on rerun. ``parent_pid``: the build process, when this runs in a worker process
    (the worker ends if the build dies, :mod:`.watchdog`).
    """
    if parent_pid is not None:
        watch_parent(parent_pid)
    shard = Path(out_dir) / unit.shard
    converter = get_converter(converter_name)
    fingerprint = unit_fingerprint(converter_name, converter_options, plan_params, unit_sources(converter, unit))
    params = dict(plan_params["params"])
    plan = DatasetPlan(name=plan_params["name"], kind=plan_params["kind"],
                       sensor_size=tuple(plan_params["sensor_size"]), classes=list(plan_params["classes"]),
                       items=[], params=params)
    # converters that make their source files per unit (tartanair --simulate) make them first and drop them after
    prepare, finish = getattr(converter, "prepare_unit", None), getattr(converter, "finish_unit", None)
    reused = _reusable(unit, shard, fingerprint) if reuse else None
    if reused is not None:
        if finish is not None:
            finish(unit.items, plan)  # e.g. the intermediate files of a unit killed after its record was written
        return reused
    record_path(shard).unlink(missing_ok=True)  # the shard is about to change: no stale record may vouch for it
    if prepare is not None:
        prepare(unit.items, plan)
    errors: dict[str, dict] = {}
    while True:
        try:
            keys, labels, num_events = _write_shard(converter, plan, unit, shard, plan_params, errors)
            break
        except _PartialItem:
            continue  # its error is recorded: write the unit again without it

    result = UnitResult(unit_id=unit.unit_id, shard=unit.shard, items=unit.item_keys, keys=keys, labels=labels,
                        num_samples=len(keys), num_events=num_events, sha256=sha256_file(shard),
                        bytes=shard.stat().st_size, errors=[errors[k] for k in sorted(errors)],
                        fingerprint=fingerprint)
    record = asdict(result)
    del record["skipped"]
    atomic_write_text(record_path(shard), json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    if finish is not None:
        finish(unit.items, plan)
    return result


def _write_shard(converter, plan: DatasetPlan, unit: WorkUnit, shard: Path, plan_params: dict,
                 errors: dict) -> tuple[list[str], list[int], int]:
    """Write the unit's shard, skipping items already in ``errors`` and adding the ones that fail now."""
    keys, labels, num_events = [], [], 0
    attrs = {"dataset": plan.name, "converter": plan_params.get("converter", plan.name), "split": unit.split,
             "unit": unit.unit_id}
    allow_empty = bool(plan.params.get("allow_empty", False))
    with ShardWriter(shard, sensor_size=plan.sensor_size, kind=plan.kind,
                     compression=plan_params.get("compression", "zstd"), attrs=attrs) as writer:
        prefix = f"{writer.path}: "
        for item in unit.items:
            if item.key in errors:
                continue
            try:
                samples = converter.read(item, plan)  # [] is fine: the item yields no sample (e.g. too short)
            except InputError as err:
                errors[item.key] = _error(item, str(err))
                continue
            except Exception as err:  # not bad input: a bug or the machine; name the file and stop
                raise RuntimeError(f"{item.path}: converter {plan.name!r} failed ({type(err).__name__}: {err})") \
                    from err
            for j, s in enumerate(samples):
                try:
                    writer.add_sample(s.events, key=s.key, label=s.label, frame_times=s.frame_times,
                                      attrs=s.attrs, frame_images=s.frame_images, allow_empty=allow_empty)
                except ValueError as err:  # incl. EventFormatError: the sample breaks a shard invariant
                    # the writer names the shard; the report names the source file (and stays run-independent)
                    errors[item.key] = _error(item, f"{item.path}: {str(err).removeprefix(prefix)}")
                    if j:
                        raise _PartialItem(item.key) from None
                    break
                keys.append(s.key)
                labels.append(int(s.label))
                num_events += len(s.events)
    return keys, labels, num_events


def _error(item: SourceItem, message: str) -> dict:
    return {"path": item.path, "key": item.key, "error": " ".join(message.split())}
