"""Which samples go where: stratified splits, nested label-efficiency subsets (manifest ``subsets``), a
dataset's split assignment and key locations, and ``split/key`` split files (MEM's format)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from evforge.errors import InputError
from evforge.formats.atomic import atomic_write_text
from evforge.formats.manifest import Manifest
from evforge.formats.shards import ShardReader

__all__ = ["DEFAULT_PERCENTS", "stratified_split", "label_subsets", "make_subsets", "split_assignment",
           "locate_keys", "write_split_file", "split_file_lines", "read_split_file", "read_subset_file",
           "SUBSET_FILE_SUFFIXES"]

DEFAULT_PERCENTS = (2, 5, 10, 20, 50)


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


# ------------------------------------------------------------------------------ keys of a built dataset
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
    atomic_write_text(path, "".join(lines))
    return path


def split_file_lines(path, *, expect: str = "split/key") -> list[tuple[int, str, str, str]]:
    """``(line number, split, key, line)`` of each non-blank line of a split file; InputError naming the file
    when it cannot be read as UTF-8 or a line is not ``expect`` (``split/key``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read split file ({getattr(err, 'strerror', None) or err})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        split, sep, key = line.partition("/")
        if not sep or not split or not key:
            raise InputError(path, f"line {n}: expected '{expect}', got {line!r}")
        out.append((n, split, key, line))
    return out


def read_split_file(path) -> dict[str, list[str]]:
    """Read ``split/key`` lines into ``{split: [keys]}`` (blank lines skipped; InputError on a bad line)."""
    out: dict[str, list[str]] = {}
    for _, split, key, _ in split_file_lines(path):
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
