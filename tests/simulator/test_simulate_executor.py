"""Simulation beyond one process: worker processes per device and Ray give the same corpus as one process;
killed workers and runs resume to it; one bad sequence fails alone; changed requests and second runs refused."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from evforge.cli import main
from evforge.errors import InputError, LockedError
from evforge.formats.streamfile import is_complete_stream
from evforge.locks import FolderLock
from evforge.simulator.pipeline import SUMMARY_NAME, SimulateConfig, parse_devices, simulate_sequences
from evforge.simulator.scenes import SceneSpec, make_sequence
from evforge.simulator.sources import TartanAirV1Sequence, discover_sequences

CFG = dict(preset="noisy", overrides={"shot_noise_rate_hz": 5.0}, device="cpu", resolution="32x24", batch=2)
COLUMNS = ("events/x", "events/y", "events/p", "events/t", "t_offset", "ms_to_idx", "frames/t", "frames/event_idx")


def _frames(root, lengths, size=(40, 30)):
    """One environment with a trajectory per length (different lengths: slots finish at different steps)."""
    for k, n in enumerate(lengths):
        make_sequence(Path(root) / "env" / "Easy" / f"P{k:03d}",
                      SceneSpec(width=size[0], height=size[1], frames=n, speed_px=2.0, seed=20 + k))
    return Path(root)


def _corpus(out) -> dict:
    """Every stream file's stored columns, as raw bytes (what 'identical corpus' means)."""
    files = sorted(Path(out).rglob("*.h5"))
    got = {}
    for f in files:
        with h5py.File(f, "r") as h:
            got[f.relative_to(out).as_posix()] = {c: h[c][()].tobytes() for c in COLUMNS}
    return got


def _summary(out) -> dict:
    return json.loads((Path(out) / SUMMARY_NAME).read_text())


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    return _frames(tmp_path_factory.mktemp("frames"), (6, 4, 7, 5))


@pytest.fixture(scope="module")
def reference(frames, tmp_path_factory):
    """The corpus of one process (batch 2), the reference every other partition must equal."""
    out = tmp_path_factory.mktemp("one") / "out"
    results = simulate_sequences(discover_sequences(frames), out, SimulateConfig(**CFG), progress=False)
    assert [r.status for r in results] == ["done"] * 4
    return out, _corpus(out)


def test_parse_devices():
    assert parse_devices("cpu:3") == ["cpu"] * 3
    assert parse_devices(None, "cpu") == ["cpu"]
    assert parse_devices("cpu,cpu:2") == ["cpu"] * 3
    with pytest.raises(ValueError):
        parse_devices("cpu:0")
    with pytest.raises((ValueError, RuntimeError)):
        parse_devices("tpu:1")


def test_ray_devices_is_the_device_inside_each_task(frames, tmp_path):
    with pytest.raises(ValueError, match="with executor 'ray' give the device inside each task"):
        simulate_sequences(discover_sequences(frames), tmp_path / "o", SimulateConfig(**CFG), executor="ray",
                           devices="cuda:0,cuda:1", progress=False)
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_two_worker_processes_equal_one_process(frames, reference, tmp_path):
    ref_out, ref = reference
    out = tmp_path / "two"
    results = simulate_sequences(discover_sequences(frames), out, SimulateConfig(**CFG), devices="cpu:2",
                                 progress=False)
    assert [r.status for r in results] == ["done"] * 4
    got = _corpus(out)
    assert list(got) == list(ref) and got == ref
    summary = _summary(out)
    assert summary["devices"] == ["cpu", "cpu"] and summary["totals"]["done"] == 4
    rows = {row["sequence"]: row for row in summary["sequences"]}
    for r in results:
        with h5py.File(r.path, "r") as h:
            assert rows[r.name]["events"] == r.events == int(h.attrs["num_events"]) > 0
        assert rows[r.name]["status"] == "done" and rows[r.name]["device"] == "cpu"
        assert rows[r.name]["frames"] == r.frames and rows[r.name]["seconds"] > 0
    # the one-process summary, and a rerun: everything already done, nothing rewritten, the summary says so
    assert _summary(ref_out)["totals"] == {**summary["totals"]}
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.h5")}
    again = simulate_sequences(discover_sequences(frames), out, SimulateConfig(**CFG), devices="cpu:2",
                               progress=False)
    assert [r.status for r in again] == ["skipped"] * 4 and [r.events for r in again] == [r.events for r in results]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.h5")} == mtimes
    assert _summary(out)["totals"]["skipped"] == 4


def test_bad_sequence_fails_alone_on_workers_with_exit_1(frames, reference, tmp_path, capsys):
    src = tmp_path / "frames"
    _frames(src, (6, 4, 7, 5))
    bad = sorted((src / "env" / "Easy" / "P002" / "image_left").glob("*.png"))[3]
    bad.write_bytes(bad.read_bytes()[:50])  # a truncated PNG in the middle of one trajectory
    out = tmp_path / "out"
    rc = main(["simulate", str(src), "--out", str(out), "--preset", "noisy", "--shot-noise-rate-hz", "5",
               "--device", "cpu", "--resolution", "32x24", "--batch", "2", "--devices", "cpu:2", "--quiet"])
    cap = capsys.readouterr()
    assert rc == 1
    lines = [line for line in cap.err.splitlines() if "failed" in line]
    assert len(lines) == 1 and str(bad) in lines[0]
    assert "3 simulated" in cap.out and "1 failed" in cap.out
    got, ref = _corpus(out), reference[1]
    assert set(got) == set(ref) - {"env/Easy/P002.h5"} and all(got[k] == ref[k] for k in got)
    assert not list(out.rglob("*.tmp-*"))
    row = next(r for r in _summary(out)["sequences"] if r["sequence"] == "env/Easy/P002")
    assert row["status"] == "failed" and str(bad) in row["error"] and "\n" not in row["error"]


class KillsItsWorker(TartanAirV1Sequence):
    """A trajectory whose frame ``kill_at`` kills the process decoding it (a worker dying mid-sequence)."""

    kill_at = 3

    def read_frame(self, i):
        if i == self.kill_at and os.environ.get("EVFORGE_TEST_PARENT") != str(os.getpid()):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().read_frame(i)


def test_a_worker_that_dies_fails_its_sequence_and_the_rerun_completes(frames, reference, tmp_path, monkeypatch,
                                                                       caplog):
    monkeypatch.setenv("EVFORGE_TEST_PARENT", str(os.getpid()))  # only a worker process dies
    seqs = discover_sequences(frames)
    seqs[2].__class__ = KillsItsWorker  # the longest: the first one handed out
    out = tmp_path / "out"
    # batch 1: the dead worker held that one sequence only (with batch B it fails the B it held)
    with caplog.at_level(logging.WARNING, logger="evforge"):
        results = simulate_sequences(seqs, out, SimulateConfig(**{**CFG, "batch": 1}), devices="cpu:2",
                                     progress=False)
    assert [r.status for r in results] == ["done", "done", "failed", "done"]
    # logged once, by the run's process (a killed worker says nothing)
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("evforge.simulator.run_plan", f"failed: {results[2].error}")]
    assert "the worker on cpu ended (exit status -9) while simulating it" in results[2].error
    assert len(list(out.rglob("*.h5.tmp-*"))) == 1  # what the dead worker was writing
    assert _summary(out)["totals"] == {"sequences": 4, "done": 3, "skipped": 0, "failed": 1, "pending": 0,
                                       "events": sum(r.events for r in results), "frames_simulated": 6 + 4 + 5}
    again = simulate_sequences(discover_sequences(frames), out, SimulateConfig(**CFG), progress=False)
    assert [r.status for r in again] == ["skipped", "skipped", "done", "skipped"]
    assert _corpus(out) == reference[1] and not list(out.rglob("*.tmp-*"))


def _run_cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "evforge.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _wait_for_temp_file(out: Path, proc, timeout=120.0) -> Path:
    t0 = time.time()
    while time.time() - t0 < timeout:
        tmps = list(out.rglob("*.h5.tmp-*")) if out.exists() else []
        if tmps:
            return tmps[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    raise AssertionError("no stream file was started")


@pytest.fixture(scope="module")
def long_frames(tmp_path_factory):
    """Trajectories long enough to be killed in the middle of."""
    return _frames(tmp_path_factory.mktemp("long"), (40, 30, 36), size=(48, 36))


LONG_ARGS = ["--preset", "noisy", "--device", "cpu", "--batch", "1", "--max-steps", "16", "--quiet"]


@pytest.mark.slow  # 40-70 s on 2 busy cores: four runs of trajectories long enough to be killed in the middle
def test_killed_worker_and_killed_run_resume_to_the_same_corpus(long_frames, tmp_path):
    one = tmp_path / "one"
    assert main(["simulate", str(long_frames), "--out", str(one), *LONG_ARGS]) == 0
    ref = _corpus(one)

    # 1. kill -9 one worker while it writes: its sequence fails with one line, the other worker goes on
    out = tmp_path / "out"
    proc = _run_cli(["simulate", str(long_frames), "--out", str(out), "--devices", "cpu:2", *LONG_ARGS])
    tmp = _wait_for_temp_file(out, proc)
    worker = int(tmp.name.rsplit("-", 1)[1])
    assert worker != proc.pid
    os.kill(worker, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    summary = _summary(out)
    failed = [r for r in summary["sequences"] if r["status"] == "failed"]
    assert len(failed) == 1 and "worker on cpu ended (exit status -9)" in failed[0]["error"]
    assert summary["totals"]["done"] == 2 and "-9" in err and len(err.strip().splitlines()) == 1

    # 2. the rerun does only what is missing (and removes the killed worker's temp file)
    assert main(["simulate", str(long_frames), "--out", str(out), "--devices", "cpu:2", *LONG_ARGS]) == 0
    assert _summary(out)["totals"]["skipped"] == 2 and _summary(out)["totals"]["done"] == 1
    assert _corpus(out) == ref and not list(out.rglob("*.tmp-*"))

    # 3. kill -9 the whole run: its workers end with it, and the rerun completes the same corpus
    out = tmp_path / "killed"
    proc = _run_cli(["simulate", str(long_frames), "--out", str(out), "--devices", "cpu:2", *LONG_ARGS])
    tmp = _wait_for_temp_file(out, proc)
    worker = int(tmp.name.rsplit("-", 1)[1])
    proc.kill()
    proc.communicate()
    t0 = time.time()
    while _alive(worker) and time.time() - t0 < 5:
        time.sleep(0.05)
    assert not _alive(worker), "a worker outlived its killed run"
    assert main(["simulate", str(long_frames), "--out", str(out), "--devices", "cpu:2", *LONG_ARGS]) == 0
    assert _corpus(out) == ref and not list(out.rglob("*.tmp-*"))


def test_changed_request_is_refused_or_redone_with_overwrite(frames, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["simulate", str(frames), "--out", str(out), "--device", "cpu", "--resolution", "32x24", "--quiet"]
    assert main([*base, "--preset", "ideal"]) == 0
    before = _corpus(out)
    capsys.readouterr()
    for change, word in ((["--preset", "noisy"], "preset"), (["--preset", "ideal", "--seed", "3"], "seed"),
                         (["--preset", "ideal", "--pos-thres", "0.3"], "pos_thres")):
        assert main([*base, *change]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--overwrite" in err and word in err
        assert str(out / "env" / "Easy") in err  # the file is named
        assert _corpus(out) == before  # nothing touched
    # another resolution too (and the same request is still a plain skip)
    assert main(["simulate", str(frames), "--out", str(out), "--device", "cpu", "--resolution", "16x12",
                 "--preset", "ideal", "--quiet"]) == 2
    assert "resolution" in capsys.readouterr().err
    assert main([*base, "--preset", "ideal"]) == 0 and "4 already done" in capsys.readouterr().out
    assert main([*base, "--preset", "noisy", "--overwrite"]) == 0
    assert "4 simulated" in capsys.readouterr().out
    after = _corpus(out)
    assert set(after) == set(before) and all(after[k] != before[k] for k in after)
    assert main([*base, "--preset", "noisy"]) == 0  # now made with noisy: done


def test_changed_frames_are_a_difference(tmp_path):
    src = _frames(tmp_path / "f", (5,))
    cfg = SimulateConfig(preset="ideal", device="cpu", resolution="32x24")
    simulate_sequences(discover_sequences(src), tmp_path / "out", cfg, progress=False)
    png = sorted((src / "env" / "Easy" / "P000" / "image_left").glob("*.png"))[-1]
    png.unlink()  # one frame fewer
    with pytest.raises(InputError, match="num_frames: stored 5, requested 4.*--overwrite"):
        simulate_sequences(discover_sequences(src), tmp_path / "out", cfg, progress=False)


def test_one_run_per_folder_and_only_the_holder_cleans_up(frames, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    theirs = out / "env" / "Easy" / "P000.h5.tmp-12345"  # another run's file in progress
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"partial")
    with FolderLock(out, "evforge simulate other"):
        rc = main(["simulate", str(frames), "--out", str(out), "--device", "cpu", "--preset", "ideal", "--quiet"])
        err = capsys.readouterr().err.strip()
        assert rc == 3 and len(err.splitlines()) == 1
        assert "locked by another evforge run" in err and "'evforge simulate other'" in err and str(out) in err
        assert theirs.exists() and not list(out.rglob("*.h5"))
        with pytest.raises(LockedError):
            simulate_sequences(discover_sequences(frames), out, SimulateConfig(preset="ideal", device="cpu"),
                               progress=False)
    # free again: this run holds the lock, so it removes the dead run's temp file
    assert main(["simulate", str(frames), "--out", str(out), "--device", "cpu", "--preset", "ideal",
                 "--resolution", "32x24", "--quiet"]) == 0
    assert not theirs.exists() and all(is_complete_stream(p) for p in out.rglob("*.h5"))


@pytest.fixture()
def fake_gpu_ray(monkeypatch):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install ray) - the Ray executor is untested")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    # a private Ray on loopback that declares 2 GPUs it does not have: tasks ask for one, run on the CPU
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


class KillsItsRayWorker(TartanAirV1Sequence):
    """A trajectory that kills the Ray worker simulating it, noting each attempt in ``attempts``."""

    attempts = None

    def read_frame(self, i):
        if i == 2:
            with open(self.attempts, "a") as f:
                f.write(f"{os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        return super().read_frame(i)


def test_ray_with_fake_gpus_equals_one_process(frames, reference, tmp_path, fake_gpu_ray):
    out = tmp_path / "ray"
    results = simulate_sequences(discover_sequences(frames), out, SimulateConfig(**CFG), executor="ray",
                                 devices="cpu", ray_gpus=1, progress=False)
    assert [r.status for r in results] == ["done"] * 4
    assert _corpus(out) == reference[1]
    summary = _summary(out)
    assert summary["executor"] == "ray" and summary["totals"]["done"] == 4


@pytest.mark.slow  # ~25 s: three Ray workers started and killed one after the other
def test_ray_task_whose_worker_dies_is_retried_then_fails_alone(frames, reference, tmp_path, fake_gpu_ray):
    """A task whose worker dies is run again, RAY_RETRIES times, then its sequence fails alone."""
    from ray import cloudpickle

    from evforge.simulator.executor import RAY_RETRIES

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test module
    seqs = discover_sequences(frames)
    seqs[1].__class__ = KillsItsRayWorker
    seqs[1].attempts = str(tmp_path / "attempts.txt")
    out = tmp_path / "retried"
    results = simulate_sequences(seqs, out, SimulateConfig(**{**CFG, "batch": 1}), executor="ray", devices="cpu",
                                 ray_gpus=1, progress=False)
    assert [r.status for r in results] == ["done", "failed", "done", "done"]
    assert results[1].error.startswith("env/Easy/P001: RuntimeError: Ray task failed")
    assert len((tmp_path / "attempts.txt").read_text().split()) == 1 + RAY_RETRIES
    good = {k: v for k, v in reference[1].items() if k != "env/Easy/P001.h5"}
    assert _corpus(out) == good


def test_convert_tartanair_simulate_streams_into_shards(frames, reference, tmp_path):
    """convert tartanair --simulate writes each unit's shard as soon as its sequences are simulated and drops
    their streams (bounded disk); --keep-streams keeps them, equal to evforge simulate's; where the simulation
    ran (--devices) is not recorded, so a rerun elsewhere reuses every unit."""
    from evforge.dataset_builder.build import build_dataset

    opts = dict(simulate=True, device="cpu", resolution="32x24", preset="noisy", overrides={"shot_noise_rate_hz": 5.0},
                batch=2, progress=False)
    seen = []
    streamed = build_dataset("tartanair", frames, tmp_path / "a", samples_per_unit=1, **opts,
                             on_unit_done=lambda r: seen.append((len(list((tmp_path / "a").rglob("*-0000?.h5"))),
                                                                 list((tmp_path / "a" / "_streams").rglob("*.h5")))))
    assert [n for n, _ in seen] == [1, 2, 3, 4] and all(streams == [] for _, streams in seen)
    kept = build_dataset("tartanair", frames, tmp_path / "b", devices="cpu:2", keep_streams=True, **opts)
    assert _corpus(tmp_path / "b" / "_streams") == reference[1]  # the same streams as evforge simulate's
    assert kept.num_samples == streamed.num_samples == 4 and kept.num_events == streamed.num_events > 0
    assert kept.num_units == 1  # the size estimate of 4 tiny trajectories: one shard (2 workers share it)
    again = build_dataset("tartanair", frames, tmp_path / "b", keep_streams=True, **opts)
    assert again.units_skipped == again.num_units == 1


def test_convert_tartanair_simulate_bad_sequence_fails_alone(tmp_path, caplog, capsys):
    from evforge.dataset_builder.build import build_dataset

    src = _frames(tmp_path / "frames", (5, 4, 6))
    bad = sorted((src / "env" / "Easy" / "P001" / "image_left").glob("*.png"))[2]
    bad.write_bytes(bad.read_bytes()[:50])
    with caplog.at_level(logging.DEBUG, logger="evforge"):
        report = build_dataset("tartanair", src, tmp_path / "ds", simulate=True, device="cpu", resolution="32x24",
                               preset="ideal", progress=False)
    # the simulator's failure line is muted: the failure is recorded once, in errors.jsonl
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or "failed:" in r.getMessage()]
    assert "failed" not in capsys.readouterr().err
    assert report.num_samples == 2 and report.num_errors == 1 and report.exit_code == 1
    (err,) = [json.loads(line) for line in report.errors_path.read_text().splitlines()]
    assert err["key"] == "env/Easy/P001" and str(bad) in err["error"] and "simulation failed" in err["error"]
    assert not list((tmp_path / "ds" / "_streams").rglob("*.h5*"))
