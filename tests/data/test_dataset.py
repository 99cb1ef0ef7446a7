"""EventDataset, the packing collate, samplers and loaders over shards written directly with ShardWriter."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from evforge.data.collate import EventBatch, collate_events, unpack
from evforge.data.dataset import EventDataset, make_loader, make_sampler
from evforge.dataset_builder.subsets import make_subsets
from evforge.formats.events import EVENT_DTYPE, make_events
from evforge.formats.manifest import MANIFEST_NAME, build_manifest, make_provenance
from evforge.formats.shards import ShardWriter

W, H = 40, 30
CLASSES = ["airplanes", "cars", "dogs"]
T0 = 1_700_000_000


def events_for(i, n, t0=None):
    rng = np.random.default_rng(i)
    t0 = T0 + 10**6 * i if t0 is None else t0
    t = np.sort(rng.integers(0, 50_000, n)) + t0
    return make_events(rng.integers(0, W, n), rng.integers(0, H, n), t, rng.choice([1, -1], n))


def build_samples(root, per_split=None):
    """train: 2 shards (12 + 12 samples), val: 1 shard (6); returns {key: (events, label, split)}."""
    per_split = per_split or {"train": [(0, 12), (12, 24)], "val": [(24, 30)]}
    shards, truth, keys, labels = {}, {}, [], []
    for split, ranges in per_split.items():
        for j, (a, b) in enumerate(ranges):
            path = root / f"{split}-{j:05d}.h5"
            with ShardWriter(path, sensor_size=(W, H)) as w:
                for i in range(a, b):
                    label = i % len(CLASSES)
                    key = f"{CLASSES[label]}/image_{i:04d}"
                    ev = events_for(i, 20 + 7 * i)
                    w.add_sample(ev, key=key, label=label)
                    truth[key] = (ev, label, split)
                    if split == "train":
                        keys.append(key)
                        labels.append(label)
            shards.setdefault(split, []).append(path)
    subsets = make_subsets(keys, labels, split="train", percents=(10, 50), seed=3)
    prov = make_provenance(converter="test", command="test")
    build_manifest(root, name="toy", shards=shards, classes=CLASSES, provenance=prov,
                   subsets=subsets).save(root / MANIFEST_NAME)
    return truth


def stream_events(seed, n, t0, t1):
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(t0, t1, n))
    return make_events(rng.integers(0, W, n), rng.integers(0, H, n), t, rng.choice([1, -1], n))


def build_streams(root):
    """Two stream shards (train) with 3 + 1 sequences; frames every 10 ms; returns {key: (events, frames)}."""
    truth, shards = {}, []
    specs = [[("office/P000", 9, 2000), ("office/P001", 4, 500), ("garden/P000", 2, 0)],
             [("garden/P001", 6, 1200)]]
    for j, group in enumerate(specs):
        path = root / f"train-{j:05d}.h5"
        with ShardWriter(path, sensor_size=(W, H), kind="streams") as w:
            for k, (key, n_frames, n_events) in enumerate(group):
                t0 = T0 + 10**7 * (j * 10 + k)
                frames = t0 + np.arange(n_frames) * 10_000
                ev = stream_events(j * 10 + k, n_events, t0 - 3000, int(frames[-1]) + 5000)  # events outside too
                w.add_sample(ev, key=key, frame_times=frames, allow_empty=True)
                truth[key] = (ev, frames)
        shards.append(path)
    prov = make_provenance(converter="test", command="test")
    build_manifest(root, name="streams", shards={"train": shards}, classes=[], provenance=prov).save(
        root / MANIFEST_NAME)
    return truth


@pytest.fixture
def samples_ds(tmp_path):
    root = tmp_path / "samples"
    root.mkdir()
    return root, build_samples(root)


@pytest.fixture
def streams_ds(tmp_path):
    root = tmp_path / "streams"
    root.mkdir()
    return root, build_streams(root)


def same_items(a, b):
    assert a["key"] == b["key"] and a["label"] == b["label"]
    np.testing.assert_array_equal(a["events"], b["events"])


# --------------------------------------------------------------------------------------------- samples
def test_samples_exact_events_labels_keys(samples_ds):
    root, truth = samples_ds
    for split, n in (("train", 24), ("val", 6)):
        ds = EventDataset(root, split)  # a folder resolves to its manifest.json
        assert len(ds) == n and ds.kind == "samples" and ds.sensor_size == (W, H)
        expected = [k for k, v in truth.items() if v[2] == split]
        assert ds.keys == expected  # shard order
        for i in range(len(ds)):
            item = ds[i]
            ev, label, _ = truth[item["key"]]
            assert item["events"].dtype == EVENT_DTYPE
            np.testing.assert_array_equal(item["events"], ev)
            assert item["label"] == label == ds.labels[i]
            assert ds.num_events[i] == len(ev)
        same_items(ds[-1], ds[len(ds) - 1])
        with pytest.raises(IndexError):
            ds[len(ds)]


def test_subset_selection_and_errors(samples_ds):
    root, truth = samples_ds
    import json
    subsets = json.loads((root / MANIFEST_NAME).read_text())["subsets"]
    ds = EventDataset(root / MANIFEST_NAME, "train", subset="train_50pct")
    assert set(ds.keys) == set(subsets["train_50pct"]["keys"]) and len(ds) == 12
    full_order = [k for k, v in truth.items() if v[2] == "train"]
    assert ds.keys == [k for k in full_order if k in set(ds.keys)]  # shard order kept
    for i in range(len(ds)):
        np.testing.assert_array_equal(ds[i]["events"], truth[ds[i]["key"]][0])
    small = EventDataset(root, "train", subset="train_10pct")
    assert set(small.keys) <= set(ds.keys) and len(small) == len(subsets["train_10pct"]["keys"])
    with pytest.raises(ValueError, match="drawn from split"):
        EventDataset(root, "val", subset="train_10pct")
    with pytest.raises(ValueError, match="no subset"):
        EventDataset(root, "train", subset="train_99pct")
    with pytest.raises(ValueError, match="no split"):
        EventDataset(root, "test")
    with pytest.raises(ValueError, match="window"):
        EventDataset(root, "train", window=2)


def test_transform_and_min_events(samples_ds):
    root, truth = samples_ds
    ds = EventDataset(root, "train", transform=lambda ev: ev[:5], min_events=100)
    counts = {k: len(v[0]) for k, v in truth.items() if v[2] == "train"}
    assert ds.keys == [k for k, n in counts.items() if n >= 100]
    assert all(len(ds[i]["events"]) == 5 for i in range(len(ds)))


# --------------------------------------------------------------------------------------------- streams
def test_stream_windows_between_frames(streams_ds):
    root, truth = streams_ds
    ds = EventDataset(root, "train")
    assert ds.kind == "streams"
    expected = [(key, j) for key, (_, frames) in truth.items() for j in range(len(frames) - 1)]
    assert ds.keys == [f"{k}#{j}" for k, j in expected]
    for i, (key, j) in enumerate(expected):
        item = ds[i]
        ev, frames = truth[key]
        a, b = int(frames[j]), int(frames[j + 1])
        want = ev[(ev["t"] >= a) & (ev["t"] < b)]
        np.testing.assert_array_equal(item["events"], want)
        assert (item["t_start"], item["t_end"], item["label"]) == (a, b, -1)


def test_stream_window_groups_and_min_events(streams_ds):
    root, truth = streams_ds
    ds = EventDataset(root, "train", window=3)
    expected = [(key, j) for key, (_, frames) in truth.items() for j in range(0, len(frames) - 3, 3)]
    assert ds.keys == [f"{k}#{j}" for k, j in expected]
    for i, (key, j) in enumerate(expected):
        ev, frames = truth[key]
        item = ds[i]
        want = ev[(ev["t"] >= frames[j]) & (ev["t"] < frames[j + 3])]
        np.testing.assert_array_equal(item["events"], want)
    nonempty = EventDataset(root, "train", min_events=1)
    assert "garden/P000#0" not in nonempty.keys and all(len(nonempty[i]["events"]) for i in range(len(nonempty)))


# ------------------------------------------------------------------------------------------- collate
def test_collate_packs_and_unpacks(samples_ds, streams_ds):
    root, _ = samples_ds
    ds = EventDataset(root, "train")
    items = [ds[i] for i in (3, 0, 7, 11)]
    batch = collate_events(items)
    counts = [len(it["events"]) for it in items]
    assert batch["offsets"].tolist() == np.concatenate([[0], np.cumsum(counts)]).tolist()
    assert batch["x"].dtype == torch.int32 and batch["t"].dtype == torch.int64 and batch["p"].dtype == torch.int8
    assert batch["batch_index"].dtype == torch.int64
    assert batch["batch_index"].tolist() == np.repeat(np.arange(4), counts).tolist()
    assert batch["label"].tolist() == [it["label"] for it in items]
    assert batch["key"] == [it["key"] for it in items]
    for b, it in enumerate(items):
        a, z = batch["offsets"][b], batch["offsets"][b + 1]
        assert batch["t"][a] == 0 and torch.all(batch["t"][a:z] >= 0)  # relative to the sample's first event
        np.testing.assert_array_equal(unpack(batch, b), it["events"])

    sroot, _ = streams_ds
    sds = EventDataset(sroot, "train")
    empty = next(i for i in range(len(sds)) if len(sds[i]["events"]) == 0)
    items = [sds[0], sds[empty], sds[1]]
    batch = collate_events(items)
    assert batch["offsets"][1] == batch["offsets"][2]
    assert batch["t_start"].tolist() == [it["t_start"] for it in items]
    assert batch["t0"][1] == items[1]["t_start"]
    for b, it in enumerate(items):
        np.testing.assert_array_equal(unpack(batch, b), it["events"])


def test_event_batch_is_a_dataclass_that_reads_like_a_dict(samples_ds, streams_ds):
    root, _ = samples_ds
    ds = EventDataset(root, "train")
    batch = collate_events([ds[i] for i in (3, 0, 7)])
    assert isinstance(batch, EventBatch) and batch.num_samples == 3 and batch.num_events == len(batch.t)
    assert batch["x"] is batch.x and "t_start" not in batch and batch.get("t_start") is None
    assert list(batch) == ["x", "y", "t", "p", "batch_index", "offsets", "t0", "label", "key"]
    with pytest.raises(KeyError):
        batch["mask"]
    np.testing.assert_array_equal(batch.sample(1), ds[0]["events"])
    # a task's own column goes to extra and travels with replace / to
    batch["mask"] = torch.ones(3, 2, 2, dtype=torch.uint8)
    assert "mask" in batch and batch.extra["mask"] is batch["mask"] and "mask" in batch.keys()
    flipped = batch.replace(x=batch.x + 1, note="kept")
    assert torch.equal(flipped.x, batch.x + 1) and flipped.y is batch.y and flipped["note"] == "kept"
    assert "note" not in batch  # the copy's extra is its own
    moved = batch.to("cpu")
    assert isinstance(moved, EventBatch) and moved.key == batch.key and torch.equal(moved["mask"], batch["mask"])
    plain = dict(batch)  # functions taking a packed batch accept this dict too
    assert set(plain) == set(batch.keys()) and plain["t0"] is batch.t0
    # Lightning's to_device (what the trainer calls) keeps the type and moves every tensor, extra included
    from lightning_utilities.core.apply_func import apply_to_collection
    doubled = apply_to_collection(batch, torch.Tensor, lambda v: v * 2)
    assert isinstance(doubled, EventBatch) and torch.equal(doubled.t, batch.t * 2)
    assert torch.equal(doubled["mask"], batch["mask"] * 2) and doubled.key == batch.key
    # stream windows carry t_start / t_end
    sroot, _ = streams_ds
    sds = EventDataset(sroot, "train")
    windows = collate_events([sds[0], sds[1]])
    assert windows.t_start.tolist() == [sds[0]["t_start"], sds[1]["t_start"]] and "t_end" in windows


# ---------------------------------------------------------------------------------- pickling, loaders
def test_pickle_reopens_lazily(samples_ds):
    root, _ = samples_ds
    ds = EventDataset(root, "train")
    first = ds[5]  # opens a handle in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert all(r._file is None for r in clone.readers)  # handles do not travel
    same_items(clone[5], first)
    assert len(pickle.dumps(ds)) < 50_000  # the index only, no events


def test_open_file_limit(samples_ds):
    root, truth = samples_ds
    ds = EventDataset(root, "train", max_open_files=1)  # 2 shards
    for i in list(range(len(ds))) + [0, 23, 1, 22]:
        np.testing.assert_array_equal(ds[i]["events"], truth[ds.key(i)][0])
        assert sum(r._file is not None for r in ds.readers) == 1
    ds.close()
    assert all(r._file is None for r in ds.readers)


def flatten(loader):
    out = []
    for batch in loader:
        for b in range(len(batch["key"])):
            out.append((batch["key"][b], int(batch["label"][b]), unpack(batch, b)))
    return out


def test_loader_workers_match_single_process(samples_ds):
    root, _ = samples_ds
    ds = EventDataset(root, "train")
    ds[0]  # the parent holds an open handle before the workers fork
    single = flatten(make_loader(ds, batch_size=5, num_workers=0))
    multi = flatten(make_loader(ds, batch_size=5, num_workers=2))
    assert [s[:2] for s in single] == [m[:2] for m in multi] == [(k, int(l)) for k, l in zip(ds.keys, ds.labels)]
    for s, m in zip(single, multi):
        np.testing.assert_array_equal(s[2], m[2])
    shuffled = flatten(make_loader(ds, batch_size=4, num_workers=2, shuffle=True, seed=7))
    again = flatten(make_loader(ds, batch_size=4, num_workers=0, shuffle=True, seed=7))
    assert [s[0] for s in shuffled] == [a[0] for a in again] != [s[0] for s in single]
    assert sorted(s[0] for s in shuffled) == sorted(ds.keys)


def test_loader_spawn_workers(streams_ds):
    root, _ = streams_ds
    ds = EventDataset(root, "train")
    single = flatten(make_loader(ds, batch_size=3))
    spawned = flatten(make_loader(ds, batch_size=3, num_workers=1, multiprocessing_context="spawn"))
    assert [s[0] for s in single] == [s[0] for s in spawned] == ds.keys
    for s, m in zip(single, spawned):
        np.testing.assert_array_equal(s[2], m[2])


@pytest.mark.parametrize("shuffle", [False, True])
def test_distributed_sampler_partitions(samples_ds, shuffle):
    root, _ = samples_ds
    ds = EventDataset(root, "train")  # 24 items: divisible by 2, so no padding
    parts = []
    for rank in (0, 1):
        sampler = make_sampler(ds, shuffle=shuffle, seed=1, rank=rank, world_size=2)
        assert isinstance(sampler, torch.utils.data.DistributedSampler)
        sampler.set_epoch(0)
        parts.append(list(sampler))
    assert len(parts[0]) == len(parts[1]) == 12
    assert not set(parts[0]) & set(parts[1]) and set(parts[0]) | set(parts[1]) == set(range(len(ds)))
    keys = [set(k for b in make_loader(ds, batch_size=4, rank=r, world_size=2, shuffle=shuffle, seed=1)
                for k in b["key"]) for r in (0, 1)]
    assert not keys[0] & keys[1] and keys[0] | keys[1] == set(ds.keys)


def test_single_process_samplers(samples_ds):
    root, _ = samples_ds
    ds = EventDataset(root, "val")
    assert list(make_sampler(ds, shuffle=False)) == list(range(6))
    a = list(make_sampler(ds, shuffle=True, seed=3))
    assert sorted(a) == list(range(6)) and a == list(make_sampler(ds, shuffle=True, seed=3))
    with pytest.raises(ValueError, match="rank"):
        make_sampler(ds, shuffle=False, rank=2, world_size=2)
