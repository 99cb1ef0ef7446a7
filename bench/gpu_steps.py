"""A few training steps of every pretraining and finetuning config, on one device, as a smoke check.

Each YAML under ``evforge/configs/pretrain`` and ``evforge/configs/finetune`` runs through the same path as
``evforge pretrain`` / ``evforge finetune`` (``load_config`` -> the task -> ``Trainer.fit``) for ``--steps``
optimizer steps at ``--precision`` (default bf16-mixed), on small datasets of the kind each task reads,
built once (not timed): simulated streams (ECDDP), synthetic classification samples (MEM, classification)
and a synthetic DSEC-Semantic folder (segmentation). MEM runs take the tokenizer that the matching
``mem_dvae*`` config's run wrote a moment before (the run named in their ``task.tokenizer``; the paper's
``mem_dvae`` when that config is absent). Batches are capped at ``--batch`` so that the small datasets fill
them; validation and periodic checkpoints are off. A config that fails is reported with its error and the
others still run (exit code 1).

Prints one line per config and writes ``bench/results/gpu-steps-<machine tag>.json`` and ``.md``: the status,
the losses of the steps, the wall time of ``fit`` and of its last step, and the peak device memory.
``bench/gpu_check.sh`` runs it on CUDA; ``--quick`` (the tiny configs, ``--device cpu --precision 32-true
--batch 2 --steps 1``) checks the plumbing on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path

import harness
import torch
from bench_data import dsec_dataset, samples_dataset, stream_dataset
from harness import REPO, markdown_head, markdown_table
from machine import machine_info

CONFIGS = REPO / "evforge" / "configs"
QUICK = dict(device="cpu", precision="32-true", steps=1, batch=2, only="tiny")
KINDS = {"ecddp": "streams", "mem_dvae": "samples", "mem": "samples", "classification": "samples",
         "segmentation": "dsec"}


def configs(patterns: list[str]) -> list[Path]:
    """Every pretraining then finetuning config (``mem_dvae*`` before ``mem*``: their runs are the tokenizers)."""
    found = []
    for stage in ("pretrain", "finetune"):
        paths = sorted((CONFIGS / stage).glob("*.yaml"))
        paths.sort(key=lambda p: (not p.stem.startswith("mem_dvae"), p.stem))
        found += [p for p in paths if not patterns or any(s in p.stem for s in patterns)]
    return found


def run_config(path: Path, data: dict, runs: Path, args) -> dict:
    """``--steps`` optimizer steps of one config; returns its row."""
    from evforge.trainer.config import load_config
    from evforge.trainer.trainer import Trainer

    stage = path.parent.name
    cfg = load_config(path)
    task_name = cfg.get("task", {}).get("name", "")
    row = {"config": f"{stage}/{path.name}", "task": task_name, "status": "failed"}
    t_start = time.perf_counter()
    try:
        if stage == "pretrain":
            from evforge.pretrain import get_task
        else:
            from evforge.finetune import get_task
        kind = KINDS.get(task_name)
        if kind is None:
            raise ValueError(f"no dataset kind for task {task_name!r}")
        cfg["seed"] = args.seed
        cfg["data"]["path"] = str(data[kind]())
        cfg["data"]["batch_size"] = min(int(cfg["data"].get("batch_size") or args.batch), args.batch)
        cfg["data"]["num_workers"] = args.workers
        if task_name == "segmentation":  # every label of the small folder, one sequence held out
            cfg["data"].update(val_sequences=["zurich_city_01_a"], first_label=0, label_stride=1)
            maps = (cfg["task"].get("rectify") or {}).get("maps")
            if maps:  # the reference recipe rectifies raw shards when it reads them: our source's maps
                cfg["task"]["rectify"]["maps"] = (Path(cfg["data"]["path"]) / "source").read_text()
        if task_name == "classification":  # validation is off, but the splits must exist in the small dataset
            cfg["data"].update(val_split="val", test_split="val")
        cfg.setdefault("trainer", {}).update(accelerator=args.device, devices=1, num_nodes=1, strategy="auto",
                                             precision=args.precision, epochs=None, max_steps=args.steps,
                                             val_every_n_epochs=None, val_every_n_steps=None, log_every_n_steps=1)
        cfg.setdefault("checkpoint", {}).update(every_n_steps=None, every_n_epochs=None, keep_every_n_steps=None)
        cfg.setdefault("log", {}).update(progress=False, tensorboard=False)
        if task_name == "mem" and cfg["task"].get("tokenizer"):
            wanted = Path(cfg["task"]["tokenizer"]).parts[-3]  # runs/<dvae config>/checkpoints/last.ckpt
            tok = runs / wanted / "checkpoints" / "last.ckpt"
            if not tok.exists():
                tok = runs / "mem_dvae" / "checkpoints" / "last.ckpt"
            row["tokenizer"] = tok.parent.parent.name
            cfg["task"]["tokenizer"] = str(tok)
        out = runs / path.stem
        shutil.rmtree(out, ignore_errors=True)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Trainer(cfg, get_task(task_name), out_dir=out, resume=None) as trainer:
                summary = trainer.fit()
        if args.device == "cuda":
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        train = [r for r in logs if r.get("split") == "train"]
        row["losses"] = [round(float(r["loss"]), 4) for r in train if "loss" in r]
        row["step_s"] = [r.get("s/step") or r.get("sec_per_step") for r in train][-1:] or None
        row["steps"] = int(summary.get("step", 0))
        row["batch"] = cfg["data"]["batch_size"]
        ok = row["steps"] == args.steps and row["losses"] and all(math.isfinite(v) for v in row["losses"])
        row["status"] = "ok" if ok else "bad losses or steps"
    except Exception as e:  # reported, and the next config runs
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc(limit=6)
    row["seconds"] = round(time.perf_counter() - t_start, 1)
    return row


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_bench_args(p, quick="the tiny configs on the CPU, fp32, batch 2, 1 step", devices=("cuda", "cpu"),
                           device_default=None, out="bench/results/gpu-steps-<machine tag>.json")
    p.add_argument("--precision", default=None, help="trainer.precision of every run (default bf16-mixed)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per config (default 3)")
    p.add_argument("--batch", type=int, default=None,
                   help="largest batch (a config's own smaller one is kept; default 8)")
    p.add_argument("--workers", type=int, default=2, help="loader workers")
    p.add_argument("--only", default=None, help="comma-separated parts of config names to run (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="datasets and runs (default: a temp folder, removed)")
    a = p.parse_args(argv)
    defaults = QUICK if a.quick else dict(device="cuda", precision="bf16-mixed", steps=3, batch=8, only="")
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    return a


def markdown(doc: dict) -> list[str]:
    c, rows = doc["config"], doc["rows"]
    ok = sum(r["status"] == "ok" for r in rows)
    table = [[r["config"], r["task"], r["status"] + (": " + r["error"][:120] if "error" in r else ""),
              r.get("batch", "-"), ", ".join(f"{v:.3g}" for v in r.get("losses") or []), r["seconds"],
              r.get("peak_mem_gib", "-")] for r in rows]
    return [*markdown_head("Training steps of every config", doc["date"], doc["machine"]),
            f"{c['steps']} optimizer steps per config at {c['precision']}, batch at most {c['batch']}, on "
            f"{c['device']}; small synthetic datasets; validation and checkpoints off.", "",
            markdown_table(["config", "task", "status", "batch", "losses", "s", "peak GiB"], table), "",
            f"{ok}/{len(rows)} ok; total {doc['elapsed_s']:.0f} s.", ""]


def main(argv=None) -> int:
    args = parse_args(argv)
    if harness.bench_devices(args.device) is None:
        return 2
    clock = harness.Clock()
    with contextlib.ExitStack() as stack:
        work = args.workdir or stack.enter_context(harness.work_dir("evforge-gpu-steps-"))
        rows, info = run_all(args, work)
    elapsed = clock.elapsed()
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"{ok}/{len(rows)} configs ran {args.steps} steps with finite losses, {elapsed:.0f} s in all")
    for path in harness.result_paths("gpu-steps", [args.device], info, args.quick, args.out):
        harness.write_results(path, info, {k: str(v) for k, v in vars(args).items()}, rows, benchmark="gpu-steps",
                              markdown=markdown, elapsed_s=round(elapsed, 1))
        print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0 if ok == len(rows) else 1


def run_all(args, work: Path) -> tuple[list[dict], dict]:
    """Every selected config's row (datasets built on first use), and the machine."""
    cache: dict = {}

    def once(kind, build):
        def get():
            if kind not in cache:
                t0 = time.perf_counter()
                cache[kind] = build()
                print(f"  {kind} dataset: {cache[kind]} ({time.perf_counter() - t0:.0f} s, not timed)", flush=True)
            return cache[kind]
        return get

    sim_device = "cuda" if args.device == "cuda" else "cpu"
    streams = "tiny" if args.quick else "paper"
    data = {"streams": once("streams", lambda: stream_dataset(work, streams, 3 * args.batch, sim_device, args.seed,
                                                              log=lambda m: None)),
            "samples": once("samples", lambda: samples_dataset(work, 4 * args.batch, args.seed, log=lambda m: None)),
            "dsec": once("dsec", lambda: dsec_dataset(work, args.seed))}
    info = machine_info()
    harness.announce(info, args.device, [args.device])
    rows = []
    for path in configs(harness.csv(args.only)):
        row = run_config(path, data, work / "runs", args)
        rows.append(row)
        losses = ", ".join(f"{v:.3g}" for v in row.get("losses") or [])
        print(f"  {row['config']:45s} {row['status']:4s} {row['seconds']:6.1f} s  losses [{losses}]"
              + (f"  {row['error'][:160]}" if "error" in row else ""), flush=True)
    return rows, info


if __name__ == "__main__":
    sys.exit(main())
