"""Converters ncaltech101, ncars, nimagenet on small fake datasets written with the test-side encoders.

Scans (classes, labels, keys, splits, split files and lists), bit-exact reads, exact class matching, the
unsorted-timestamp policy and the registry. Whole builds and bad-input reports are in test_build.py.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from evforge.dataset_builder.converters import CONVERTERS, available, get_converter, register
from evforge.dataset_builder.converters.base import DatasetPlan, Sample, SourceItem
from evforge.errors import InputError
from evforge.formats.decoders import (
    read_atis_bin,
    read_nimagenet_npz,
    read_prophesee_dat,
    write_atis_bin,
    write_nimagenet_npz,
    write_prophesee_dat,
)
from evforge.formats.events import EVENT_DTYPE, make_events

CALTECH_CLASSES = ["BACKGROUND_Google", "Faces_easy", "ant", "elephant", "airplanes"]


def rand_events(seed, n, width, height, t0=0, span=300_000):
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(0, span, n)) + t0
    return make_events(rng.integers(0, width, n), rng.integers(0, height, n), t, rng.choice([-1, 1], n))


def same(a, b) -> bool:
    return a.dtype == b.dtype == EVENT_DTYPE and a.tobytes() == b.tobytes()


def make_ncaltech(src: Path, classes=CALTECH_CLASSES, per_class=5) -> dict:
    """SRC/<class>/image_XXXX.bin; returns {key: events}."""
    truth = {}
    for c, name in enumerate(classes):
        (src / name).mkdir(parents=True, exist_ok=True)
        for i in range(1, per_class + 1):
            ev = rand_events(100 * c + i, 50 + 7 * i, 240, 180)
            write_atis_bin(src / name / f"image_{i:04d}.bin", ev)
            truth[f"{name}/image_{i:04d}"] = ev
    return truth


def swap_records(path: Path, offset: int, size: int) -> None:
    """Swap the first two fixed-size records after ``offset``: the file's timestamps go out of order."""
    data = bytearray(path.read_bytes())
    a, b = data[offset : offset + size], data[offset + size : offset + 2 * size]
    data[offset : offset + 2 * size] = b + a
    path.write_bytes(bytes(data))


def unsorted_events(width, height):
    return make_events([1, 2, 3], [1, 2, 3], [10, 20, 30], [1, -1, 1])


# --------------------------------------------------------------------------------------------- ncaltech101
def test_ncaltech_scan_classes_labels_keys_and_stratified_split(tmp_path):
    truth = make_ncaltech(tmp_path / "src")
    (tmp_path / "src" / "airplanes" / "notes.txt").write_text("not a sample")
    conv = get_converter("ncaltech101")
    plan = conv.scan(tmp_path / "src", seed=3)
    assert plan.classes == sorted(CALTECH_CLASSES)  # BACKGROUND_Google and Faces_easy are classes like the others
    assert plan.sensor_size == (240, 180) and plan.kind == "samples"
    assert sorted(it.key for it in plan.items) == sorted(truth)
    for it in plan.items:
        assert plan.classes[it.label] == it.key.split("/")[0]
        assert it.path == os.path.abspath(tmp_path / "src" / (it.key + ".bin"))
    # stratified: 1 of 5 per class to val (20 %), train the rest; the same seed gives the same split
    val = Counter(plan.classes[it.label] for it in plan.items if it.split == "val")
    assert val == {c: 1 for c in CALTECH_CLASSES}
    again = conv.scan(tmp_path / "src", seed=3)
    assert [(i.key, i.split) for i in again.items] == [(i.key, i.split) for i in plan.items]
    other = [conv.scan(tmp_path / "src", seed=s) for s in range(4, 8)]
    assert any([i.split for i in o.items] != [i.split for i in plan.items] for o in other)
    assert plan.params["split"] == "stratified" and plan.params["seed"] == 3


def test_ncaltech_read_is_bit_exact_with_overflow_markers(tmp_path):
    src = tmp_path / "src"
    make_ncaltech(src, classes=["airplanes"], per_class=1)
    ev = rand_events(7, 400, 240, 180, t0=2**23 - 5000, span=3 * 2**13 + 10_000)  # crosses 2**23: markers
    write_atis_bin(src / "airplanes" / "image_0002.bin", ev)
    raw = np.frombuffer((src / "airplanes" / "image_0002.bin").read_bytes(), np.uint8).reshape(-1, 5)
    assert (raw[:, 1] == 240).sum() > 0  # the file really holds overflow markers
    conv = get_converter("ncaltech101")
    plan = conv.scan(src)
    item = next(i for i in plan.items if i.key == "airplanes/image_0002")
    [sample] = conv.read(item, plan)
    assert same(sample.events, ev) and same(sample.events, read_atis_bin(item.path))
    assert sample.key == item.key and sample.label == 0 and sample.attrs == {"source": "airplanes/image_0002.bin"}


def test_ncaltech_split_file_mem_format_and_exact_class_matching(tmp_path):
    src = tmp_path / "src"
    make_ncaltech(src, classes=["ant", "elephant"], per_class=3)
    split = tmp_path / "split.txt"
    # MEM writes .npy names; ant must match "ant" only, never "elephant"
    split.write_text("train/ant/image_0001.npy\ntrain/ant/image_0002\nval/ant/image_0003.bin\n\n"
                     "train/elephant/image_0001.npy\nval/elephant/image_0002.npy\n")
    plan = get_converter("ncaltech101").scan(src, split_file=split)
    got = {i.key: (i.split, plan.classes[i.label]) for i in plan.items}
    assert got == {"ant/image_0001": ("train", "ant"), "ant/image_0002": ("train", "ant"),
                   "ant/image_0003": ("val", "ant"), "elephant/image_0001": ("train", "elephant"),
                   "elephant/image_0002": ("val", "elephant")}
    assert plan.params["split"] == "file" and plan.params["unlisted"] == 1  # elephant/image_0003 left out
    for it in plan.items:
        assert Path(it.path).parent.name == plan.classes[it.label]


@pytest.mark.parametrize("lines, match", [
    ("train/ant/image_0001\ntrain/ant/image_0009\n", "line 2: no file for 'ant/image_0009'"),
    ("train/an/image_0001\n", "line 1: no file for 'an/image_0001'"),  # a prefix of a class is no class
    ("train/ant/image_0001\nval/ant/image_0001.npy\n", "line 2: 'ant/image_0001' is listed twice"),
    ("train\n", "line 1: expected"),
    ("\n\n", "lists no samples"),
])
def test_ncaltech_bad_split_file_names_file_and_line(tmp_path, lines, match):
    src = tmp_path / "src"
    make_ncaltech(src, classes=["ant", "elephant"], per_class=1)
    split = tmp_path / "split.txt"
    split.write_text(lines)
    with pytest.raises(InputError, match=match) as info:
        get_converter("ncaltech101").scan(src, split_file=split)
    assert info.value.path == str(split)


def test_ncaltech_unusable_source(tmp_path):
    conv = get_converter("ncaltech101")
    with pytest.raises(InputError, match="not a directory"):
        conv.scan(tmp_path / "missing")
    (tmp_path / "empty" / "airplanes").mkdir(parents=True)
    with pytest.raises(InputError, match="no class folders with .bin files"):
        conv.scan(tmp_path / "empty")
    with pytest.raises(ValueError, match="unsorted"):
        conv.scan(tmp_path / "empty", unsorted="maybe")


def test_unsorted_timestamps_policy_all_formats(tmp_path):
    """A file whose timestamps go back is an error by default; unsorted='sort' takes the stably sorted events."""
    ev = unsorted_events(10, 10)
    cases = []
    cal = tmp_path / "cal"
    (cal / "a").mkdir(parents=True)
    write_atis_bin(cal / "a" / "image_0001.bin", ev)
    swap_records(cal / "a" / "image_0001.bin", 0, 5)
    cases.append(("ncaltech101", cal))
    cars = tmp_path / "cars"
    (cars / "train" / "cars").mkdir(parents=True)
    path = cars / "train" / "cars" / "obj_000001_td.dat"
    write_prophesee_dat(path, ev, 120, 100)
    swap_records(path, len(path.read_bytes()) - 8 * len(ev), 8)
    cases.append(("ncars", cars))
    inet = tmp_path / "inet"
    (inet / "extracted_train" / "n01").mkdir(parents=True)
    data = np.zeros(3, dtype=[("x", "<u2"), ("y", "<u2"), ("t", "<i8"), ("p", "?")])
    data["x"], data["y"], data["t"], data["p"] = [2, 1, 3], [2, 1, 3], [20, 10, 30], [False, True, True]
    np.savez_compressed(inet / "extracted_train" / "n01" / "x_1.npz", event_data=data)
    cases.append(("nimagenet", inet))
    for name, src in cases:
        conv = get_converter(name)
        plan = conv.scan(src)
        [item] = plan.items
        with pytest.raises(InputError, match="timestamps not sorted in the file at event 1") as info:
            conv.read(item, plan)
        assert info.value.path == item.path
        plan = conv.scan(src, unsorted="sort")
        [sample] = conv.read(item, plan)
        assert same(sample.events, ev), name


# ------------------------------------------------------------------------------------------------- ncars
def make_ncars(src: Path, folders=("train", "test"), per_class=3) -> dict:
    truth = {}
    for s, folder in enumerate(folders):
        for c, cls in enumerate(("background", "cars")):
            (src / folder / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                ev = rand_events(1000 * s + 100 * c + i, 40 + i, 120, 100, span=100_000)
                name = f"obj_{1000 * s + 100 * c + i:06d}_td"
                write_prophesee_dat(src / folder / cls / f"{name}.dat", ev, 120, 100)
                truth[f"{folder}/{cls}/{name}"] = ev
    return truth


@pytest.mark.parametrize("folders", [("train", "test"), ("n-cars_train", "n-cars_test")])
def test_ncars_scan_and_read(tmp_path, folders):
    truth = make_ncars(tmp_path / "src", folders)
    conv = get_converter("ncars")
    plan = conv.scan(tmp_path / "src")
    assert plan.classes == ["background", "cars"] and plan.sensor_size == (120, 100)
    assert sorted(i.key for i in plan.items) == sorted(truth)
    for it in plan.items:
        assert it.split == ("train" if "train" in it.key else "test")
        assert plan.classes[it.label] == it.key.split("/")[1]
        [sample] = conv.read(it, plan)
        assert same(sample.events, truth[it.key]) and same(sample.events, read_prophesee_dat(it.path))
        assert sample.label == it.label


def test_ncars_folder_rules(tmp_path):
    make_ncars(tmp_path / "src", ("train", "n-cars_train"), per_class=1)
    with pytest.raises(InputError, match="both train/ and n-cars_train/ exist"):
        get_converter("ncars").scan(tmp_path / "src")
    (tmp_path / "none" / "train").mkdir(parents=True)
    with pytest.raises(InputError, match="no .dat files"):
        get_converter("ncars").scan(tmp_path / "none")


def test_ncars_real_recording(tmp_path):
    """The real N-Cars clip from tonic's test data converts, byte for byte as the decoder reads it."""
    env = os.environ.get("EVFORGE_REALDATA")
    real = (Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "realdata") / "sample_ncars.dat"
    if not real.is_file():
        pytest.skip(f"real sample {real} is absent (set EVFORGE_REALDATA)")
    (tmp_path / "src" / "train" / "cars").mkdir(parents=True)
    shutil.copy(real, tmp_path / "src" / "train" / "cars" / "obj_000001_td.dat")
    conv = get_converter("ncars")
    plan = conv.scan(tmp_path / "src")
    [sample] = conv.read(plan.items[0], plan)
    assert len(sample.events) == 2009 and same(sample.events, read_prophesee_dat(real))


# --------------------------------------------------------------------------------------------- nimagenet
WNIDS = ["n01440764", "n01443537", "n02102040", "n03000134"]


def make_nimagenet(src: Path, per_class=2, legacy_every=3) -> dict:
    truth, k = {}, 0
    for split, folder in (("train", "extracted_train"), ("val", "extracted_val")):
        for c, wnid in enumerate(WNIDS):
            (src / folder / wnid).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                name = f"{wnid}_{i}" if split == "train" else f"ILSVRC2012_val_{c * per_class + i:08d}"
                ev = rand_events(k, 60 + k, 640, 480, t0=10**6)
                write_nimagenet_npz(src / folder / wnid / f"{name}.npz", ev, legacy=k % legacy_every == 2)
                truth[f"{folder}/{wnid}/{name}"] = ev
                k += 1
    return truth


def test_nimagenet_scan_read_new_and_legacy_fields(tmp_path):
    truth = make_nimagenet(tmp_path / "src")
    # a legacy structured event_data (x_pos, y_pos, timestamp as float seconds, polarity as int8 -1/+1)
    ev = rand_events(99, 30, 640, 480, span=500_000)
    data = np.zeros(len(ev), dtype=[("x_pos", "<i4"), ("y_pos", "<i4"), ("timestamp", "<f8"), ("polarity", "i1")])
    data["x_pos"], data["y_pos"], data["timestamp"], data["polarity"] = ev["x"], ev["y"], ev["t"] / 1e6, ev["p"]
    np.savez_compressed(tmp_path / "src" / "extracted_train" / WNIDS[0] / "legacy_struct.npz", event_data=data)
    truth[f"extracted_train/{WNIDS[0]}/legacy_struct"] = ev
    conv = get_converter("nimagenet")
    plan = conv.scan(tmp_path / "src")
    assert plan.classes == WNIDS and plan.sensor_size == (640, 480)
    assert sorted(i.key for i in plan.items) == sorted(truth)
    for it in plan.items:
        assert it.split == ("train" if it.key.startswith("extracted_train/") else "val")
        assert plan.classes[it.label] == it.key.split("/")[1]
        [sample] = conv.read(it, plan)
        assert same(sample.events, truth[it.key]) and same(sample.events, read_nimagenet_npz(it.path))


def test_nimagenet_lists_with_foreign_paths_class_list_and_mini(tmp_path):
    src = tmp_path / "src"
    truth = make_nimagenet(src)
    train = sorted(k for k in truth if k.startswith("extracted_train/"))
    # lists written on another machine: absolute foreign paths, Windows separators, with and without .npz
    (src / "train_list.txt").write_text(
        f"/mnt/data/N_Imagenet/{train[0]}.npz\nC:\\data\\{train[1].replace('/', chr(92))}.npz\n"
        f"/x/{train[2]}\n\n{'/nowhere/' + WNIDS[3] + '/' + 'missing_file.npz'}\n")
    conv = get_converter("nimagenet")
    plan = conv.scan(src)
    train_keys = sorted(i.key for i in plan.items if i.split == "train")
    assert train_keys == sorted(train[:3] + [f"extracted_train/{WNIDS[3]}/missing_file"])
    assert len([i for i in plan.items if i.split == "val"]) == 2 * len(WNIDS)  # no val list: all files
    missing = next(i for i in plan.items if i.key.endswith("missing_file"))
    with pytest.raises(InputError, match="cannot read file") as info:
        conv.read(missing, plan)
    assert info.value.path == missing.path

    # class list order defines labels; mini keeps the listed classes (lists stay the full ones)
    class_list = tmp_path / "classes.txt"
    class_list.write_text("\n".join(f"{w} name{i}" for i, w in enumerate(reversed(WNIDS))) + "\n")
    mini_list = tmp_path / "mini.txt"
    mini_list.write_text(f"{WNIDS[0]}\n{WNIDS[3]}\n")
    plan = conv.scan(src, class_list=class_list, mini=True, mini_list=mini_list)
    assert plan.classes == [WNIDS[3], WNIDS[0]]
    assert {i.key.split("/")[1] for i in plan.items} == {WNIDS[0], WNIDS[3]}
    assert all(plan.classes[i.label] == i.key.split("/")[1] for i in plan.items)
    assert plan.params["mini"] is True and plan.params["num_classes"] == 2


def test_nimagenet_bad_lists(tmp_path):
    src = tmp_path / "src"
    make_nimagenet(src, per_class=1)
    conv = get_converter("nimagenet")
    bad = tmp_path / "bad.txt"
    bad.write_text("/a/n09999999/x.npz\n")
    with pytest.raises(InputError, match="line 1: class 'n09999999'"):
        conv.scan(src, train_list=bad)
    bad.write_text(f"/a/{WNIDS[0]}/x.npz\n/b/{WNIDS[0]}/x.npz\n")
    with pytest.raises(InputError, match="line 2: .* already listed on line 1"):
        conv.scan(src, train_list=bad)
    bad.write_text("justafile.npz\n")
    with pytest.raises(InputError, match="line 1: expected a path"):
        conv.scan(src, train_list=bad)
    short = tmp_path / "short.txt"
    short.write_text(f"{WNIDS[0]}\n")
    with pytest.raises(InputError, match="class folder is not in the class list"):
        conv.scan(src, class_list=short)
    bad.write_text("n09999999\n")
    with pytest.raises(InputError, match="line 1: class 'n09999999' is not among"):
        conv.scan(src, mini=True, mini_list=bad)
    with pytest.raises(ValueError, match="mini_list"):
        conv.scan(src, mini=True)
    with pytest.raises(InputError, match="no extracted_train"):
        conv.scan(tmp_path)


# ---------------------------------------------------------------------------------------------- registry
def test_registry(monkeypatch):
    assert {"ncaltech101", "ncars", "nimagenet", "dsec", "tartanair"} <= set(available())
    assert get_converter("ncars").name == "ncars" and get_converter("ncars") is not get_converter("ncars")
    with pytest.raises(ValueError, match="unknown converter 'nope'; known: .*ncaltech101"):
        get_converter("nope")
    with pytest.raises(ValueError, match="did you mean 'ncars'"):
        get_converter("ncar")
    monkeypatch.setitem(CONVERTERS._entries, "ghost", "evforge.dataset_builder.converters.ghost:Ghost")
    with pytest.raises(ValueError, match="'ghost' is not available"):
        get_converter("ghost")

    class Toy:
        name = "toy"

        def scan(self, src, **options):
            return DatasetPlan("toy", "samples", (4, 4), ["a"], [SourceItem("k", "p", 0)])

        def read(self, item, plan):
            return [Sample(item.key, make_events([0], [0], [0], [1]), 0)]

    monkeypatch.setitem(CONVERTERS._entries, "toy", None)  # restored (removed) after the test
    register("toy", Toy)
    assert isinstance(get_converter("toy"), Toy) and "toy" in available()
