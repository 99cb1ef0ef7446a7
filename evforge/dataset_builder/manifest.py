"""Dataset manifests: one JSON file next to the shards saying what the dataset holds and how to check it.

Schema version 1 (field tables in ``docs/FORMAT.md``): ``schema_version, name, sensor_size [W, H], kind,
classes, splits, shards, subsets, provenance, stats``.

Design choices:

* **A shard belongs to exactly one split.** Builders assign samples to splits first and write each split's
  shards separately (``train-00000.h5``, ``val-00000.h5``, ...). ``shards[i].split`` is authoritative and
  ``splits[s].shards`` lists the same paths, so a loader opens only its split's files and a split's counts
  are sums over whole shards.
* **Subsets are lists of sample keys** (``{"split", "percent", "seed", "keys"}``): keys are unique in the
  dataset, readable, survive re-sharding and are what MEM's split files hold; :func:`locate_keys` maps them
  to (shard, index) through the shards' in-file index.
* **Paths are relative** POSIX paths, normalised, that stay inside the dataset root (the manifest's folder)
  also after following symlinks. ``provenance.source_root`` is a record of where the input was, not a path
  into the dataset, and may be absolute.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import re
import shlex
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import h5py
import hdf5plugin
import numpy as np
import torch

import evforge
from evforge.atomic import atomic_write_text as _atomic_write_text
from evforge.errors import InputError

from .completion import incomplete_problem
from .shards import KINDS, ShardReader, sha256_file

__all__ = [
    "SCHEMA_VERSION", "MANIFEST_NAME", "Manifest", "build_manifest", "make_provenance", "compute_stats",
    "verify", "stratified_split", "label_subsets", "make_subsets", "write_split_file", "read_split_file",
    "read_subset_file",
    "split_assignment", "locate_keys", "path_problem",
]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
DEFAULT_PERCENTS = (2, 5, 10, 20, 50)

_FIELDS = ("schema_version", "name", "sensor_size", "kind", "classes", "splits", "shards", "subsets",
           "provenance", "stats")
_SHARD_FIELDS = {"path": str, "sha256": str, "bytes": int, "num_samples": int, "num_events": int, "split": str}
_SPLIT_FIELDS = {"shards": list, "num_samples": int, "num_events": int}
_PROVENANCE_FIELDS = {"source_root": (str, type(None)), "converter": str, "converter_params": dict,
                      "simulator_params": (dict, type(None)), "evforge_version": str, "command": str,
                      "created": str, "python": str, "torch": str, "h5py": str}
_SHA_RE = re.compile(r"[0-9a-f]{64}")


# ----------------------------------------------------------------------------------------- the manifest
@dataclass
class Manifest:
    """Plain data mirroring the JSON file; nested parts are dicts and lists exactly as stored."""

    name: str
    sensor_size: list[int]
    kind: str
    classes: list[str]
    splits: dict[str, dict]
    shards: list[dict]
    subsets: dict[str, dict] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        self.sensor_size = list(self.sensor_size)
        self.classes = list(self.classes)

    # ---- conversion
    def to_dict(self) -> dict:
        return {name: copy.deepcopy(getattr(self, name)) for name in _FIELDS}

    @classmethod
    def from_dict(cls, data) -> "Manifest":
        problem = schema_problem(data)
        if problem:
            raise ValueError(problem)
        return cls(**{name: data[name] for name in _FIELDS})

    def to_json(self) -> str:
        self.validate()
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False, default=_json_default) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"not valid JSON ({err})") from None
        return cls.from_dict(data)

    def validate(self) -> None:
        """Raise ValueError for the first schema problem (fields, types, paths, split/shard consistency)."""
        problem = schema_problem(json.loads(json.dumps(self.to_dict(), default=_json_default)))
        if problem:
            raise ValueError(problem)

    # ---- files
    def save(self, path) -> Path:
        """Write atomically (temp file, fsync, rename)."""
        path = Path(path)
        _atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, path) -> "Manifest":
        """Read and validate a manifest; the dataset root is its folder. InputError names the manifest file,
        also when the folder is marked incomplete (a build has not finished: :mod:`.completion`)."""
        path = Path(path)
        problem = incomplete_problem(path.absolute().parent)
        if problem:
            raise InputError(path, problem)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(path, "no such file") from None
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(path, f"cannot read manifest ({err})") from None
        try:
            manifest = cls.from_json(text)
        except ValueError as err:
            raise InputError(path, f"invalid manifest: {err}") from None
        root = path.absolute().parent
        for entry in manifest.shards:
            problem = _escape_problem(root, entry["path"])
            if problem:
                raise InputError(path, f"invalid manifest: {problem}")
        return manifest

    # ---- queries
    @property
    def num_samples(self) -> int:
        return sum(s["num_samples"] for s in self.splits.values())

    @property
    def num_events(self) -> int:
        return sum(s["num_events"] for s in self.splits.values())

    def shards_of(self, split: str) -> list[dict]:
        return [entry for entry in self.shards if entry["split"] == split]

    def shard_paths(self, root, split: str | None = None) -> list[Path]:
        """Absolute shard paths under ``root`` (the manifest's folder), of one split or all."""
        return [Path(root) / e["path"] for e in self.shards if split is None or e["split"] == split]


def _json_default(value):
    """numpy scalars and arrays in params become plain JSON numbers and lists."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _type_ok(value, expected) -> bool:
    if expected is int:
        return _is_int(value) and value >= 0
    return isinstance(value, expected)


def path_problem(p) -> str | None:
    """Why ``p`` is not a normalised relative POSIX path inside the root (None when it is)."""
    if not isinstance(p, str) or not p:
        return f"path {p!r} is empty or not a string"
    if "\\" in p or "\0" in p or "\n" in p:
        return f"path {p!r} contains a backslash, NUL or newline"
    if p.startswith("/") or re.match(r"[A-Za-z]:", p):
        return f"path {p!r} is absolute (paths are relative to the dataset root)"
    parts = p.split("/")
    if ".." in parts:
        return f"path {p!r} leaves the dataset root"
    if any(part in ("", ".") for part in parts):
        return f"path {p!r} is not normalised"
    return None


def _escape_problem(root: Path, rel: str) -> str | None:
    """Why ``root/rel`` resolves (following symlinks) outside ``root``, or None."""
    real_root = root.resolve()
    target = (root / rel).resolve()
    if not target.is_relative_to(real_root):
        return f"path {rel!r} resolves outside the dataset root (to {target})"
    return None


def schema_problem(data) -> str | None:
    """The first schema problem of a manifest dict, or None (no filesystem access)."""
    if not isinstance(data, dict):
        return "top level is not a JSON object"
    version = data.get("schema_version")
    if not _is_int(version):
        return f"schema_version missing or not an integer ({version!r})"
    if version > SCHEMA_VERSION:
        return f"schema_version {version} is newer than this evforge reads ({SCHEMA_VERSION}): upgrade evforge"
    if version != SCHEMA_VERSION:
        return f"unsupported schema_version {version}"
    missing = [k for k in _FIELDS if k not in data]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        return f"unknown field(s) {', '.join(unknown)}"
    if not isinstance(data["name"], str) or not data["name"]:
        return "name must be a non-empty string"
    size = data["sensor_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)):
        return f"sensor_size must be [width, height] positive integers, got {size!r}"
    if data["kind"] not in KINDS:
        return f"kind must be one of {', '.join(KINDS)}, got {data['kind']!r}"
    classes = data["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) and c for c in classes):
        return "classes must be a list of non-empty strings"
    if len(set(classes)) != len(classes):
        return "class names are not unique"
    for name in ("splits", "subsets", "provenance", "stats"):
        if not isinstance(data[name], dict):
            return f"{name} must be an object"
    if not isinstance(data["shards"], list):
        return "shards must be a list"
    return _shards_problem(data) or _subsets_problem(data) or _provenance_problem(data["provenance"])


def _shards_problem(data) -> str | None:
    splits, shards = data["splits"], data["shards"]
    for name, info in splits.items():
        if not name or "/" in name or "\n" in name:
            return f"split name {name!r} is empty or contains '/' or a newline"
        if not isinstance(info, dict) or set(info) != set(_SPLIT_FIELDS):
            return f"splits.{name} must have exactly the fields {', '.join(_SPLIT_FIELDS)}"
        for key, expected in _SPLIT_FIELDS.items():
            if not _type_ok(info[key], expected):
                return f"splits.{name}.{key} has a wrong type or a negative value ({info[key]!r})"
        if not all(isinstance(p, str) for p in info["shards"]):
            return f"splits.{name}.shards must list path strings"
    by_path = {}
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict) or set(entry) != set(_SHARD_FIELDS):
            return f"shards[{i}] must have exactly the fields {', '.join(_SHARD_FIELDS)}"
        for key, expected in _SHARD_FIELDS.items():
            if not _type_ok(entry[key], expected):
                return f"shards[{i}].{key} has a wrong type or a negative value ({entry[key]!r})"
        problem = path_problem(entry["path"])
        if problem:
            return f"shards[{i}]: {problem}"
        if not _SHA_RE.fullmatch(entry["sha256"]):
            return f"shards[{i}].sha256 is not 64 lowercase hex digits"
        if entry["path"] in by_path:
            return f"shard {entry['path']!r} is listed twice"
        if entry["split"] not in splits:
            return f"shards[{i}].split {entry['split']!r} is not in splits"
        by_path[entry["path"]] = entry["split"]
    for name, info in splits.items():
        listed = info["shards"]
        for p in listed:
            if by_path.get(p) != name:
                return f"splits.{name}.shards lists {p!r}, which is not a shard of split {name!r}"
        expected = [p for p, s in by_path.items() if s == name]
        if len(listed) != len(set(listed)) or set(listed) != set(expected):
            return f"splits.{name}.shards does not list exactly the shards whose split is {name!r}"
    return None


def _subsets_problem(data) -> str | None:
    for name, sub in data["subsets"].items():
        if not isinstance(sub, dict) or not {"split", "keys"} <= set(sub) <= {"split", "keys", "percent", "seed"}:
            return f"subsets.{name} must have fields split, keys (and optionally percent, seed)"
        if sub["split"] not in data["splits"]:
            return f"subsets.{name}.split {sub['split']!r} is not in splits"
        if not isinstance(sub["keys"], list) or not all(isinstance(k, str) and k for k in sub["keys"]):
            return f"subsets.{name}.keys must be a list of sample keys"
        if len(set(sub["keys"])) != len(sub["keys"]):
            return f"subsets.{name}.keys has duplicates"
        pct = sub.get("percent")
        if pct is not None and (isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0 < pct <= 100):
            return f"subsets.{name}.percent must be in (0, 100], got {pct!r}"
        if sub.get("seed") is not None and not _is_int(sub["seed"]):
            return f"subsets.{name}.seed must be an integer"
    return None


def _provenance_problem(prov: dict) -> str | None:
    for key, expected in _PROVENANCE_FIELDS.items():
        if key not in prov:
            return f"provenance.{key} is missing"
        if not isinstance(prov[key], expected):
            return f"provenance.{key} has a wrong type ({type(prov[key]).__name__})"
    return None


# ------------------------------------------------------------------------------------------- building
def make_provenance(*, converter: str, source_root=None, converter_params: dict | None = None,
                    simulator_params: dict | None = None, command: str | None = None) -> dict:
    """Provenance record: inputs and parameters, plus versions, command line and UTC time of this run."""
    return {
        "source_root": None if source_root is None else os.fspath(Path(source_root).absolute()),
        "converter": converter,
        "converter_params": dict(converter_params or {}),
        "simulator_params": None if simulator_params is None else dict(simulator_params),
        "evforge_version": evforge.__version__,
        "command": shlex.join(sys.argv) if command is None else command,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": str(torch.__version__),
        "h5py": h5py.__version__,
        "hdf5plugin": hdf5plugin.version,
    }


def _summary(values: np.ndarray) -> dict | None:
    if len(values) == 0:
        return None
    return {"mean": float(np.mean(values)), "median": float(np.median(values)),
            "min": values.min().item(), "max": values.max().item()}


def compute_stats(event_counts, durations_us, labels, classes: Sequence[str]) -> dict:
    """Summary statistics of a set of samples: events per sample, duration (us), event rate (events/s, over
    samples with a positive duration), samples per class and unlabelled samples."""
    counts = np.asarray(event_counts, dtype=np.int64).reshape(-1)
    durations = np.asarray(durations_us, dtype=np.int64).reshape(-1)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if not len(counts) == len(durations) == len(labels):
        raise ValueError(f"lengths differ: {len(counts)} counts, {len(durations)} durations, {len(labels)} labels")
    if len(labels) and labels.max() >= len(classes):
        raise ValueError(f"label {labels.max()} has no class name ({len(classes)} classes)")
    positive = durations > 0
    per_class = np.bincount(labels[labels >= 0], minlength=len(classes))
    return {
        "num_samples": int(len(counts)),
        "num_events": int(counts.sum()),
        "events_per_sample": _summary(counts),
        "duration_us": _summary(durations),
        "event_rate_hz": _summary(counts[positive] / (durations[positive] * 1e-6)),
        "per_class": {name: int(n) for name, n in zip(classes, per_class)},
        "unlabeled": int((labels < 0).sum()),
    }


def build_manifest(root, *, name: str, shards: Mapping[str, Sequence], classes: Sequence[str], provenance: dict,
                   subsets: dict | None = None) -> Manifest:
    """Describe finished shards (``{split: [paths]}``, inside ``root``): hashes, counts, splits and stats.

    Reads each shard's index once; sensor size and kind must agree across shards. Save the result with
    ``manifest.save(root / MANIFEST_NAME)``.
    """
    root = Path(root)
    entries, splits, per_split = [], {}, {}
    sensor, kind = None, None
    for split, paths in shards.items():
        cols = {"count": [], "duration": [], "label": []}
        rels = []
        for p in paths:
            p = Path(p) if Path(p).is_absolute() else root / p
            rel = Path(os.path.relpath(os.path.abspath(p), os.path.abspath(root))).as_posix()
            problem = path_problem(rel) or _escape_problem(root.absolute(), rel)
            if problem:
                raise ValueError(f"{p}: {problem}")
            with ShardReader(p) as reader:
                if sensor is None:
                    sensor, kind = reader.sensor_size, reader.kind
                if (reader.sensor_size, reader.kind) != (sensor, kind):
                    raise ValueError(f"{p}: {reader.kind} shard of {reader.width}x{reader.height}, but earlier "
                                     f"shards are {kind} of {sensor[0]}x{sensor[1]}")
                ix = reader.index
                if len(ix) and ix["label"].max() >= len(classes):
                    raise ValueError(f"{p}: label {ix['label'].max()} has no class name ({len(classes)} classes)")
                cols["count"].append(ix["count"].astype(np.int64))
                cols["duration"].append(ix["t_end"] - ix["t_start"])
                cols["label"].append(ix["label"])
                entries.append({"path": rel, "sha256": sha256_file(p), "bytes": p.stat().st_size,
                                "num_samples": reader.num_samples, "num_events": reader.num_events, "split": split})
            rels.append(rel)
        per_split[split] = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in cols.items()}
        splits[split] = {"shards": rels, "num_samples": len(per_split[split]["count"]),
                         "num_events": int(per_split[split]["count"].sum())}
    if sensor is None:
        raise ValueError(f"{root}: no shards given")
    everything = {k: np.concatenate([c[k] for c in per_split.values()]) for k in ("count", "duration", "label")}
    stats = {"all": compute_stats(everything["count"], everything["duration"], everything["label"], classes),
             "splits": {s: compute_stats(c["count"], c["duration"], c["label"], classes)
                        for s, c in per_split.items()}}
    manifest = Manifest(name=name, sensor_size=list(sensor), kind=kind, classes=list(classes), splits=splits,
                        shards=entries, subsets=dict(subsets or {}), provenance=dict(provenance), stats=stats)
    manifest.validate()
    return manifest


# ------------------------------------------------------------------------------------------- checking
def verify(manifest_path) -> list[str]:
    """Every fault found in a dataset, as ``"<path>: <problem>"`` lines (empty list: all good).

    Checks the manifest schema, each shard's presence, size, sha256, attrs and index counts against the
    manifest, the shard invariants (:meth:`ShardReader.check`, read in blocks), labels against the classes,
    key uniqueness across shards, split totals, stats totals, and that subset keys exist in their split.
    """
    manifest_path = Path(manifest_path)
    try:
        m = Manifest.load(manifest_path)
    except InputError as err:
        return [str(err)]
    root = manifest_path.absolute().parent
    faults: list[str] = []
    key_split: dict[str, str] = {}
    duplicate = None
    all_read = True
    for entry in m.shards:
        p = root / entry["path"]
        if not p.is_file():
            faults.append(f"{p}: missing shard")
            all_read = False
            continue
        size = p.stat().st_size
        if size != entry["bytes"]:
            faults.append(f"{p}: size {size} bytes, manifest says {entry['bytes']}")
        digest = sha256_file(p)
        if digest != entry["sha256"]:
            faults.append(f"{p}: sha256 mismatch (manifest {entry['sha256'][:12]}..., file {digest[:12]}...)")
        try:
            reader = ShardReader(p)
        except InputError as err:
            faults.append(str(err))
            all_read = False
            continue
        with reader:
            for what, got in (("num_samples", reader.num_samples), ("num_events", reader.num_events)):
                if got != entry[what]:
                    faults.append(f"{p}: {what} is {got} in the shard, manifest says {entry[what]}")
            if int(reader.index["count"].sum()) != entry["num_events"]:
                faults.append(f"{p}: index counts sum to {int(reader.index['count'].sum())} events, "
                              f"manifest says {entry['num_events']}")
            if reader.kind != m.kind or list(reader.sensor_size) != m.sensor_size:
                faults.append(f"{p}: {reader.kind} shard of {reader.width}x{reader.height}, manifest says "
                              f"{m.kind} of {m.sensor_size[0]}x{m.sensor_size[1]}")
            labels = reader.index["label"]
            if len(labels) and labels.max() >= len(m.classes):
                faults.append(f"{p}: label {labels.max()} has no class name ({len(m.classes)} classes)")
            for key in reader.keys:
                if key in key_split and duplicate is None:
                    duplicate = f"{p}: sample key {key!r} also appears in another shard"
                key_split[key] = entry["split"]
            faults.extend(reader.check())
    if duplicate:
        faults.append(duplicate)
    for split, info in m.splits.items():
        for what in ("num_samples", "num_events"):
            total = sum(e[what] for e in m.shards if e["split"] == split)
            if info[what] != total:
                faults.append(f"{manifest_path}: splits.{split}.{what} = {info[what]}, its shards hold {total}")
    overall = m.stats.get("all") if isinstance(m.stats.get("all"), dict) else {}
    for what in ("num_samples", "num_events"):
        total = sum(e[what] for e in m.shards)
        if what in overall and overall[what] != total:
            faults.append(f"{manifest_path}: stats.all.{what} = {overall[what]}, the shards hold {total}")
    if all_read:  # keys of unreadable shards are unknown: checking subsets would only repeat that fault
        for name, sub in m.subsets.items():
            bad = [k for k in sub["keys"] if key_split.get(k) != sub["split"]]
            if bad:
                faults.append(f"{manifest_path}: subsets.{name}: {len(bad)} key(s) not in split "
                              f"{sub['split']!r}, e.g. {bad[0]!r}")
    return faults


def split_assignment(manifest_path) -> dict[str, list[str]]:
    """``{split: [sample keys]}`` in shard order, read from the shards' indices."""
    manifest_path = Path(manifest_path)
    m = Manifest.load(manifest_path)
    out: dict[str, list[str]] = {s: [] for s in m.splits}
    for entry in m.shards:
        out[entry["split"]].extend(ShardReader(manifest_path.absolute().parent / entry["path"]).keys)
    return out


def locate_keys(manifest_path, keys: Iterable[str]) -> dict[str, tuple[Path, int]]:
    """Map sample keys (e.g. a subset's) to ``(shard path, index in shard)``; KeyError names a missing key."""
    manifest_path = Path(manifest_path)
    m = Manifest.load(manifest_path)
    where: dict[str, tuple[Path, int]] = {}
    for path in m.shard_paths(manifest_path.absolute().parent):
        for i, key in enumerate(ShardReader(path).keys):
            where[key] = (path, i)
    out = {}
    for key in keys:
        if key not in where:
            raise KeyError(f"{manifest_path}: no sample with key {key!r}")
        out[key] = where[key]
    return out


# -------------------------------------------------------------------------------- splits and subsets
def _nested_counts(sizes: np.ndarray, fractions: Sequence[float], rng: np.random.Generator, *,
                   min_one: bool) -> np.ndarray:
    """Per class (rows) and increasing fraction (columns): how many of the class's samples a nested prefix holds.

    Each count is the floor or ceiling of ``fraction * size`` (raised to the previous column's count, so prefixes
    nest, and to 1 for a non-empty class with ``min_one``); the +1s go to the largest fractional parts (random
    ties) until the column total reaches ``round(fraction * N)``, where the lower bounds allow.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    prev = np.zeros(len(sizes), dtype=np.int64)
    columns = []
    for f in fractions:
        x = np.round(f * sizes, 9)  # 0.3 * 10 must floor to 3, not ceil to 4
        lo = np.maximum(np.floor(x).astype(np.int64), prev)
        if min_one:
            lo = np.maximum(lo, (sizes > 0).astype(np.int64))
        hi = np.minimum(np.maximum(np.ceil(x).astype(np.int64), lo), sizes)
        k = lo.copy()
        extra = int(round(f * sizes.sum())) - int(k.sum())
        if extra > 0:
            room = np.flatnonzero(hi > k)  # each of these can take exactly one more
            frac = x[room] - np.floor(x[room])
            order = room[np.lexsort((rng.random(len(room)), -frac))]
            k[order[:extra]] += 1
        columns.append(k)
        prev = k
    return np.stack(columns, axis=1) if columns else np.zeros((len(sizes), 0), dtype=np.int64)


def _shuffled_classes(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """Class values and, per class, its sample indices in a seeded random order."""
    classes, inverse = np.unique(labels, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    groups = np.split(order, np.cumsum(np.bincount(inverse, minlength=len(classes)))[:-1])
    return classes, [rng.permutation(g) for g in groups]


def stratified_split(labels, fractions, seed: int = 0):
    """Split sample indices into parts with the given fractions (summing to 1), class by class.

    ``fractions`` is ``{name: fraction}`` (returns ``{name: sorted indices}``) or a sequence (returns a list).
    Each class's samples are shuffled with ``seed`` and cut at the cumulative fractions (rounded as in
    :func:`label_subsets`), so per class every part is within rounding of its share and parts are disjoint and
    cover everything. Every distinct label (including -1) is its own stratum.
    """
    named = isinstance(fractions, Mapping)
    names = list(fractions) if named else list(range(len(fractions)))
    values = np.asarray([fractions[n] for n in names], dtype=np.float64)
    if not len(values) or np.any(values <= 0) or abs(values.sum() - 1) > 1e-6:
        raise ValueError(f"fractions must be positive and sum to 1, got {list(values)}")
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    _, groups = _shuffled_classes(labels, rng)
    cumulative = np.cumsum(values)
    cumulative[-1] = 1.0
    counts = _nested_counts(np.array([len(g) for g in groups]), cumulative, rng, min_one=False)
    bounds = np.concatenate([np.zeros((len(groups), 1), dtype=np.int64), counts], axis=1)
    parts = [np.sort(np.concatenate([g[bounds[c, j]:bounds[c, j + 1]] for c, g in enumerate(groups)]
                                    or [np.zeros(0, np.int64)]).astype(np.int64))
             for j in range(len(names))]
    return dict(zip(names, parts)) if named else parts


def label_subsets(labels, percents: Sequence[float] = DEFAULT_PERCENTS, seed: int = 0) -> dict:
    """Nested, stratified label-efficiency subsets: ``{percent: sorted indices into labels}``.

    Per class, the samples are shuffled once with ``seed`` and every subset takes a prefix of that order, so
    the 2 % subset lies inside the 5 % one, etc. A class gets the floor or ceiling of ``percent`` % of its
    samples, at least one, and the total is as close to ``percent`` % of all labelled samples as that allows.
    Unlabelled samples (label < 0) are never chosen.
    """
    pcts = [float(p) for p in percents]
    if any(not 0 < p <= 100 for p in pcts):
        raise ValueError(f"percents must be in (0, 100], got {list(percents)}")
    labels = np.asarray(labels).reshape(-1)
    labelled = np.flatnonzero(labels >= 0)
    rng = np.random.default_rng(seed)
    _, groups = _shuffled_classes(labels[labelled], rng)
    groups = [labelled[g] for g in groups]
    ascending = sorted(range(len(pcts)), key=lambda j: pcts[j])
    counts = _nested_counts(np.array([len(g) for g in groups], dtype=np.int64),
                            [pcts[j] / 100 for j in ascending], rng, min_one=True)
    out = {}
    for col, j in enumerate(ascending):
        chosen = [g[: counts[c, col]] for c, g in enumerate(groups)]
        out[percents[j]] = np.sort(np.concatenate(chosen or [np.zeros(0, np.int64)]).astype(np.int64))
    return {p: out[p] for p in percents}


def make_subsets(keys: Sequence[str], labels, *, split: str = "train",
                 percents: Sequence[float] = DEFAULT_PERCENTS, seed: int = 0) -> dict:
    """Manifest ``subsets`` entries ``{"<split>_<p>pct": {"split", "percent", "seed", "keys"}}`` for one split."""
    if len(keys) != len(labels):
        raise ValueError(f"{len(keys)} keys but {len(labels)} labels")
    chosen = label_subsets(labels, percents, seed)
    return {f"{split}_{p:g}pct": {"split": split, "percent": p, "seed": seed, "keys": [keys[i] for i in idx]}
            for p, idx in chosen.items()}


# --------------------------------------------------------------------------------------- split files
def write_split_file(path, assignment: Mapping[str, Iterable[str]]) -> Path:
    """Write ``split/key`` lines (MEM's ``train|val/<class>/image_XXXX`` format), atomically.

    ``assignment`` is ``{split: keys}`` (see :func:`split_assignment`); lines follow its order.
    """
    lines = []
    for split, keys in assignment.items():
        if not split or "/" in split or "\n" in split:
            raise ValueError(f"split name {split!r} is empty or contains '/' or a newline")
        for key in keys:
            if not key or "\n" in key or "\r" in key:
                raise ValueError(f"sample key {key!r} is empty or spans lines")
            lines.append(f"{split}/{key}\n")
    path = Path(path)
    _atomic_write_text(path, "".join(lines))
    return path


def read_split_file(path) -> dict[str, list[str]]:
    """Read ``split/key`` lines into ``{split: [keys]}`` (blank lines skipped; InputError on a bad line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(path, f"cannot read split file ({err.strerror or err})") from None
    out: dict[str, list[str]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        split, sep, key = line.partition("/")
        if not sep or not split or not key:
            raise InputError(path, f"line {n}: expected 'split/key', got {line!r}")
        out.setdefault(split, []).append(key)
    return out


SUBSET_FILE_SUFFIXES = (".npy", ".npz", ".bin", ".dat")


def read_subset_file(path, split: str = "train") -> list[str]:
    """The sample keys a MEM label-efficiency subset file lists for ``split``, in file order.

    MEM's ``configs/splits/fig1-subsets/ncaltech101-<p>percent.txt`` are split files (``train|val/<class>/<name>.npy``
    lines): the ``train`` lines are the subset, a random nested draw from the training split (not stratified: the
    2 % one covers 46 of the 101 classes), and every file repeats the whole ``val`` split. Accepted as they are:
    the lines of other splits are skipped, file suffixes dropped (evforge keys are ``<class>/<name>``).
    """
    keys = []
    for key in read_split_file(path).get(split, []):
        for suffix in SUBSET_FILE_SUFFIXES:
            key = key.removesuffix(suffix)
        keys.append(key)
    if not keys:
        raise InputError(Path(path), f"lists no {split!r} samples")
    if len(set(keys)) != len(keys):
        raise InputError(Path(path), f"lists a {split!r} sample twice")
    return keys
