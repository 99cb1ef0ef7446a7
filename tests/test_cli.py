"""The evforge command: exit codes, one-line errors, and the demo's fast path."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evforge.cli import main
from evforge.formats.streamfile import StreamFile
from evforge.simulator.scenes import SceneSpec, make_dataset


@pytest.fixture()
def scenes(tmp_path):
    make_dataset(tmp_path / "scenes", envs=("env",), trajectories=2,
                 spec=SceneSpec(width=40, height=30, frames=5, seed=1))
    return tmp_path / "scenes"


def test_simulate_then_preview(scenes, tmp_path, capsys):
    out = tmp_path / "streams"
    rc = main(["simulate", str(scenes), "--out", str(out), "--preset", "clean", "--resolution", "32x24",
               "--cutoff-hz", "50", "--quiet"])
    assert rc == 0
    assert "2 simulated" in capsys.readouterr().out
    f = out / "env" / "Easy" / "P000.h5"
    with StreamFile(f) as s:
        assert (s.width, s.height) == (32, 24) and s.attrs["cutoff_hz"] == 50.0 and s.attrs["sigma_thres"] == 0.02
    assert main(["simulate", str(scenes), "--out", str(out), "--preset", "clean", "--resolution", "32x24",
                 "--cutoff-hz", "50", "--quiet"]) == 0  # the same request: done already
    assert "2 already done" in capsys.readouterr().out
    png = tmp_path / "p.png"
    assert main(["preview", str(f), "--out", str(png)]) == 0
    assert Image.open(png).size[0] > 200


def test_missing_input_is_a_one_line_error(tmp_path, capsys):
    rc = main(["simulate", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and str(tmp_path / "nope") in err and err.count("\n") == 1


def test_empty_folder_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = main(["simulate", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--fps", "30", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and str(tmp_path / "empty") in err and err.count("\n") == 1


def test_failed_sequence_gives_exit_code_1_and_keeps_the_others(scenes, tmp_path, capsys):
    victim = next((scenes / "env" / "Easy" / "P001" / "image_left").glob("000002_*.png"))
    victim.write_bytes(b"not a png")
    rc = main(["simulate", str(scenes), "--out", str(tmp_path / "o"), "--preset", "ideal", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 1
    # the library logs the failure (WARNING); the CLI prints it as one stderr line, the summary on stdout
    failed = [line for line in captured.err.splitlines() if "failed" in line]
    assert len(failed) == 1 and failed[0].startswith(f"evforge: failed: {victim}")
    assert "failed:" not in captured.out and captured.out.endswith("1 failed -> " + str(tmp_path / "o") + "\n")
    assert (tmp_path / "o" / "env" / "Easy" / "P000.h5").exists()
    assert not (tmp_path / "o" / "env" / "Easy" / "P001.h5").exists()
    handlers = list(logging.getLogger("evforge").handlers)
    # --log-level error: the failure line is not shown; the exit code and the summary line still say it
    rc = main(["--log-level", "error", "simulate", str(scenes), "--out", str(tmp_path / "o"), "--preset", "ideal",
               "--quiet"])
    captured = capsys.readouterr()
    assert rc == 1 and "failed:" not in captured.err and "1 already done, 1 failed" in captured.out
    assert logging.getLogger("evforge").handlers == handlers  # main leaves no handler behind


def test_bad_parameter_value(scenes, tmp_path, capsys):
    rc = main(["simulate", str(scenes), "--out", str(tmp_path / "o"), "--pos-thres", "-1", "--quiet"])
    assert rc == 2 and "pos_thres" in capsys.readouterr().err


def test_ecddp_recipe_simulate_convert_inspect(scenes, tmp_path, capsys, monkeypatch):
    """The recipe from the command line: 1 s per TartanAir interval, one sample per interval (first and last
    dropped; no size rule at this tiny resolution), the same samples whether simulated first or by convert."""
    monkeypatch.chdir(tmp_path)  # convert writes a split copy into ./manifests when that folder exists
    streams = tmp_path / "streams"
    assert main(["simulate", str(scenes), "--out", str(streams), "--recipe", "ecddp", "--resolution", "32x24",
                 "--device", "cpu", "--quiet"]) == 0
    with StreamFile(streams / "env" / "Easy" / "P000.h5") as s:
        assert s.frame_times.tolist() == [i * 1_000_000 for i in range(5)] and s.attrs["recipe"] == "ecddp"
        assert s.attrs["preset"] == "ecddp" and (s.width, s.height) == (32, 24)
    ds = tmp_path / "ds"
    assert main(["convert", "tartanair", str(streams), "--out", str(ds), "--recipe", "ecddp",
                 "--opt", "min_interval_bytes=0", "--quiet"]) == 0
    assert "4 samples (train 4)" in capsys.readouterr().out
    ds2 = tmp_path / "ds2"
    assert main(["convert", "tartanair", str(scenes), "--out", str(ds2), "--simulate", "--recipe", "ecddp",
                 "--resolution", "32x24", "--device", "cpu", "--opt", "min_interval_bytes=0", "--quiet"]) == 0
    assert "4 samples (train 4)" in capsys.readouterr().out
    shards = [[e["sha256"] for e in json.loads((d / "manifest.json").read_text())["shards"]] for d in (ds, ds2)]
    assert shards[0] == shards[1]  # byte-identical shards either way
    assert main(["inspect", str(ds2)]) == 0
    out = capsys.readouterr().out
    assert "recipe    ecddp" in out and "time base 1 s per source-frame interval" in out
    assert "resolution 32x24 (recipe: dvs640)" in out and "1.000000" in out


def test_recipe_on_streams_of_another_time_base_is_a_one_line_error(scenes, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    streams = tmp_path / "streams"
    assert main(["simulate", str(scenes), "--out", str(streams), "--preset", "ideal", "--quiet"]) == 0
    capsys.readouterr()
    rc = main(["convert", "tartanair", str(streams), "--out", str(tmp_path / "ds"), "--recipe", "ecddp", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "P000.h5: frames 0 and 1 are 100000 us apart" in err


def test_demo_runs_the_chain(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "demo finished" in out and "[5/7] training loader" in out and "[6/7] ECDDP pretraining" in out
    assert "[7/7] finetune" in out
    metrics = json.loads((tmp_path / "demo" / "runs" / "classification_tiny" / "eval" / "metrics.json").read_text())
    assert metrics["metrics"]["top1"] > 0.5  # 4 classes: chance is 0.25
    assert (tmp_path / "demo" / "runs" / "ecddp_tiny" / "backbone.safetensors").is_file()
    streams = sorted((tmp_path / "demo" / "streams").rglob("*.h5"))
    previews = sorted((tmp_path / "demo" / "previews").glob("*.png"))
    assert len(streams) == 4 and len(previews) == 6
    with StreamFile(streams[0]) as s:
        assert s.num_events > 10_000
    for name in ("streams", "synthetic"):
        assert (tmp_path / "demo" / "datasets" / name / "manifest.json").is_file()
        assert main(["verify", str(tmp_path / "demo" / "datasets" / name)]) == 0


@pytest.fixture()
def atis_dataset(tmp_path):
    from evforge.dataset_builder.synthetic import make_synthetic_classification

    return make_synthetic_classification(tmp_path / "raw", classes=("disc", "bar"), per_class=5, size=(32, 24),
                                         seed=3)


def test_convert_inspect_verify_preview(atis_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # convert writes the split copy to ./manifests/ when it exists
    (tmp_path / "manifests").mkdir()
    out = tmp_path / "ds"
    rc = main(["convert", "ncaltech101", str(atis_dataset), "--out", str(out), "--opt", "sensor_size=[32, 24]",
               "--val-fraction", "0.4", "--quiet"])
    assert rc == 0
    assert "10 samples (train 6, val 4)" in capsys.readouterr().out
    split_copy = (tmp_path / "manifests" / "ncaltech101_split.txt").read_text().splitlines()
    assert len(split_copy) == 10 and sum(line.startswith("val/") for line in split_copy) == 4
    assert main(["inspect", str(out)]) == 0
    report = capsys.readouterr().out
    assert "disc" in report and "bar" in report and "32x24" in report
    assert main(["verify", str(out)]) == 0 and capsys.readouterr().out.strip().endswith("OK")
    png = tmp_path / "grid.png"
    assert main(["preview", str(out), "--out", str(png), "--samples", "4"]) == 0
    assert Image.open(png).size[0] > 200
    # tampering with a shard is caught, with a non-zero exit
    shard = next(out.rglob("*.h5"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 1
    assert "sha256" in capsys.readouterr().out


def test_convert_reports_bad_samples_and_exit_code(atis_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = next((atis_dataset / "bar").glob("*.bin"))
    bad.write_bytes(bad.read_bytes()[:-3])  # truncated: not a multiple of 5 bytes
    args = ["convert", "ncaltech101", str(atis_dataset), "--opt", "sensor_size=[32, 24]", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert "1 samples failed" in err
    lines = (tmp_path / "a" / "errors.jsonl").read_text().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0]
    assert main(args + ["--out", str(tmp_path / "b"), "--allow-errors"]) == 0


def test_import_checkpoint_of_the_authors_layout(tmp_path, capsys):
    """evforge import-checkpoint ecddp: the released-layout fixture imports (student by default, teacher on
    request); a file that is not one is a one-line error naming it, with exit code 2."""
    import lzma

    from evforge.export import read_backbone

    released = tmp_path / "released.pt"
    fixture = Path(__file__).resolve().parent / "fixtures" / "ecddp" / "released_ecddp_tiny.pt.xz"
    released.write_bytes(lzma.decompress(fixture.read_bytes()))
    out = tmp_path / "b.safetensors"
    assert main(["import-checkpoint", "ecddp", str(released), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and read_backbone(out)[1]["which"] == "student"
    assert main(["import-checkpoint", "ecddp", str(released), "--out", str(out), "--which", "teacher"]) == 0
    assert read_backbone(out)[1]["which"] == "teacher"
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 10)
    assert main(["import-checkpoint", "ecddp", str(bad), "--out", str(tmp_path / "c.safetensors")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and err.count("\n") == 1 and not (tmp_path / "c.safetensors").exists()
    assert main(["export-backbone", str(released), "--out", str(tmp_path / "d.safetensors")]) == 2
    assert "use 'evforge import-checkpoint ecddp'" in capsys.readouterr().err


def test_parser_is_built_without_importing_torch():
    """``evforge --help`` stays fast: the parser (every command's arguments) needs no torch; commands import
    what they use when they run."""
    import subprocess
    import sys

    code = ("import sys, evforge.cli as c; p = c.build_parser(); p.parse_args(['simulate', 'x', '--out', 'y']); "
            "print(sorted(m for m in ('torch', 'numpy', 'h5py', 'numba') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------- issue 15: one line, the right exit code
def _one_line(err: str, path) -> bool:
    return err.count("\n") == 1 and err.startswith("evforge: error: ") and str(path) in err


@pytest.fixture()
def readonly(tmp_path):
    """A read-only folder: a read-only tmpfs mount for root (whom permissions do not stop), chmod 555 otherwise."""
    import os
    import subprocess

    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        pytest.skip("cannot make a read-only folder here (root, and no mount)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def _stream_file(path):
    from evforge.formats.events import make_events
    from evforge.formats.streamfile import write_stream

    rng = np.random.default_rng(0)
    n = 5000
    ev = make_events(rng.integers(0, 32, n), rng.integers(0, 24, n), np.sort(rng.integers(0, 400_000, n)),
                     rng.choice([-1, 1], n))
    return write_stream(path, ev, np.arange(5) * 100_000, width=32, height=24)


def test_read_only_outputs_are_one_line_with_exit_code_3(atis_dataset, readonly, tmp_path, capsys, monkeypatch):
    import lzma

    from evforge import pretrain
    from evforge.trainer.toy import ToyTask, toy_config

    monkeypatch.chdir(tmp_path)
    stream = _stream_file(tmp_path / "s.h5")
    released = tmp_path / "released.pt"
    released.write_bytes(lzma.decompress((Path(__file__).resolve().parent / "fixtures" / "ecddp" /
                                          "released_ecddp_tiny.pt.xz").read_bytes()))
    monkeypatch.setattr(pretrain, "get_task", lambda name: ToyTask())
    (tmp_path / "toy.yaml").write_text(json.dumps(toy_config(max_steps=2)))
    commands = {
        "convert": ["convert", "ncaltech101", str(atis_dataset), "--out", str(readonly / "ds"),
                    "--opt", "sensor_size=[32, 24]", "--quiet"],
        "pretrain": ["pretrain", "--config", str(tmp_path / "toy.yaml"), "--out", str(readonly / "run")],
        "import-checkpoint": ["import-checkpoint", "ecddp", str(released), "--out", str(readonly / "b.safetensors")],
        "preview": ["preview", str(stream), "--out", str(readonly / "p.png")],
        "scenes": ["scenes", str(readonly / "scenes"), "--frames", "2", "--size", "16x12"],
    }
    for name, argv in commands.items():
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 3 and _one_line(err, readonly), (name, rc, err)
        assert "read-only file system" in err or "permission denied" in err, (name, err)


def test_output_that_is_a_file_and_a_locked_output(atis_dataset, tmp_path, capsys, monkeypatch):
    from evforge.locks import FolderLock

    monkeypatch.chdir(tmp_path)
    args = ["convert", "ncaltech101", str(atis_dataset), "--opt", "sensor_size=[32, 24]", "--quiet"]
    (tmp_path / "file").write_text("x")
    rc = main(args + ["--out", str(tmp_path / "file")])
    err = capsys.readouterr().err
    assert rc == 3 and _one_line(err, tmp_path / "file") and "is a file, not a folder" in err
    with FolderLock(tmp_path / "ds", "evforge convert (the other one)"):
        rc = main(args + ["--out", str(tmp_path / "ds")])
    err = capsys.readouterr().err
    assert rc == 3 and _one_line(err, tmp_path / "ds") and "locked by another evforge run" in err


def test_disk_full_in_convert_exits_3_not_1(atis_dataset, tmp_path, capsys, monkeypatch):
    import errno

    from evforge.formats import shards

    monkeypatch.chdir(tmp_path)

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device", str(self._tmp))

    monkeypatch.setattr(shards.ShardWriter, "close", full)
    rc = main(["convert", "ncaltech101", str(atis_dataset), "--out", str(tmp_path / "ds"), "--opt",
               "sensor_size=[32, 24]", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 3 and _one_line(err, tmp_path / "ds") and "disk full" in err
    assert not [p for p in (tmp_path / "ds").rglob("*") if ".tmp-" in p.name]


def test_damaged_files_are_one_line_errors(atis_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ds"
    assert main(["convert", "ncaltech101", str(atis_dataset), "--out", str(out), "--opt", "sensor_size=[32, 24]",
                 "--quiet"]) == 0
    capsys.readouterr()
    shard = next(out.rglob("*.h5"))
    shard.write_bytes(shard.read_bytes()[:2000])  # truncated: unreadable
    assert main(["inspect", str(out)]) == 1  # it was 0
    assert str(shard) in capsys.readouterr().out
    # a stream file whose event data is damaged: verify and preview answer in one line, no traceback
    stream = _stream_file(tmp_path / "s.h5")
    import h5py

    with h5py.File(stream, "r") as f:
        info = f["events/x"].id.get_chunk_info(0)
    data = bytearray(stream.read_bytes())
    data[info.byte_offset : info.byte_offset + info.size] = bytes(info.size)  # the chunk zeroed
    stream.write_bytes(bytes(data))
    assert main(["verify", str(stream)]) == 1
    out_text = capsys.readouterr().out
    assert out_text.splitlines()[0].startswith(f"{stream}: ") and out_text.endswith("1 fault(s)\n")
    rc = main(["preview", str(stream), "--out", str(tmp_path / "p.png")])
    err = capsys.readouterr().err
    assert rc in (2, 3) and _one_line(err, stream)


def test_pickled_checkpoint_export_and_a_root_one_folder_too_high(atis_dataset, tmp_path, capsys, monkeypatch):
    import fractions

    import torch

    bad = tmp_path / "pickled.ckpt"
    torch.save({"model": {}, "config": "{}", "x": fractions.Fraction(1, 3)}, bad)
    assert main(["export-backbone", str(bad), "--out", str(tmp_path / "b.safetensors")]) == 2
    err = capsys.readouterr().err
    assert _one_line(err, bad) and "holds pickled Python objects" in err and "weights_only=False" not in err
    monkeypatch.chdir(tmp_path)
    outer = tmp_path / "download"
    outer.mkdir()
    atis_dataset.rename(outer / "Caltech101")
    rc = main(["convert", "ncaltech101", str(outer), "--out", str(tmp_path / "ds"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and _one_line(err, outer) and f"the dataset root seems to be {outer / 'Caltech101'}" in err
