"""Training throughput: the ECDDP step through the trainer against the model step alone and a bare timm Swin-T.

Measures samples/s, sec/step and memory of one ECDDP pretraining step at three levels, on the CPU and (when
torch sees one) on CUDA, in fp32 (and bf16-mixed on CUDA), for two model sizes (``--presets tiny,paper``):

1. ``bare-swin``: the backbone work of one ECDDP step with a plain timm Swin (``timm.create_model(variant,
   in_chans=6, ...)``, the student backbone's config, without ECDDP's fusion / mask token), on random
   tensors shaped like the step's crops: a teacher copy (eval, no grad) runs forward on the B views and the
   n_global*B global crops; the student runs forward on the n_global*B global and n_local*B local crops and
   backward from the mean of its outputs. No heads, no loss, no optimizer step.
2. ``model-step``: :class:`ECDDPModel` forward + backward + gradient clipping + prototype freezing +
   AdamW step + EMA update, on voxel grids made beforehand (by the task's own input path, from the same
   dataset) and held on the device. It runs on the trainer's own model and optimizer (row 3), so both rows
   use the same weights, parameter groups and optimizer.
3. ``trainer``: ``Trainer.fit`` with :class:`ECDDPTask` (config ``configs/pretrain/ecddp_swin_t.yaml``,
   single device) on a stream dataset built once in a temp dir: procedural scenes
   (``evforge.simulator.scenes``) -> ``simulate_sequences`` (preset ``ecddp``) -> ``build_dataset
   ("tartanair")``. Includes the data loader (``--workers``), collate, host->device copy, voxel grid,
   random crop, Fabric, schedules and logging. Timed by wall clock between the ends of two optimizer steps
   inside one ``fit`` call (the task's ``after_optimizer_step`` hook records the time), so the first step of
   each ``fit`` call (loader iterator creation, first batch) and epoch boundaries are outside the timed
   window; checkpoint writes are switched off.

Component rows (``--no-components`` drops them), to see where the trainer's extra time goes:
``task-inputs`` (host batch -> device, voxel grid, random crop: ``ECDDPTask.inputs``) and ``data-loader``
(``EventDataset`` + ``collate_events`` through a DataLoader with ``--workers`` workers, no model).

MEM rows (``--methods mem``): ``mem-dvae-step`` (tokenizer train step), ``mem-step`` (MEMModel step incl. the
tokenizer's targets; also tokens/s = masked patches predicted per second), ``mem-targets`` (the targets alone),
``mem-trainer`` (``Trainer.fit`` with MEMTask). Finetune rows (``--methods finetune``): ``cls-finetune-trainer``
(``Trainer.fit`` with ClassificationTask) and ``seg-finetune-step`` (SegmentationModel on random 20-channel
inputs). Both on a synthetic samples dataset (64x48) built once; see ROW_DOC and bench/README.md.

Every timed repeat of every row starts with one untimed step (for the trainer: the first step of its ``fit``
call). The issue's target: the trainer and data path add under 10 % over the model step (row 3 vs row 2).
Repeats of all rows of a group are interleaved; overheads are medians of the per-repeat ratios [min-max].

Usage::

    python bench/train.py                 # full run: tiny + paper presets, CPU (+ CUDA if available)
    python bench/train.py --device cuda   # CUDA only
    python bench/train.py --methods mem   # one family: ecddp, mem, finetune (default all)
    python bench/train.py --quick         # smoke test (tiny, CPU, 2 repeats, 1 thread; < 1 min on 2 cores)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import gc
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from machine import MemoryProbe, announce, bench_devices, cpuinfo, machine_info, machine_lines, result_paths  # noqa: E402
from machine import sync as _sync

from evforge.data.dataset import collate_events, make_loader  # noqa: E402
from evforge.dataset_builder.build import build_dataset  # noqa: E402
from evforge.dataset_builder.synthetic import make_synthetic_classification  # noqa: E402
from evforge.finetune.classification import ClassificationTask  # noqa: E402
from evforge.finetune.segmentation import SegmentationTask  # noqa: E402
from evforge.models.swin import TINY_SWIN_KWARGS  # noqa: E402
from evforge.pretrain.ecddp.model import ECDDPConfig  # noqa: E402
from evforge.pretrain.ecddp.task import ECDDPTask  # noqa: E402
from evforge.pretrain.mem.task import MEMDVAETask, MEMTask  # noqa: E402
from evforge.simulator.pipeline import SimulateConfig, simulate_sequences  # noqa: E402
from evforge.simulator.scenes import SceneSpec, make_dataset  # noqa: E402
from evforge.simulator.sources import discover_sequences  # noqa: E402
from evforge.simulator.upsample import UpsampleConfig  # noqa: E402
from evforge.trainer import Trainer  # noqa: E402
from evforge.trainer.config import load_config  # noqa: E402
from evforge.trainer.sampler import mix_seed  # noqa: E402

BASE_CONFIG = REPO / "configs" / "pretrain" / "ecddp_swin_t.yaml"
TARGET_TRAINER_OVERHEAD_PCT = 10.0  # the trainer and data path add under 10 % over the model step


@dataclass(frozen=True)
class Preset:
    """Model size, input crop, dataset sensor, and per-device defaults (batch, timed steps, warm-up steps)."""

    model: dict | None  # cfg["task"]["model"]; None keeps the paper config's
    input_size: int  # cfg["task"]["input_size"]: the random square crop of the voxel grid
    sensor: tuple[int, int]  # (W, H) of the simulated streams
    render: tuple[int, int]  # (W, H) the procedural scenes are rendered at (resized to the sensor)
    batch: dict
    steps: dict
    warmup: dict


PRESETS = {
    # ECDDPConfig.tiny_config(): tiny Swin (embed 24, window 4), 96 view / 64 global / 32 local crops, 4 locals, K = 4
    "tiny": Preset(model={"preset": "tiny"}, input_size=128, sensor=(160, 128), render=(160, 128),
                   batch={"cpu": 8, "cuda": 64}, steps={"cpu": 8, "cuda": 20}, warmup={"cpu": 3, "cuda": 10}),
    # the paper: Swin-T/7, 224 view / 2 x 192 global / 8 x 96 local, 32768 prototypes, 320 crop of 640x480
    "paper": Preset(model=None, input_size=320, sensor=(640, 480), render=(160, 120),
                    batch={"cpu": 2, "cuda": 32}, steps={"cpu": 2, "cuda": 10}, warmup={"cpu": 2, "cuda": 5}),
}
# --quick is a smoke test, meant to finish on a busy shared machine: one torch thread (with every core's thread
# busy-waiting on a loaded box a step can take 100x longer), unless --threads says otherwise.
QUICK = dict(presets="tiny", device="cpu", repeats=2, steps=4, warmup=2, threads=1)
FRAMES_PER_TRAJECTORY = 41  # 40 samples (frame intervals) per simulated trajectory
PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}
FAMILIES = ("ecddp", "mem", "finetune")


# --------------------------------------------------------------------------------------------- machine
# (the same machine description and naming as bench/simulator.py)


def train_machine_info(threads: int) -> dict:
    extra = {"timm": timm.__version__}
    try:
        import lightning_fabric
        extra["lightning_fabric"] = lightning_fabric.__version__
    except ImportError:
        pass
    return machine_info(threads, **extra)


# --------------------------------------------------------------------------------------------- memory, sync


# --------------------------------------------------------------------------------------------- data


def _built_once(root: Path, name: str, label: str, build, log=print) -> Path:
    """``root/name/dataset``, made by ``build(work, out) -> summary`` unless its manifest is already there
    (then reused); what ``build`` leaves in ``root/name`` besides the dataset is removed."""
    work = root / name
    out = work / "dataset"
    if (out / "manifest.json").exists():
        log(f"  {label}: reusing {out}")
        return out
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    summary = build(work, out)
    for child in work.iterdir():
        if child != out:
            shutil.rmtree(child, ignore_errors=True)
    log(f"  {label}: built {out} ({summary}, {time.perf_counter() - t0:.0f} s, not timed)")
    return out


def stream_dataset(root: Path, preset: str, items: int, sim_device: str, seed: int, log=print) -> Path:
    """A stream dataset of at least ``items`` samples (frame intervals) at the preset's sensor size, built once
    under ``root`` (reused when present): procedural scenes -> simulate (preset ``ecddp``) -> shards."""
    p = PRESETS[preset]
    trajectories = max(1, math.ceil(items / (FRAMES_PER_TRAJECTORY - 1)))
    (rw, rh), (sw, sh) = p.render, p.sensor

    def build(work: Path, out: Path) -> str:
        # speed 3 px per frame at the render size (12 px at 640x480 for the paper preset)
        make_dataset(work / "scenes", envs=("bench",), trajectories=trajectories,
                     spec=SceneSpec(width=rw, height=rh, frames=FRAMES_PER_TRAJECTORY, speed_px=3.0, seed=seed))
        cfg = SimulateConfig(preset="ecddp", resolution=f"{sw}x{sh}", upsample=UpsampleConfig(mode="none"),
                             seed=seed, device=sim_device, batch=8, save_frames=False)
        results = simulate_sequences(discover_sequences(work / "scenes"), work / "streams", cfg, progress=False,
                                     log=lambda m: None)
        failed = [r for r in results if r.status == "failed"]
        if failed:
            raise RuntimeError(f"simulation failed: {failed[0].error}")
        build_dataset("tartanair", work / "streams", out, test_envs=(), progress=False, command="bench/train.py")
        return f"{trajectories} trajectories"

    name = f"{preset}-{sw}x{sh}-r{rw}x{rh}-{trajectories}x{FRAMES_PER_TRAJECTORY}-seed{seed}"
    return _built_once(root, name, "dataset", build, log)


# --------------------------------------------------------------------------------------------- the rows


class BenchTask(ECDDPTask):
    """ECDDPTask that notes the time at the end of chosen optimizer steps (the bench's clock for the trainer),
    and optionally draws its crops from a CPU generator (``cpu_generator``)."""

    def __init__(self, device: torch.device, cpu_generator: bool = False):
        super().__init__()
        self.device, self.cpu_generator = device, cpu_generator
        self.want: set[int] = set()
        self.marks: dict[int, float] = {}

    def step_generator(self, state, salt, device="cpu"):
        return super().step_generator(state, salt, "cpu" if self.cpu_generator else device)

    def after_optimizer_step(self, model, state):
        super().after_optimizer_step(model, state)
        step = int(state["step"])  # optimizer steps done, this one included
        if step in self.want:
            _sync(self.device)
            self.marks[step] = time.perf_counter()


def make_config(preset: str, device: str, precision: str, batch: int, workers: int, data: Path, seed: int,
                log_every: int | None) -> dict:
    """The paper config (configs/pretrain/ecddp_swin_t.yaml) on one device, with the preset's model and crop."""
    p = PRESETS[preset]
    cfg = load_config(BASE_CONFIG)
    if p.model is not None:
        cfg["task"]["model"] = dict(p.model)
    cfg["task"]["input_size"] = p.input_size
    cfg["seed"] = seed
    cfg["data"].update(path=str(data), batch_size=batch, num_workers=workers)
    cfg["trainer"].update(accelerator=device, devices=1, num_nodes=1, strategy="auto", precision=precision,
                          epochs=None, max_steps=10**7, val_every_n_epochs=None, val_every_n_steps=None,
                          stop_signals=[])
    if log_every is not None:
        cfg["trainer"]["log_every_n_steps"] = log_every
    cfg["checkpoint"].update(every_n_steps=None, every_n_epochs=None, keep_every_n_steps=None)
    cfg["log"]["progress"] = False
    return cfg


def time_row(row: "Row", fn, steps: int, warm: bool, device: torch.device) -> None:
    """One untimed lead-in step, then ``steps`` timed ones, like the trainer row's ``fit`` call (the memory probe
    hands freed heap back to the OS first, so the lead-in step pays the page faults for all rows alike)."""
    with MemoryProbe(device) as mem:
        fn(1)
        _sync(device)
        t0 = time.perf_counter()
        extra = fn(steps)
        _sync(device)
        seconds = time.perf_counter() - t0
    if not warm:
        row.runs.append({"seconds": seconds, "steps": steps, "samples": steps * row.batch,
                         "peak_mem_mib": mem.peak_mib, **(extra or {})})


@dataclass
class Row:
    name: str
    batch: int
    runs: list = field(default_factory=list)  # {"seconds", "steps", "samples", "peak_mem_mib", ...}
    resident_mib: float | None = None
    note: str = ""

    def stat(self, fn) -> dict:
        vals = [fn(r) for r in self.runs]
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}

    def summary(self) -> dict:
        out = self._summary()
        if self.runs and "tokens" in self.runs[0]:  # mem-step: masked tokens predicted per second
            out["tokens_per_s"] = self.stat(lambda r: r["tokens"] / r["seconds"])
        return out

    def _summary(self) -> dict:
        return {"row": self.name, "batch": self.batch, "repeats": len(self.runs),
                "steps_per_repeat": self.runs[0]["steps"] if self.runs else None,
                "samples_per_s": self.stat(lambda r: r["samples"] / r["seconds"]),
                "sec_per_step": self.stat(lambda r: r["seconds"] / r["steps"]),
                "peak_mem_mib": max(r["peak_mem_mib"] for r in self.runs),
                "resident_mib": self.resident_mib, "note": self.note, "runs": self.runs}


class Group:
    """All rows of one (device, preset, precision, batch): built once, then measured in interleaved repeats."""

    def __init__(self, args, device: str, preset: str, precision: str, batch: int, data: Path, workdir: Path,
                 cpu_generator: bool):
        self.args, self.preset, self.precision, self.batch = args, preset, precision, batch
        self.device = torch.device(device)
        self.steps = args.steps or PRESETS[preset].steps[device]
        self.warmup = args.warmup if args.warmup is not None else PRESETS[preset].warmup[device]
        self.workers = args.workers if args.workers is not None else default_workers(device)
        self.cpu_generator = cpu_generator
        dev = self.device

        # (3) the trainer; (2) runs on its model and optimizer
        self.cfg = make_config(preset, device, PRECISIONS[precision], batch, self.workers, data, args.seed,
                               args.log_every)
        self.task = BenchTask(dev, cpu_generator)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Fabric's notes on a single-device CPU run
            self.trainer = Trainer(self.cfg, self.task, out_dir=workdir / "run", resume=None)
        self.trainer.save_checkpoint = lambda keep=False: None  # not part of a step: no checkpoint writes
        self.loader = None
        try:
            self._setup(args, data, batch, cpu_generator)
        except BaseException:
            self.trainer.close(distributed=False)
            raise

    def _setup(self, args, data: Path, batch: int, cpu_generator: bool) -> None:
        dev = self.device
        self.model = self.trainer.raw_model
        self.mcfg: ECDDPConfig = self.model.cfg
        self.autocast = self.trainer.fabric.autocast
        ds = self.trainer.loader.dataset
        ds = getattr(ds, "dataset", ds)  # SeededDataset wraps the EventDataset
        self.data_info = {"path": str(data), "items": len(ds), "sensor_size": list(ds.sensor_size),
                          "events_per_sample_mean": float(np.mean(ds.num_events)),
                          "events_per_sample_median": float(np.median(ds.num_events)),
                          "steps_per_epoch": self.trainer.steps_per_epoch}
        if self.trainer.steps_per_epoch < 1 + self.steps:
            raise RuntimeError(f"the dataset gives {self.trainer.steps_per_epoch} steps per epoch at batch {batch}, "
                               f"fewer than the {1 + self.steps} of one timed trainer window")
        self.trainer_row = Row("trainer", batch, note=f"{self.workers} loader workers")

        # host batches and the voxel grids made from them by the task's own input path
        gen_dev = "cpu" if cpu_generator else dev
        self.gen = torch.Generator(device=gen_dev)
        host = [collate_events([ds[int(i)] for i in range(k * batch, (k + 1) * batch)])
                for k in range(min(4, len(ds) // batch))]
        self.host_batches = host
        self.voxels = [self.task.inputs(self.model, _to_device(b, dev), self.cfg, self._seeded(k))
                       for k, b in enumerate(host)]
        sched = self.trainer.schedules.at(0)
        self.teacher_temp, self.ema_momentum = float(sched["teacher_temp"]), float(sched["ema_momentum"])
        self.model_row = Row("model-step", batch, note="on the trainer's model and optimizer")

        # (1) bare timm Swin: student (trained) + teacher copy (eval, no grad), random crop-shaped inputs
        c = self.mcfg
        kwargs = dict(TINY_SWIN_KWARGS) if c.tiny else {}
        kwargs.update(c.backbone_kwargs)
        self.swin = timm.create_model(c.variant, pretrained=False, in_chans=c.in_chans, img_size=c.img_size,
                                      num_classes=0, global_pool="", strict_img_size=False,
                                      drop_path_rate=c.drop_path_rate, **kwargs).to(dev).train()
        self.swin_teacher = copy.deepcopy(self.swin).requires_grad_(False).eval()
        g = torch.Generator(device="cpu").manual_seed(args.seed)
        rnd = lambda n, s: torch.randn(n, c.in_chans, s, s, generator=g).to(dev)  # noqa: E731
        self.bare_inputs = (rnd(batch, c.view_size), rnd(c.n_global * batch, c.global_size),
                            rnd(c.n_local * batch, c.local_size) if c.n_local else None)
        self.bare_row = Row("bare-swin", batch, note=f"timm {c.variant}")

        self.components = []
        if not args.no_components:
            self.inputs_row = Row("task-inputs", batch, note="to device + voxel grid + crop")
            self.loader = make_loader(ds, batch_size=batch, shuffle=True, seed=args.seed, num_workers=self.workers,
                                      drop_last=True, pin_memory=dev.type == "cuda")
            self.loader_row = Row("data-loader", batch, note=f"{self.workers} workers, no model")
            self.components = [(self.inputs_row, self.run_inputs), (self.loader_row, self.run_loader)]
        self.step_count = 0

    # ---- helpers
    def _seeded(self, k: int) -> torch.Generator:
        return self.gen.manual_seed(mix_seed(self.args.seed, 0xBE, k))

    def _timed(self, row: Row, fn, steps: int, warm: bool) -> None:
        time_row(row, fn, steps, warm, self.device)

    # ---- (1)
    def run_bare(self, steps: int):
        view, gl, lo = self.bare_inputs
        for _ in range(steps):
            with torch.no_grad(), self.autocast():
                self.swin_teacher(view)
                self.swin_teacher(gl)
            with self.autocast():
                loss = self.swin(gl).float().mean()
                if lo is not None:
                    loss = loss + self.swin(lo).float().mean()
            loss.backward()
            for p in self.swin.parameters():
                p.grad = None

    # ---- (2)
    def run_model(self, steps: int):
        tr, model, opt = self.trainer, self.model, self.trainer.raw_optimizer
        for _ in range(steps):
            self.step_count += 1
            vox = self.voxels[self.step_count % len(self.voxels)]
            with self.autocast():
                loss, _ = model(vox, teacher_temp=self.teacher_temp, generator=self._seeded(self.step_count))
            loss.backward()
            if tr.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tr.grad_clip, error_if_nonfinite=False)
            self.task.before_optimizer_step(model, {"epoch": tr.epoch})  # prototypes frozen in epoch 0
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.ema_update(self.ema_momentum)

    # ---- (3)
    def run_trainer(self, steps: int, warm: bool) -> None:
        """One ``fit`` call of 1 + ``steps`` steps, timed from the end of its first step to the end of its last,
        within one epoch (the rest of an epoch too short for that is run first, untimed)."""
        tr = self.trainer
        left = tr.steps_per_epoch - tr.batch_in_epoch // tr.accumulate
        skipped = 0
        if left < 1 + steps:
            tr.fit(stop_at_step=tr.step + left)
            skipped = left
        s = tr.step
        self.task.want, self.task.marks = {s + 1, s + 1 + steps}, {}
        with MemoryProbe(self.device) as mem:
            tr.fit(stop_at_step=s + 1 + steps)
        m = self.task.marks
        if not warm:
            self.trainer_row.runs.append({"seconds": m[s + 1 + steps] - m[s + 1], "steps": steps,
                                          "samples": steps * self.batch, "peak_mem_mib": mem.peak_mib,
                                          "untimed_steps": 1 + skipped, "first_step": s + 2})

    # ---- components
    def run_inputs(self, steps: int):
        for k in range(steps):
            b = self.host_batches[k % len(self.host_batches)]
            self.task.inputs(self.model, _to_device(b, self.device), self.cfg, self._seeded(1000 + k))

    def run_loader(self, steps: int, warm: bool) -> None:
        it = iter(self.loader)
        next(it)  # iterator start / first batch: not timed (as in the trainer row)
        dev = self.device
        with MemoryProbe(dev) as mem:
            t0 = time.perf_counter()
            for _ in range(steps):
                b = next(it)
            seconds = time.perf_counter() - t0
        del it, b
        if not warm:
            self.loader_row.runs.append({"seconds": seconds, "steps": steps, "samples": steps * self.batch,
                                         "peak_mem_mib": mem.peak_mib})

    # ---- the measurement
    def measure(self, repeats: int, progress) -> None:
        w = self.warmup
        # warm-up: every row once (not recorded)
        self.run_trainer(max(w - 1, 1), warm=True)
        self._timed(self.model_row, self.run_model, w, warm=True)
        self._timed(self.bare_row, self.run_bare, w, warm=True)
        for row, fn in self.components:
            if row is self.loader_row:
                fn(w, warm=True)
            else:
                self._timed(row, fn, w, warm=True)
        # resident after warm-up (optimizer state exists): parameters + buffers + optimizer state + fixed inputs
        self.model_row.resident_mib = self.trainer_row.resident_mib = _mib(
            _tensors(self.model, self.trainer.raw_optimizer, self.voxels))
        self.bare_row.resident_mib = _mib(_tensors(self.swin, None, self.bare_inputs)
                                          + _tensors(self.swin_teacher, None, ()))
        n = self.steps
        for r in range(repeats):
            self._timed(self.bare_row, self.run_bare, n, warm=False)
            self._timed(self.model_row, self.run_model, n, warm=False)
            self.run_trainer(n, warm=False)
            for row, fn in self.components:
                if row is self.loader_row:
                    fn(n, warm=False)
                else:
                    self._timed(row, fn, n, warm=False)
            progress(f"repeat {r + 1}/{repeats}: " + ", ".join(
                f"{row.name} {row.runs[-1]['samples'] / row.runs[-1]['seconds']:.3g}/s" for row in self.rows()))

    def rows(self) -> list[Row]:
        return [self.bare_row, self.model_row, self.trainer_row] + [row for row, _ in self.components]

    def close(self) -> None:
        self.trainer.close(distributed=False)
        self.loader = None


def _tensors(model, optimizer, extra) -> list[torch.Tensor]:
    """Parameters + buffers of ``model``, ``optimizer`` state tensors and the tensors in ``extra``."""
    out = list(model.parameters()) + list(model.buffers())
    if optimizer is not None:
        out += [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    out += [t for t in extra if torch.is_tensor(t)]
    return out


def _mib(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _to_device(batch: dict, device: torch.device) -> dict:
    nb = device.type == "cuda"
    return {k: v.to(device, non_blocking=nb) if torch.is_tensor(v) else v for k, v in batch.items()}


def default_workers(device: str) -> int:
    """Loader workers: 0 on the CPU (the data path in series with the step, so its cost shows), else up to 8
    (the paper config's count) leaving half the cores to the main process."""
    if device == "cpu":
        return 0
    return max(1, min(8, (cpuinfo()["usable_cpus"] or 2) // 2))


def ratio_stats(num: Row, den: Row) -> dict | None:
    """(sec/step of ``num`` / sec/step of ``den`` - 1) in %, per interleaved repeat: median, min, max."""
    pairs = [(a["seconds"] / a["steps"]) / (b["seconds"] / b["steps"]) for a, b in zip(num.runs, den.runs)]
    if not pairs:
        return None
    pct = [(p - 1.0) * 100.0 for p in pairs]
    return {"median": statistics.median(pct), "min": min(pct), "max": max(pct), "per_repeat": pct}


def share_stats(part: Row, whole: Row) -> dict | None:
    """sec/step of ``part`` as % of the sec/step of ``whole``, per repeat."""
    pct = [100.0 * (a["seconds"] / a["steps"]) / (b["seconds"] / b["steps"]) for a, b in zip(part.runs, whole.runs)]
    return {"median": statistics.median(pct), "min": min(pct), "max": max(pct)} if pct else None


# --------------------------------------------------------------------------------------------- MEM and finetune
# (--methods mem,finetune): the same conventions as the ECDDP rows (one untimed lead-in step per timed repeat,
# interleaved repeats, medians [min-max], peak memory per repeat), on a small samples dataset built once.

CONFIGS = REPO / "evforge" / "configs"
SAMPLES_SENSOR = (64, 48)  # (W, H) of the synthetic N-Caltech101-layout samples (as tests/pretrain/test_mem.py)
SAMPLES_CLASSES = 4        # make_synthetic_classification's default shapes
SAMPLES_TRAIN_FRACTION = 0.75 * 0.75  # val_fraction 0.25, then the classification holdout (tiny config: 0.25)
MEM_PRESETS = {
    # mem_tiny / mem_dvae_tiny: 2-block ViT (dim 64, patch 8) on 64x64 images, 64 codes
    "tiny": {"dvae": "mem_dvae_tiny.yaml", "mem": "mem_tiny.yaml", "batch": {"cpu": 8, "cuda": 64}},
    # the paper: ViT-B/16 at 224 (98 of 196 patches masked), dVAE of 4 x 384-channel convs, 8192 codes
    "paper": {"dvae": "mem_dvae.yaml", "mem": "mem_ncaltech101.yaml", "batch": {"cpu": 2, "cuda": 64}},
}
FT_PRESETS = {
    # classification_tiny (ViT patch 4, 2 blocks of 64, 24x32 input); dsec_tiny (tiny Swin + 32-ch UPerNet, 112x160)
    "tiny": {"cls": "classification_tiny.yaml", "seg": "dsec_tiny.yaml", "batch": {"cpu": 16, "cuda": 64},
             "seg_batch": {"cpu": 2, "cuda": 16}},
    # ncaltech101_vit_s (ViT-S/16 at 224); dsec_swin_t (Swin-T/7 + 512-ch UPerNet, 448x640)
    "paper": {"cls": "ncaltech101_vit_s.yaml", "seg": "dsec_swin_t.yaml", "batch": {"cpu": 2, "cuda": 64},
              "seg_batch": {"cpu": 2, "cuda": 8}},  # >= 2: BatchNorm in the PPM
}
FAMILY_BATCH = {"mem": MEM_PRESETS, "finetune": FT_PRESETS}


def samples_dataset(root: Path, train_items: int, seed: int, log=print) -> Path:
    """A samples dataset (synthetic shapes -> ncaltech101 converter, 64x48, val 25 %) with at least
    ``train_items`` training samples after the classification holdout, built once under ``root`` (reused)."""
    per_class = max(8, math.ceil(train_items / SAMPLES_TRAIN_FRACTION / SAMPLES_CLASSES))
    w, h = SAMPLES_SENSOR

    def build(work: Path, out: Path) -> str:
        raw = make_synthetic_classification(work / "raw", per_class=per_class, size=SAMPLES_SENSOR, seed=seed)
        report = build_dataset("ncaltech101", raw, out, val_fraction=0.25, seed=seed, sensor_size=SAMPLES_SENSOR,
                               progress=False, command="bench/train.py")
        if report.num_errors:
            raise RuntimeError(f"samples dataset: {report.num_errors} conversion errors")
        return str(report.splits)

    return _built_once(root, f"samples-{w}x{h}-{per_class}pc-seed{seed}", "samples dataset", build, log)


class _Marks:
    """Notes the time at the end of chosen optimizer steps (the trainer rows' clock), as BenchTask."""

    def _init_marks(self, device: torch.device) -> None:
        self.device, self.want, self.marks = device, set(), {}

    def after_optimizer_step(self, model, state):
        super().after_optimizer_step(model, state)
        step = int(state["step"])
        if step in self.want:
            _sync(self.device)
            self.marks[step] = time.perf_counter()


class MarkedMEMTask(_Marks, MEMTask):
    def __init__(self, device):
        super().__init__()
        self._init_marks(device)


class MarkedClsTask(_Marks, ClassificationTask):
    def __init__(self, device):
        super().__init__()
        self._init_marks(device)


def bench_trainer_config(cfg: dict, device: str, precision: str, batch: int, workers: int, data: Path, seed: int,
                         log_every: int | None) -> dict:
    """A task config on one device for the bench: no validation, no checkpoints, no progress bar."""
    cfg["seed"] = seed
    cfg["data"].update(path=str(data), batch_size=batch, num_workers=workers)
    cfg["trainer"].update(accelerator=device, devices=1, num_nodes=1, strategy="auto", precision=precision,
                          epochs=None, max_steps=10**7, val_every_n_epochs=None, val_every_n_steps=None,
                          stop_signals=[])
    if log_every is not None:
        cfg["trainer"]["log_every_n_steps"] = log_every
    cfg.setdefault("checkpoint", {}).update(every_n_steps=None, every_n_epochs=None, keep_every_n_steps=None)
    cfg.setdefault("log", {}).update(progress=False, tensorboard=False)
    return cfg


def _autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class FamilyGroup:
    """Rows of one family (mem or finetune) for one (device, preset, precision, batch), measured like Group:
    every row once as warm-up, then ``repeats`` interleaved repeats of all rows."""

    family = ""

    def __init__(self, args, device: str, preset: str, precision: str, batch: int):
        self.args, self.preset, self.precision, self.batch = args, preset, precision, batch
        self.device = torch.device(device)
        self.steps = args.steps or PRESETS[preset].steps[device]
        self.warmup = args.warmup if args.warmup is not None else PRESETS[preset].warmup[device]
        self.workers = args.workers if args.workers is not None else default_workers(device)
        self.items: list = []  # (Row, kind "step" | "trainer", fn)
        self.trainers: list = []
        self.info: dict = {}
        self.ratios: dict = {}  # overhead name -> (row name, reference row name, "ratio" | "share")

    def _trainer(self, cfg: dict, task, out_dir: Path) -> Trainer:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tr = Trainer(cfg, task, out_dir=out_dir, resume=None)
        tr.save_checkpoint = lambda keep=False: None
        self.trainers.append(tr)
        if tr.steps_per_epoch < 1 + self.steps:
            raise RuntimeError(f"the dataset gives {tr.steps_per_epoch} steps per epoch at batch "
                               f"{tr.cfg['data']['batch_size']}, fewer than the {1 + self.steps} of one timed "
                               "trainer window")
        return tr

    def _timed(self, row: Row, fn, steps: int, warm: bool) -> None:
        time_row(row, fn, steps, warm, self.device)

    def _window(self, row: Row, tr: Trainer, task, steps: int, warm: bool) -> None:
        """One ``fit`` call of 1 + ``steps`` steps, timed from the end of its first step to the end of its last,
        within one epoch (as Group.run_trainer)."""
        left = tr.steps_per_epoch - tr.batch_in_epoch // tr.accumulate
        skipped = 0
        if left < 1 + steps:
            tr.fit(stop_at_step=tr.step + left)
            skipped = left
        s = tr.step
        task.want, task.marks = {s + 1, s + 1 + steps}, {}
        with MemoryProbe(self.device) as mem:
            tr.fit(stop_at_step=s + 1 + steps)
        m = task.marks
        if not warm:
            row.runs.append({"seconds": m[s + 1 + steps] - m[s + 1], "steps": steps, "samples": steps * row.batch,
                             "peak_mem_mib": mem.peak_mib, "untimed_steps": 1 + skipped, "first_step": s + 2})

    def _run(self, row, kind, fn, steps, warm):
        if kind == "trainer":
            fn(row, steps, warm)
        else:
            self._timed(row, fn, steps, warm)

    def measure(self, repeats: int, progress) -> None:
        for row, kind, fn in self.items:
            self._run(row, kind, fn, max(self.warmup - 1, 1) if kind == "trainer" else self.warmup, True)
        self.resident()
        for r in range(repeats):
            for row, kind, fn in self.items:
                self._run(row, kind, fn, self.steps, False)
            progress(f"repeat {r + 1}/{repeats}: " + ", ".join(
                f"{row.name} {row.runs[-1]['samples'] / row.runs[-1]['seconds']:.3g}/s" for row in self.rows()))

    def resident(self) -> None:
        pass

    def rows(self) -> list[Row]:
        return [row for row, _, _ in self.items]

    def summary(self) -> dict:
        rows = {r.name: r for r in self.rows()}
        ov = {}
        for key, (a, b, how) in self.ratios.items():
            ov[key] = (ratio_stats if how == "ratio" else share_stats)(rows[a], rows[b])
        return {"family": self.family, "device": self.device.type, "preset": self.preset,
                "precision": self.precision, "trainer_precision": PRECISIONS[self.precision], "batch": self.batch,
                "steps": self.steps, "warmup": self.warmup, "workers": self.workers, **self.info,
                "rows": [r.summary() for r in self.rows()], "overheads": ov}

    def close(self) -> None:
        for tr in self.trainers:
            tr.close(distributed=False)
        self.trainers = []


class MEMGroup(FamilyGroup):
    """``mem-dvae-step``, ``mem-step``, ``mem-targets``, ``mem-trainer`` (see ROW_DOC). The tokenizer is a
    randomly initialised DiscreteVAE of the preset's mem_dvae config, written as a mem_dvae checkpoint for
    MEMTask to load (its codes are as costly to compute as a trained one's)."""

    family = "mem"

    def __init__(self, args, device, preset, precision, batch, data: Path, workdir: Path):
        super().__init__(args, device, preset, precision, batch)
        dev, P = self.device, MEM_PRESETS[preset]
        dcfg = load_config(CONFIGS / "pretrain" / P["dvae"])
        torch.manual_seed(args.seed)
        dvae = MEMDVAETask().build_model(dcfg)
        tok = workdir / "tokenizer.ckpt"
        torch.save({"model": dvae.state_dict(), "config": json.dumps(dcfg, default=str)}, tok)
        cfg = load_config(CONFIGS / "pretrain" / P["mem"])
        cfg["task"]["tokenizer"] = str(tok)
        cfg = bench_trainer_config(cfg, device, PRECISIONS[precision], batch, self.workers, data, args.seed,
                                   args.log_every)
        self.task = MarkedMEMTask(dev)
        self.trainer = self._trainer(cfg, self.task, workdir / "mem-run")
        self.model, self.opt = self.trainer.raw_model, self.trainer.raw_optimizer
        self.autocast = self.trainer.fabric.autocast
        ds = self.trainer.loader.dataset
        ds = getattr(ds, "dataset", ds)
        host = [collate_events([ds[int(i)] for i in range(k * batch, (k + 1) * batch)])
                for k in range(min(4, len(ds) // batch))]
        gens = [torch.Generator().manual_seed(mix_seed(args.seed, 0xE1, k)) for k in range(len(host))]
        self.images = [self.task.images(_to_device(b, dev), train=True, generator=g) for b, g in zip(host, gens)]
        masks = [self.task.mask_generator(batch, generator=g) for g in gens]
        self.mask_tokens = [int(m.sum()) for m in masks]
        self.masks = [m.to(dev) for m in masks]
        self.tokenizer = self.task.tokenizer.to(dev)
        # the tokenizer in training (its own Adam, the config's lr and grad clip), on the same images
        self.dvae = dvae.to(dev).train()
        o = dcfg.get("optim", {})
        lr = float(next(iter(dcfg["schedules"]["lr"].values())).get("start", 1e-4))
        self.dvae_opt = torch.optim.Adam(self.dvae.parameters(), lr=lr, betas=tuple(o.get("betas", (0.9, 0.999))),
                                         weight_decay=0.0)
        gc_ = dcfg["trainer"].get("grad_clip")
        self.dvae_clip = None if gc_ in (None, 0) else float(gc_)
        self.noise = torch.Generator(device=dev).manual_seed(args.seed)
        self.k = 0
        c, t = self.model.cfg, self.tokenizer.cfg
        self.info = {"model": {"variant": c.variant, "img_size": c.img_size, "patch_size": c.patch_size,
                               "embed_dim": self.model.vit.embed_dim, "depth": len(self.model.vit.blocks),
                               "num_patches": self.model.num_patches, "num_tokens": c.num_tokens,
                               "masked_per_sample_mean": sum(self.mask_tokens) / (batch * len(masks)),
                               "grad_clip": self.trainer.grad_clip,
                               "params": sum(p.numel() for p in self.model.parameters()),
                               "tokenizer": {"image_size": t.image_size, "num_layers": t.num_layers,
                                             "hidden_dim": t.hidden_dim, "num_tokens": t.num_tokens,
                                             "params": sum(p.numel() for p in self.dvae.parameters()),
                                             "grad_clip": self.dvae_clip}},
                     "data": {"path": str(data), "items": len(ds), "sensor_size": list(ds.sensor_size),
                              "steps_per_epoch": self.trainer.steps_per_epoch}}
        b = batch
        self.dvae_row = Row("mem-dvae-step", b, note="DiscreteVAE fwd(gumbel)+bwd+clip+Adam")
        self.step_row = Row("mem-step", b, note="incl. tokenizer targets; on the trainer's model and optimizer")
        self.targets_row = Row("mem-targets", b, note="tokenizer argmax codes only (fp32)")
        self.trainer_row = Row("mem-trainer", b, note=f"{self.workers} loader workers")
        self.items = [(self.dvae_row, "step", self.run_dvae), (self.step_row, "step", self.run_step),
                      (self.trainer_row, "trainer", lambda row, n, warm: self._window(row, self.trainer, self.task,
                                                                                      n, warm))]
        if not args.no_components:
            self.items.append((self.targets_row, "step", self.run_targets))
            self.ratios["targets_share_pct"] = ("mem-targets", "mem-step", "share")
        self.ratios["trainer_vs_model_pct"] = ("mem-trainer", "mem-step", "ratio")

    def _next(self) -> int:
        self.k += 1
        return self.k % len(self.images)

    def run_dvae(self, steps: int):
        for _ in range(steps):
            img = self.images[self._next()]
            with _autocast(self.device, self.precision):
                loss, _ = self.dvae(img, tau=1.0, generator=self.noise)
            loss.backward()
            if self.dvae_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.dvae.parameters(), self.dvae_clip, error_if_nonfinite=False)
            self.dvae_opt.step()
            self.dvae_opt.zero_grad(set_to_none=True)

    def run_step(self, steps: int):
        tokens = 0
        clip = self.trainer.grad_clip
        for _ in range(steps):
            k = self._next()
            img, mask = self.images[k], self.masks[k]
            with self.autocast():
                loss, _ = self.model(img, mask, self.task.targets(img))
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, error_if_nonfinite=False)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            tokens += self.mask_tokens[k]
        return {"tokens": tokens}

    def run_targets(self, steps: int):
        for _ in range(steps):
            self.task.targets(self.images[self._next()])

    def resident(self) -> None:
        self.step_row.resident_mib = self.trainer_row.resident_mib = _mib(
            _tensors(self.model, self.opt, self.images + self.masks) + _tensors(self.tokenizer, None, ()))
        self.targets_row.resident_mib = _mib(_tensors(self.tokenizer, None, self.images))
        self.dvae_row.resident_mib = _mib(_tensors(self.dvae, self.dvae_opt, self.images))


class FinetuneGroup(FamilyGroup):
    """``cls-finetune-trainer`` and ``seg-finetune-step`` (see ROW_DOC)."""

    family = "finetune"

    def __init__(self, args, device, preset, precision, batch, data: Path, workdir: Path, seg_batch: int):
        super().__init__(args, device, preset, precision, batch)
        dev, P = self.device, FT_PRESETS[preset]
        cfg = load_config(CONFIGS / "finetune" / P["cls"])
        cfg = bench_trainer_config(cfg, device, PRECISIONS[precision], batch, self.workers, data, args.seed,
                                   args.log_every)
        cfg["data"]["holdout_fraction"] = 0.25
        self.task = MarkedClsTask(dev)
        self.trainer = self._trainer(cfg, self.task, workdir / "cls-run")
        # segmentation: the preset's model on random 20-channel inputs at its training size, CE + Dice (+ aux)
        scfg = load_config(CONFIGS / "finetune" / P["seg"])
        self.seg_task = SegmentationTask()
        torch.manual_seed(args.seed)
        self.seg = self.seg_task.build_model(scfg).to(dev).train()
        o = self.seg_task.options(scfg)
        h, w = (int(v) for v in o["train_size"])
        g = torch.Generator().manual_seed(args.seed)
        self.seg_x = (torch.rand(seg_batch, 2 * int(o["chunks"]), h, w, generator=g) * 4).floor().to(dev)
        self.seg_y = torch.randint(0, int(o["num_classes"]), (seg_batch, h, w), generator=g).to(dev)
        self.seg_opt = torch.optim.AdamW(self.seg_task.param_groups(self.seg, scfg), lr=1e-4,
                                         weight_decay=float(scfg["optim"].get("weight_decay", 0.05)))
        cls_model = self.trainer.raw_model
        ds = self.trainer.loader.dataset
        self.info = {"model": {"cls_arch": cfg["task"]["model"]["arch"], "cls_input_size": cfg["task"]["input_size"],
                               "cls_params": sum(p.numel() for p in cls_model.parameters() if p.requires_grad),
                               "seg_arch": o["model"]["arch"], "seg_tiny": bool(o["model"]["tiny"]),
                               "seg_input": [2 * int(o["chunks"]), h, w], "seg_batch": seg_batch,
                               "seg_params": sum(p.numel() for p in self.seg.parameters())},
                     "data": {"path": str(data), "items": len(ds), "sensor_size": list(SAMPLES_SENSOR),
                              "steps_per_epoch": self.trainer.steps_per_epoch}}
        self.cls_row = Row("cls-finetune-trainer", batch, note=f"{self.workers} loader workers, EMA on")
        self.seg_row = Row("seg-finetune-step", seg_batch, note=f"random {2 * int(o['chunks'])}-ch {h}x{w} inputs")
        self.items = [(self.cls_row, "trainer", lambda row, n, warm: self._window(row, self.trainer, self.task,
                                                                                 n, warm)),
                      (self.seg_row, "step", self.run_seg)]

    def run_seg(self, steps: int):
        for _ in range(steps):
            with _autocast(self.device, self.precision):
                out = self.seg(self.seg_x)
            logits, aux = out if isinstance(out, (tuple, list)) else (out, None)
            loss, _ = self.seg_task.loss(logits.float(), self.seg_y, None if aux is None else aux.float())
            loss.backward()
            self.seg_opt.step()
            self.seg_opt.zero_grad(set_to_none=True)

    def resident(self) -> None:
        self.cls_row.resident_mib = _mib(_tensors(self.trainer.raw_model, self.trainer.raw_optimizer, ()))
        self.seg_row.resident_mib = _mib(_tensors(self.seg, self.seg_opt, (self.seg_x, self.seg_y)))


# --------------------------------------------------------------------------------------------- report


def _num(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _spread(s: dict) -> str:
    return f"{_num(s['median'])} [{_num(s['min'])}-{_num(s['max'])}]"


def _pct(s: dict | None, sign: bool = True) -> str:
    if not s:
        return "-"
    f = "{:+.1f}" if sign else "{:.0f}"
    return f"{f.format(s['median'])} % [{f.format(s['min'])} to {f.format(s['max'])}]"


def table(groups: list[dict]) -> str:
    head = ["device", "preset", "precision", "batch", "row", "samples/s [min-max]", "s/step", "overhead",
            "resident MiB", "peak step MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for g in groups:
        key = [g["device"], g["preset"], g["precision"], str(g["batch"])]
        if g.get("error"):
            key[-1] += f" ({g.get('family', 'ecddp')})"
            lines.append("| " + " | ".join(key + ["error", g["error"].splitlines()[-1][:120]] + ["-"] * 4) + " |")
            continue
        ov = g["overheads"]
        notes = {"model-step": ("vs bare-swin ", ov.get("model_vs_bare_pct"), True),
                 "trainer": ("vs model-step ", ov.get("trainer_vs_model_pct"), True),
                 "task-inputs": ("of model-step ", ov.get("task_inputs_share_pct"), False),
                 "data-loader": ("of model-step ", ov.get("data_loader_share_pct"), False),
                 "mem-trainer": ("vs mem-step ", ov.get("trainer_vs_model_pct"), True),
                 "mem-targets": ("of mem-step ", ov.get("targets_share_pct"), False)}
        for r in g["rows"]:
            key[-1] = str(r["batch"])
            label, stat, sign = notes.get(r["row"], ("", None, True))
            res = "-" if r["resident_mib"] is None else f"{r['resident_mib']:.0f}"
            lines.append("| " + " | ".join(key + [r["row"], _spread(r["samples_per_s"]),
                                                 f"{r['sec_per_step']['median']:.3g}",
                                                 (label + _pct(stat, sign)) if stat else
                                                 f"tokens/s {_spread(r['tokens_per_s'])}" if r.get("tokens_per_s")
                                                 else "-", res,
                                                 f"{r['peak_mem_mib']:.0f}"]) + " |")
    return "\n".join(lines)


def target_lines(groups: list[dict]) -> list[str]:
    out = []
    for g in groups:
        if g.get("error") or g.get("family", "ecddp") != "ecddp":
            continue
        s = g["overheads"].get("trainer_vs_model_pct")
        if s is None:
            continue
        ok = s["median"] < TARGET_TRAINER_OVERHEAD_PCT
        out.append(f"- {g['device']} {g['preset']} {g['precision']} batch {g['batch']}: the trainer adds "
                   f"{s['median']:+.1f} % [{s['min']:+.1f} to {s['max']:+.1f}] over the model step "
                   f"(target < {TARGET_TRAINER_OVERHEAD_PCT:g} %: {'met' if ok else 'NOT met'})")
    return out


ROW_DOC = {
    "bare-swin": "timm Swin (student config), teacher fwd on view + globals (no grad), student fwd+bwd on globals "
                 "+ locals, random inputs; no heads/loss/optimizer",
    "model-step": "ECDDPModel fwd+bwd + grad clip + prototype freeze + AdamW + EMA on pre-made device voxels",
    "trainer": "Trainer.fit with ECDDPTask on a stream dataset: loader, collate, to device, voxel grid, crop, "
               "model step, schedules, logging (no checkpoints); first step of each fit call untimed",
    "task-inputs": "ECDDPTask.inputs: host batch to device, voxel grid, random crop",
    "data-loader": "EventDataset + collate_events through a DataLoader, no model (first batch untimed)",
    "mem-dvae-step": "MEM tokenizer (DiscreteVAE of mem_dvae[_tiny].yaml) fwd with Gumbel-softmax codes (tau 1) + "
                     "bwd + grad clip + Adam, on pre-made device MEM images",
    "mem-step": "MEMModel (mem_tiny / mem_ncaltech101) fwd+bwd + grad clip + AdamW on pre-made device MEM images "
                "and block masks, INCLUDING the frozen tokenizer's target codes of each image (as in training); "
                "on the mem-trainer's model and optimizer. Overhead column: tokens/s = masked patches predicted "
                "per second",
    "mem-targets": "the frozen tokenizer's argmax codes alone (MEMTask.targets), the part of mem-step it takes",
    "mem-trainer": "Trainer.fit with MEMTask on a synthetic samples dataset: loader, collate, to device, MEM "
                   "event pipeline (window, flips, shift, image, resize, hot pixels, normalise), masks, tokenizer "
                   "targets, model step, logging (no checkpoints); first step of each fit call untimed",
    "cls-finetune-trainer": "Trainer.fit with ClassificationTask (classification_tiny / ncaltech101_vit_s) on the "
                            "synthetic samples dataset: loader, augmentations, MEM image, resize, ViT fwd+bwd, "
                            "layer-decay AdamW, EMA update, logging (no checkpoints); first step untimed",
    "seg-finetune-step": "SegmentationModel (dsec_tiny / dsec_swin_t: Swin + UPerNet + aux FCN) fwd+bwd, CE + Dice "
                         "on both heads, AdamW, on random 20-channel inputs at the config's train_size (own batch)",
}


def write_results(path: Path, info: dict, config: dict, groups: list[dict], elapsed: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "train", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": info, "config": config, "rows_doc": ROW_DOC, "elapsed_s": round(elapsed, 1),
           "groups": groups}
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")  # default=str: never lose a run to a stray object
    md = [f"# Training step benchmark ({doc['date']})", "", *machine_lines(info), "",
          f"Command: `{config['command']}`", "",
          f"Medians of {config['repeats']} interleaved repeats [min-max]. samples/s = batch x steps / s. "
          "'overhead': extra time per step (median of per-repeat ratios); component rows: their time per batch "
          "as a share of the model step. 'resident MiB': parameters + buffers + optimizer state + fixed inputs of "
          "the row's model(s) (model-step and trainer share one model). 'peak step MiB': growth of peak memory "
          "during a timed repeat (CPU: process RSS; CUDA: torch.cuda.max_memory_allocated).", "",
          *[f"- `{k}`: {v}" for k, v in ROW_DOC.items()], "", table(groups), ""]
    goals = target_lines(groups)
    if goals:
        md += ["Target (the trainer and data path add under 10 % over the model step):", "", *goals, ""]
    data = [g for g in groups if not g.get("error") and g.get("family", "ecddp") == "ecddp"]
    if data:
        md += ["Data per group:", ""]
        for g in data:
            d = g["data"]
            md.append(f"- {g['device']} {g['preset']} {g['precision']} batch {g['batch']}: {d['items']} samples at "
                      f"{d['sensor_size'][0]}x{d['sensor_size'][1]}, {_num(d['events_per_sample_mean'])} events per "
                      f"sample (mean), {d['steps_per_epoch']} steps per epoch, {g['workers']} loader workers, "
                      f"crop generator on {g['generator']}")
        md.append("")
    other = [g for g in groups if not g.get("error") and g.get("family", "ecddp") != "ecddp"]
    if other:
        md += ["MEM / finetune groups:", ""]
        for g in other:
            d = g["data"]
            md.append(f"- {g['family']} {g['device']} {g['preset']} {g['precision']} batch {g['batch']}: "
                      f"{d['items']} training samples at {d['sensor_size'][0]}x{d['sensor_size'][1]}, "
                      f"{d['steps_per_epoch']} steps per epoch, {g['workers']} loader workers; model "
                      f"{json.dumps(g['model'], default=str)}")
        md.append("")
    md += [f"Total time {elapsed:.0f} s.", ""]
    path.with_suffix(".md").write_text("\n".join(md))


# --------------------------------------------------------------------------------------------- main


def _ints(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny preset, CPU, 2 repeats of 4 steps, 1 torch thread; output in the temp dir")
    p.add_argument("--methods", default="ecddp,mem,finetune",
                   help="comma-separated families of rows: ecddp (bare-swin, model-step, trainer, task-inputs, "
                        "data-loader), mem (mem-dvae-step, mem-step, mem-targets, mem-trainer), finetune "
                        "(cls-finetune-trainer, seg-finetune-step); default all")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default=None,
                   help="all = cpu, plus cuda when torch sees a GPU (default)")
    p.add_argument("--presets", default=None, help="comma-separated: tiny, paper (default both)")
    p.add_argument("--precisions", default="fp32,bf16",
                   help="comma-separated fp32, bf16 (bf16-mixed, CUDA only: CPU rows are fp32); default both")
    p.add_argument("--batch", default=None,
                   help="comma-separated batch sizes (default per preset and device: tiny 8 / 64, paper 2 / 32 "
                        "on cpu / cuda)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per repeat and row (default tiny 8 / 20, paper 2 / 10 on cpu / cuda)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up steps per row (default tiny 3 / 10, paper 2 / 5 on cpu / cuda)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per measurement (default 5)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers of the trainer and data-loader rows (default 0 on cpu, "
                        "min(8, CPUs / 2) on cuda)")
    p.add_argument("--log-every", type=int, default=None,
                   help="trainer.log_every_n_steps (default: the paper config's, 50)")
    p.add_argument("--generator", choices=["device", "cpu"], default="device",
                   help="where the task's crop/mask RNG lives (the task uses the device; default). A CUDA group "
                        "that fails with the device generator is retried once with 'cpu', noted in the results")
    p.add_argument("--no-components", action="store_true", help="skip the task-inputs and data-loader rows")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: usable CPUs; 1 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where the simulated stream datasets are built and reused (default "
                        "$TMPDIR/evforge-bench/train-data)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (a .md table is written next to it); default bench/results/train-<machine "
                        "tag>.json, one file per device")
    a = p.parse_args(argv)
    if a.quick:
        a.presets = a.presets or QUICK["presets"]
        a.device = a.device or QUICK["device"]
        a.repeats = a.repeats or QUICK["repeats"]
        a.steps = a.steps or QUICK["steps"]
        a.warmup = a.warmup if a.warmup is not None else QUICK["warmup"]
        a.threads = a.threads or QUICK["threads"]
    a.device = a.device or "all"
    a.presets = [v.strip() for v in (a.presets or "tiny,paper").split(",") if v.strip()]
    a.precisions = [v.strip() for v in a.precisions.split(",") if v.strip()]
    a.batch = _ints(a.batch) if a.batch else None
    a.methods = [v.strip() for v in a.methods.split(",") if v.strip()]
    for name in a.methods:
        if name not in FAMILIES:
            p.error(f"unknown method {name!r} (known: {', '.join(FAMILIES)})")
    a.repeats = a.repeats or 5
    for name in a.presets:
        if name not in PRESETS:
            p.error(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    for name in a.precisions:
        if name not in PRECISIONS:
            p.error(f"unknown precision {name!r} (known: {', '.join(PRECISIONS)})")
    if a.repeats < 1 or (a.steps is not None and a.steps < 1) or (a.batch and min(a.batch) < 1):
        p.error("--repeats, --steps and batch sizes must be >= 1")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads or cpuinfo()["usable_cpus"] or 1
    torch.set_num_threads(threads)
    devices = bench_devices(args.device)
    if devices is None:
        return 2
    info = train_machine_info(threads)
    announce(info, args.device, devices)
    started = time.perf_counter()
    data_root = args.data_dir or Path(tempfile.gettempdir()) / "evforge-bench" / "train-data"
    sim_device = "cuda" if torch.cuda.is_available() else "cpu"

    plan = []  # (device, preset, precision, batch) of the ECDDP rows
    fplan = []  # (family, device, preset, precision, batch) of the MEM / finetune rows
    for device in devices:
        for preset in args.presets:
            precs = [p for p in args.precisions if device == "cuda" or p == "fp32"] or ["fp32"]
            for prec in precs:
                if "ecddp" in args.methods:
                    for b in args.batch or [PRESETS[preset].batch[device]]:
                        plan.append((device, preset, prec, b))
                for fam in ("mem", "finetune"):
                    if fam in args.methods:
                        for b in args.batch or [FAMILY_BATCH[fam][preset]["batch"][device]]:
                            fplan.append((fam, device, preset, prec, b))
    # one dataset per preset, large enough for two timed trainer windows of its largest group
    need: dict[str, int] = {}
    for device, preset, _, b in plan:
        n = args.steps or PRESETS[preset].steps[device]
        need[preset] = max(need.get(preset, 0), 2 * b * (1 + n) + b)
    datasets = {}
    for preset in need:
        print(f"[{time.perf_counter() - started:6.0f} s] data for {preset}: >= {need[preset]} samples", flush=True)
        datasets[preset] = stream_dataset(data_root, preset, need[preset], sim_device, args.seed)
    samples = None
    if fplan:  # one samples dataset for all MEM / finetune groups: two timed trainer windows of the largest
        train_need = max((1 + (args.steps or PRESETS[pr].steps[d])) * b + b for _, d, pr, _, b in fplan)
        print(f"[{time.perf_counter() - started:6.0f} s] samples data (MEM, finetune): >= {train_need} training "
              f"samples", flush=True)
        samples = samples_dataset(data_root, train_need, args.seed)

    results: dict[str, list[dict]] = {d: [] for d in devices}
    for device, preset, prec, b in plan:
        label = f"{device} {preset} {prec} batch {b}"
        gen_modes = ["cpu"] if args.generator == "cpu" else ["device"] + (["cpu"] if device == "cuda" else [])
        fallback_error = None
        for mode in gen_modes:
            print(f"[{time.perf_counter() - started:6.0f} s] {label} (crop generator on {mode})", flush=True)
            workdir = Path(tempfile.mkdtemp(prefix="evforge-bench-train-"))
            group = None
            try:
                group = Group(args, device, preset, prec, b, datasets[preset], workdir, cpu_generator=mode == "cpu")
                group.measure(args.repeats, lambda m: print(
                    f"  [{time.perf_counter() - started:6.0f} s] {m}", flush=True))
                summary = summarize(group)
                summary["generator"] = mode if fallback_error is None else \
                    f"cpu (fallback: the device generator failed: {fallback_error})"
                results[device].append(summary)
                break
            except Exception as e:  # noqa: BLE001 - one failing group must not lose the others
                err = f"{type(e).__name__}: {e}"
                print(f"  FAILED: {err}", flush=True)
                traceback.print_exc(limit=6)
                if mode == "device" and "cpu" in gen_modes and _generator_error(err):
                    fallback_error = err
                    print("  retrying with the crop generator on the CPU (--generator cpu)", flush=True)
                    continue
                results[device].append({"device": device, "preset": preset, "precision": prec, "batch": b,
                                        "error": traceback.format_exc(limit=8)})
                break
            finally:
                if group is not None:
                    group.close()
                del group
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                shutil.rmtree(workdir, ignore_errors=True)

    for fam, device, preset, prec, b in fplan:
        label = f"{fam} {device} {preset} {prec} batch {b}"
        print(f"[{time.perf_counter() - started:6.0f} s] {label}", flush=True)
        workdir = Path(tempfile.mkdtemp(prefix="evforge-bench-train-"))
        group = None
        try:
            if fam == "mem":
                group = MEMGroup(args, device, preset, prec, b, samples, workdir)
            else:
                group = FinetuneGroup(args, device, preset, prec, b, samples, workdir,
                                      seg_batch=FT_PRESETS[preset]["seg_batch"][device])
            group.measure(args.repeats, lambda m: print(
                f"  [{time.perf_counter() - started:6.0f} s] {m}", flush=True))
            results[device].append(group.summary())
        except Exception as e:  # noqa: BLE001 - one failing group must not lose the others
            print(f"  FAILED: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=6)
            results[device].append({"family": fam, "device": device, "preset": preset, "precision": prec,
                                    "batch": b, "error": traceback.format_exc(limit=8)})
        finally:
            if group is not None:
                group.close()
            del group
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            shutil.rmtree(workdir, ignore_errors=True)

    elapsed = time.perf_counter() - started
    config = {"command": " ".join(["python", "bench/train.py", *(sys.argv[1:] if argv is None else argv)]),
              "quick": args.quick, "methods": args.methods, "devices": devices, "presets": args.presets,
              "precisions": args.precisions,
              "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
              "workers": args.workers, "log_every": args.log_every, "generator": args.generator, "seed": args.seed,
              "base_config": str(BASE_CONFIG.relative_to(REPO)),
              "preset_defaults": {k: {"model": v.model or "paper config", "input_size": v.input_size,
                                      "sensor": list(v.sensor), "render": list(v.render), "batch": v.batch,
                                      "steps": v.steps, "warmup": v.warmup} for k, v in PRESETS.items()},
              "cpu_peak_rss_reset": MemoryProbe.hwm_resettable}
    groups = [g for d in devices for g in results[d]]
    print("\n" + table(groups), flush=True)
    goals = target_lines(groups)
    if goals:
        print("\nTarget (trainer + data path vs the model step):\n" + "\n".join(goals))
    print(f"\nTotal {elapsed:.0f} s", flush=True)

    for path, devs in result_paths("train", devices, info, args.quick, args.out).items():
        write_results(path, info, config, [g for d in devs for g in results[d]], elapsed)
        print(f"wrote {path} and {path.with_suffix('.md')}")
    return 1 if any(g.get("error") for g in groups) else 0


def _generator_error(message: str) -> bool:
    """Whether an error looks like a CUDA generator / CPU tensor mix-up (worth a retry with a CPU generator)."""
    m = message.lower()
    return "generator" in m or "same device" in m or "expected a 'cpu' device" in m or "expected all tensors" in m


def summarize(group: Group) -> dict:
    rows = {r.name: r for r in group.rows()}
    ov = {"model_vs_bare_pct": ratio_stats(rows["model-step"], rows["bare-swin"]),
          "trainer_vs_model_pct": ratio_stats(rows["trainer"], rows["model-step"]),
          "trainer_vs_bare_pct": ratio_stats(rows["trainer"], rows["bare-swin"])}
    if "task-inputs" in rows:
        ov["task_inputs_share_pct"] = share_stats(rows["task-inputs"], rows["model-step"])
        ov["data_loader_share_pct"] = share_stats(rows["data-loader"], rows["model-step"])
    c = group.mcfg
    return {"family": "ecddp", "device": group.device.type, "preset": group.preset, "precision": group.precision,
            "trainer_precision": PRECISIONS[group.precision], "batch": group.batch, "steps": group.steps,
            "warmup": group.warmup, "workers": group.workers,
            "model": {"variant": c.variant, "tiny": c.tiny, "img_size": c.img_size, "fused_dim": c.fused_dim,
                      "head_out_dim": c.head_out_dim, "view_size": c.view_size, "global_size": c.global_size,
                      "n_global": c.n_global, "local_size": c.local_size, "n_local": c.n_local,
                      "num_clusters": c.num_clusters, "input_size": group.cfg["task"]["input_size"],
                      "grad_clip": group.trainer.grad_clip,
                      "student_params": sum(p.numel() for p in group.model.student.parameters())},
            "data": group.data_info, "rows": [r.summary() for r in group.rows()], "overheads": ov}


if __name__ == "__main__":
    sys.exit(main())
