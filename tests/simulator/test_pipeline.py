"""Frame sequences on disk -> stream files: equality with in-memory simulation, resume, bad input."""

import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from evforge.formats.streamfile import StreamFile, is_complete_stream
from evforge.simulator.engine import simulate_frames
from evforge.simulator.pipeline import (
    SimulateConfig,
    output_path,
    quiet_failures,
    sequence_seed,
    simulate_sequences,
)
from evforge.simulator.resample import prepare_frames
from evforge.simulator.scenes import SceneSpec, make_dataset, make_sequence
from evforge.simulator.sources import discover_sequences
from evforge.simulator.upsample import UpsampleConfig

SMALL = SceneSpec(width=48, height=36, frames=6, speed_px=2.0, seed=3)


def _dataset(root, frames=(6, 4, 7)):
    """Three trajectories of different lengths (so batch slots finish at different steps)."""
    paths = []
    for k, n in enumerate(frames):
        spec = SceneSpec(width=48, height=36, frames=n, speed_px=2.0, seed=10 + k)
        paths.append(make_sequence(Path(root) / "env" / "Easy" / f"P00{k}", spec))
    return discover_sequences(root)


def _in_memory(seq, cfg):
    frames = np.stack([seq.read_frame(i) for i in range(len(seq))])
    return simulate_frames(frames, seq.timestamps_us, cfg.params().resolve(sequence_seed(cfg.seed, seq.name)),
                           seed=sequence_seed(cfg.seed, seq.name), resolution=cfg.resolution,
                           upsample=cfg.upsample, device="cpu")


@pytest.mark.parametrize("batch", [1, 2])
def test_stream_files_equal_in_memory_simulation(tmp_path, batch):
    seqs = _dataset(tmp_path / "in")
    cfg = SimulateConfig(preset="noisy", overrides={"shot_noise_rate_hz": 20.0}, batch=batch, device="cpu",
                         resolution="40x30")
    results = simulate_sequences(seqs, tmp_path / "out", cfg, progress=False)
    assert [r.status for r in results] == ["done"] * 3
    for seq, r in zip(seqs, results):
        with StreamFile(r.path) as f:
            got = f.events()
            np.testing.assert_array_equal(got, _in_memory(seq, cfg))
            assert (f.width, f.height) == (40, 30)
            np.testing.assert_array_equal(f.frame_times, seq.timestamps_us)
            assert f.frame_event_idx[0] == 0 and f.frame_event_idx[-1] <= len(got)
            for i in range(len(seq) - 1):
                win = f.between_frames(i)
                assert np.all((win["t"] >= seq.timestamps_us[i]) & (win["t"] < seq.timestamps_us[i + 1]))
            assert f.has_frames and f.gray_frame(0).shape == (30, 40)
            for i in (0, len(seq) - 1):  # every stored frame is the simulator's input at that time, in 8 bits
                want = prepare_frames([seq.read_frame(i)], (40, 30), "cpu")[0, 0].round().clamp(0, 255)
                np.testing.assert_array_equal(f.gray_frame(i), want.to(torch.uint8).numpy())
            a = f.attrs
            assert a["preset"] == "noisy" and a["seed"] == sequence_seed(0, seq.name)
            assert a["shot_noise_rate_hz"] == 20.0 and a["pos_thres"] == 0.2 and a["refractory_period_s"] == 0.01
            assert a["sequence"] == seq.name and a["upsample"]["mode"] == "linear"
        assert r.events == len(got) and r.frames == len(seq)


def test_native_size_frames_equal_in_memory_simulation(tmp_path):
    """At the native size the decoding threads make the gray input and its 8-bit copy in one pass."""
    seqs = _dataset(tmp_path / "in", frames=(5,))
    cfg = SimulateConfig(preset="noisy", overrides={"shot_noise_rate_hz": 20.0}, batch=1, device="cpu")
    (r,) = simulate_sequences(seqs, tmp_path / "out", cfg, progress=False)
    with StreamFile(r.path) as f:
        np.testing.assert_array_equal(f.events(), _in_memory(seqs[0], cfg))
        for i in range(len(seqs[0])):
            want = prepare_frames([seqs[0].read_frame(i)], None, "cpu")[0, 0].round().clamp(0, 255)
            np.testing.assert_array_equal(f.gray_frame(i), want.to(torch.uint8).numpy())


def test_rerun_skips_finished_sequences_and_cleans_stale_temp_files(tmp_path):
    seqs = _dataset(tmp_path / "in", frames=(4, 4))
    cfg = SimulateConfig(preset="ideal", device="cpu")
    out = tmp_path / "out"
    first = simulate_sequences(seqs, out, cfg, progress=False)
    mtimes = [os.stat(r.path).st_mtime_ns for r in first]
    # a killed earlier run left a temp file and no output for the second sequence
    os.remove(first[1].path)
    stale = Path(str(first[1].path) + ".tmp-999999")
    stale.write_bytes(b"partial")
    again = simulate_sequences(seqs, out, cfg, progress=False)
    assert [r.status for r in again] == ["skipped", "done"]
    assert os.stat(again[0].path).st_mtime_ns == mtimes[0]
    assert not stale.exists() and is_complete_stream(again[1].path)
    redo = simulate_sequences(seqs, out, SimulateConfig(preset="ideal", device="cpu", overwrite=True),
                              progress=False)
    assert [r.status for r in redo] == ["done", "done"]


def test_missing_frame_fails_that_sequence_only(tmp_path, caplog, capsys):
    seqs = _dataset(tmp_path / "in", frames=(6, 5))
    bad = Path(seqs[0].frame_files[3])
    bad.unlink()
    with caplog.at_level(logging.DEBUG, logger="evforge"):
        results = simulate_sequences(seqs, tmp_path / "out", SimulateConfig(preset="ideal", device="cpu", batch=2),
                                     progress=False)
    assert [r.status for r in results] == ["failed", "done"]
    assert results[0].error.startswith(str(bad)) and "\n" not in results[0].error
    assert not results[0].path.exists() and not list(results[0].path.parent.glob("*.tmp-*"))
    assert is_complete_stream(results[1].path)
    # the failure is one WARNING record of the simulator's logger, the same line the CLI prints; a library call
    # prints nothing itself (no handler here but pytest's)
    failed = [r for r in caplog.records if r.getMessage().startswith("failed: ")]
    assert [(r.name, r.levelno, r.getMessage()) for r in failed] == [
        ("evforge.simulator.run_plan", logging.WARNING, f"failed: {results[0].error}")]
    assert all(r.levelno < logging.WARNING for r in caplog.records if r not in failed)
    assert capsys.readouterr().out == ""


def test_quiet_failures_mutes_only_this_threads_runs(tmp_path, caplog):
    seqs = _dataset(tmp_path / "in", frames=(4, 4))
    Path(seqs[0].frame_files[2]).write_bytes(b"not a png")
    cfg = SimulateConfig(preset="ideal", device="cpu", batch=2)
    other = []
    with caplog.at_level(logging.WARNING, logger="evforge"), quiet_failures():
        results = simulate_sequences(seqs, tmp_path / "a", cfg, progress=False)
        thread = threading.Thread(target=lambda: other.append(simulate_sequences(seqs, tmp_path / "b", cfg,
                                                                                  progress=False)))
        thread.start()
        thread.join()
    assert [r.status for r in results] == [r.status for r in other[0]] == ["failed", "done"]
    # the muted run's failure is in its results only; the other thread's run still logs its own
    assert [r.getMessage() for r in caplog.records] == [f"failed: {other[0][0].error}"]
    assert caplog.records[0].thread == thread.ident
    with caplog.at_level(logging.WARNING, logger="evforge"):  # and the filter is gone after the block
        simulate_sequences(seqs, tmp_path / "c", cfg, progress=False)
    assert len(caplog.records) == 2


def test_corrupt_frame_and_bad_flow_file_are_named(tmp_path):
    seqs = _dataset(tmp_path / "in", frames=(5, 5))
    png = Path(seqs[0].frame_files[2])
    png.write_bytes(png.read_bytes()[:40])  # truncated PNG
    flow = Path(seqs[1].source) / "flow" / "000001_000002_flow.npy"
    np.save(flow, np.zeros((3, 3, 2), np.float32))  # wrong shape
    cfg = SimulateConfig(preset="ideal", device="cpu", upsample=UpsampleConfig(mode="flow"))
    results = simulate_sequences(seqs, tmp_path / "out", cfg, progress=False)
    assert [r.status for r in results] == ["failed", "failed"]
    assert results[0].error.startswith(str(png))
    assert results[1].error.startswith(str(flow))


def test_flow_mode_uses_flow_and_ideal_counts_match_linear_mode(tmp_path):
    make_dataset(tmp_path / "in", envs=("e",), trajectories=1, spec=SMALL)
    seqs = discover_sequences(tmp_path / "in")
    assert seqs[0].has_flow
    out = {}
    for mode in ("linear", "flow"):
        cfg = SimulateConfig(preset="ideal", device="cpu", upsample=UpsampleConfig(mode=mode, max_steps=8))
        r = simulate_sequences(seqs, tmp_path / mode, cfg, progress=False)[0]
        out[mode] = StreamFile(r.path).events()
    # the net change per pixel is set by the frames; the path (and so timing and count) differs with flow
    assert len(out["flow"]) > 0 and not np.array_equal(out["flow"]["t"][:100], out["linear"]["t"][:100])


def test_output_paths_mirror_sequence_names(tmp_path):
    make_dataset(tmp_path / "in", envs=("a",), trajectories=2, spec=SMALL)
    seqs = discover_sequences(tmp_path / "in")
    results = simulate_sequences(seqs, tmp_path / "out", SimulateConfig(preset="ideal", device="cpu"),
                                 progress=False)
    assert [r.path for r in results] == [output_path(tmp_path / "out", s.name) for s in seqs]
    assert results[0].path == tmp_path / "out" / "a" / "Easy" / "P000.h5"
