"""Training throughput: the ECDDP step through the trainer against the model step alone and a bare timm Swin-T.

samples/s, sec/step and memory of training steps, on the CPU and (when torch sees one) on CUDA, in fp32 (and
bf16-mixed on CUDA), for two model sizes (``--presets tiny,paper``), in three families of rows (``--methods``):

* ``ecddp``: ``bare-swin`` (a plain timm Swin doing the backbone work of one ECDDP step on random crop-shaped
  tensors), ``model-step`` (ECDDPModel fwd + bwd + clip + prototype freeze + AdamW + EMA on pre-made voxel grids,
  on the trainer's own model and optimizer), ``trainer`` (``Trainer.fit`` with ECDDPTask on a simulated stream
  dataset), and the components ``task-inputs`` (host batch -> device, voxel grid, crop) and ``data-loader`` (the
  trainer's own DataLoader, no model). The issue's target: the trainer and data path add under 10 % over the
  model step (``trainer`` vs ``model-step``).
* ``mem``: ``mem-dvae-step``, ``mem-step`` (incl. the tokenizer's targets; also tokens/s), ``mem-targets``,
  ``mem-trainer``.
* ``finetune``: ``cls-finetune-trainer`` and ``seg-finetune-step``.

Every timed repeat of a row starts with one untimed step (a trainer row: the first step of its ``fit`` call, so
the loader's start and epoch boundaries stay outside the window). The rows of a group are measured in
interleaved repeats; overheads are medians of the per-repeat ratios [min-max]. ROW_DOC and bench/README.md
say exactly what each row runs.

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
import gc
import json
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import harness
import numpy as np
import timm
import torch
from bench_data import SAMPLES_SENSOR, STREAMS, samples_dataset, stream_dataset
from harness import REPO, Clock, Row, csv, markdown_head, markdown_table, num, pct, ratio_stats, spread, sync
from machine import MemoryProbe, cpuinfo, machine_info

from evforge.finetune.classification import ClassificationTask
from evforge.finetune.segmentation import SegmentationTask
from evforge.models.swin import TINY_SWIN_KWARGS
from evforge.pretrain.ecddp.task import ECDDPTask
from evforge.pretrain.mem.task import MEMDVAETask, MEMTask
from evforge.trainer import Trainer
from evforge.trainer.checkpoint import TRAINER_FORMAT
from evforge.trainer.config import load_config
from evforge.trainer.sampler import mix_seed

CONFIGS = REPO / "evforge" / "configs"
BASE_CONFIG = CONFIGS / "pretrain" / "ecddp_swin_t.yaml"
TARGET_TRAINER_OVERHEAD_PCT = 10.0  # the trainer and data path add under 10 % over the model step
PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}
FAMILIES = ("ecddp", "mem", "finetune")
# --quick is a smoke test, meant to finish on a busy shared machine: one torch thread (with every core's thread
# busy-waiting on a loaded box a step can take 100x longer), unless --threads says otherwise.
QUICK = dict(presets="tiny", device="cpu", repeats=2, steps=4, warmup=2, threads=1)


@dataclass(frozen=True)
class Preset:
    """ECDDP model size, input crop, and per-device defaults (batch, timed steps, warm-up steps); the streams'
    sizes are bench_data.STREAMS[name]."""

    model: dict | None  # cfg["task"]["model"]; None keeps the paper config's
    input_size: int  # cfg["task"]["input_size"]: the random square crop of the voxel grid
    batch: dict
    steps: dict
    warmup: dict


PRESETS = {
    # ECDDPConfig.tiny(): tiny Swin (embed 24, window 4), 96 view / 64 global / 32 local crops, 4 locals
    "tiny": Preset(model={"preset": "tiny"}, input_size=128, batch={"cpu": 8, "cuda": 64},
                   steps={"cpu": 8, "cuda": 20}, warmup={"cpu": 3, "cuda": 10}),
    # the paper: Swin-T/7, 224 view / 2 x 192 global / 8 x 96 local, 32768 prototypes, 320 crop of 640x480
    "paper": Preset(model=None, input_size=320, batch={"cpu": 2, "cuda": 32},
                    steps={"cpu": 2, "cuda": 10}, warmup={"cpu": 2, "cuda": 5}),
}
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


def default_batch(family: str, preset: str, device: str) -> int:
    return {"ecddp": PRESETS[preset].batch, "mem": MEM_PRESETS[preset]["batch"],
            "finetune": FT_PRESETS[preset]["batch"]}[family][device]


# --------------------------------------------------------------------------------------------- tasks, configs
# (the datasets the groups train on are built by bench_data.py)


class Marks:
    """Task mixin: notes the time at the end of chosen optimizer steps (the trainer rows' clock, after a device
    sync), and with ``cpu_generator`` draws the step's crops/masks from a CPU generator."""

    def bench_init(self, device: torch.device, cpu_generator: bool = False) -> None:
        self.device, self.cpu_generator = device, cpu_generator
        self.want: set[int] = set()
        self.marks: dict[int, float] = {}

    def step_generator(self, state, salt, device="cpu"):
        return super().step_generator(state, salt, "cpu" if self.cpu_generator else device)

    def after_optimizer_step(self, model, state):
        super().after_optimizer_step(model, state)
        step = int(state["step"])  # optimizer steps done, this one included
        if step in self.want:
            sync(self.device)
            self.marks[step] = time.perf_counter()


def marked(task_cls, device: torch.device, cpu_generator: bool = False):
    """An instance of ``task_cls`` with :class:`Marks` mixed in."""
    task = type(f"Marked{task_cls.__name__}", (Marks, task_cls), {})()
    task.bench_init(device, cpu_generator)
    return task


def bench_config(cfg: dict, device: str, precision: str, batch: int, workers: int, data: Path, seed: int,
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
    cfg.setdefault("log", {})["progress"] = False
    return cfg


def default_workers(device: str) -> int:
    """Loader workers: 0 on the CPU (the data path in series with the step, so its cost shows), else up to 8
    (the paper config's count) leaving half the cores to the main process."""
    if device == "cpu":
        return 0
    return max(1, min(8, (cpuinfo()["usable_cpus"] or 2) // 2))


def _tensors(model, optimizer, extra) -> list[torch.Tensor]:
    """Parameters + buffers of ``model``, ``optimizer`` state tensors and the tensors in ``extra``."""
    out = list(model.parameters()) + list(model.buffers())
    if optimizer is not None:
        out += [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    return out + [t for t in extra if torch.is_tensor(t)]


def _mib(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


# --------------------------------------------------------------------------------------------- groups


class Group:
    """The rows of one (family, device, preset, precision, batch), measured together: ``build`` makes the trainer(s)
    and inputs and lists the rows as contenders, ``measure`` runs every row once as warm-up, notes the resident
    memory, then ``repeats`` interleaved repeats; ``summary`` is the result record."""

    family = ""

    def __init__(self, args, device: str, preset: str, precision: str, batch: int, data: Path, workdir: Path,
                 cpu_generator: bool = False):
        self.args, self.preset, self.precision, self.batch = args, preset, precision, batch
        self.data, self.workdir, self.cpu_generator = data, workdir, cpu_generator
        self.device = torch.device(device)
        self.steps = args.steps or PRESETS[preset].steps[device]
        self.warmup = args.warmup if args.warmup is not None else PRESETS[preset].warmup[device]
        self.workers = args.workers if args.workers is not None else default_workers(device)
        self.items: list[tuple[Row, object]] = []  # (row, fn(warm) -> run | None)
        self.trainers: list[Trainer] = []
        self.info: dict = {}
        self.ratios: dict = {}  # overhead name -> (row name, reference row name, "change" | "share")

    def build(self) -> None:
        raise NotImplementedError

    # ---- building blocks
    def row(self, name: str, batch: int | None = None, note: str = "") -> Row:
        return Row(name, meta={"batch": batch or self.batch, "note": note, "resident_mib": None})

    def trainer(self, cfg: dict, task, name: str) -> Trainer:
        """A Trainer for the bench: no checkpoint writes (not part of a step), closed by :meth:`close`."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Fabric's notes on a single-device CPU run
            tr = Trainer(cfg, task, out_dir=self.workdir / name, resume=None)
        tr.save_checkpoint = lambda keep=False: None
        self.trainers.append(tr)
        if tr.steps_per_epoch < 1 + self.steps:
            raise RuntimeError(f"the dataset gives {tr.steps_per_epoch} steps per epoch at batch "
                               f"{cfg['data']['batch_size']}, fewer than the {1 + self.steps} of one timed window")
        return tr

    @staticmethod
    def dataset(tr: Trainer):
        ds = tr.loader.dataset
        return getattr(ds, "dataset", ds)  # SeededDataset wraps the task's dataset

    @staticmethod
    def host_batches(tr: Trainer, n: int = 4) -> list:
        """The first ``n`` batches of epoch 0 from the trainer's own loader (its sampler, dataset wrapper and
        collate), as host tensors: the fixed inputs of the step rows."""
        tr.sampler.set_epoch(0, 0)  # fit sets the sampler's epoch itself before iterating
        it = iter(tr.loader)
        out = [next(it) for _ in range(min(n, tr.steps_per_epoch))]
        del it
        return out

    def step(self, row: Row, fn):
        """Contender for a step row: one untimed lead-in step, then ``steps`` timed ones (``fn(n)`` runs n steps
        and may return extra counts), under a memory probe that hands freed heap back first, so the lead-in
        step pays the page faults for all rows alike."""
        def run(warm: bool):
            n, extra = self.warmup if warm else self.steps, {}
            with MemoryProbe(self.device) as mem:
                fn(1)  # the lead-in step (timed() syncs the device before it reads the clock)
                seconds = harness.timed(lambda: extra.update(fn(n) or {}), sync=lambda: sync(self.device))[0]
            return {"seconds": seconds, "steps": n, "samples": n * row.meta["batch"], "peak_mem_mib": mem.peak_mib,
                    **extra}
        return run

    def window(self, row: Row, tr: Trainer, task):
        """Contender for a trainer row: one ``fit`` call of 1 + ``steps`` steps, timed from the end of its first
        optimizer step to the end of its last, within one epoch (the rest of an epoch too short for that runs
        first, untimed)."""
        def run(warm: bool):
            n = max(self.warmup - 1, 1) if warm else self.steps
            left = tr.steps_per_epoch - tr.batch_in_epoch // tr.accumulate
            skipped = 0
            if left < 1 + n:
                tr.fit(stop_at_step=tr.step + left)
                skipped = left
            s = tr.step
            task.want, task.marks = {s + 1, s + 1 + n}, {}
            with MemoryProbe(self.device) as mem:
                tr.fit(stop_at_step=s + 1 + n)
            m = task.marks
            return {"seconds": m[s + 1 + n] - m[s + 1], "steps": n, "samples": n * row.meta["batch"],
                    "peak_mem_mib": mem.peak_mib, "untimed_steps": 1 + skipped, "first_step": s + 2}
        return run

    def loader(self, row: Row, tr: Trainer):
        """Contender for the data-loader row: the trainer's own DataLoader (the one ``fit`` iterates: its
        sampler, workers, dataset wrapper, collate and pinning), from the start of the current epoch; the
        iterator's start and first batch untimed, as in the trainer row; no model."""
        def run(warm: bool):
            n = self.warmup if warm else self.steps
            tr.sampler.set_epoch(tr.epoch, 0)  # fit sets its own position again before it iterates
            it = iter(tr.loader)
            next(it)
            with MemoryProbe(self.device) as mem:
                t0 = time.perf_counter()
                for _ in range(n):
                    b = next(it)
                seconds = time.perf_counter() - t0
            del it, b
            return {"seconds": seconds, "steps": n, "samples": n * row.meta["batch"], "peak_mem_mib": mem.peak_mib}
        return run

    # ---- measuring and reporting
    def resident(self) -> None:
        """Set each row's ``resident_mib`` (after warm-up, when optimizer state exists)."""

    def measure(self, repeats: int, say) -> None:
        harness.interleave(self.items, 0, warmup=1)
        self.resident()
        harness.interleave(self.items, repeats, warmup=0, progress=lambda k, rows: say(
            f"repeat {k + 1}/{repeats}: " + ", ".join(
                f"{r.name} {r.runs[-1]['samples'] / r.runs[-1]['seconds']:.3g}/s" for r in rows)))

    def rows(self) -> list[Row]:
        return [row for row, _ in self.items]

    def summary(self) -> dict:
        rows = {r.name: r for r in self.rows()}
        per_step = lambda r: r["seconds"] / r["steps"]  # noqa: E731
        ov = {key: ratio_stats(rows[a].values(per_step), rows[b].values(per_step), kind)
              for key, (a, b, kind) in self.ratios.items() if a in rows}
        return {"family": self.family, "device": self.device.type, "preset": self.preset,
                "precision": self.precision, "trainer_precision": PRECISIONS[self.precision], "batch": self.batch,
                "steps": self.steps, "warmup": self.warmup, "workers": self.workers, **self.info,
                "rows": [row_summary(r) for r in self.rows()], "overheads": ov}

    def close(self) -> None:
        for tr in self.trainers:
            tr.close(distributed=False)
        self.trainers = []


def row_summary(row: Row) -> dict:
    out = {"row": row.name, "batch": row.meta["batch"], "repeats": len(row.runs),
           "steps_per_repeat": row.runs[0]["steps"] if row.runs else None,
           "samples_per_s": row.rate("samples"), "sec_per_step": row.stats(lambda r: r["seconds"] / r["steps"]),
           "peak_mem_mib": max(row.values("peak_mem_mib")), "resident_mib": row.meta["resident_mib"],
           "note": row.meta["note"], "runs": row.runs}
    if row.runs and "tokens" in row.runs[0]:  # mem-step: masked tokens predicted per second
        out["tokens_per_s"] = row.rate("tokens")
    return out


class ECDDPGroup(Group):
    """``bare-swin``, ``model-step``, ``trainer``, and the components ``task-inputs`` and ``data-loader``."""

    family = "ecddp"

    def build(self) -> None:
        args, dev, batch, p = self.args, self.device, self.batch, PRESETS[self.preset]
        cfg = bench_config(load_config(BASE_CONFIG), dev.type, PRECISIONS[self.precision], batch, self.workers,
                           self.data, args.seed, args.log_every)
        if p.model is not None:
            cfg["task"]["model"] = dict(p.model)
        cfg["task"]["input_size"] = p.input_size
        self.cfg, self.task = cfg, marked(ECDDPTask, dev, self.cpu_generator)
        tr = self.tr = self.trainer(cfg, self.task, "run")
        self.model, c = tr.raw_model, tr.raw_model.cfg
        self.autocast = tr.fabric.autocast
        ds = self.dataset(tr)
        self.info = {"model": {"variant": c.variant, "tiny": c.tiny, "img_size": c.img_size,
                               "fused_dim": c.fused_dim, "head_out_dim": c.head_out_dim, "view_size": c.view_size,
                               "global_size": c.global_size, "n_global": c.n_global, "local_size": c.local_size,
                               "n_local": c.n_local, "num_clusters": c.num_clusters, "input_size": p.input_size,
                               "grad_clip": tr.grad_clip,
                               "student_params": sum(q.numel() for q in self.model.student.parameters())},
                     "data": {"path": str(self.data), "items": len(ds), "sensor_size": list(ds.sensor_size),
                              "events_per_sample_mean": float(np.mean(ds.num_events)),
                              "events_per_sample_median": float(np.median(ds.num_events)),
                              "steps_per_epoch": tr.steps_per_epoch}}

        # (2) on the trainer's model and optimizer: voxel grids made by the task's own input path from the
        # trainer's own batches, moved as the trainer moves them
        self.gen = torch.Generator(device="cpu" if self.cpu_generator else dev)
        self.host = self.host_batches(tr)
        self.voxels = [self.task.inputs(self.model, tr.fabric.to_device(b), cfg, self._seeded(k))
                       for k, b in enumerate(self.host)]
        sched = tr.schedules.at(0)
        self.teacher_temp, self.ema_momentum = float(sched["teacher_temp"]), float(sched["ema_momentum"])
        self.k = 0

        # (1) bare timm Swin: student (trained) + teacher copy (eval, no grad), random crop-shaped inputs
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

        bare = self.row("bare-swin", note=f"timm {c.variant}")
        model = self.row("model-step", note="on the trainer's model and optimizer")
        trainer = self.row("trainer", note=f"{self.workers} loader workers")
        self.items = [(bare, self.step(bare, self.run_bare)), (model, self.step(model, self.run_model)),
                      (trainer, self.window(trainer, tr, self.task))]
        self.ratios = {"model_vs_bare_pct": ("model-step", "bare-swin", "change"),
                       "trainer_vs_model_pct": ("trainer", "model-step", "change"),
                       "trainer_vs_bare_pct": ("trainer", "bare-swin", "change")}
        if not args.no_components:
            inputs = self.row("task-inputs", note="to device + voxel grid + crop")
            loader = self.row("data-loader", note=f"the trainer's DataLoader, {self.workers} workers, no model")
            self.items += [(inputs, self.step(inputs, self.run_inputs)), (loader, self.loader(loader, tr))]
            self.ratios.update(task_inputs_share_pct=("task-inputs", "model-step", "share"),
                               data_loader_share_pct=("data-loader", "model-step", "share"))

    def _seeded(self, k: int) -> torch.Generator:
        return self.gen.manual_seed(mix_seed(self.args.seed, 0xBE, k))

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
            for q in self.swin.parameters():
                q.grad = None

    def run_model(self, steps: int):
        tr, model, opt = self.tr, self.model, self.tr.raw_optimizer
        for _ in range(steps):
            self.k += 1
            vox = self.voxels[self.k % len(self.voxels)]
            with self.autocast():
                loss, _ = model(vox, teacher_temp=self.teacher_temp, generator=self._seeded(self.k))
            loss.backward()
            if tr.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tr.grad_clip, error_if_nonfinite=False)
            self.task.before_optimizer_step(model, {"epoch": tr.epoch})  # prototypes frozen in epoch 0
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.ema_update(self.ema_momentum)

    def run_inputs(self, steps: int):
        for k in range(steps):
            b = self.host[k % len(self.host)]
            self.task.inputs(self.model, self.tr.fabric.to_device(b), self.cfg, self._seeded(1000 + k))

    def resident(self) -> None:
        # parameters + buffers + optimizer state + fixed inputs; model-step and trainer share one model
        rows = {r.name: r for r in self.rows()}
        rows["model-step"].meta["resident_mib"] = rows["trainer"].meta["resident_mib"] = _mib(
            _tensors(self.model, self.tr.raw_optimizer, self.voxels))
        rows["bare-swin"].meta["resident_mib"] = _mib(_tensors(self.swin, None, self.bare_inputs)
                                                      + _tensors(self.swin_teacher, None, ()))


class MEMGroup(Group):
    """``mem-dvae-step``, ``mem-step``, ``mem-trainer`` and the component ``mem-targets`` (see ROW_DOC). The
    tokenizer is a randomly initialised DiscreteVAE of the preset's mem_dvae config, written as a mem_dvae
    checkpoint for MEMTask to load (its codes are as costly to compute as a trained one's)."""

    family = "mem"

    def build(self) -> None:
        args, dev, batch, P = self.args, self.device, self.batch, MEM_PRESETS[self.preset]
        dcfg = load_config(CONFIGS / "pretrain" / P["dvae"])
        torch.manual_seed(args.seed)
        dvae = MEMDVAETask().build_model(dcfg)
        tok = self.workdir / "tokenizer.ckpt"
        torch.save({"format": TRAINER_FORMAT, "model": dvae.state_dict(), "config": json.dumps(dcfg, default=str)},
                   tok)
        cfg = load_config(CONFIGS / "pretrain" / P["mem"])
        cfg["task"]["tokenizer"] = str(tok)
        cfg = bench_config(cfg, dev.type, PRECISIONS[self.precision], batch, self.workers, self.data, args.seed,
                           args.log_every)
        cfg["log"]["tensorboard"] = False
        self.task = marked(MEMTask, dev)
        tr = self.tr = self.trainer(cfg, self.task, "mem-run")
        self.model, self.opt, self.autocast = tr.raw_model, tr.raw_optimizer, tr.fabric.autocast
        host = self.host_batches(tr)
        gens = [torch.Generator().manual_seed(mix_seed(args.seed, 0xE1, k)) for k in range(len(host))]
        self.images = [self.task.images(tr.fabric.to_device(b), train=True, generator=g) for b, g in zip(host, gens)]
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
        clip = dcfg["trainer"].get("grad_clip")
        self.dvae_clip = None if clip in (None, 0) else float(clip)
        self.noise = torch.Generator(device=dev).manual_seed(args.seed)
        self.k = 0
        c, t, ds = self.model.cfg, self.tokenizer.cfg, self.dataset(tr)
        self.info = {"model": {"variant": c.variant, "img_size": c.img_size, "patch_size": c.patch_size,
                               "embed_dim": self.model.vit.embed_dim, "depth": len(self.model.vit.blocks),
                               "num_patches": self.model.num_patches, "num_tokens": c.num_tokens,
                               "masked_per_sample_mean": sum(self.mask_tokens) / (batch * len(masks)),
                               "grad_clip": tr.grad_clip, "params": sum(q.numel() for q in self.model.parameters()),
                               "tokenizer": {"image_size": t.image_size, "num_layers": t.num_layers,
                                             "hidden_dim": t.hidden_dim, "num_tokens": t.num_tokens,
                                             "params": sum(q.numel() for q in self.dvae.parameters()),
                                             "grad_clip": self.dvae_clip}},
                     "data": {"path": str(self.data), "items": len(ds), "sensor_size": list(ds.sensor_size),
                              "steps_per_epoch": tr.steps_per_epoch}}
        dvae_row = self.row("mem-dvae-step", note="DiscreteVAE fwd(gumbel)+bwd+clip+Adam")
        step_row = self.row("mem-step", note="incl. tokenizer targets; on the trainer's model and optimizer")
        trainer_row = self.row("mem-trainer", note=f"{self.workers} loader workers")
        self.items = [(dvae_row, self.step(dvae_row, self.run_dvae)), (step_row, self.step(step_row, self.run_step)),
                      (trainer_row, self.window(trainer_row, tr, self.task))]
        if not args.no_components:
            targets_row = self.row("mem-targets", note="tokenizer argmax codes only (fp32)")
            self.items.append((targets_row, self.step(targets_row, self.run_targets)))
            self.ratios["targets_share_pct"] = ("mem-targets", "mem-step", "share")
        self.ratios["trainer_vs_model_pct"] = ("mem-trainer", "mem-step", "change")

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
        tokens, clip = 0, self.tr.grad_clip
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
        rows = {r.name: r for r in self.rows()}
        rows["mem-step"].meta["resident_mib"] = rows["mem-trainer"].meta["resident_mib"] = _mib(
            _tensors(self.model, self.opt, self.images + self.masks) + _tensors(self.tokenizer, None, ()))
        rows["mem-dvae-step"].meta["resident_mib"] = _mib(_tensors(self.dvae, self.dvae_opt, self.images))
        if "mem-targets" in rows:
            rows["mem-targets"].meta["resident_mib"] = _mib(_tensors(self.tokenizer, None, self.images))


class FinetuneGroup(Group):
    """``cls-finetune-trainer`` and ``seg-finetune-step`` (see ROW_DOC)."""

    family = "finetune"

    def build(self) -> None:
        args, dev, P = self.args, self.device, FT_PRESETS[self.preset]
        seg_batch = P["seg_batch"][dev.type]
        cfg = bench_config(load_config(CONFIGS / "finetune" / P["cls"]), dev.type, PRECISIONS[self.precision],
                           self.batch, self.workers, self.data, args.seed, args.log_every)
        cfg["log"]["tensorboard"] = False
        cfg["data"]["holdout_fraction"] = 0.25
        self.task = marked(ClassificationTask, dev)
        tr = self.tr = self.trainer(cfg, self.task, "cls-run")
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
        self.info = {"model": {"cls_arch": cfg["task"]["model"]["arch"], "cls_input_size": cfg["task"]["input_size"],
                               "cls_params": sum(q.numel() for q in tr.raw_model.parameters() if q.requires_grad),
                               "seg_arch": o["model"]["arch"], "seg_tiny": bool(o["model"]["tiny"]),
                               "seg_input": [2 * int(o["chunks"]), h, w], "seg_batch": seg_batch,
                               "seg_params": sum(q.numel() for q in self.seg.parameters())},
                     "data": {"path": str(self.data), "items": len(tr.loader.dataset),
                              "sensor_size": list(SAMPLES_SENSOR), "steps_per_epoch": tr.steps_per_epoch}}
        cls_row = self.row("cls-finetune-trainer", note=f"{self.workers} loader workers, EMA on")
        seg_row = self.row("seg-finetune-step", seg_batch, note=f"random {2 * int(o['chunks'])}-ch {h}x{w} inputs")
        self.items = [(cls_row, self.window(cls_row, tr, self.task)), (seg_row, self.step(seg_row, self.run_seg))]

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
        cls_row, seg_row = self.rows()
        cls_row.meta["resident_mib"] = _mib(_tensors(self.tr.raw_model, self.tr.raw_optimizer, ()))
        seg_row.meta["resident_mib"] = _mib(_tensors(self.seg, self.seg_opt, (self.seg_x, self.seg_y)))


GROUPS = {"ecddp": ECDDPGroup, "mem": MEMGroup, "finetune": FinetuneGroup}


def _autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------- report

ROW_DOC = {
    "bare-swin": "timm Swin (student config), teacher fwd on view + globals (no grad), student fwd+bwd on globals "
                 "+ locals, random inputs; no heads/loss/optimizer",
    "model-step": "ECDDPModel fwd+bwd + grad clip + prototype freeze + AdamW + EMA on pre-made device voxels",
    "trainer": "Trainer.fit with ECDDPTask on a stream dataset: loader, collate, to device, voxel grid, crop, "
               "model step, schedules, logging (no checkpoints); first step of each fit call untimed",
    "task-inputs": "ECDDPTask.inputs: host batch to device, voxel grid, random crop",
    "data-loader": "the trainer's own DataLoader (its sampler, workers, dataset wrapper, collate, pinning), "
                   "no model (first batch untimed)",
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
# the overhead column of a row: (label, overhead key, signed)
OVERHEAD_OF = {"model-step": ("vs bare-swin ", "model_vs_bare_pct", True),
               "trainer": ("vs model-step ", "trainer_vs_model_pct", True),
               "task-inputs": ("of model-step ", "task_inputs_share_pct", False),
               "data-loader": ("of model-step ", "data_loader_share_pct", False),
               "mem-trainer": ("vs mem-step ", "trainer_vs_model_pct", True),
               "mem-targets": ("of mem-step ", "targets_share_pct", False)}


def table(groups: list[dict]) -> str:
    head = ["device", "preset", "precision", "batch", "row", "samples/s [min-max]", "s/step", "overhead",
            "resident MiB", "peak step MiB"]
    lines = []
    for g in groups:
        key = [g["device"], g["preset"], g["precision"], str(g["batch"])]
        if g.get("error"):
            key[-1] += f" ({g.get('family', 'ecddp')})"
            lines.append(key + ["error", g["error"].splitlines()[-1][:120]] + ["-"] * 4)
            continue
        for r in g["rows"]:
            label, name, sign = OVERHEAD_OF.get(r["row"], ("", None, True))
            stat = g["overheads"].get(name) if name else None
            overhead = (label + pct(stat, sign)) if stat else \
                f"tokens/s {spread(r['tokens_per_s'])}" if r.get("tokens_per_s") else "-"
            lines.append(key[:3] + [str(r["batch"]), r["row"], spread(r["samples_per_s"]),
                                    f"{r['sec_per_step']['median']:.3g}", overhead,
                                    "-" if r["resident_mib"] is None else f"{r['resident_mib']:.0f}",
                                    f"{r['peak_mem_mib']:.0f}"])
    return markdown_table(head, lines)


def target_lines(groups: list[dict]) -> list[str]:
    out = []
    for g in groups:
        s = None if g.get("error") or g.get("family") != "ecddp" else g["overheads"].get("trainer_vs_model_pct")
        if s is not None:
            ok = s["median"] < TARGET_TRAINER_OVERHEAD_PCT
            out.append(f"- {g['device']} {g['preset']} {g['precision']} batch {g['batch']}: the trainer adds "
                       f"{s['median']:+.1f} % [{s['min']:+.1f} to {s['max']:+.1f}] over the model step "
                       f"(target < {TARGET_TRAINER_OVERHEAD_PCT:g} %: {'met' if ok else 'NOT met'})")
    return out


def markdown(doc: dict) -> list[str]:
    config, groups = doc["config"], doc["groups"]
    md = [*markdown_head("Training step benchmark", doc["date"], doc["machine"], config["command"]),
          f"Medians of {config['repeats']} interleaved repeats [min-max]. samples/s = batch x steps / s. "
          "'overhead': extra time per step (median of per-repeat ratios); component rows: their time per batch "
          "as a share of the model step. 'resident MiB': parameters + buffers + optimizer state + fixed inputs of "
          "the row's model(s) (model-step and trainer share one model). 'peak step MiB': growth of peak memory "
          "during a timed repeat (CPU: process RSS; CUDA: torch.cuda.max_memory_allocated).", "",
          *[f"- `{k}`: {v}" for k, v in ROW_DOC.items()], "", table(groups), ""]
    goals = target_lines(groups)
    if goals:
        md += ["Target (the trainer and data path add under 10 % over the model step):", "", *goals, ""]
    ok = [g for g in groups if not g.get("error")]
    if ok:
        md += ["Data per group:", ""]
    for g in ok:
        d, label = g["data"], f"{g['device']} {g['preset']} {g['precision']} batch {g['batch']}"
        if g["family"] == "ecddp":
            md.append(f"- {label}: {d['items']} samples at {d['sensor_size'][0]}x{d['sensor_size'][1]}, "
                      f"{num(d['events_per_sample_mean'])} events per sample (mean), {d['steps_per_epoch']} steps "
                      f"per epoch, {g['workers']} loader workers, crop generator on {g['generator']}")
        else:
            md.append(f"- {g['family']} {label}: {d['items']} training samples at {d['sensor_size'][0]}x"
                      f"{d['sensor_size'][1]}, {d['steps_per_epoch']} steps per epoch, {g['workers']} loader "
                      f"workers; model {json.dumps(g['model'], default=str)}")
    return md + ["", f"Total time {doc['elapsed_s']:.0f} s.", ""]


# --------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_bench_args(p, quick="tiny preset, CPU, 2 repeats of 4 steps, 1 torch thread", device_default=None,
                           out="bench/results/train-<machine tag>.json, one file per device")
    p.add_argument("--methods", default="ecddp,mem,finetune",
                   help="comma-separated families of rows: ecddp (bare-swin, model-step, trainer, task-inputs, "
                        "data-loader), mem (mem-dvae-step, mem-step, mem-targets, mem-trainer), finetune "
                        "(cls-finetune-trainer, seg-finetune-step); default all")
    p.add_argument("--presets", default=None, help="comma-separated: tiny, paper (default both)")
    p.add_argument("--precisions", default="fp32,bf16",
                   help="comma-separated fp32, bf16 (bf16-mixed, CUDA only: CPU rows are fp32); default both")
    p.add_argument("--batch", default=None,
                   help="comma-separated batch sizes (default per family, preset and device, e.g. ECDDP tiny 8 / 64, "
                        "paper 2 / 32 on cpu / cuda)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per repeat and row (default tiny 8 / 20, paper 2 / 10 on cpu / cuda)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up steps per row (default tiny 3 / 10, paper 2 / 5 on cpu / cuda)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per measurement (default 5)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers of the trainers (default 0 on cpu, min(8, CPUs / 2) on cuda)")
    p.add_argument("--log-every", type=int, default=None,
                   help="trainer.log_every_n_steps (default: the paper config's, 50)")
    p.add_argument("--generator", choices=["device", "cpu"], default="device",
                   help="where the task's crop/mask RNG lives (the task uses the device; default). A CUDA group "
                        "that fails with the device generator is retried once with 'cpu', noted in the results")
    p.add_argument("--no-components", action="store_true", help="skip the component rows (task-inputs, "
                   "data-loader, mem-targets)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: usable CPUs; 1 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where the simulated stream datasets are built and reused (default "
                        "$TMPDIR/evforge-bench/train-data)")
    a = p.parse_args(argv)
    if a.quick:
        for key, value in QUICK.items():
            if getattr(a, key) is None:
                setattr(a, key, value)
    a.device = a.device or "all"
    a.presets = csv(a.presets or "tiny,paper")
    a.precisions = csv(a.precisions)
    a.batch = csv(a.batch, int) or None
    a.methods = csv(a.methods)
    a.repeats = a.repeats or 5
    for what, names, known in (("method", a.methods, FAMILIES), ("preset", a.presets, PRESETS),
                               ("precision", a.precisions, PRECISIONS)):
        for name in names:
            if name not in known:
                p.error(f"unknown {what} {name!r} (known: {', '.join(known)})")
    if a.repeats < 1 or (a.steps is not None and a.steps < 1) or (a.batch and min(a.batch) < 1):
        p.error("--repeats, --steps and batch sizes must be >= 1")
    return a


def _generator_error(message: str) -> bool:
    """Whether an error looks like a CUDA generator / CPU tensor mix-up (worth a retry with a CPU generator)."""
    m = message.lower()
    return "generator" in m or "same device" in m or "expected a 'cpu' device" in m or "expected all tensors" in m


def run_group(args, clock: Clock, key: tuple, data: Path) -> dict:
    """Build and measure one group; a CUDA ECDDP group that fails with the device generator is retried once with
    a CPU generator. Returns its summary, or its error record (one failing group must not lose the others)."""
    family, device, preset, prec, b = key
    modes = ["device"] + (["cpu"] if device == "cuda" else []) if args.generator == "device" else ["cpu"]
    fallback = None
    for mode in modes if family == "ecddp" else ["device"]:
        clock.say(f"{family} {device} {preset} {prec} batch {b}" + (f" (crop generator on {mode})"
                                                                    if family == "ecddp" else ""))
        group = None
        with harness.work_dir("evforge-bench-train-") as workdir:
            try:
                group = GROUPS[family](args, device, preset, prec, b, data, workdir, cpu_generator=mode == "cpu")
                group.build()
                group.measure(args.repeats, lambda m: clock.say(m, "  "))
                out = group.summary()
                if family == "ecddp":
                    out["generator"] = mode if fallback is None else \
                        f"cpu (fallback: the device generator failed: {fallback})"
                return out
            except Exception as e:  # noqa: BLE001 - reported in the results
                err = f"{type(e).__name__}: {e}"
                print(f"  FAILED: {err}", flush=True)
                traceback.print_exc(limit=6)
                if mode == "device" and "cpu" in modes and family == "ecddp" and _generator_error(err):
                    fallback = err
                    print("  retrying with the crop generator on the CPU (--generator cpu)", flush=True)
                    continue
                return {"family": family, "device": device, "preset": preset, "precision": prec, "batch": b,
                        "error": traceback.format_exc(limit=8)}
            finally:
                if group is not None:
                    group.close()
                del group
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads or cpuinfo()["usable_cpus"] or 1
    torch.set_num_threads(threads)
    devices = harness.bench_devices(args.device)
    if devices is None:
        return 2
    extra = {"timm": timm.__version__}
    with contextlib.suppress(ImportError):
        import lightning_fabric
        extra["lightning_fabric"] = lightning_fabric.__version__
    info = machine_info(threads, **extra)
    harness.announce(info, args.device, devices)
    clock = Clock()
    data_root = args.data_dir or harness.results_folder(True) / "train-data"
    sim_device = "cuda" if torch.cuda.is_available() else "cpu"

    plan = [(fam, device, preset, prec, b) for device in devices for preset in args.presets
            for prec in ([p for p in args.precisions if device == "cuda" or p == "fp32"] or ["fp32"])
            for fam in FAMILIES if fam in args.methods
            for b in args.batch or [default_batch(fam, preset, device)]]
    # datasets built once, large enough for two timed trainer windows of their largest group
    steps = lambda preset, device: args.steps or PRESETS[preset].steps[device]  # noqa: E731
    data = {}
    for preset in dict.fromkeys(k[2] for k in plan if k[0] == "ecddp"):
        need = max(2 * b * (1 + steps(pr, d)) + b for f, d, pr, _, b in plan if f == "ecddp" and pr == preset)
        clock.say(f"data for {preset}: >= {need} samples")
        data[preset] = stream_dataset(data_root, preset, need, sim_device, args.seed)
    if any(k[0] != "ecddp" for k in plan):
        need = max((1 + steps(pr, d)) * b + b for f, d, pr, _, b in plan if f != "ecddp")
        clock.say(f"samples data (MEM, finetune): >= {need} training samples")
        data["samples"] = samples_dataset(data_root, need, args.seed)

    groups = [run_group(args, clock, key, data[key[2] if key[0] == "ecddp" else "samples"]) for key in plan]
    elapsed = clock.elapsed()
    config = {"command": harness.command_line("train.py", argv), "quick": args.quick, "methods": args.methods,
              "devices": devices, "presets": args.presets, "precisions": args.precisions, "batch": args.batch,
              "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "workers": args.workers,
              "log_every": args.log_every, "generator": args.generator, "seed": args.seed,
              "base_config": str(BASE_CONFIG.relative_to(REPO)),
              "preset_defaults": {k: {**asdict(v), "model": v.model or "paper config", **STREAMS[k]}
                                  for k, v in PRESETS.items()},
              "cpu_peak_rss_reset": MemoryProbe.hwm_resettable}
    print("\n" + table(groups), flush=True)
    goals = target_lines(groups)
    if goals:
        print("\nTarget (trainer + data path vs the model step):\n" + "\n".join(goals))
    print(f"\nTotal {elapsed:.0f} s", flush=True)
    for path, devs in harness.result_paths("train", devices, info, args.quick, args.out).items():
        harness.write_results(path, info, config, [g for g in groups if g["device"] in devs], benchmark="train",
                              markdown=markdown, rows_key="groups", rows_doc=ROW_DOC, elapsed_s=round(elapsed, 1))
        print(f"wrote {path} and {path.with_suffix('.md')}")
    return 1 if any(g.get("error") for g in groups) else 0


if __name__ == "__main__":
    sys.exit(main())
