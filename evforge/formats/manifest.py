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
  to (shard, index) through the shards' in-file index (:mod:`.subsets`, which also makes them);
  :func:`~evforge.dataset_builder.verify.verify` checks a dataset against its manifest.
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
from typing import Mapping, Sequence

import h5py
import hdf5plugin
import numpy as np
import torch

import evforge
from evforge.errors import InputError
from evforge.formats.atomic import atomic_write_text
from evforge.formats.completion import incomplete_problem
from evforge.formats.shards import KINDS, ShardReader, sha256_file

__all__ = ["SCHEMA_VERSION", "MANIFEST_NAME", "Manifest", "build_manifest", "make_provenance", "compute_stats",
           "path_problem"]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

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
        atomic_write_text(path, self.to_json())
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
