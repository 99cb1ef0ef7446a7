"""The dataset build runner: scan -> work units -> one shard each -> ``errors.jsonl`` -> ``manifest.json``.

Output layout (``OUT``)::

    OUT/manifest.json                        the dataset (see docs/FORMAT.md)
    OUT/errors.jsonl                         one {"path", "key", "error"} line per bad source item (maybe empty)
    OUT/<split>/<split>-00000.h5             a shard: the converted items of one work unit
    OUT/<split>/<split>-00000.h5.done.json   its completion record (what the rerun check reads)
    OUT/.evforge.lock                        held while a build runs (two runs on one OUT are refused)
    OUT/.evforge-incomplete                  present while the shards may disagree with the manifest

Design:

* **Units.** :func:`plan_units` sorts the items by ``(split, key)`` and cuts each split into runs of
  consecutive items, by count (``samples_per_unit``) or by the shard size policy (the items' file sizes times
  the converter's ``raw_bytes_per_file_byte``, against ``target_bytes`` of raw shard bytes). The plan is a pure
  function of the scan, so a rerun plans the same units and shard names.
* **One unit, one shard, written atomically.** :func:`run_unit` is a picklable top-level function: it reads
  the items with the converter, writes the shard with :class:`ShardWriter` (temp file + rename), then writes
  ``<shard>.done.json`` atomically. A bad item (the converter's :class:`InputError`, or a sample the writer
  refuses) is left out and reported; the item is atomic (an item that fails after some of its samples were
  added makes the unit start over without it). A unit is skipped on rerun iff its record exists, the shard's
  sha256 equals the record's, the record lists the same item keys, and the same converter, options, plan
  parameters, shard format and source files (size and mtime of each item's files, :mod:`evforge.fingerprint`;
  the record's ``fingerprint``): a tampered or half-replaced shard, or a repaired or replaced source file, is
  redone. ``overwrite=True`` redoes every unit.
* **Completeness.** Before the first shard is touched the build marks ``OUT`` incomplete
  (:mod:`.completion`); the mark goes only after the manifest is written, and every reader refuses a marked
  folder, so a rebuild with other options killed half way can never be read as a dataset.
* **One build per folder.** ``OUT/.evforge.lock`` (:class:`evforge.locks.FolderLock`, the lock ``pretrain`` and
  ``finetune`` take on their run folders) is held from the scan to the manifest.
* **Executors.** ``workers == 1`` runs the units in this process; ``workers > 1`` with joblib (loky
  processes); ``executor="ray"`` as Ray tasks (``address=None`` starts a local Ray on loopback, otherwise it
  connects; on a real cluster every node needs evforge installed and ``OUT`` on a shared file system). joblib
  workers end with the build process (:mod:`evforge.watchdog`): a killed build leaves no orphan writing into
  ``OUT``. The result does not depend on the executor: units are pure functions of their inputs and shards are
  byte-identical for identical input (h5py writes no timestamps).
* **Determinism.** Results are ordered by unit, errors by ``(key, path, error)``, subsets are seeded, and
  :func:`build_manifest` hashes the shards, so a build killed at any moment and rerun ends with the same
  ``errors.jsonl``, shards and manifest as an uninterrupted one. Fields that vary between runs:
  ``provenance.created`` (the time) always; ``provenance.command`` when the command differs (the default is
  synthesised from the arguments that shape the output, so API callers get a stable one); library versions
  and ``source_root`` when the environment or the source location changes. Execution settings (workers,
  executor, address) are deliberately not recorded in ``converter_params``.
* **Cleanup.** A build starts by deleting leftover ``*.tmp-<pid>`` files of killed runs and ends by deleting
  shards (and records) in ``OUT/<split>/`` that the current plan no longer has, so ``OUT`` holds what the
  manifest lists.
* **The environment.** A full disk or a read-only ``OUT`` stops the build with :class:`OutputError` naming the
  file (the CLI's exit code 3); the shard being written is removed, finished units are kept for the rerun.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
from collections import Counter
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from tqdm.auto import tqdm

from evforge.atomic import atomic_write_text
from evforge.errors import InputError, output_error
from evforge.fingerprint import digest, sources_signature
from evforge.locks import FolderLock
from evforge.watchdog import watch_parent

from .completion import mark_complete, mark_incomplete
from .converters import get_converter
from .converters.base import DatasetPlan, SourceItem
from .manifest import MANIFEST_NAME, build_manifest, make_provenance
from .shards import DEFAULT_TARGET_BYTES, FORMAT_VERSION, RAW_INDEX_BYTES, ShardWriter, sha256_file
from .subsets import DEFAULT_PERCENTS, make_subsets, write_split_file

__all__ = ["WorkUnit", "UnitResult", "BuildReport", "plan_units", "run_unit", "build_dataset", "ERRORS_NAME",
           "RECORD_SUFFIX"]

ERRORS_NAME = "errors.jsonl"
RECORD_SUFFIX = ".done.json"
EXECUTORS = ("local", "ray")
_TMP_RE = re.compile(r".+\.tmp-\d+")  # temp files of ShardWriter and the atomic text writes


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


@dataclass
class BuildReport:
    """Outcome of :func:`build_dataset`. ``exit_code`` is 0 unless items failed and errors were not allowed."""

    name: str
    out: Path
    manifest_path: Path
    errors_path: Path
    num_units: int
    units_run: int
    units_skipped: int
    num_samples: int
    num_events: int
    num_errors: int
    splits: dict[str, int] = field(default_factory=dict)  # samples per split
    split_file_path: Path | None = None  # the repository copy of the split, when asked for
    allow_errors: bool = False

    @property
    def exit_code(self) -> int:
        return 0 if self.num_errors == 0 or self.allow_errors else 1


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


# -------------------------------------------------------------------------------------------- executors
def _results(units: list[WorkUnit], args: tuple, *, workers: int, executor: str, address) -> Iterator[UnitResult]:
    """Run ``run_unit(name, options, unit, out, plan_params, reuse)`` for every unit; yield results as they finish."""
    name, options, out, plan_params, reuse = args
    if executor == "ray":
        yield from _ray_results(units, args, workers=workers, address=address)
    elif workers > 1:
        from joblib import Parallel, delayed

        parallel = Parallel(n_jobs=workers, return_as="generator_unordered")
        yield from parallel(delayed(run_unit)(name, options, u, out, plan_params, reuse, os.getpid())
                            for u in units)
    else:
        for u in units:
            yield run_unit(name, options, u, out, plan_params, reuse)


def _ray_results(units, args, *, workers: int, address) -> Iterator[UnitResult]:
    try:
        import ray
    except ImportError:
        raise RuntimeError("executor='ray' needs the ray package (pip install ray)") from None
    name, options, out, plan_params, reuse = args
    started = False
    if not ray.is_initialized():
        if address in (None, "local"):
            # a private single-machine cluster on loopback: no token file, no dashboard
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(address="local", num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
        started = True
    try:
        resources = getattr(get_converter(name), "unit_resources", lambda params: {})(plan_params["params"])
        task = ray.remote(**{"num_cpus": 1, **resources})(run_unit)  # e.g. a GPU for units that simulate
        pending = [task.remote(name, options, u, out, plan_params, reuse) for u in units]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                yield ray.get(ref)
    finally:
        if started:
            ray.shutdown()


# ----------------------------------------------------------------------------------------------- a build
def build_dataset(name: str, src, out, *, workers: int = 1, executor: str = "local", address: str | None = None,
                  allow_errors: bool = False, split_file=None, seed: int = 0, samples_per_unit: int | None = None,
                  target_bytes: int = DEFAULT_TARGET_BYTES, compression: str = "zstd",
                  percents: Sequence[float] = DEFAULT_PERCENTS, progress: bool = True, command: str | None = None,
                  split_copy_dir=None, on_unit_done: Callable[[UnitResult], None] | None = None,
                  overwrite: bool = False, **converter_options) -> BuildReport:
    """Convert dataset ``src`` with converter ``name`` into shards + manifest under ``out``.

    ``converter_options`` go to the converter's ``scan``, with ``split_file`` when given, and ``seed``, ``out`` and
    ``progress`` when the scan takes them (see :func:`_scan_options`). ``seed`` also draws the label-efficiency
    subsets (``percents`` of the train split, nested, stratified). ``split_copy_dir`` (the CLI passes the
    repository's ``manifests/``) receives ``<name>_split.txt`` with every sample's ``split/key``.
    ``on_unit_done`` is called in this process after each unit (progress hooks, tests). Bad items do not stop
    the build: they are listed in ``errors.jsonl`` and counted in the report, whose ``exit_code`` honours
    ``allow_errors``. ``overwrite`` redoes every unit (by default a rerun redoes only what changed).
    InputError for an unusable ``src``; :class:`~evforge.errors.OutputError` when ``out`` cannot be written (disk
    full, read-only, a file) and :class:`~evforge.errors.LockedError` when another run holds it.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    converter = get_converter(name)
    out = Path(out).absolute()
    scan_kwargs, options = _scan_options(converter, converter_options, split_file=split_file, seed=seed, out=out,
                                         progress=progress)
    if command is None:
        command = _default_command(name, src, out, options, samples_per_unit, compression)
    # held from the scan on: a converter may write scratch files under OUT while scanning
    with FolderLock(out, command):
        try:
            return _build_locked(converter, name, src, out, scan_kwargs, options, command, workers=workers,
                                 executor=executor, address=address, allow_errors=allow_errors, seed=seed,
                                 samples_per_unit=samples_per_unit, target_bytes=target_bytes,
                                 compression=compression, percents=percents, progress=progress,
                                 split_copy_dir=split_copy_dir, on_unit_done=on_unit_done, overwrite=overwrite)
        except (OSError, RuntimeError) as err:  # a full disk, a read-only folder: the environment, not the input
            problem = output_error(err, out)
            if problem is None:
                raise
            _remove_temp_files(out)  # what a worker left behind when it failed
            raise problem from err


def _build_locked(converter, name, src, out: Path, scan_kwargs, options, command, *, workers, executor, address,
                  allow_errors, seed, samples_per_unit, target_bytes, compression, percents, progress,
                  split_copy_dir, on_unit_done, overwrite) -> BuildReport:
    """:func:`build_dataset`'s body, run under the folder lock."""
    _remove_temp_files(out)
    plan = converter.scan(Path(src), **scan_kwargs)
    units = plan_units(plan, samples_per_unit=samples_per_unit, target_bytes=target_bytes,
                       size_factor=float(getattr(converter, "raw_bytes_per_file_byte", 1.0)),
                       item_bytes=getattr(converter, "item_bytes", None))
    plan_params = {"name": plan.name, "converter": name, "kind": plan.kind,
                   "sensor_size": [int(v) for v in plan.sensor_size], "classes": list(plan.classes),
                   "params": _jsonable(plan.params), "compression": compression}
    order = {u.unit_id: i for i, u in enumerate(units)}
    results: list[UnitResult] = []
    mark_incomplete(out, command)  # from here on the shards may disagree with manifest.json
    # closing(): an exception here (a crash, Ctrl-C) stops the workers / shuts our Ray down at once
    running = _results(units, (name, options, os.fspath(out), plan_params, not overwrite), workers=workers,
                       executor=executor, address=address)
    with closing(running), tqdm(total=len(units), desc=f"{name} units", unit="unit", disable=not progress) as bar:
        for result in running:
            results.append(result)
            bar.update()
            if on_unit_done is not None:
                on_unit_done(result)
    results.sort(key=lambda r: order[r.unit_id])
    _remove_stale_shards(out, units)

    errors = sorted((e for r in results for e in r.errors), key=lambda e: (e["key"], e["path"], e["error"]))
    errors_path = out / ERRORS_NAME
    atomic_write_text(errors_path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors))

    splits = sorted({u.split for u in units})
    assignment = {s: [k for r, u in zip(results, units) if u.split == s for k in r.keys] for s in splits}
    subsets = {}
    if "train" in assignment:
        train_labels = [lab for r, u in zip(results, units) if u.split == "train" for lab in r.labels]
        if any(lab >= 0 for lab in train_labels):
            subsets = make_subsets(assignment["train"], train_labels, split="train", percents=percents, seed=seed)
    converter_params = {**plan_params["params"], "scan_options": options, "compression": compression,
                        "samples_per_unit": samples_per_unit, "target_bytes": target_bytes,
                        "num_units": len(units), "subset_percents": list(percents), "subset_seed": seed,
                        "num_errors": len(errors)}
    provenance = make_provenance(converter=name, source_root=src, converter_params=converter_params,
                                 command=command)
    manifest = build_manifest(out, name=plan.name, shards={s: [out / u.shard for u in units if u.split == s]
                                                           for s in splits},
                              classes=plan.classes, provenance=provenance, subsets=subsets)
    manifest_path = manifest.save(out / MANIFEST_NAME)
    mark_complete(out)

    split_copy = None
    if split_copy_dir is not None:
        split_copy = write_split_file(Path(split_copy_dir) / f"{plan.name}_split.txt", assignment)
    return BuildReport(name=plan.name, out=out, manifest_path=manifest_path, errors_path=errors_path,
                       num_units=len(units), units_run=sum(not r.skipped for r in results),
                       units_skipped=sum(r.skipped for r in results),
                       num_samples=sum(r.num_samples for r in results), num_events=sum(r.num_events for r in results),
                       num_errors=len(errors), splits={s: len(k) for s, k in assignment.items()},
                       split_file_path=split_copy, allow_errors=allow_errors)


# ---------------------------------------------------------------------------------------------- helpers
_EXECUTION = ("out", "progress")  # given by the build itself, never recorded
# converter options that say where work runs or what is kept on the side, not what a shard holds: not recorded
_EXECUTION_OPTIONS = ("devices", "keep_streams")


def _scan_options(converter, options: dict, *, split_file, seed: int, out: Path,
                  progress: bool) -> tuple[dict, dict]:
    """``(keyword arguments for converter.scan, the part that is recorded)``; ValueError for an unknown option.

    ``split_file`` goes to a scan that takes it (an error otherwise); ``seed``, ``out`` (the dataset folder, for
    converters that write scratch files there) and ``progress`` go to a scan that takes them. Those and the
    options ``devices`` and ``keep_streams`` are execution settings: they are left out of the record (fingerprint,
    provenance) so that the same build in another folder, on other machines or without a progress bar, records
    the same options.
    """
    params = inspect.signature(converter.scan).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    takes = lambda opt: opt in params and opt != "src"
    kwargs = dict(options)
    for opt in kwargs:
        if not (open_ended or takes(opt)) or opt in _EXECUTION:
            known = [p for p in params if p not in ("src", *_EXECUTION)
                     and params[p].kind is not inspect.Parameter.VAR_KEYWORD]
            raise ValueError(f"converter {converter.name!r} has no option {opt!r} (options: {', '.join(known)})")
    if split_file is not None:
        if not (open_ended or takes("split_file")):
            raise ValueError(f"converter {converter.name!r} does not take a split file (its source has its splits)")
        kwargs["split_file"] = os.path.abspath(split_file)
    if takes("seed"):
        kwargs["seed"] = seed
    recorded = {k: v for k, v in kwargs.items() if k not in _EXECUTION_OPTIONS}
    for name, value in (("out", out), ("progress", progress)):
        if takes(name):
            kwargs[name] = value
    return kwargs, _jsonable(recorded)


def _jsonable(value):
    """A JSON round trip: paths become strings, tuples lists (so records and fingerprints compare equal)."""
    return json.loads(json.dumps(value, sort_keys=True, default=lambda v: v.item() if hasattr(v, "item")
                                 else os.fspath(v) if isinstance(v, os.PathLike) else str(v)))


def _default_command(name, src, out, options: dict, samples_per_unit, compression) -> str:
    """A stable ``evforge convert ...`` line from the arguments that shape the output (no execution settings)."""
    argv = ["evforge", "convert", name, os.fspath(src), "--out", os.fspath(out)]
    for key, value in sorted(options.items()):
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    if samples_per_unit is not None:
        argv += ["--samples-per-unit", str(samples_per_unit)]
    if compression != "zstd":
        argv += ["--compression", compression]
    return shlex.join(argv)


def _remove_temp_files(out: Path) -> None:
    """Delete ``*.tmp-<pid>`` leftovers of killed runs in OUT and its split folders (we hold the lock)."""
    for d in [out, *(p for p in out.iterdir() if p.is_dir())]:
        for p in d.iterdir():
            if _TMP_RE.fullmatch(p.name) and p.is_file():
                p.unlink(missing_ok=True)


def _remove_stale_shards(out: Path, units: list[WorkUnit]) -> None:
    """Delete shards and records of an earlier plan (another unit size, fewer items) that this plan lacks."""
    planned = {u.shard for u in units}
    for d in (p for p in out.iterdir() if p.is_dir()):
        pattern = re.compile(re.escape(d.name) + r"-\d{5}\.h5(" + re.escape(RECORD_SUFFIX) + ")?")
        for p in d.iterdir():
            if pattern.fullmatch(p.name) and f"{d.name}/{p.name.removesuffix(RECORD_SUFFIX)}" not in planned:
                p.unlink(missing_ok=True)
