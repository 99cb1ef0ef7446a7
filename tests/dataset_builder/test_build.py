"""The build runner on small fake datasets: shards, manifest, subsets, bad input, resume, executors.

Shows: decoded source == shard sample bit for bit; labels, splits, keys and nested subsets in the manifest;
every bad-input case reported once in errors.jsonl while the rest converts; a build crashed (exception or
SIGKILL) and rerun ends with the same manifest and shard bytes as an uninterrupted one, without redoing finished
units; a tampered shard is caught by verify and redone; joblib (2 workers) and Ray on loopback equal a
sequential build.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from evforge.dataset_builder.build import (
    ERRORS_NAME,
    RECORD_SUFFIX,
    build_dataset,
    plan_units,
)
from evforge.dataset_builder.converters import get_converter
from evforge.dataset_builder.subsets import read_split_file, split_assignment
from evforge.dataset_builder.verify import verify
from evforge.errors import LockedError
from evforge.formats.decoders import read_atis_bin, write_atis_bin, write_nimagenet_npz, write_prophesee_dat
from evforge.formats.events import EVENT_DTYPE, make_events
from evforge.formats.manifest import MANIFEST_NAME, Manifest
from evforge.formats.shards import ShardReader
from evforge.locks import FolderLock

CLASSES = ["BACKGROUND_Google", "Faces_easy", "airplanes", "ant", "elephant"]
CMD = "evforge convert ncaltech101 SRC --out OUT"  # one command for all builds that are compared
FAST = dict(progress=False, command=CMD)


def rand_events(seed, n, width, height, t0=0, span=300_000):
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(0, span, n)) + t0
    return make_events(rng.integers(0, width, n), rng.integers(0, height, n), t, rng.choice([-1, 1], n))


def make_ncaltech(src: Path, per_class=6) -> dict:
    truth = {}
    for c, name in enumerate(CLASSES):
        (src / name).mkdir(parents=True, exist_ok=True)
        for i in range(1, per_class + 1):
            ev = rand_events(100 * c + i, 40 + 5 * i, 240, 180, t0=c * 2**22)  # some files need overflow markers
            write_atis_bin(src / name / f"image_{i:04d}.bin", ev)
            truth[f"{name}/image_{i:04d}"] = ev
    return truth


@pytest.fixture
def caltech(tmp_path):
    src = tmp_path / "src"
    return src, make_ncaltech(src)


def comparable(manifest_path: Path) -> dict:
    """The manifest without the one field that varies between otherwise identical builds."""
    data = json.loads(Path(manifest_path).read_text())
    data["provenance"].pop("created")
    return data


def shard_bytes(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*/*.h5"))}


def assert_same_build(out_a: Path, out_b: Path) -> None:
    assert comparable(out_a / MANIFEST_NAME) == comparable(out_b / MANIFEST_NAME)
    assert shard_bytes(out_a) == shard_bytes(out_b)
    assert (out_a / ERRORS_NAME).read_text() == (out_b / ERRORS_NAME).read_text()


def no_temp_files(out: Path) -> bool:
    return not [p for p in out.rglob("*") if ".tmp-" in p.name]


# ------------------------------------------------------------------------------------------ the results
def test_build_round_trip_labels_splits_subsets(caltech, tmp_path):
    src, truth = caltech
    report = build_dataset("ncaltech101", src, tmp_path / "out", samples_per_unit=4, seed=1,
                           split_copy_dir=tmp_path / "manifests", **FAST)
    out = tmp_path / "out"
    assert (report.num_samples, report.num_errors, report.exit_code) == (30, 0, 0)
    assert report.splits == {"train": 24, "val": 6} and report.units_run == report.num_units == 8
    assert verify(report.manifest_path) == []
    m = Manifest.load(report.manifest_path)
    assert m.classes == sorted(CLASSES) and m.sensor_size == [240, 180] and m.name == "ncaltech101"
    assert [e["path"] for e in m.shards] == [f"{s}/{s}-{i:05d}.h5" for s, n in (("train", 6), ("val", 2))
                                             for i in range(n)]
    assert (out / ERRORS_NAME).read_text() == ""

    seen = set()
    for entry in m.shards:
        reader = ShardReader(out / entry["path"])
        assert reader.keys == sorted(reader.keys)
        for i in range(len(reader)):
            events, label, key = reader.sample(i)
            # bit for bit: the shard holds exactly what the decoder reads from the source file
            assert events.dtype == EVENT_DTYPE and events.tobytes() == read_atis_bin(src / f"{key}.bin").tobytes()
            assert events.tobytes() == truth[key].tobytes()
            assert m.classes[label] == key.split("/")[0]
            assert reader.sample_attrs(i) == {"source": f"{key}.bin"}
            seen.add(key)
        reader.close()
    assert seen == set(truth)

    # subsets: 2/5/10/20/50 % of train, nested, every class present, seeded, recorded in the manifest
    assign = split_assignment(report.manifest_path)
    names = [f"train_{p}pct" for p in (2, 5, 10, 20, 50)]
    assert list(m.subsets) == names
    prev = set()
    for name in names:
        sub = m.subsets[name]
        keys = set(sub["keys"])
        assert sub["split"] == "train" and sub["seed"] == 1 and keys <= set(assign["train"]) and prev <= keys
        assert {k.split("/")[0] for k in keys} == set(CLASSES)
        prev = keys
    assert len(m.subsets["train_50pct"]["keys"]) == 12
    prov = m.provenance
    assert prov["converter"] == "ncaltech101" and prov["command"] == CMD
    assert prov["converter_params"]["split"] == "stratified" and prov["converter_params"]["num_units"] == 8

    # the split copy for the repository is MEM's format and feeds a rebuild with the same split
    copy = tmp_path / "manifests" / "ncaltech101_split.txt"
    assert report.split_file_path == copy and read_split_file(copy) == assign
    again = build_dataset("ncaltech101", src, tmp_path / "again", split_file=copy, **FAST)
    assert split_assignment(again.manifest_path) == assign


def test_plan_units_is_deterministic_and_sized(caltech):
    src, _ = caltech
    conv = get_converter("ncaltech101")
    plan = conv.scan(src)
    units = plan_units(plan, samples_per_unit=5)
    assert [u.unit_id for u in units] == [f"train-{i:05d}" for i in range(5)] + ["val-00000", "val-00001"]
    assert [len(u.items) for u in units] == [5, 5, 5, 5, 4, 5, 1]
    keys = [k for u in units for k in u.item_keys]
    assert keys == [i.key for i in sorted(plan.items, key=lambda i: (i.split, i.key))]
    assert all(u.shard == f"{u.split}/{u.unit_id}.h5" for u in units)
    # by size: file bytes x 9/5 per item against the target; a too-large item still gets a unit
    plan.items.reverse()
    sizes = [os.path.getsize(i.path) * 9 // 5 + 48 for i in sorted(plan.items, key=lambda i: (i.split, i.key))]
    target = 3 * max(sizes)
    by_size = plan_units(plan, target_bytes=target, size_factor=9 / 5)
    assert by_size == plan_units(plan, target_bytes=target, size_factor=9 / 5)
    assert [k for u in by_size for k in u.item_keys] == keys
    size_of = dict(zip(keys, sizes))
    for u, nxt in zip(by_size, by_size[1:] + [None]):
        assert sum(size_of[k] for k in u.item_keys) <= target
        if nxt is not None and nxt.split == u.split:  # cut only when the next item would not fit: >= 3 items
            assert len(u.items) >= 3
    assert len(plan_units(plan, target_bytes=1)) == len(plan.items)
    with pytest.raises(ValueError, match="samples_per_unit"):
        plan_units(plan, samples_per_unit=0)


# ------------------------------------------------------------------------------------------- bad input
def test_bad_input_ncaltech_every_case(caltech, tmp_path):
    src, truth = caltech
    good = rand_events(5, 50, 240, 180)
    bad = {}

    def bad_file(key, data: bytes, expect: str):
        (src / f"{key}.bin").write_bytes(data)
        bad[key] = expect

    write_atis_bin(tmp_path / "ok.bin", good)
    ok = (tmp_path / "ok.bin").read_bytes()
    bad_file("ant/image_0101", ok[:7], "truncated: 7 bytes is not a multiple of 5")  # odd length
    bad_file("ant/image_0102", ok[:-2], "is not a multiple of 5")  # cut inside the last event
    bad_file("BACKGROUND_Google/image_0103", b"", "no events")  # empty
    outside = good.copy()
    outside["y"][10] = 200  # a valid ATIS row, outside the 240x180 canvas
    write_atis_bin(tmp_path / "outside.bin", outside)
    bad_file("elephant/image_0104", (tmp_path / "outside.bin").read_bytes(), "y=200 at index 10 is outside")
    assert good["t"][0] < good["t"][1]
    swapped = bytearray(ok)
    swapped[0:5], swapped[5:10] = ok[5:10], ok[0:5]  # the first two events change places
    bad_file("Faces_easy/image_0105", bytes(swapped), "timestamps not sorted in the file")
    (src / "Faces_easy" / "image_0106.bin").mkdir()  # unreadable: a directory where a file should be
    bad["Faces_easy/image_0106"] = "cannot read file"
    if os.geteuid() != 0:  # root reads a mode-000 file anyway
        bad_file("airplanes/image_0107", ok, "cannot read file")
        os.chmod(src / "airplanes" / "image_0107.bin", 0)

    out = tmp_path / "out"
    report = build_dataset("ncaltech101", src, out, samples_per_unit=4, **FAST)
    lines = [json.loads(line) for line in (out / ERRORS_NAME).read_text().splitlines()]
    assert [e["key"] for e in lines] == sorted(bad)  # one line per bad file, sorted
    for e in lines:
        assert e["path"] == os.path.abspath(src / f"{e['key']}.bin")
        assert e["error"].startswith(e["path"] + ": ") and bad[e["key"]] in e["error"], e
        assert "\n" not in e["error"]
    assert report.num_errors == len(bad) and report.exit_code == 1
    assert report.num_samples == len(truth)  # the rest is converted
    assert verify(report.manifest_path) == [] and no_temp_files(out)
    assert set(k for keys in split_assignment(report.manifest_path).values() for k in keys) == set(truth)
    assert Manifest.load(report.manifest_path).provenance["converter_params"]["num_errors"] == len(bad)
    # --allow-errors: the same build, exit code 0 (nothing redone: the finished units verify)
    again = build_dataset("ncaltech101", src, out, samples_per_unit=4, allow_errors=True, **FAST)
    assert again.exit_code == 0 and again.num_errors == len(bad) and again.units_run == 0
    assert (out / ERRORS_NAME).read_text() == "".join(json.dumps(e) + "\n" for e in lines)


def test_bad_input_ncars(tmp_path):
    src = tmp_path / "src"
    for split in ("train", "test"):
        for c, cls in enumerate(("background", "cars")):
            (src / split / cls).mkdir(parents=True)
            for i in range(3):
                write_prophesee_dat(src / split / cls / f"obj_{c}{i}_td.dat", rand_events(c * 10 + i, 30, 120, 100),
                                    120, 100)
    d = src / "train" / "cars"
    (d / "bad_noheader.dat").write_bytes(b"\x00\x08" + b"\x00" * 16)
    (d / "bad_size.dat").write_bytes(b"% Version 2\n% Width 120\n% Height 100\n\x00\x10" + b"\x00" * 32)
    (d / "bad_garbled.dat").write_bytes(b"% Width one-twenty\n\x00\x08" + b"\x00" * 8)
    outside = rand_events(1, 20, 120, 100)
    outside["x"][3] = 130
    write_prophesee_dat(d / "bad_outside.dat", outside, 304, 240)
    write_prophesee_dat(d / "bad_empty.dat", rand_events(1, 0, 120, 100), 120, 100)
    report = build_dataset("ncars", src, tmp_path / "out", allow_errors=True, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "out" / ERRORS_NAME).read_text().splitlines()]
    expect = {"bad_empty": "no events", "bad_garbled": "garbled header", "bad_noheader": "missing header",
              "bad_outside": "x=130 at index 3 is outside the 120x100 sensor", "bad_size": "unsupported event size"}
    assert {Path(e["path"]).stem: e["error"].split(": ", 1)[1] for e in lines}.keys() == expect.keys()
    for e in lines:
        assert e["error"].startswith(e["path"]) and expect[Path(e["path"]).stem] in e["error"]
    assert report.num_samples == 12 and report.splits == {"test": 6, "train": 6} and report.exit_code == 0


def test_bad_input_nimagenet(tmp_path):
    src = tmp_path / "src"
    for split in ("extracted_train", "extracted_val"):
        for wnid in ("n01", "n02"):
            (src / split / wnid).mkdir(parents=True)
            for i in range(2):
                write_nimagenet_npz(src / split / wnid / f"{wnid}_{i}.npz", rand_events(i, 25, 640, 480))
    d = src / "extracted_train" / "n01"
    np.savez_compressed(d / "bad_noevents.npz", something=np.arange(3))
    (d / "bad_notzip.npz").write_bytes(b"hello world")
    outside = rand_events(3, 10, 640, 480)
    outside["x"][2] = 700
    write_nimagenet_npz(d / "bad_outside.npz", outside)
    write_nimagenet_npz(d / "bad_empty.npz", rand_events(3, 0, 640, 480))
    report = build_dataset("nimagenet", src, tmp_path / "out", progress=False)
    lines = [json.loads(line) for line in (tmp_path / "out" / ERRORS_NAME).read_text().splitlines()]
    expect = {"bad_noevents": "no 'event_data' array", "bad_notzip": "not an .npz", "bad_outside": "x=700",
              "bad_empty": "no events"}
    assert sorted(Path(e["path"]).stem for e in lines) == sorted(expect)
    for e in lines:
        assert e["error"].startswith(e["path"]) and expect[Path(e["path"]).stem] in e["error"]
        assert e["key"] == f"extracted_train/n01/{Path(e['path']).stem}"
    assert report.num_samples == 8 and report.exit_code == 1 and verify(report.manifest_path) == []


# ---------------------------------------------------------------------------------------- resume, verify
def test_crash_and_rerun_equals_uninterrupted(caltech, tmp_path):
    src, _ = caltech
    ref = build_dataset("ncaltech101", src, tmp_path / "ref", samples_per_unit=3, **FAST)
    out = tmp_path / "out"
    done = []

    def crash_after_three(result):
        done.append(result)
        if len(done) == 3:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        build_dataset("ncaltech101", src, out, samples_per_unit=3, on_unit_done=crash_after_three, **FAST)
    assert not (out / MANIFEST_NAME).exists() and no_temp_files(out)
    finished = {r.shard: (out / r.shard).stat().st_mtime_ns for r in done}
    time.sleep(0.01)
    report = build_dataset("ncaltech101", src, out, samples_per_unit=3, **FAST)
    assert (report.units_skipped, report.units_run) == (3, ref.num_units - 3)
    assert {s: (out / s).stat().st_mtime_ns for s in finished} == finished  # finished units were not redone
    assert_same_build(ref.out, out)


def test_sigkill_and_rerun_equals_uninterrupted(caltech, tmp_path):
    src, _ = caltech
    out = tmp_path / "out"
    script = textwrap.dedent("""
        import sys, time
        from evforge.dataset_builder.build import build_dataset
        build_dataset("ncaltech101", sys.argv[1], sys.argv[2], samples_per_unit=1, progress=False,
                      command=sys.argv[3], on_unit_done=lambda r: time.sleep(0.1))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(src), str(out), CMD])
    try:
        deadline = time.monotonic() + 60
        while len(list(out.glob(f"*/*{RECORD_SUFFIX}"))) < 4 and proc.poll() is None:
            assert time.monotonic() < deadline, "the build subprocess made no progress"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert not (out / MANIFEST_NAME).exists()
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/*.h5") if Path(f"{p}{RECORD_SUFFIX}").exists()}
    report = build_dataset("ncaltech101", src, out, samples_per_unit=1, **FAST)
    assert report.units_skipped == len(before) >= 4 and no_temp_files(out)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    ref = build_dataset("ncaltech101", src, tmp_path / "ref", samples_per_unit=1, **FAST)
    assert_same_build(ref.out, out)


def test_tampered_shard_is_caught_and_redone(caltech, tmp_path):
    src, _ = caltech
    out = tmp_path / "out"
    first = build_dataset("ncaltech101", src, out, samples_per_unit=5, **FAST)
    original = shard_bytes(out)
    target = out / "train" / "train-00002.h5"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    faults = verify(first.manifest_path)
    assert any(f.startswith(str(target)) and "sha256 mismatch" in f for f in faults), faults
    report = build_dataset("ncaltech101", src, out, samples_per_unit=5, **FAST)
    assert (report.units_run, report.units_skipped) == (1, first.num_units - 1)
    assert shard_bytes(out) == original and verify(report.manifest_path) == []


def test_rerun_with_other_settings_redoes_units_and_cleans_up(caltech, tmp_path):
    src, _ = caltech
    out = tmp_path / "out"
    build_dataset("ncaltech101", src, out, samples_per_unit=4, **FAST)
    (out / "train" / "train-00000.h5.tmp-12345").write_bytes(b"half a shard")  # left by a killed writer
    lz4 = build_dataset("ncaltech101", src, out, samples_per_unit=4, compression="lz4", **FAST)
    assert lz4.units_run == lz4.num_units and no_temp_files(out)  # another codec: nothing reused
    fewer = build_dataset("ncaltech101", src, out, samples_per_unit=10, compression="lz4", **FAST)
    assert fewer.num_units == 4
    # shards of the earlier plan (train-00003 .. 00005) are gone: OUT holds what the manifest lists
    listed = {e["path"] for e in Manifest.load(fewer.manifest_path).shards}
    assert {p.relative_to(out).as_posix() for p in out.glob("*/*.h5")} == listed
    assert {p.relative_to(out).as_posix().removesuffix(RECORD_SUFFIX) for p in out.glob(f"*/*{RECORD_SUFFIX}")} \
        == listed
    assert verify(fewer.manifest_path) == []


def test_options_and_lock(caltech, tmp_path):
    src, _ = caltech
    with pytest.raises(ValueError, match="has no option 'colour'"):
        build_dataset("ncaltech101", src, tmp_path / "o", colour=1, progress=False)
    with pytest.raises(ValueError, match="does not take a split file"):
        build_dataset("ncars", src, tmp_path / "o", split_file=tmp_path / "x.txt", progress=False)
    with pytest.raises(ValueError, match="executor"):
        build_dataset("ncaltech101", src, tmp_path / "o", executor="dask", progress=False)
    (tmp_path / "locked").mkdir()
    with FolderLock(tmp_path / "locked", "evforge test"):
        with pytest.raises(LockedError, match="another evforge run .*'evforge test'"):
            build_dataset("ncaltech101", src, tmp_path / "locked", progress=False)


# ---------------------------------------------------------------------------------------------- executors
def test_joblib_two_workers_equal_sequential(caltech, tmp_path):
    src, _ = caltech
    (src / "ant" / "image_0999.bin").write_bytes(b"12345678")  # errors must match too
    one = build_dataset("ncaltech101", src, tmp_path / "one", samples_per_unit=4, **FAST)
    two = build_dataset("ncaltech101", src, tmp_path / "two", samples_per_unit=4, workers=2, **FAST)
    assert two.units_run == two.num_units and two.num_errors == one.num_errors == 1
    assert_same_build(one.out, two.out)


def test_ray_on_loopback_equals_local(caltech, tmp_path, monkeypatch):
    pytest.importorskip("ray", reason="ray is not installed (pip install ray) - the Ray executor is untested")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    src, _ = caltech
    local = build_dataset("ncaltech101", src, tmp_path / "local", samples_per_unit=4, **FAST)
    ray_run = build_dataset("ncaltech101", src, tmp_path / "ray", samples_per_unit=4, executor="ray", workers=2,
                            **FAST)
    assert ray_run.units_run == ray_run.num_units
    assert_same_build(local.out, ray_run.out)
