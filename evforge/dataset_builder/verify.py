"""``evforge verify`` of a dataset: every fault of a manifest and its shards (checksums, counts, invariants,
keys, splits, stats, subsets), as one ``"<path>: <problem>"`` line each."""

from __future__ import annotations

from pathlib import Path

from evforge.errors import InputError
from evforge.formats.manifest import Manifest
from evforge.formats.shards import ShardReader, sha256_file

__all__ = ["verify"]


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
