"""The shared trainer: a :class:`~evforge.trainer.task.Task` driven on Lightning Fabric with exact resume.

Launching (Fabric detects torchrun and SLURM itself; ``devices``/``num_nodes`` "auto" are read from them)::

    evforge pretrain cfg.yaml --set trainer.devices=1                 # CPU or one GPU
    evforge pretrain cfg.yaml --set trainer.devices=4                 # 4 GPUs, one machine: fabric.launch()
                                                                      # re-runs the command once per extra GPU
    torchrun --nproc_per_node 4 -m evforge.cli pretrain cfg.yaml      # 4 GPUs via torchrun
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m evforge.cli pretrain cfg.yaml                              # 2 nodes (run on each node)
    srun --nodes 4 --ntasks-per-node 8 --gpus-per-node 8 evforge pretrain cfg.yaml   # SLURM (inside sbatch)

On a multi-node run ``out_dir`` must be on a shared file system (rank 0 writes, every rank reads checkpoints).
With ``#SBATCH --signal=USR1@120`` the run checkpoints and returns ``stopped="signal"`` before the time limit;
requeue the job and it resumes (``resume="auto"``).

Reproducibility: the data order is a function of (seed, epoch), random item transforms are seeded per item
(:mod:`evforge.trainer.sampler`), every rank's RNG states are checkpointed, and resuming skips the consumed
batches in the sampler: a resumed run's losses equal the uninterrupted run's (bit for bit on CPU in fp32).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..errors import InputError
from .checkpoint import TRAINER_FORMAT, CheckpointManager, read_trainer_checkpoint, rng_state, set_rng_state
from .config import ConfigError, check_config, config_hash, config_int, flatten, save_config, with_defaults
from .control import fork_rng, lock_run_folder, seed_all, stop_signals
from .launch import fabric_kwargs
from .loggers import Loggers, Progress
from .metrics import accumulate, all_reduce_stats
from .optim import apply_schedules, build_optimizer
from .sampler import ResumableBatchSampler, SeededCollate, SeededDataset, mix_seed
from .schedules import Schedules
from .task import StepState

__all__ = ["Trainer", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = TRAINER_FORMAT
# Config keys that may change between a run and its resume without changing the math.
_RESUME_IGNORED = ("trainer.devices", "trainer.num_nodes", "trainer.accelerator", "trainer.strategy",
                   "trainer.log_every_n_steps", "trainer.val_every_n_steps", "trainer.val_every_n_epochs",
                   "trainer.limit_val_batches", "trainer.stop_signals", "data.num_workers", "data.pin_memory",
                   "data.persistent_workers", "data.prefetch_factor", "data.multiprocessing_context",
                   "checkpoint.", "log.")


class Trainer:
    """Trains ``task`` as ``cfg`` says (see :data:`evforge.trainer.config.DEFAULTS`), writing to ``out_dir``.

    ``resume``: ``"auto"`` continues from ``out_dir/checkpoints/last.ckpt`` when present, a path continues from
    that checkpoint, ``None`` starts fresh (overwriting the logs). Construction launches the processes
    (``fabric.launch()``), builds model, optimizer and loaders and restores the checkpoint; :meth:`fit` trains.

    ``task`` is a :class:`~evforge.trainer.task.Task`. Its ``training_step`` receives the Fabric-wrapped model:
    call ``model(...)`` (its ``forward``) so that DDP synchronises gradients and autocast applies (other methods:
    ``model.mark_forward_method(name)``). ``after_optimizer_step`` and ``validation_step`` receive the plain
    module; ``state_dict()`` / ``load_state_dict(d)`` carry state outside the model (checkpointed with it).
    """

    def __init__(self, cfg: dict, task, *, out_dir, resume: str | os.PathLike | None = "auto",
                 command: str | None = None):
        from lightning_fabric import Fabric

        cfg = with_defaults(cfg)
        check_config(cfg, task.config_keys or None)  # typos and wrong types fail before any work
        self.cfg, self.task, self.out_dir = cfg, task, Path(out_dir)
        self._command = command
        t = cfg["trainer"]
        self.accumulate = config_int(cfg, "trainer", "accumulate_grad_batches", 1, optional=False)
        self.log_every = config_int(cfg, "trainer", "log_every_n_steps", 1) or 0
        self.val_every_steps = config_int(cfg, "trainer", "val_every_n_steps", 1)
        self.val_every_epochs = config_int(cfg, "trainer", "val_every_n_epochs", 1)
        self.limit_val = config_int(cfg, "trainer", "limit_val_batches", 0)
        self.grad_clip = None if t["grad_clip"] in (None, 0) else float(t["grad_clip"])
        batch_size = config_int(cfg, "data", "batch_size", 1, optional=False)
        num_workers = config_int(cfg, "data", "num_workers", 0, optional=False)
        if t["float32_matmul_precision"]:
            torch.set_float32_matmul_precision(t["float32_matmul_precision"])

        self.fabric = fabric = Fabric(**fabric_kwargs(t))
        fabric.launch()
        self.rank, self.world_size = fabric.global_rank, fabric.world_size
        self.is_main = fabric.is_global_zero
        self.seed = int(cfg["seed"])

        self._lock = lock_run_folder(self.out_dir, self._command, fabric, self.is_main, self.world_size)
        try:
            self._setup(cfg, task, resume, batch_size, num_workers)
        except BaseException:
            self._release_lock()
            raise

    def _setup(self, cfg: dict, task, resume, batch_size: int, num_workers: int) -> None:
        """Model, optimizer, loaders, schedules, checkpoint state and logs (the constructor, under the lock)."""
        fabric, seed = self.fabric, self.seed
        t, d = cfg["trainer"], cfg["data"]

        # model and optimizer (identical initialisation on every rank)
        seed_all(seed)
        model = task.build_model(cfg)
        groups = task.param_groups(model, cfg)

        # data
        train_set = task.build_dataset(cfg, "train")
        seed_items = bool(d["seed_items"])
        self.sampler = ResumableBatchSampler(len(train_set), batch_size, shuffle=bool(d["shuffle"]), seed=seed,
                                             rank=self.rank, world_size=self.world_size,
                                             drop_last=bool(d["drop_last"]), seed_items=seed_items)
        self._loader_gen = torch.Generator().manual_seed(mix_seed(seed, self.rank, 2))
        self.loader = self._make_loader(train_set, self.sampler, num_workers, self._loader_gen)
        self.steps_per_epoch = len(self.sampler) // self.accumulate
        if self.steps_per_epoch < 1:
            raise ConfigError(f"data.batch_size: {len(train_set)} training items give {len(self.sampler)} "
                              f"batches of {batch_size} per rank, fewer than accumulate_grad_batches="
                              f"{self.accumulate}: no optimizer step per epoch")
        max_steps, epochs = config_int(cfg, "trainer", "max_steps", 1), t["epochs"]
        if max_steps is None and epochs is None:
            raise ConfigError("trainer: set epochs or max_steps")
        if max_steps is None and (isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or epochs <= 0):
            raise ConfigError(f"trainer.epochs: expected a positive number, got {epochs!r}")
        self.total_steps = max_steps or int(round(float(epochs) * self.steps_per_epoch))
        self.global_batch = batch_size * self.world_size * self.accumulate
        self.schedules = Schedules(cfg["schedules"], steps_per_epoch=self.steps_per_epoch,
                                   total_steps=self.total_steps, global_batch=self.global_batch,
                                   defaults={"lr": cfg["optim"]["lr"], "weight_decay": cfg["optim"]["weight_decay"]})
        first = self.schedules.at(0)
        optimizer = build_optimizer(groups, cfg["optim"], first["lr"])
        apply_schedules(optimizer, first["lr"], first["weight_decay"])
        self.raw_model, self.raw_optimizer = model, optimizer
        self.model, self.optimizer = fabric.setup(model, optimizer)

        self.val_loader = self.val_sampler = None
        if self.val_every_steps or self.val_every_epochs:
            val_set = task.build_dataset(cfg, "val")
            if val_set is not None:
                self.val_sampler = ResumableBatchSampler(
                    len(val_set), d["val_batch_size"] or batch_size, shuffle=False, seed=mix_seed(seed, 0x7A1),
                    rank=self.rank, world_size=self.world_size, drop_last=False, pad=False, seed_items=seed_items)
                self.val_loader = self._make_loader(val_set, self.val_sampler, num_workers,
                                                    torch.Generator().manual_seed(mix_seed(seed, self.rank, 3)))

        # progress, checkpoints, logs
        self.step = self.epoch = self.batch_in_epoch = 0
        self.history: list[dict] = []
        self.last_train: dict = {}
        self.last_val: dict = {}
        self._stop_flag = False
        self.ckpt = CheckpointManager(self.out_dir / "checkpoints", config_int(cfg, "checkpoint", "keep_last", 1))
        path = self._resume_path(resume)
        seed_all(mix_seed(seed, self.rank, 1))  # each rank its own stream (dropout, masks, crops)
        if path is not None:
            self.load_checkpoint(path)
        self.resumed_from = path
        if self.is_main:
            save_config(cfg, self.out_dir / "config.yaml")
        self.loggers = Loggers(self.out_dir, cfg["log"], enabled=self.is_main, resume_step=self.step)

    # ------------------------------------------------------------------------------------------------ setup
    def _release_lock(self) -> None:
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.release()

    def _make_loader(self, dataset, sampler, num_workers: int, generator: torch.Generator) -> DataLoader:
        d = self.cfg["data"]
        collate = self.task.collate
        if num_workers > 0 and callable(getattr(dataset, "close", None)):
            dataset.close()  # workers open their own file handles (EventDataset's HDF5 shards)
        if d["seed_items"]:
            dataset, collate = SeededDataset(dataset), SeededCollate(collate)
        pin = d["pin_memory"]
        if pin is None:
            pin = self.fabric.device.type == "cuda"
        extra = {}
        if num_workers > 0:
            extra["persistent_workers"] = bool(d["persistent_workers"])
            if d["prefetch_factor"]:
                extra["prefetch_factor"] = int(d["prefetch_factor"])
            if d["multiprocessing_context"]:
                extra["multiprocessing_context"] = d["multiprocessing_context"]
        # A generator of its own: creating an iterator draws a worker seed that must not come from (and
        # advance) the training RNG, or a resumed run would draw it at a different point.
        return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                          pin_memory=bool(pin), generator=generator, **extra)

    def _resume_path(self, resume) -> Path | None:
        if resume is None or resume is False:
            return None
        if resume == "auto":
            return self.ckpt.latest()
        path = Path(resume)
        if not path.is_file():
            raise InputError(path, "no such checkpoint to resume from")
        return path

    # ------------------------------------------------------------------------------------------ checkpoints
    def _scaler(self):
        return getattr(self.fabric.strategy.precision, "scaler", None)

    def _gather_rng(self) -> list[dict]:
        """Every rank's RNG states (rank 0 stores them all; a rank resumes its own)."""
        local = rng_state(cuda=self.fabric.device.type == "cuda")
        local["loader"] = self._loader_gen.get_state()
        if self.world_size == 1:
            return [local]
        dist = torch.distributed
        out: list[dict] = [{} for _ in range(self.world_size)]
        for k, v in local.items():  # fixed shapes per key on every rank
            v = v.to(self.fabric.device)
            parts = [torch.empty_like(v) for _ in range(self.world_size)]
            dist.all_gather(parts, v)
            for r, part in enumerate(parts):
                out[r][k] = part.cpu()
        return out

    def state_dict(self) -> dict:
        """The checkpoint: only tensors, numbers, strings and containers (loads with ``weights_only=True``)."""
        scaler = self._scaler()
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": self.raw_model.state_dict(),
            "optimizer": self.raw_optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "progress": {
                "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "sampler_epoch": self.epoch, "sampler_seed": self.seed, "batches_consumed": self.batch_in_epoch,
                "batches_per_epoch": len(self.sampler), "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps, "world_size": self.world_size, "global_batch": self.global_batch,
            },
            "rng": self._gather_rng(),
            "config": json.dumps(self.cfg, default=str),
            "config_hash": config_hash(self.cfg),
            "last_train": {k: v for k, v in self.last_train.items() if isinstance(v, (int, float, str))},
        }
        state["task"] = self.task.state_dict()
        return state

    def save_checkpoint(self, keep: bool = False) -> Path:
        """Write ``checkpoints/last.ckpt`` (and ``step-<N>.ckpt`` with ``keep``); collective on every rank."""
        state = self.state_dict()
        if self.is_main:
            self.ckpt.save(state, self.step, keep=keep)
        return self.ckpt.last

    def load_checkpoint(self, path) -> None:
        """Restore model, optimizer, scaler, progress, this rank's RNG states and the loader's generator."""
        ck, _ = read_trainer_checkpoint(path, hint="; delete it or resume from another (checkpoints/step-*.ckpt)")
        self.raw_model.load_state_dict(ck["model"])
        self.raw_optimizer.load_state_dict(ck["optimizer"])
        scaler = self._scaler()
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        p = ck["progress"]
        self.step, self.epoch, self.batch_in_epoch = int(p["step"]), int(p["epoch"]), int(p["batch_in_epoch"])
        self.last_train = dict(ck.get("last_train", {}))
        notes = []
        if int(p["world_size"]) != self.world_size:
            notes.append(f"world size {p['world_size']} -> {self.world_size} (data shards and RNG streams change)")
        if int(p["batches_per_epoch"]) != len(self.sampler):
            notes.append(f"batches per epoch {p['batches_per_epoch']} -> {len(self.sampler)}")
        old = flatten(json.loads(ck["config"]))
        new = flatten(json.loads(json.dumps(self.cfg, default=str)))
        changed = sorted(k for k in old.keys() | new.keys()
                         if old.get(k) != new.get(k) and not any(k.startswith(i) for i in _RESUME_IGNORED))
        if changed:
            notes.append(f"config changed: {', '.join(changed[:8])}{' ...' if len(changed) > 8 else ''}")
        ranks = ck["rng"]
        if self.rank < len(ranks):
            set_rng_state(ranks[self.rank])
            self._loader_gen.set_state(ranks[self.rank]["loader"])
        else:
            seed_all(mix_seed(self.seed, self.rank, self.step, 1))
        if "task" in ck:
            self.task.load_state_dict(ck["task"])
        if notes and self.is_main:
            warnings.warn(f"resuming from {path} (step {self.step}): not an exact continuation: " + "; ".join(notes),
                          stacklevel=2)

    # ---------------------------------------------------------------------------------------------- signals
    def request_stop(self, *_) -> None:
        """Checkpoint and return from :meth:`fit` after the current step (also the handler of ``stop_signals``)."""
        self._stop_flag = True

    @contextmanager
    def _signals(self):
        names = self.cfg["trainer"]["stop_signals"] or []
        self._watch_signals = bool(names)
        with stop_signals(names, self.request_stop):
            yield

    def _stop_requested(self) -> bool:
        """Whether any rank asked to stop (a collective when several ranks watch signals)."""
        if self.world_size == 1 or not self._watch_signals:
            return self._stop_flag
        flag = torch.tensor([1.0 if self._stop_flag else 0.0], device=self.fabric.device)
        return bool(self.fabric.all_reduce(flag, reduce_op="sum").item() > 0)

    # --------------------------------------------------------------------------------------------- training
    def _state(self, scalars: dict) -> StepState:
        return StepState(step=self.step, epoch=self.epoch, device=self.fabric.device, rank=self.rank,
                         world_size=self.world_size, global_batch=self.global_batch,
                         steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
                         accumulate=self.accumulate, micro_step=0, scalars=dict(scalars))

    def _train_step(self, it) -> tuple[dict, dict]:
        """One optimizer step over ``accumulate`` micro-batches: this rank's logs (tensors or floats), the scalars."""
        fabric, accum = self.fabric, self.accumulate
        scalars = self.schedules.at(self.step)
        apply_schedules(self.raw_optimizer, scalars["lr"], scalars["weight_decay"])
        state = self._state(scalars)
        sums: dict[str, Any] = {}
        for k in range(accum):
            try:
                batch = next(it)
            except StopIteration:
                raise RuntimeError("the training loader ran out of batches within an epoch") from None
            batch = fabric.to_device(batch)
            state.micro_step = k
            skip_sync = self.world_size > 1 and k < accum - 1
            with fabric.no_backward_sync(self.model, enabled=True) if skip_sync else nullcontext():
                with fabric.autocast():
                    loss, logs = self.task.training_step(self.model, batch, state)
                fabric.backward(loss / accum if accum > 1 else loss)
            for name, v in {"loss": loss, **(logs or {})}.items():
                v = v.detach().float() if torch.is_tensor(v) else float(v)
                sums[name] = sums[name] + v if name in sums else v
        out = {name: v / accum for name, v in sums.items()}
        # e.g. ECDDP's public order: prototype gradients dropped before clipping
        self.task.before_gradient_clip(self.raw_model, state)
        if self.grad_clip is not None:
            norm = fabric.clip_gradients(self.model, self.optimizer, max_norm=self.grad_clip,
                                         error_if_nonfinite=False)
            out["grad_norm"] = norm.detach().float()
        # e.g. freezing prototype layers early on (after clipping, as DINO does)
        self.task.before_optimizer_step(self.raw_model, state)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.task.after_optimizer_step(self.raw_model, state.replace(step=self.step + 1))
        return out, scalars

    def _reduce_logs(self, logs: dict, scalars: dict) -> dict:
        """Floats: the step's values averaged over ranks (one collective), then the scheduled scalars."""
        names = [n for n in logs if n not in scalars]
        dev = self.fabric.device
        dtype = torch.float32 if dev.type == "mps" else torch.float64
        vals = [logs[n].reshape(()).to(dev, dtype) if torch.is_tensor(logs[n])
                else torch.tensor(logs[n], dtype=dtype, device=dev) for n in names]
        vec = torch.stack(vals) if vals else torch.zeros(0, dtype=dtype, device=dev)
        if self.world_size > 1 and names:
            vec = self.fabric.all_reduce(vec, reduce_op="mean")
        out = {n: float(x) for n, x in zip(names, vec.tolist())}
        out.update({k: float(v) for k, v in scalars.items()})
        return out

    def fit(self, *, stop_at_step: int | None = None) -> dict:
        """Train until ``total_steps`` (or ``stop_at_step``, or a stop signal), checkpointing as configured.

        Returns ``{"step", "epoch", "total_steps", "stopped" ("completed" | "stop_at_step" | "signal"),
        "train" (last logged train values), "val" (last validation metrics), "checkpoint", "out_dir"}``.
        """
        c = self.cfg["checkpoint"]
        every_steps, every_epochs = c["every_n_steps"], c["every_n_epochs"]
        keep_every = c["keep_every_n_steps"]
        micro_per_epoch = self.steps_per_epoch * self.accumulate
        stopped = "completed" if self.step >= self.total_steps else None
        if stopped is None and stop_at_step is not None and self.step >= stop_at_step:
            stopped = "stop_at_step"
        progress = Progress(self.total_steps, self.step, self.cfg["log"]["progress"] if self.is_main else False)
        self.model.train()
        t_last, n_last = time.perf_counter(), self.step
        try:
            with self._signals():
                while stopped is None:
                    self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
                    it = iter(self.loader)
                    while True:
                        logs, scalars = self._train_step(it)
                        self.step += 1
                        self.batch_in_epoch += self.accumulate
                        epoch_end = self.batch_in_epoch >= micro_per_epoch
                        if epoch_end:
                            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                        final = self.step >= self.total_steps
                        logged = bool(self.log_every) and (self.step % self.log_every == 0 or final)
                        if logged:
                            now = time.perf_counter()
                            rec = self._reduce_logs(logs, scalars)
                            rec["sec_per_step"] = (now - t_last) / max(self.step - n_last, 1)
                            t_last, n_last = now, self.step
                            self.last_train = rec
                            self._log("train", rec)
                        progress.update(1, {"loss": rec.get("loss"), "lr": rec.get("lr"),
                                            "s/step": rec["sec_per_step"]} if logged else None)
                        if self.val_loader is not None and (
                                final or (self.val_every_steps and self.step % self.val_every_steps == 0)
                                or (epoch_end and self.val_every_epochs and self.epoch % self.val_every_epochs == 0)):
                            self.validate()
                        if final:
                            stopped = "completed"
                        elif stop_at_step is not None and self.step >= stop_at_step:
                            stopped = "stop_at_step"
                        elif self._stop_requested():
                            stopped = "signal"
                        keep = bool(keep_every) and self.step % keep_every == 0
                        if (stopped or keep or (every_steps and self.step % every_steps == 0)
                                or (epoch_end and every_epochs and self.epoch % every_epochs == 0)):
                            self.save_checkpoint(keep=keep)
                        if stopped or epoch_end:
                            break
                    del it
        finally:
            progress.close()
            self.loggers.flush()
        self._stop_flag = False
        if self.world_size > 1:
            self.fabric.barrier()
        return {"step": self.step, "epoch": self.epoch, "total_steps": self.total_steps, "stopped": stopped,
                "train": dict(self.last_train), "val": dict(self.last_val),
                "checkpoint": str(self.ckpt.last), "out_dir": str(self.out_dir)}

    def _log(self, split: str, values: dict) -> None:
        rec = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "split": split, **values}
        self.history.append(rec)
        self.loggers.log(rec)

    # ------------------------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> dict:
        """The task's metrics over the validation split: its per-batch statistics summed over batches and ranks
        (:mod:`evforge.trainer.metrics`), turned into metrics once by ``task.validation_metrics``; logged as
        ``val``. Exact whatever the batching and the number of ranks."""
        if self.val_loader is None:
            return {}
        fabric, model = self.fabric, self.raw_model
        was_training = model.training
        model.eval()
        total: dict = {}
        state = self._state(self.schedules.at(self.step))
        with fork_rng(fabric.device):
            self.val_sampler.set_epoch(0)
            for i, batch in enumerate(self.val_loader):
                if self.limit_val is not None and i >= self.limit_val:
                    break
                with fabric.autocast():
                    accumulate(total, self.task.validation_step(model, fabric.to_device(batch), state))
        model.train(was_training)
        metrics = {k: float(v) for k, v in self.task.validation_metrics(
            all_reduce_stats(total, fabric, self.world_size)).items()}
        self.last_val = metrics
        self._log("val", metrics)
        return metrics

    # ---------------------------------------------------------------------------------------------- closing
    def close(self, *, distributed: bool = True) -> None:
        """Close the logs, stop the loader workers and (``distributed``, every rank together) end the process group.

        Ending the group cleanly (barrier, then destroy) avoids ranks tearing down connections under each other
        at interpreter exit; on an error path pass ``distributed=False`` (other ranks may not get here).
        """
        self.loggers.close()
        self.loader = self.val_loader = None
        self._release_lock()
        dist = torch.distributed
        if distributed and self.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(distributed=exc_type is None)
