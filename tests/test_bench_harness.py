"""bench/harness.py (the benchmarks' shared timing, stats, tables and result files) and that every bench script
still imports and parses its options (``--help``)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:  # the bench scripts import each other by module name
    sys.path.append(str(BENCH))

import harness  # noqa: E402

SCRIPTS = ["simulator.py", "convert.py", "train.py", "simulate_workers.py", "cli_e2e.py", "gpu_steps.py"]


def test_stats_median_min_max():
    assert harness.stats([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0}
    assert harness.stats([4.0]) == {"median": 4.0, "min": 4.0, "max": 4.0}
    with pytest.raises(ValueError):
        harness.stats([])


def test_ratios_are_paired_per_repeat_not_ratios_of_medians():
    num, den = [2.0, 3.0, 100.0], [1.0, 3.0, 10.0]
    assert harness.paired_ratios(num, den) == [2.0, 1.0, 10.0]
    s = harness.ratio_stats(num, den)
    assert (s["median"], s["min"], s["max"]) == (2.0, 1.0, 10.0)  # medians alone would give 3 / 3 = 1
    assert s["per_repeat"] == [2.0, 1.0, 10.0]
    assert harness.paired_ratios([3.0, 1.0], [2.0, 4.0], "change") == [50.0, -75.0]
    assert harness.paired_ratios([3.0, 1.0], [2.0, 4.0], "share") == [150.0, 25.0]
    assert harness.ratio_stats([], []) is None
    with pytest.raises(ValueError, match="pair"):
        harness.paired_ratios([1.0, 2.0], [1.0])


def test_formatting():
    assert harness.num(1234.0) == "1.23k" and harness.num(2.5e6) == "2.5M" and harness.num(0.5) == "0.5"
    assert harness.spread({"median": 2000.0, "min": 1000.0, "max": 3.0e6}) == "2k [1k-3M]"
    assert harness.pct({"median": 5.04, "min": -1.0, "max": 12.0}) == "+5.0 % [-1.0 to +12.0]"
    assert harness.pct(None) == "-"
    assert harness.ratio({"median": 2.0, "min": 1.0, "max": 10.0, "per_repeat": [2.0, 1.0, 10.0]}) == \
        "2.0x [1.0-10.0]"
    table = harness.markdown_table(["a", "b"], [[1, "x|y"], ["2", "z"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x\\|y |", "| 2 | z |"]


def test_interleave_runs_warmups_first_then_alternates_and_records_each_repeat():
    calls = []

    def contender(name, result=None):
        def fn(warm):
            calls.append((name, warm))
            return None if warm else (result if result is not None else {"seconds": len(calls)})
        return fn

    a, b, c = harness.Row("A"), harness.Row("B"), harness.Row("C")
    seen = []
    order = harness.interleave([(a, contender("A")), (b, contender("B", 0.5)), (c, lambda warm: None)], 3,
                               warmup=2, progress=lambda k, rows: seen.append((k, [r.name for r in rows])))
    assert order == ["A", "B", "C"] * 3
    assert calls[:4] == [("A", True), ("B", True), ("A", True), ("B", True)]
    assert calls[4:] == [("A", False), ("B", False)] * 3
    assert [r["seconds"] for r in a.runs] == [5, 7, 9]  # the call count when each timed run happened
    assert b.runs == [{"seconds": 0.5}] * 3  # plain seconds become runs
    assert c.runs == []  # None is not a repeat
    assert seen == [(k, ["A", "B", "C"]) for k in range(3)]


def test_timed_warms_up_and_syncs_around_each_call():
    log = []
    times = harness.timed(lambda: log.append("call"), repeats=3, warmup=2, sync=lambda: log.append("sync"))
    assert len(times) == 3 and all(t >= 0 for t in times)
    assert log == ["call", "call"] + ["sync", "call", "sync"] * 3


def test_row_stats_and_rates():
    row = harness.Row("r", runs=[{"seconds": 2.0, "frames": 10}, {"seconds": 1.0, "frames": 10}])
    row.add(4.0)
    assert row.values("seconds") == [2.0, 1.0, 4.0]
    assert harness.Row("q", runs=row.runs[:2]).rate("frames") == {"median": 7.5, "min": 5.0, "max": 10.0}


def test_write_results_json_and_markdown_read_back(tmp_path):
    path = tmp_path / "out" / "bench-cpu-x.json"
    rows = [{"name": "a", "runs": [{"seconds": np.float32(0.5), "n": np.int64(3)}], "where": tmp_path}]
    doc = harness.write_results(path, {"cpu_model": "X"}, {"repeats": 1}, rows, benchmark="demo",
                                markdown=lambda d: ["# demo", "", f"{len(d['rows'])} rows"], elapsed_s=1.5)
    back = json.loads(path.read_text())
    assert back["benchmark"] == "demo" and back["machine"] == {"cpu_model": "X"} and back["elapsed_s"] == 1.5
    assert back["rows"][0]["runs"] == [{"seconds": 0.5, "n": 3}]  # numpy scalars as numbers
    assert back["rows"][0]["where"] == str(tmp_path)
    assert back["date"] == doc["date"]
    assert path.with_suffix(".md").read_text() == "# demo\n\n1 rows\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["bench-cpu-x.json", "bench-cpu-x.md"]  # no temp files

    def broken(doc):
        raise RuntimeError("table bug")

    with pytest.raises(RuntimeError):  # a failing report leaves the earlier files whole
        harness.write_results(path, {}, {}, [], benchmark="demo", markdown=broken)
    assert json.loads(path.read_text())["benchmark"] == "demo" and json.loads(path.read_text())["rows"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["bench-cpu-x.json", "bench-cpu-x.md"]

    harness.write_results(path, {}, {}, None, benchmark="sections", markdown="text", decode={"x": 1})
    back = json.loads(path.read_text())
    assert "rows" not in back and back["decode"] == {"x": 1}


def test_work_dir_is_removed_even_on_an_exception(tmp_path):
    with harness.work_dir("t-", tmp_path) as d:
        (d / "f").write_text("x")
        kept = d
    assert not kept.exists()
    with pytest.raises(KeyError):
        with harness.work_dir("t-", tmp_path / "parent") as d:
            (d / "sub").mkdir()
            (d / "sub" / "g").write_text("y")
            kept = d
            raise KeyError("boom")
    assert not kept.exists() and (tmp_path / "parent").is_dir()


def test_result_paths_and_options(tmp_path):
    info = {"cpu_model": "AMD EPYC 7B13", "usable_cpus": 2, "gpu": {"name": "NVIDIA H200"}}
    paths = harness.result_paths("sim", ["cpu", "cuda"], info, quick=False)
    assert [p.name for p in paths] == ["sim-cpu-amd-epyc-7b13-2cpu.json", "sim-cuda-nvidia-h200.json"]
    assert all(p.parent == harness.RESULTS for p in paths)
    quick = harness.result_paths("sim", ["cpu"], info, quick=True)
    assert [p.name for p in quick] == ["sim-quick-cpu-amd-epyc-7b13-2cpu.json"]
    assert harness.RESULTS not in next(iter(quick)).parents
    assert harness.result_paths("sim", ["cpu", "cuda"], info, False, tmp_path / "o.json") == \
        {tmp_path / "o.json": ["cpu", "cuda"]}

    p = argparse.ArgumentParser()
    harness.add_bench_args(p, quick="tiny", out="x")
    a = p.parse_args(["--quick", "--device", "cpu", "--out", "r.json"])
    assert (a.quick, a.device, a.out) == (True, "cpu", Path("r.json"))
    assert p.parse_args([]).device == "all"
    with pytest.raises(SystemExit):
        p.parse_args(["--device", "tpu"])
    assert harness.csv(" 1, 8,,32 ", int) == [1, 8, 32]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_help(script):
    """Every bench script imports and parses its options (an import or option clash fails here)."""
    done = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--quick" in done.stdout


def test_train_group_measures_the_trainers_own_loader_and_fit(tmp_path, monkeypatch):
    """bench/train.py's one run loop on the toy task: every row warmed up then measured in interleaved repeats,
    the trainer row timed inside fit, and the data-loader row drawing its batches from the trainer's own
    DataLoader and sampler (not a loader of its own)."""
    import torch
    import train

    from evforge.trainer.sampler import ResumableBatchSampler
    from evforge.trainer.toy import ToyTask, toy_config

    drawn = []
    real_iter = ResumableBatchSampler.__iter__

    def spy(self):
        for batch in real_iter(self):
            drawn.append(self)
            yield batch

    monkeypatch.setattr(ResumableBatchSampler, "__iter__", spy)

    def work(steps: int) -> None:  # a stand-in model step
        for _ in range(steps):
            torch.ones(256).sum()

    class ToyGroup(train.Group):
        family = "toy"

        def build(self):
            self.task = train.marked(ToyTask, self.device)
            self.tr = self.trainer(toy_config(max_steps=1000), self.task, "run")
            step, fit, loader = self.row("model-step"), self.row("trainer"), self.row("data-loader")
            self.items = [(step, self.step(step, work)),
                          (fit, self.window(fit, self.tr, self.task)), (loader, self.loader(loader, self.tr))]
            self.ratios = {"trainer_vs_model_pct": ("trainer", "model-step", "change"),
                           "loader_share_pct": ("data-loader", "model-step", "share")}

    args = argparse.Namespace(steps=3, warmup=2, workers=0)
    group = ToyGroup(args, "cpu", "tiny", "fp32", 4, data=tmp_path, workdir=tmp_path)
    group.build()
    try:
        tr = group.tr
        run = group.loader(group.rows()[2], tr)(False)
        assert run["steps"] == 3 and run["samples"] == 12 and run["seconds"] > 0
        assert drawn == [tr.sampler] * 4  # the first batch untimed, then 3, all from the trainer's sampler
        drawn.clear()
        group.measure(2, lambda m: None)
        summary = group.summary()
    finally:
        group.close()
    rows = {r["row"]: r for r in summary["rows"]}
    assert list(rows) == ["model-step", "trainer", "data-loader"]
    assert all(r["repeats"] == 2 and r["steps_per_repeat"] == 3 and r["samples_per_s"]["median"] > 0
               for r in rows.values())
    fit_runs = rows["trainer"]["runs"]
    assert all(r["untimed_steps"] >= 1 and r["seconds"] > 0 for r in fit_runs)
    assert fit_runs[1]["first_step"] > fit_runs[0]["first_step"] + 3  # both windows in the one trainer's steps
    assert set(drawn) == {tr.sampler}  # fit and the loader row read the same sampler
    ov = summary["overheads"]
    assert len(ov["trainer_vs_model_pct"]["per_repeat"]) == 2 and len(ov["loader_share_pct"]["per_repeat"]) == 2
