"""Nothing silently wrong (issue 15) on the dataset side: each test is a way a dataset used to be read wrong.

* a rebuild with other options killed half way: the folder is marked incomplete and every reader refuses it;
* shards rewritten under an old manifest: the loader checks counts and sizes against the manifest;
* shard data from outside the dataset (external links, external storage, virtual datasets): refused;
* a source file repaired or replaced after a build: its unit is redone (``overwrite`` redoes all);
* one flipped byte: the loader refuses the sample instead of returning unsorted times;
* a full disk: one ``OutputError`` naming the file, no temp file, finished units kept, the rerun completes;
* a killed parallel build: its worker processes end with it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from evforge.data.dataset import EventDataset
from evforge.dataset_builder.build import ERRORS_NAME, build_dataset
from evforge.dataset_builder.inspect import inspect_path, verify_dataset
from evforge.dataset_builder.verify import verify
from evforge.errors import InputError, OutputError
from evforge.formats.completion import INCOMPLETE_NAME
from evforge.formats.decoders import write_atis_bin
from evforge.formats.events import make_events
from evforge.formats.manifest import MANIFEST_NAME, Manifest
from evforge.formats.shards import ShardReader, ShardWriter, sha256_file

CLASSES = ["airplanes", "ant", "bass", "chair"]
FAST = dict(progress=False, command="evforge convert ncaltech101 SRC --out OUT")


def rand_events(seed, n, t0=0):
    rng = np.random.default_rng(seed)
    return make_events(rng.integers(0, 240, n), rng.integers(0, 180, n), np.sort(rng.integers(0, 200_000, n)) + t0,
                       rng.choice([-1, 1], n))


def make_source(src: Path, per_class: int = 12) -> Path:
    for c, name in enumerate(CLASSES):
        (src / name).mkdir(parents=True, exist_ok=True)
        for i in range(1, per_class + 1):
            write_atis_bin(src / name / f"image_{i:04d}.bin", rand_events(100 * c + i, 30 + 3 * i))
    return src


@pytest.fixture
def src(tmp_path):
    return make_source(tmp_path / "src")


class Killed(Exception):
    pass


def kill_after(n: int):
    """An ``on_unit_done`` hook that stops the build after ``n`` units (as a kill would, before the manifest)."""
    done = []

    def hook(result):
        done.append(result)
        if len(done) >= n:
            raise Killed

    return hook


# ---------------------------------------------------------------------------------------- 1. rebuilds
def test_killed_rebuild_with_other_options_is_refused_by_every_reader(src, tmp_path):
    out = tmp_path / "out"
    build_dataset("ncaltech101", src, out, samples_per_unit=6, seed=0, **FAST)
    assert len(EventDataset(out, "train")) == 38
    # the same folder, another seed (another split) and shard size; killed after a few shards were rewritten
    with pytest.raises(Killed):
        build_dataset("ncaltech101", src, out, samples_per_unit=5, seed=1, on_unit_done=kill_after(3), **FAST)
    assert (out / INCOMPLETE_NAME).exists() and (out / MANIFEST_NAME).exists()  # the old manifest is still there
    for read in (lambda: EventDataset(out, "train"), lambda: EventDataset(out, "val", subset=None),
                 lambda: Manifest.load(out / MANIFEST_NAME), lambda: inspect_path(out)):
        with pytest.raises(InputError, match="incomplete dataset: a build .* has not finished"):
            read()
    faults = verify(out / MANIFEST_NAME)
    assert len(faults) == 1 and "incomplete dataset" in faults[0]
    # the rerun of that build finishes it: readable again, verified, and only the new split's samples
    report = build_dataset("ncaltech101", src, out, samples_per_unit=5, seed=1, **FAST)
    assert not (out / INCOMPLETE_NAME).exists() and verify(report.manifest_path) == []
    train, val = EventDataset(out, "train"), EventDataset(out, "val")
    assert len(train) + len(val) == 48 and not set(train.keys) & set(val.keys)


def test_a_failed_scan_does_not_mark_a_good_dataset_incomplete(src, tmp_path):
    out = tmp_path / "out"
    build_dataset("ncaltech101", src, out, samples_per_unit=6, **FAST)
    with pytest.raises(InputError):
        build_dataset("ncaltech101", tmp_path / "typo", out, samples_per_unit=6, **FAST)
    assert len(EventDataset(out, "train")) == 38


def test_loader_checks_every_shard_against_the_manifest(src, tmp_path):
    out, other = tmp_path / "out", tmp_path / "other"
    build_dataset("ncaltech101", src, out, samples_per_unit=6, seed=0, **FAST)
    build_dataset("ncaltech101", src, other, samples_per_unit=4, seed=3, **FAST)
    # shards of another build copied over this one's (no marker: e.g. by hand, or an old evforge)
    for p in sorted(other.glob("*/*.h5")):
        shutil.copy(p, out / p.relative_to(other))
    with pytest.raises(InputError, match=r"train-00000\.h5: does not match .*manifest\.json: num_samples 4 "
                                         r"\(manifest: 6\)"):
        EventDataset(out, "train")
    with pytest.raises(InputError, match="does not match"):  # was a bare StopIteration
        EventDataset(out, "train", subset="train_10pct")


def test_keys_repeated_across_shards_are_refused(src, tmp_path):
    out = tmp_path / "out"
    build_dataset("ncaltech101", src, out, samples_per_unit=6, **FAST)
    a, b = sorted((out / "train").glob("*.h5"))[:2]
    with pytest.raises(InputError, match="in more than one shard"):
        EventDataset.from_shards([a, b, a])


# ------------------------------------------------------------------------------- 4. outside the root
def _swap_x_column(shard: Path, how: str, outside: Path) -> None:
    """Replace events/x of ``shard`` by data that lives in ``outside`` (the ways HDF5 allows)."""
    with h5py.File(shard, "r") as f:
        x = f["events/x"][:]
    np.full(len(x), 7, dtype="<u2").tofile(outside)
    with h5py.File(shard, "r+") as f:
        del f["events/x"]
        if how == "external_link":
            with h5py.File(outside.with_suffix(".h5"), "w") as g:
                g["x"] = np.full(len(x), 7, dtype="<u2")
            f["events/x"] = h5py.ExternalLink(str(outside.with_suffix(".h5")), "x")
        elif how == "external_storage":
            f.create_dataset("events/x", shape=x.shape, dtype="<u2", external=[(str(outside), 0, x.nbytes)])
        elif how == "virtual":
            with h5py.File(outside.with_suffix(".h5"), "w") as g:
                g["x"] = np.full(len(x), 7, dtype="<u2")
            layout = h5py.VirtualLayout(shape=x.shape, dtype="<u2")
            layout[:] = h5py.VirtualSource(str(outside.with_suffix(".h5")), "x", shape=x.shape)
            f.create_virtual_dataset("events/x", layout)


@pytest.mark.parametrize("how", ["external_link", "external_storage", "virtual"])
def test_shard_data_from_outside_the_file_is_refused(src, tmp_path, how):
    out = tmp_path / "out"
    report = build_dataset("ncaltech101", src, out, samples_per_unit=6, **FAST)
    shard = out / "train" / "train-00000.h5"
    _swap_x_column(shard, how, tmp_path / "outside.bin")
    # the attacker also updates the manifest's checksum and size, so only the file's structure gives it away
    data = json.loads(report.manifest_path.read_text())
    entry = next(e for e in data["shards"] if e["path"] == "train/train-00000.h5")
    entry.update(sha256=sha256_file(shard), bytes=shard.stat().st_size)
    report.manifest_path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"train-00000\.h5: refused: /events/x .*outside this file"):
        ShardReader(shard)
    with pytest.raises(InputError, match="outside this file"):
        EventDataset(out, "train")
    assert any("outside this file" in f for f in verify(report.manifest_path))
    assert any("outside this file" in f for f in verify_dataset(shard))


# ----------------------------------------------------------------------------------- 5. changed inputs
def test_repaired_source_file_is_converted_on_rerun(src, tmp_path):
    out = tmp_path / "out"
    victim = src / "ant" / "image_0003.bin"
    good = victim.read_bytes()
    victim.write_bytes(b"\x00\x01\x02")  # truncated
    first = build_dataset("ncaltech101", src, out, samples_per_unit=6, **FAST)
    assert first.num_errors == 1 and "ant/image_0003" in (out / ERRORS_NAME).read_text()
    victim.write_bytes(good)  # repaired
    second = build_dataset("ncaltech101", src, out, samples_per_unit=6, **FAST)
    assert second.num_errors == 0 and (out / ERRORS_NAME).read_text() == ""
    assert second.units_run == 1 and second.num_samples == 48  # only the unit holding the repaired file
    # a file replaced by another of the same size (a different recording): redone as well
    other = rand_events(999, 30 + 3 * 5)
    write_atis_bin(src / "bass" / "image_0005.bin", other)
    third = build_dataset("ncaltech101", src, out, samples_per_unit=6, **FAST)
    assert third.units_run == 1
    ds = next(d for d in (EventDataset(out, "train"), EventDataset(out, "val")) if "bass/image_0005" in d.keys)
    assert ds[ds.keys.index("bass/image_0005")]["events"].tobytes() == other.tobytes()
    assert build_dataset("ncaltech101", src, out, samples_per_unit=6, **FAST).units_run == 0
    redo = build_dataset("ncaltech101", src, out, samples_per_unit=6, overwrite=True, **FAST)
    assert redo.units_run == redo.num_units == 9


# ------------------------------------------------------------------------------------- 8. corruption
def test_loader_never_returns_corrupt_events(tmp_path):
    n = 20_000
    truth = rand_events(5, n)
    path = tmp_path / "s.h5"
    with ShardWriter(path, sensor_size=(240, 180)) as w:
        w.add_sample(truth, key="a", label=0)
    with h5py.File(path, "r") as f:
        info = f["events/t"].id.get_chunk_info(0)
    refused = 0
    for k in range(12):  # one flipped bit at twelve places of the compressed time column
        bad = tmp_path / f"flip{k}.h5"
        shutil.copy(path, bad)
        pos = info.byte_offset + 16 + (info.size - 16) * k // 12
        with open(bad, "r+b") as fh:
            fh.seek(pos)
            byte = fh.read(1)[0]
            fh.seek(pos)
            fh.write(bytes([byte ^ 0x10]))
        try:
            events = EventDataset.from_shards([bad])[0]["events"]
        except InputError as err:
            assert str(err).startswith(f"{bad}: ") and "\n" not in str(err)
            refused += 1
            continue
        # whatever is returned keeps every invariant of a sample
        assert np.all(np.diff(events["t"]) >= 0) and events["x"].max() < 240 and events["y"].max() < 180
    assert refused >= 6  # most flips of the time column break its order


def test_loader_refuses_a_shard_replaced_while_open(src, tmp_path):
    out = tmp_path / "out"
    build_dataset("ncaltech101", src, out, samples_per_unit=6, **FAST)
    ds = EventDataset(out, "train")
    shard = out / "train" / "train-00000.h5"
    with ShardWriter(tmp_path / "new.h5", sensor_size=(240, 180)) as w:
        w.add_sample(rand_events(1, 50), key="other", label=0)
    os.replace(tmp_path / "new.h5", shard)
    with pytest.raises(InputError, match="changed since it was opened"):
        ds[0]


# -------------------------------------------------------------------------------------- 10. disk full
def test_disk_full_during_convert_is_one_output_error_and_the_rerun_completes(src, tmp_path, monkeypatch):
    out, ref = tmp_path / "out", tmp_path / "ref"
    build_dataset("ncaltech101", src, ref, samples_per_unit=6, **FAST)
    from evforge.formats import shards

    real_close, calls = shards.ShardWriter.close, []

    def close(self):  # the fourth shard hits a full disk while its data is flushed
        calls.append(self.path)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(self._tmp))
        return real_close(self)

    monkeypatch.setattr(shards.ShardWriter, "close", close)
    with pytest.raises(OutputError) as info:
        build_dataset("ncaltech101", src, out, samples_per_unit=6, **FAST)
    assert str(info.value) == f"{calls[3]}: disk full (no space left on device)"
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert len(list(out.glob("*/*.done.json"))) == 3 and (out / INCOMPLETE_NAME).exists()
    monkeypatch.setattr(shards.ShardWriter, "close", real_close)
    report = build_dataset("ncaltech101", src, out, samples_per_unit=6, **FAST)
    assert (report.units_skipped, report.units_run) == (3, 6)
    for p in sorted(ref.glob("*/*.h5")):
        assert (out / p.relative_to(ref)).read_bytes() == p.read_bytes()


def test_hdf5_disk_full_message_is_recognised():
    from evforge.errors import output_error

    err = OSError("Can't write data (file write failed: time = Tue, filename = '/d/train/train-00001.h5.tmp-77', "
                  "file descriptor = 5, errno = 28, error message = 'No space left on device', buf = 0x1, "
                  "total write size = 4096, bytes this sub-write = 4096, bytes actually written = "
                  "18446744073709551615, offset = 0)")
    assert str(output_error(err, "/d")) == "/d/train/train-00001.h5: disk full (no space left on device)"
    assert output_error(OSError("Unable to synchronously open file (file signature not found)"), "/d") is None


# --------------------------------------------------------------------------------------- 9. orphans
_PARALLEL_BUILD = textwrap.dedent("""
    import sys, time
    from evforge.dataset_builder import build, build_executors
    real = build_executors.run_unit

    def slow(*args, **kwargs):  # each unit takes a while, so the build is killed while workers run
        time.sleep(0.5)
        return real(*args, **kwargs)

    build_executors.run_unit = slow
    build.build_dataset("ncaltech101", sys.argv[1], sys.argv[2], workers=2, samples_per_unit=1, progress=False)
""")


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the worker processes")
def test_killed_parallel_build_leaves_no_worker_processes(src, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _PARALLEL_BUILD, str(src), str(tmp_path / "out")])
    try:
        deadline, workers = time.time() + 60, []
        while time.time() < deadline and not list((tmp_path / "out").glob("*/*.done.json")):
            time.sleep(0.1)
        workers = [p for p in _children(proc.pid) if _alive(p)]
        assert workers, "no worker processes seen"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.1)
        left = [p for p in workers if _alive(p)]
        for p in left:
            os.kill(p, signal.SIGKILL)
        assert not left, f"worker processes {left} outlived the killed build"
    finally:
        if proc.poll() is None:
            proc.kill()
