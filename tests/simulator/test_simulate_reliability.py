"""``evforge simulate`` when the disk or the time base is wrong (issue 15, items 2 and 3): one line naming the
file, the right exit code, no temp file, finished stream files kept, nothing simulated from impossible times."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from evforge.cli import main
from evforge.formats import streamfile
from evforge.formats.h5guard import GuardedFile
from evforge.formats.streamfile import StreamFile
from evforge.simulator import pipeline
from evforge.simulator.scenes import SceneSpec, make_sequence

SIM = ["--preset", "noisy", "--device", "cpu", "--batch", "1", "--quiet"]


def _trajectories(root: Path, n: int = 3, size=(48, 36), frames: int = 6) -> Path:
    for k in range(n):
        make_sequence(root / "env" / "Easy" / f"P00{k}",
                      SceneSpec(width=size[0], height=size[1], frames=frames, speed_px=2.0, seed=10 + k))
    return root


def _streams(out: Path) -> dict[str, Path]:
    return {p.relative_to(out).as_posix(): p for p in sorted(out.rglob("*.h5"))}


def _temps(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".tmp-" in p.name]


def _same_stream(a: Path, b: Path) -> bool:
    with StreamFile(a) as fa, StreamFile(b) as fb:
        return (np.array_equal(fa.events(), fb.events()) and np.array_equal(fa.frame_times, fb.frame_times)
                and fa.t_offset == fb.t_offset and np.array_equal(fa.ms_to_idx, fb.ms_to_idx))


# ---------------------------------------------------------------------------- item 2: full disk, read-only, EIO
@pytest.mark.parametrize("code, problem", [(errno.ENOSPC, "disk full (no space left on device)"),
                                           (errno.EROFS, "read-only file system"),
                                           (errno.EIO, "Input/output error")])
def test_write_error_in_simulate_is_one_line_exit_3_and_keeps_finished_files(tmp_path, capsys, monkeypatch, code,
                                                                             problem):
    src = _trajectories(tmp_path / "in")
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(["simulate", str(src), "--out", str(ref), *SIM]) == 0
    capsys.readouterr()

    # the disk fails half way through the second stream file, while its blocks are being written (small
    # blocks, so the writer flushes during the run, and HDF5 keeps writing to the file after the failure)
    monkeypatch.setattr(streamfile, "FLUSH_EVENTS", 2000)
    real, opened, failed = GuardedFile._write_at, [], []

    def write_at(self, data, offset):
        if self.path not in opened:
            opened.append(self.path)
        if len(opened) == 2 and self.path == opened[1] and offset > 8192:
            failed.append(offset)
            raise OSError(code, os.strerror(code))
        return real(self, data, offset)

    monkeypatch.setattr(GuardedFile, "_write_at", write_at)
    rc = main(["simulate", str(src), "--out", str(out), *SIM])
    err = capsys.readouterr().err
    assert failed, "the fault was not reached"
    final = re.sub(r"\.tmp-\d+$", "", opened[1])
    assert rc == 3 and err == f"evforge: error: {final}: {problem}\n", err  # one line: no h5py tracebacks
    assert not _temps(out)
    done = _streams(out)
    first = re.sub(r"\.tmp-\d+$", "", opened[0])
    assert list(done) == [Path(first).relative_to(out).as_posix()]  # the file finished before is kept,
    for rel, path in done.items():
        assert _same_stream(path, ref / rel)  # complete and equal to an undisturbed run's
    monkeypatch.setattr(GuardedFile, "_write_at", real)
    assert main(["simulate", str(src), "--out", str(out), *SIM]) == 0  # the rerun completes the rest
    assert sorted(_streams(out)) == sorted(_streams(ref))
    for rel, path in _streams(out).items():
        assert _same_stream(path, ref / rel)


@pytest.mark.parametrize("workers", [pytest.param([], id="one_process"),
                                     pytest.param(["--devices", "cpu:2"], id="two_workers", marks=pytest.mark.slow)])
def test_simulate_into_a_real_full_file_system(tmp_path, workers):
    """A real small tmpfs (root with mount only): the process must not crash (it used to segfault, exit 139).
    With worker processes too: the sequences the workers held stay pending (rerun), not failed."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    src = _trajectories(tmp_path / "in", n=2, size=(96, 72), frames=8)
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(["simulate", str(src), "--out", str(ref), *SIM]) == 0
    sizes = sorted(p.stat().st_size for p in _streams(ref).values())
    room = -(-(sizes[-1] + sizes[0] // 2 + 32768) // 4096) * 4096  # the first file fits, the second does not
    out.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={room}", "tmpfs", str(out)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        run = subprocess.run([sys.executable, "-m", "evforge.cli", "simulate", str(src), "--out", str(out), *SIM,
                              *workers], capture_output=True, text=True, timeout=300)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 3, run.stderr[-3000:]
        assert len(lines) == 1, lines
        assert re.fullmatch(rf"evforge: error: {re.escape(str(out))}/\S+\.h5: disk full \(no space left on device\)",
                            lines[-1]), lines
        assert "Traceback" not in run.stderr
        statuses = [r["status"] for r in json.loads((out / "simulate.json").read_text())["sequences"]]
        assert sorted(statuses) == ["done", "pending"]  # the one stopped by the disk is not "failed": rerun it
        assert not _temps(out)
        done = _streams(out)
        assert len(done) == 1
        for rel, path in done.items():
            assert _same_stream(path, ref / rel)
    finally:
        subprocess.run(["umount", str(out)], check=False)


# -------------------------------------------------------------------------------------------- item 3: time base
def _image_folder(folder: Path, stamps, unit_text=str, size=(8, 6)) -> Path:
    """Gray-ramp frames (brightness changes every frame, so there are events) and a timestamps.txt."""
    folder.mkdir(parents=True)
    w, h = size
    for i in range(len(stamps)):
        level = 40 + (i * 37) % 160
        frame = np.clip(level + np.arange(w)[None, :, None] * 4 + np.zeros((h, 1, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(frame).save(folder / f"{i:05d}.png", compress_level=0)
    (folder / "timestamps.txt").write_text("".join(f"{unit_text(t)}\n" for t in stamps))
    return folder


def _no_simulation(monkeypatch):
    def engine(*args, **kwargs):
        raise AssertionError("the simulator was started")

    monkeypatch.setattr(pipeline, "BatchEngine", engine)


def test_microsecond_timestamps_read_as_seconds_are_refused_before_simulating(tmp_path, capsys, monkeypatch):
    folder = _image_folder(tmp_path / "seq", [i * 33_333 for i in range(6)])
    _no_simulation(monkeypatch)  # refused before any frame is simulated (it used to fill gigabytes first)
    rc = main(["simulate", str(folder), "--out", str(tmp_path / "out"), *SIM])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert str(folder / "timestamps.txt") in err and "--timestamps-unit" in err and "33333 s" in err
    assert not list((tmp_path / "out").rglob("*.h5"))
    # epoch microseconds read as seconds overflow int64: the same advice, not "not a valid timestamp"
    epoch = _image_folder(tmp_path / "epoch", [1_733_160_000_000_000 + i * 33_333 for i in range(6)])
    assert main(["simulate", str(epoch), "--out", str(tmp_path / "out"), *SIM]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--timestamps-unit" in err and "not a valid timestamp" not in err
    # one gap of hours in a sequence timed in seconds is refused too (its noise would be simulated at once)
    gap = _image_folder(tmp_path / "gap", [0, 0.1, 0.2, 7200.2, 7200.3])
    assert main(["simulate", str(gap), "--out", str(tmp_path / "out"), *SIM]) == 2
    err = capsys.readouterr().err
    assert "lines 3 and 4 are 7200 s apart" in err, err


@pytest.mark.parametrize("unit, scale", [("us", 1), ("ns", 1000)])
def test_epoch_timestamps_are_accepted_with_the_absolute_time_in_t_offset(tmp_path, capsys, unit, scale):
    stamps_us = [1_733_160_000_123_456 + i * 33_333 for i in range(5)]
    folder = _image_folder(tmp_path / "seq", [t * scale for t in stamps_us])
    out = tmp_path / "out"
    rc = main(["simulate", str(folder), "--out", str(out), "--timestamps-unit", unit, *SIM])
    assert rc == 0, capsys.readouterr().err
    (path,) = _streams(out).values()
    with StreamFile(path) as sf:
        assert sf.t_offset == stamps_us[0] and list(sf.frame_times) == stamps_us
        ev = sf.events()
        assert len(ev) > 0 and ev["t"].min() >= stamps_us[0] and ev["t"].max() <= stamps_us[-1]
        assert sf._cols["t"].dtype == np.dtype("<u4")  # relative to t_offset: DSEC's u4 as before
    with h5py.File(path, "r") as f:
        assert int(f["events/t"][-1]) == int(ev["t"][-1]) - stamps_us[0]


def test_a_stream_longer_than_2_32_us_is_simulated_and_read_back_exactly(tmp_path, capsys):
    """500 frames 9 s apart: 74.9 min, over the 71.6 min a u4 time column holds (it could not be written)."""
    from evforge.simulator.engine import simulate_frames
    from evforge.simulator.pipeline import SimulateConfig, sequence_seed
    from evforge.simulator.sources import discover_sequences
    from evforge.simulator.upsample import UpsampleConfig

    stamps = [i * 9 for i in range(500)]
    folder = _image_folder(tmp_path / "long", stamps)
    out = tmp_path / "out"
    args = ["--preset", "ideal", "--upsample", "none", "--device", "cpu", "--quiet"]
    assert main(["simulate", str(folder), "--out", str(out), *args]) == 0, capsys.readouterr().err
    (path,) = _streams(out).values()
    (seq,) = discover_sequences(folder)
    cfg = SimulateConfig(preset="ideal", device="cpu", upsample=UpsampleConfig(mode="none"))
    seed = sequence_seed(cfg.seed, seq.name)
    frames = np.stack([seq.read_frame(i) for i in range(len(seq))])
    want = simulate_frames(frames, seq.timestamps_us, cfg.params().resolve(seed), seed=seed,
                           upsample=cfg.upsample, device="cpu")
    assert int(want["t"][-1]) - int(seq.timestamps_us[0]) > 2**32  # the events really go past u4
    with StreamFile(path) as sf:
        assert sf._cols["t"].dtype == np.dtype("<u8")
        assert np.array_equal(sf.events(), want)
        late = int(seq.timestamps_us[480])
        assert np.array_equal(sf.window(late, late + 9_000_000), want[(want["t"] >= late) &
                                                                      (want["t"] < late + 9_000_000)])
        assert len(sf.ms_to_idx) == -(-(int(want["t"][-1]) - sf.t_offset) // 1000) + 1
    capsys.readouterr()
    assert main(["verify", str(path)]) == 0, capsys.readouterr()


def test_a_frame_rate_of_less_than_one_frame_per_10_s_is_refused(tmp_path, capsys, monkeypatch):
    folder = _image_folder(tmp_path / "seq", [0, 1, 2])
    _no_simulation(monkeypatch)
    assert main(["simulate", str(folder), "--out", str(tmp_path / "out"), "--fps", "0.05", *SIM]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fps 0.05 is one frame per 20 s" in err, err
