"""inspect / verify / preview on datasets, shards and stream files; the synthetic classification set."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from evforge.dataset_builder.inspect import format_report, inspect_path, verify_dataset
from evforge.dataset_builder.subsets import make_subsets
from evforge.dataset_builder.synthetic import make_synthetic_classification, render_clip, simulate_clips
from evforge.errors import InputError
from evforge.formats.decoders import read_atis_bin
from evforge.formats.events import make_events
from evforge.formats.manifest import MANIFEST_NAME, build_manifest, make_provenance
from evforge.formats.shards import ShardWriter
from evforge.formats.streamfile import write_stream
from evforge.preview.shards import render_shard_preview
from evforge.simulator.engine import simulate_frames
from evforge.simulator.params import get_preset

W, H = 40, 30
CLASSES = ["airplanes", "cars", "dogs"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def events_for(i, n, duration=50_000):
    rng = np.random.default_rng(i)
    t = np.sort(rng.integers(0, duration, n)) + 10**6 * i
    return make_events(rng.integers(0, W, n), rng.integers(0, H, n), t, rng.choice([1, -1], n))


def build(root, kind="samples"):
    """train: 2 shards of 8, val: 1 shard of 4 ('samples'); or 2 stream shards in train ('streams')."""
    shards, counts = {}, {}
    if kind == "samples":
        layout = {"train": [(0, 8), (8, 16)], "val": [(16, 20)]}
        keys, labels = [], []
        for split, ranges in layout.items():
            for j, (a, b) in enumerate(ranges):
                path = root / f"{split}-{j:05d}.h5"
                with ShardWriter(path, sensor_size=(W, H), attrs={"classes": CLASSES}) as w:
                    for i in range(a, b):
                        label = -1 if i == 19 else i % 3
                        key = f"{CLASSES[i % 3]}/image_{i:04d}"
                        w.add_sample(events_for(i, 100 + 10 * i), key=key, label=label)
                        counts[key] = (100 + 10 * i, label, split)
                        if split == "train":
                            keys.append(key)
                            labels.append(label)
                shards.setdefault(split, []).append(path)
        subsets = make_subsets(keys, labels, split="train", percents=(25,), seed=0)
        classes = CLASSES
    else:
        for j in range(2):
            path = root / f"train-{j:05d}.h5"
            with ShardWriter(path, sensor_size=(W, H), kind="streams") as w:
                for k in range(2):
                    frames = 10**6 * (j * 2 + k) + np.arange(5) * 10_000
                    w.add_sample(events_for(j * 2 + k, 500, duration=45_000), key=f"seq{j}{k}",
                                 frame_times=frames)
            shards.setdefault("train", []).append(path)
        subsets, classes = {}, []
    prov = make_provenance(converter="test", command="test")
    build_manifest(root, name=f"toy-{kind}", shards=shards, classes=classes, provenance=prov,
                   subsets=subsets).save(root / MANIFEST_NAME)
    return counts


@pytest.fixture
def samples_root(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    return root, build(root)


# -------------------------------------------------------------------------------------------- inspect
def test_inspect_dataset_counts(samples_root):
    root, counts = samples_root
    for path in (root, root / MANIFEST_NAME):
        d = inspect_path(path)
        assert d["type"] == "dataset" and d["kind"] == "samples" and d["sensor_size"] == [W, H]
        assert d["num_samples"] == 20 and d["num_events"] == sum(c[0] for c in counts.values())
        for split, n in (("train", 16), ("val", 4)):
            s = d["splits"][split]
            assert s["num_samples"] == n
            assert s["num_events"] == sum(c[0] for c in counts.values() if c[2] == split)
            ev = [c[0] for c in counts.values() if c[2] == split]
            assert s["events_per_sample"]["min"] == min(ev) and s["events_per_sample"]["max"] == max(ev)
            assert s["duration_us"]["max"] <= 50_000 and s["event_rate_hz"]["median"] > 0
        assert d["splits"]["train"]["num_shards"] == 2 and d["splits"]["val"]["unlabeled"] == 1
        for c in d["classes"]:
            for split in ("train", "val"):
                want = sum(1 for v in counts.values() if v[1] == c["id"] and v[2] == split)
                assert c["per_split"][split] == want
        assert d["subsets"]["train_25pct"]["split"] == "train" and d["subsets"]["train_25pct"]["num_keys"] == 4
        assert d["shards"]["count"] == 3 and d["shards"]["compression"] == ["zstd"]
        assert d["shards"]["bytes"] == sum(p.stat().st_size for p in root.glob("*.h5"))
    text = format_report(d)
    for word in ("toy-samples", "train", "val", "airplanes", "train_25pct", "zstd"):
        assert word in text


def test_inspect_shard_stream_and_streams_dataset(tmp_path, samples_root):
    root, counts = samples_root
    d = inspect_path(root / "val-00000.h5")
    assert d["type"] == "shard" and d["num_samples"] == 4 and d["compression"] == "zstd"
    assert d["labels"] == {"airplanes": 1, "cars": 1, "dogs": 1} and d["unlabeled"] == 1  # class names from attrs
    assert "val-00000.h5" in format_report(d)

    sroot = tmp_path / "streams"
    sroot.mkdir()
    build(sroot, "streams")
    d = inspect_path(sroot)
    assert d["kind"] == "streams" and d["splits"]["train"]["num_frames"] == 20
    assert d["splits"]["train"]["num_windows"] == 16
    assert "windows" in format_report(d)

    ev = events_for(1, 300, duration=90_000)
    stream = write_stream(tmp_path / "seq.h5", ev, 10**6 + np.arange(10) * 10_000, width=W, height=H,
                          attrs={"preset": "noisy"})
    d = inspect_path(stream)
    assert d["type"] == "stream" and d["num_events"] == 300 and d["num_frames"] == 10
    assert d["frame_rate_hz"] == pytest.approx(100) and d["attrs"]["preset"] == "noisy"
    assert "stream" in format_report(d)
    with pytest.raises(InputError):
        inspect_path(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"nope")
    with pytest.raises(InputError, match="not an evforge"):
        inspect_path(tmp_path / "junk.h5")


# --------------------------------------------------------------------------------------------- verify
def test_verify_good_and_tampered_dataset(samples_root):
    root, _ = samples_root
    assert verify_dataset(root) == [] and verify_dataset(root / MANIFEST_NAME) == []
    assert verify_dataset(root / "train-00001.h5") == []
    with h5py.File(root / "train-00001.h5", "r+") as f:  # an event outside the sensor
        f["events/x"][3] = W + 5
    faults = verify_dataset(root)
    assert any("sha256" in f for f in faults) and any("outside" in f for f in faults)
    assert all("train-00001.h5" in f for f in faults)
    bare = verify_dataset(root / "train-00001.h5")
    assert len(bare) == 1 and "outside" in bare[0]


def test_verify_flipped_byte_and_missing(samples_root, tmp_path):
    root, _ = samples_root
    path = root / "val-00000.h5"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert any("sha256" in f for f in verify_dataset(root))
    assert verify_dataset(tmp_path / "nothing") == [f"{tmp_path / 'nothing'}: no such file or folder"]
    (tmp_path / "x.txt").write_text("hi")
    assert "not an evforge" in verify_dataset(tmp_path / "x.txt")[0]


def test_verify_stream_file(tmp_path):
    ev = events_for(2, 5000, duration=90_000)
    path = write_stream(tmp_path / "seq.h5", ev, 2 * 10**6 + np.arange(10) * 10_000, width=W, height=H)
    assert verify_dataset(path) == []
    with h5py.File(path, "r+") as f:
        f["ms_to_idx"][10] += 1
    faults = verify_dataset(path)
    assert len(faults) == 1 and "ms_to_idx" in faults[0]
    path = write_stream(tmp_path / "seq2.h5", ev, 2 * 10**6 + np.arange(10) * 10_000, width=W, height=H)
    with h5py.File(path, "r+") as f:
        f["events/t"][100] = f["events/t"][99] - 5
        f["events/p"][7] = 3
    faults = verify_dataset(path)
    assert any("not sorted" in f for f in faults) and any("p=3" in f for f in faults)


# -------------------------------------------------------------------------------------------- preview
def test_preview_png(samples_root, tmp_path):
    root, _ = samples_root
    out = render_shard_preview(root, tmp_path / "png" / "grid.png", samples=6, seed=1)
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 5000
    out = render_shard_preview(root / "val-00000.h5", tmp_path / "shard.png", samples=20, split="ignored")
    assert out.read_bytes()[:8] == PNG_MAGIC
    sroot = tmp_path / "streams"
    sroot.mkdir()
    build(sroot, "streams")
    out = render_shard_preview(sroot, tmp_path / "streams.png", samples=3, split="train")
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".png") == ["shard.png", "streams.png"]
    with pytest.raises(ValueError, match="no split"):
        render_shard_preview(root, tmp_path / "x.png", split="test")


# ------------------------------------------------------------------------------------------ synthetic
def _features(ev):
    """Elongation of the middle 20 % of the events (log eigenvalue ratio), fraction of them near their
    centroid (< half the RMS radius), and log event count."""
    t = ev["t"]
    mid = (t >= np.percentile(t, 40)) & (t <= np.percentile(t, 60))
    x, y = ev["x"][mid].astype(float), ev["y"][mid].astype(float)
    lo, hi = np.linalg.eigvalsh(np.cov(np.stack([x, y])))
    r = np.hypot(x - x.mean(), y - y.mean())
    return np.array([np.log(hi / max(lo, 1e-9)), np.mean(r < 0.5 * np.sqrt(np.mean(r**2))), np.log(len(ev))])


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_classification(root / "a", per_class=12, seed=0)


def test_synthetic_layout_decodes_and_is_deterministic(synthetic, tmp_path):
    files = sorted(p.relative_to(synthetic).as_posix() for p in synthetic.rglob("*.bin"))
    assert len(files) == 48 and files[0] == "bar/image_0001.bin" and "ring/image_0012.bin" in files
    for f in files:
        ev = read_atis_bin(synthetic / f)
        assert len(ev) > 100 and ev["x"].max() < 64 and ev["y"].max() < 48 and ev["t"].max() < 100_000
        assert {1, -1} == set(np.unique(ev["p"]).tolist())
    again = make_synthetic_classification(tmp_path / "b", classes=("disc", "ring"), per_class=12, seed=0)
    for f in ("disc/image_0003.bin", "ring/image_0011.bin"):
        assert (again / f).read_bytes() == (synthetic / f).read_bytes()
    other = make_synthetic_classification(tmp_path / "c", classes=("disc",), per_class=2, seed=1)
    assert (other / "disc/image_0001.bin").read_bytes() != (synthetic / "disc/image_0001.bin").read_bytes()
    with pytest.raises(ValueError, match="unknown class"):
        make_synthetic_classification(tmp_path / "d", classes=("blob",))


def test_synthetic_batched_equals_simulate_frames():
    rng = np.random.default_rng(5)
    clips = [render_clip(s, rng) for s in ("bar", "ring", "cross")]
    batched = simulate_clips(clips, [11, 12, 13])
    from evforge.dataset_builder.synthetic import FRAME_DT_US, UPSAMPLE
    alone = simulate_frames(clips[1], np.arange(len(clips[1])) * FRAME_DT_US, get_preset("clean"), seed=12,
                            upsample=UPSAMPLE)
    np.testing.assert_array_equal(batched[1], alone)


def test_synthetic_classes_are_distinct(synthetic):
    shapes = ("disc", "bar", "cross", "ring")
    feats = {s: np.stack([_features(read_atis_bin(p)) for p in sorted((synthetic / s).glob("*.bin"))])
             for s in shapes}
    mean = {s: f.mean(0) for s, f in feats.items()}
    sd = {s: f.std(0) for s, f in feats.items()}
    # bars are elongated; crosses and bars have events at their centre, discs and rings do not (hollow edges)
    assert mean["bar"][0] > max(mean[s][0] for s in ("disc", "cross", "ring")) + 2 * sd["bar"][0] / 2
    assert min(mean["bar"][1], mean["cross"][1]) > 3 * max(mean["disc"][1], mean["ring"][1])
    # a ring has an inner and an outer edge: more events than a disc of the same size
    assert mean["ring"][2] > mean["disc"][2] + 0.3
    # leave-one-out nearest-centroid on these three numbers: far better than chance (0.25)
    X = np.concatenate([feats[s] for s in shapes])
    y = np.repeat(np.arange(4), [len(feats[s]) for s in shapes])
    X = (X - X.mean(0)) / X.std(0)
    hits = 0
    for i in range(len(X)):
        keep = np.arange(len(X)) != i
        centroids = np.stack([X[keep & (y == c)].mean(0) for c in range(4)])
        hits += int(np.argmin(((centroids - X[i]) ** 2).sum(1)) == y[i])
    assert hits / len(X) >= 0.75
