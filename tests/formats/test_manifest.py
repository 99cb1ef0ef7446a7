"""Manifests: JSON round trip, path containment, verify, stratified splits, nested label subsets, split files."""

from __future__ import annotations

import json
import os
from collections import Counter

import h5py
import numpy as np
import pytest

from evforge.dataset_builder.subsets import (
    label_subsets,
    locate_keys,
    make_subsets,
    read_split_file,
    split_assignment,
    stratified_split,
    write_split_file,
)
from evforge.dataset_builder.verify import verify
from evforge.errors import InputError
from evforge.formats.events import make_events
from evforge.formats.manifest import MANIFEST_NAME, Manifest, build_manifest, compute_stats, make_provenance
from evforge.formats.shards import ShardWriter

W, H = 40, 30
CLASSES = ["airplanes", "cars", "dogs"]


def events_for(i, n):
    rng = np.random.default_rng(i)
    t = np.sort(rng.integers(0, 50_000, n)) + 10**6 * i
    return make_events(rng.integers(0, W, n), rng.integers(0, H, n), t, rng.choice([1, -1], n))


def make_dataset(root, per_split=None):
    """Shards for train (2 shards) and val (1 shard); keys '<class>/image_XXXX' as MEM's split files."""
    per_split = per_split or {"train": [(0, 12), (12, 24)], "val": [(24, 30)]}
    shards, keys, labels = {}, {}, {}
    for split, ranges in per_split.items():
        for j, (a, b) in enumerate(ranges):
            path = root / "shards" / f"{split}-{j:05d}.h5"
            with ShardWriter(path, sensor_size=(W, H), attrs={"split": split}) as w:
                for i in range(a, b):
                    label = i % len(CLASSES)
                    key = f"{CLASSES[label]}/image_{i:04d}"
                    w.add_sample(events_for(i, 50 + 10 * i), key=key, label=label)
                    keys.setdefault(split, []).append(key)
                    labels.setdefault(split, []).append(label)
            shards.setdefault(split, []).append(path)
    subsets = make_subsets(keys["train"], labels["train"], split="train", percents=(10, 50), seed=1)
    prov = make_provenance(converter="test", source_root=root / "raw", converter_params={"canvas": np.int64(7)},
                           command="evforge build test")
    manifest = build_manifest(root, name="toy", shards=shards, classes=CLASSES, provenance=prov, subsets=subsets)
    manifest.save(root / MANIFEST_NAME)
    return manifest, keys


@pytest.fixture
def dataset(tmp_path):
    manifest, keys = make_dataset(tmp_path)
    return tmp_path, manifest, keys


def edit_manifest(root, change):
    data = json.loads((root / MANIFEST_NAME).read_text())
    change(data)
    (root / MANIFEST_NAME).write_text(json.dumps(data))


def assert_input_error(path, match):
    with pytest.raises(InputError) as err:
        Manifest.load(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and match in msg and "\n" not in msg, msg


# ----------------------------------------------------------------------------------------- round trip
def test_manifest_contents_and_json_round_trip(dataset):
    root, manifest, keys = dataset
    loaded = Manifest.load(root / MANIFEST_NAME)
    assert loaded == manifest
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert loaded.schema_version == 1 and loaded.name == "toy" and loaded.sensor_size == [W, H]
    assert loaded.kind == "samples" and loaded.classes == CLASSES
    assert [e["path"] for e in loaded.shards] == ["shards/train-00000.h5", "shards/train-00001.h5",
                                                  "shards/val-00000.h5"]
    assert loaded.splits["train"] == {"shards": ["shards/train-00000.h5", "shards/train-00001.h5"],
                                      "num_samples": 24, "num_events": sum(50 + 10 * i for i in range(24))}
    assert loaded.splits["val"]["num_samples"] == 6 and loaded.num_samples == 30
    assert all(e["bytes"] == (root / e["path"]).stat().st_size for e in loaded.shards)
    prov = loaded.provenance
    assert prov["converter_params"] == {"canvas": 7} and prov["command"] == "evforge build test"
    assert prov["source_root"] == os.fspath(root / "raw") and prov["created"].endswith("Z")
    assert {"evforge_version", "python", "torch", "h5py"} <= set(prov)
    stats = loaded.stats
    assert stats["all"]["num_samples"] == 30 and stats["splits"]["val"]["num_samples"] == 6
    assert stats["all"]["per_class"] == {"airplanes": 10, "cars": 10, "dogs": 10}
    assert stats["all"]["events_per_sample"]["min"] == 50 and stats["all"]["events_per_sample"]["max"] == 340
    sub = loaded.subsets["train_10pct"]
    assert sub["split"] == "train" and sub["percent"] == 10 and set(sub["keys"]) <= set(keys["train"])
    assert set(sub["keys"]) <= set(loaded.subsets["train_50pct"]["keys"])
    text = (root / MANIFEST_NAME).read_text()
    assert str(root / "shards") not in text  # nothing absolute about the shards
    assert not list(root.glob("*.tmp-*"))


def test_split_assignment_locate_keys_and_split_file(dataset, tmp_path_factory):
    root, _, keys = dataset
    assignment = split_assignment(root / MANIFEST_NAME)
    assert assignment == keys
    where = locate_keys(root / MANIFEST_NAME, ["cars/image_0025", "airplanes/image_0000"])
    assert where["cars/image_0025"] == (root.absolute() / "shards/val-00000.h5", 1)
    assert where["airplanes/image_0000"][1] == 0
    with pytest.raises(KeyError, match="image_9999"):
        locate_keys(root / MANIFEST_NAME, ["cars/image_9999"])
    split_file = tmp_path_factory.mktemp("repo") / "manifests" / "toy_split.txt"
    write_split_file(split_file, assignment)
    lines = split_file.read_text().splitlines()
    assert lines[0] == "train/airplanes/image_0000" and lines[-1] == "val/dogs/image_0029" and len(lines) == 30
    assert read_split_file(split_file) == assignment


def test_read_split_file_mem_format_and_errors(tmp_path):
    path = tmp_path / "split.txt"
    path.write_text("train/Faces_easy/image_0001.npy\nval/BACKGROUND_Google/image_0002.npy\n\n")
    assert read_split_file(path) == {"train": ["Faces_easy/image_0001.npy"],
                                     "val": ["BACKGROUND_Google/image_0002.npy"]}
    path.write_text("train/a/b\nnoslash\n")
    with pytest.raises(InputError) as err:
        read_split_file(path)
    assert str(err.value).startswith(f"{path}: line 2")
    path.write_bytes(b"train/a/\xff\xfe\n")  # not UTF-8: one line naming the file, no traceback
    with pytest.raises(InputError, match="cannot read split file") as err:
        read_split_file(path)
    assert err.value.path == str(path)
    with pytest.raises(ValueError):
        write_split_file(tmp_path / "x.txt", {"tr/ain": ["a"]})


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("change,match", [
    (lambda d: d.update(schema_version=2), "newer"),
    (lambda d: d.pop("classes"), "missing field(s) classes"),
    (lambda d: d.update(extra=1), "unknown field(s) extra"),
    (lambda d: d.update(sensor_size=[W]), "sensor_size"),
    (lambda d: d.update(kind="video"), "kind"),
    (lambda d: d["shards"][0].update(num_events="12"), "shards[0].num_events"),
    (lambda d: d["shards"][0].update(sha256="xyz"), "sha256"),
    (lambda d: d["shards"][0].update(split="test"), "not in splits"),
    (lambda d: d["splits"]["train"]["shards"].pop(), "does not list exactly"),
    (lambda d: d["subsets"]["train_10pct"].update(split="test"), "subsets.train_10pct.split"),
    (lambda d: d["provenance"].pop("created"), "provenance.created"),
])
def test_load_rejects_bad_manifests(dataset, change, match):
    root, _, _ = dataset
    edit_manifest(root, change)
    assert_input_error(root / MANIFEST_NAME, match)


def test_load_rejects_unreadable_manifests(tmp_path):
    assert_input_error(tmp_path / "missing.json", "no such file")
    (tmp_path / "m.json").write_text("{not json")
    assert_input_error(tmp_path / "m.json", "not valid JSON")
    (tmp_path / "m.json").write_text("[1, 2]")
    assert_input_error(tmp_path / "m.json", "not a JSON object")


def rename_shard(new):
    def change(d):
        old = d["shards"][0]["path"]
        d["shards"][0]["path"] = new
        d["splits"]["train"]["shards"] = [new if p == old else p for p in d["splits"]["train"]["shards"]]
    return change


@pytest.mark.parametrize("new,match", [
    ("/etc/passwd", "absolute"),
    ("C:/data/x.h5", "absolute"),
    ("../outside.h5", "leaves the dataset root"),
    ("shards/../../outside.h5", "leaves the dataset root"),
    ("./shards/train-00000.h5", "not normalised"),
    ("shards//train-00000.h5", "not normalised"),
    ("shards\\train-00000.h5", "backslash"),
])
def test_load_rejects_path_escapes(dataset, new, match):
    root, _, _ = dataset
    edit_manifest(root, rename_shard(new))
    assert_input_error(root / MANIFEST_NAME, match)


def test_load_rejects_symlink_out_of_root(dataset, tmp_path_factory):
    root, _, _ = dataset
    outside = tmp_path_factory.mktemp("elsewhere")
    (outside / "x.h5").write_bytes((root / "shards/train-00000.h5").read_bytes())
    (root / "link.h5").symlink_to(outside / "x.h5")
    edit_manifest(root, rename_shard("link.h5"))
    assert_input_error(root / MANIFEST_NAME, "resolves outside the dataset root")
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    edit_manifest(root, rename_shard("linkdir/x.h5"))
    assert_input_error(root / MANIFEST_NAME, "resolves outside the dataset root")
    (root / "inside.h5").symlink_to(root / "shards" / "train-00000.h5")  # a link that stays inside is fine
    edit_manifest(root, rename_shard("inside.h5"))
    assert Manifest.load(root / MANIFEST_NAME).shards[0]["path"] == "inside.h5"


def test_save_validates_and_is_atomic(dataset, tmp_path):
    _, manifest, _ = dataset
    bad = Manifest.from_dict(manifest.to_dict())
    bad.shards[0]["path"] = "../x.h5"
    with pytest.raises(ValueError, match="leaves the dataset root"):
        bad.save(tmp_path / "new.json")
    assert not (tmp_path / "new.json").exists() and not list(tmp_path.glob("new.json.tmp-*"))


# ---------------------------------------------------------------------------------------------- verify
def test_verify_clean_dataset(dataset):
    root, _, _ = dataset
    assert verify(root / MANIFEST_NAME) == []


def test_verify_catches_flipped_byte(dataset):
    root, _, _ = dataset
    path = root / "shards/val-00000.h5"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    faults = verify(root / MANIFEST_NAME)
    assert any(f.startswith(f"{path.absolute()}: sha256 mismatch") for f in faults), faults


def test_verify_catches_count_mismatches(dataset):
    root, _, _ = dataset
    edit_manifest(root, lambda d: d["shards"][1].update(num_events=d["shards"][1]["num_events"] + 1))
    faults = verify(root / MANIFEST_NAME)
    assert any("train-00001.h5: num_events is" in f and "manifest says" in f for f in faults), faults
    assert any("splits.train.num_events" in f for f in faults), faults
    edit_manifest(root, lambda d: d["shards"][1].update(num_events=d["shards"][1]["num_events"] - 1))
    assert verify(root / MANIFEST_NAME) == []
    edit_manifest(root, lambda d: d["splits"]["val"].update(num_samples=7))
    assert any("splits.val.num_samples = 7, its shards hold 6" in f for f in verify(root / MANIFEST_NAME))


def test_verify_catches_missing_shard_bad_invariants_and_subset_keys(dataset):
    root, _, _ = dataset
    (root / "shards/train-00001.h5").unlink()
    faults = verify(root / MANIFEST_NAME)
    assert faults == [f"{(root / 'shards/train-00001.h5').absolute()}: missing shard"]

    make_dataset(root)  # rebuild, then break invariants inside a shard (and so its sha)
    path = root / "shards/train-00000.h5"
    with h5py.File(path, "a") as f:
        f["events/x"][3] = W + 1
        f["events/t"][200] = 0  # sample 1 starts at event 50: t goes back in time
    faults = verify(root / MANIFEST_NAME)
    text = "\n".join(faults)
    assert "sha256 mismatch" in text and f"x={W + 1} at event 3 is outside" in text
    assert "timestamps not sorted at event 200" in text

    make_dataset(root)
    edit_manifest(root, lambda d: d["subsets"]["train_10pct"]["keys"].append("cars/image_0025"))  # a val key
    faults = verify(root / MANIFEST_NAME)
    assert faults == [f"{root / MANIFEST_NAME}: subsets.train_10pct: 1 key(s) not in split 'train', "
                      f"e.g. 'cars/image_0025'"]


def test_verify_reports_bad_manifest_as_fault(tmp_path):
    faults = verify(tmp_path / "nothing.json")
    assert faults == [f"{tmp_path / 'nothing.json'}: no such file"]


# --------------------------------------------------------------------------------- splits and subsets
def imbalanced_labels(seed=0):
    sizes = [500, 203, 97, 41, 10, 3, 1]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return np.random.default_rng(seed).permutation(labels), sizes


def test_stratified_split_proportions_and_cover():
    labels, sizes = imbalanced_labels()
    parts = stratified_split(labels, {"train": 0.8, "val": 0.2}, seed=3)
    train, val = parts["train"], parts["val"]
    assert len(np.intersect1d(train, val)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    for c, n in enumerate(sizes):
        for part, f in ((train, 0.8), (val, 0.2)):
            assert abs(int((labels[part] == c).sum()) - f * n) < 1, (c, f)
    assert abs(len(val) - 0.2 * len(labels)) <= 1
    again = stratified_split(labels, {"train": 0.8, "val": 0.2}, seed=3)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    other = stratified_split(labels, {"train": 0.8, "val": 0.2}, seed=4)
    assert not np.array_equal(parts["val"], other["val"])
    three = stratified_split(labels, [0.7, 0.2, 0.1], seed=0)
    assert sorted(np.concatenate(three).tolist()) == list(range(len(labels)))
    assert [abs(len(p) - f * len(labels)) <= 1 for p, f in zip(three, (0.7, 0.2, 0.1))] == [True] * 3
    for bad in ({"a": 0.5, "b": 0.4}, {"a": 1.2, "b": -0.2}, {}):
        with pytest.raises(ValueError, match="sum to 1"):
            stratified_split(labels, bad)


def test_label_subsets_nested_stratified_seeded():
    labels, sizes = imbalanced_labels()
    labels = np.concatenate([labels, [-1] * 50])  # unlabelled samples are never picked
    percents = (2, 5, 10, 20, 50)
    subsets = label_subsets(labels, percents, seed=7)
    assert list(subsets) == list(percents)
    n_labelled = sum(sizes)
    previous = np.zeros(0, dtype=np.int64)
    for p in percents:
        chosen = subsets[p]
        assert np.all(labels[chosen] >= 0) and len(np.unique(chosen)) == len(chosen)
        assert np.all(np.isin(previous, chosen)), p  # nested
        counts = Counter(labels[chosen].tolist())
        for c, n in enumerate(sizes):
            share = p / 100 * n
            assert counts[c] >= 1, (p, c)  # every class present
            assert counts[c] <= max(1, np.ceil(share)) and counts[c] >= np.floor(share), (p, c, counts[c])
        # total within rounding of p %, except where the one-per-class floor forces more
        assert len(chosen) - p / 100 * n_labelled < 1 + sum(1 for n in sizes if p / 100 * n < 1), p
        previous = chosen
    again = label_subsets(labels, percents, seed=7)
    assert all(np.array_equal(subsets[p], again[p]) for p in percents)
    assert not np.array_equal(label_subsets(labels, percents, seed=8)[50], subsets[50])
    assert sorted(label_subsets(labels, (50, 2), seed=7)) == [2, 50]  # any order of percents
    np.testing.assert_array_equal(label_subsets(labels, (50, 2), seed=7)[2], subsets[2])
    with pytest.raises(ValueError):
        label_subsets(labels, (0, 10))


def test_make_subsets_entries():
    keys = [f"c{i % 4}/image_{i:04d}" for i in range(40)]
    labels = [i % 4 for i in range(40)]
    subsets = make_subsets(keys, labels, split="train", percents=(2, 50), seed=0)
    assert list(subsets) == ["train_2pct", "train_50pct"]
    small = subsets["train_2pct"]
    assert small["split"] == "train" and small["percent"] == 2 and small["seed"] == 0
    assert sorted(k.split("/")[0] for k in small["keys"]) == ["c0", "c1", "c2", "c3"]  # one per class
    assert len(subsets["train_50pct"]["keys"]) == 20


def test_compute_stats():
    stats = compute_stats([10, 20, 30, 0], [1000, 2000, 0, 500], [0, 1, 1, -1], ["a", "b", "c"])
    assert stats["num_samples"] == 4 and stats["num_events"] == 60
    assert stats["events_per_sample"] == {"mean": 15.0, "median": 15.0, "min": 0, "max": 30}
    assert stats["duration_us"]["max"] == 2000
    assert stats["event_rate_hz"] == {"mean": pytest.approx(20000 / 3), "median": 10000.0, "min": 0.0, "max": 10000.0}
    assert stats["per_class"] == {"a": 1, "b": 2, "c": 0} and stats["unlabeled"] == 1
    empty = compute_stats([], [], [], ["a"])
    assert empty["events_per_sample"] is None and empty["per_class"] == {"a": 0}
