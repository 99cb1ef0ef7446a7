"""The dataset build runner: scan -> work units -> one shard each -> ``errors.jsonl`` -> ``manifest.json``.

The units are planned and converted in :mod:`.build_units` and run by :mod:`.build_executors`; this module
runs a whole build around them (lock, scan, completion mark, cleanup, errors, manifest, split file).

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
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from evforge.errors import output_error
from evforge.formats.atomic import atomic_write_text
from evforge.formats.completion import mark_complete, mark_incomplete
from evforge.formats.manifest import MANIFEST_NAME, build_manifest, make_provenance
from evforge.formats.shards import DEFAULT_TARGET_BYTES
from evforge.locks import FolderLock

from .build_executors import EXECUTORS, unit_results
from .build_units import RECORD_SUFFIX, UnitResult, WorkUnit, plan_units, run_unit
from .converters import get_converter
from .subsets import DEFAULT_PERCENTS, make_subsets, write_split_file

__all__ = ["WorkUnit", "UnitResult", "BuildReport", "plan_units", "run_unit", "build_dataset", "ERRORS_NAME",
           "RECORD_SUFFIX"]

ERRORS_NAME = "errors.jsonl"
_TMP_RE = re.compile(r".+\.tmp-\d+")  # temp files of ShardWriter and the atomic text writes


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
    running = unit_results(units, (name, options, os.fspath(out), plan_params, not overwrite), workers=workers,
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
