"""Checkpoints: exact resume (losses bit for bit on CPU fp32), atomic writes, weights_only loading, stop signals."""

from __future__ import annotations

import fractions
import json
import os
import random
import signal

import numpy as np
import pytest
import torch

from evforge.errors import InputError
from evforge.trainer import CheckpointManager, Trainer, load_checkpoint, save_checkpoint
from evforge.trainer import checkpoint as ckpt_mod
from evforge.trainer.toy import ToyTask, toy_config


def _cfg(num_workers=0, accumulate=1, **trainer):
    cfg = toy_config(accumulate_grad_batches=accumulate, val_every_n_steps=5, **trainer)
    cfg["data"]["num_workers"] = num_workers
    return cfg


def _train(cfg, out, *, task=None, resume=None, stop_at_step=None):
    """Run a fresh Trainer; returns (summary, train records, final model state)."""
    with Trainer(cfg, task or ToyTask(), out_dir=out, resume=resume) as tr:
        summary = tr.fit(stop_at_step=stop_at_step)
        state = {k: v.clone() for k, v in tr.raw_model.state_dict().items()}
        return summary, [h for h in tr.history if h["split"] == "train"], state


def _scramble():
    """A killed process's RNG state is gone: make sure nothing but the checkpoint can restore it."""
    torch.manual_seed(1234)
    np.random.seed(99)
    random.seed(7)


def _losses(records):
    return [(r["step"], r["loss"], r["grad_norm"], r["x_mean"]) for r in records]


def _jsonl(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# 10 batches of 4 per epoch: with accumulation 1 the stop at step 7 is mid-epoch 0 and the run crosses into epoch 1;
# with accumulation 2 (5 steps per epoch) it stops in the middle of epoch 1, between two micro-batch groups.
@pytest.mark.parametrize("num_workers,accumulate", [(0, 1), (2, 1), (0, 2), (2, 2)])
def test_resume_reproduces_uninterrupted_run(tmp_path, num_workers, accumulate):
    cfg = _cfg(num_workers, accumulate)
    full, full_rec, full_state = _train(cfg, tmp_path / "full")
    assert full["stopped"] == "completed" and [r["step"] for r in full_rec] == list(range(1, 13))

    first, first_rec, _ = _train(cfg, tmp_path / "run", stop_at_step=7)
    assert first["stopped"] == "stop_at_step" and first["step"] == 7
    assert _losses(first_rec) == _losses(full_rec[:7])
    _scramble()
    second, second_rec, second_state = _train(cfg, tmp_path / "run", resume="auto")
    assert second["step"] == 12 and [r["step"] for r in second_rec] == list(range(8, 13))
    assert _losses(second_rec) == _losses(full_rec[7:])  # bit for bit
    for k in full_state:
        assert torch.equal(full_state[k], second_state[k]), k  # student and EMA teacher
    # the logs of the two halves read like the uninterrupted run's, validation included
    strip = lambda recs: [{k: v for k, v in r.items() if k != "sec_per_step"} for r in recs]
    assert strip(_jsonl(tmp_path / "run")) == strip(_jsonl(tmp_path / "full"))


def test_data_randomness_does_not_depend_on_workers(tmp_path):
    """Items are seeded from (seed, epoch, index): 0 or 2 workers give the same batches."""
    _, a, _ = _train(_cfg(0), tmp_path / "w0")
    _, b, _ = _train(_cfg(2), tmp_path / "w2")
    assert _losses(a) == _losses(b)


def test_crash_between_checkpoints(tmp_path):
    """A crash after step 7 loses steps 6-7; the resume replays them from step 5 and the logs hold each step once."""
    cfg = _cfg()
    cfg["checkpoint"]["every_n_steps"] = 5
    _, full_rec, _ = _train(cfg, tmp_path / "full")
    with pytest.raises(RuntimeError, match="toy crash at step 7"):
        _train(cfg, tmp_path / "run", task=ToyTask(fail_at_step=7))
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["progress"]["step"] == 5
    _scramble()
    summary, rec, _ = _train(cfg, tmp_path / "run", resume="auto")
    assert summary["stopped"] == "completed"
    assert _losses(rec) == _losses(full_rec[5:])
    logged = [r for r in _jsonl(tmp_path / "run") if r["split"] == "train"]
    assert [r["step"] for r in logged] == list(range(1, 13))
    assert [r["loss"] for r in logged] == [r["loss"] for r in full_rec]


def test_checkpoint_contents_load_with_weights_only(tmp_path):
    cfg = _cfg(accumulate=2)
    summary, _, _ = _train(cfg, tmp_path / "run", stop_at_step=7)
    ck = torch.load(summary["checkpoint"], map_location="cpu", weights_only=True)
    assert ck["format"] == "evforge-trainer/1"
    p = ck["progress"]
    # 7 steps x 2 micro-batches = 14 batches: epoch 1 (10 batches each), 4 batches into it
    assert (p["step"], p["epoch"], p["batch_in_epoch"], p["batches_per_epoch"], p["world_size"]) == (7, 1, 4, 10, 1)
    assert any(k.startswith("teacher.") for k in ck["model"])
    assert ck["optimizer"]["state"] and len(ck["optimizer"]["param_groups"]) == 4
    (rng,) = ck["rng"]
    assert all(torch.is_tensor(v) for v in rng.values()) and {"torch", "numpy_keys", "python", "loader"} <= set(rng)
    assert json.loads(ck["config"])["trainer"]["accumulate_grad_batches"] == 2
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_atomic_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck" / "last.ckpt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()

    def failing_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(path.parent) == ["last.ckpt"]
    assert load_checkpoint(path)["step"] == 1


def test_unsafe_objects_are_refused(tmp_path):
    path = save_checkpoint({"obj": fractions.Fraction(1, 3)}, tmp_path / "bad.ckpt")  # a pickled object
    with pytest.raises(Exception, match="(?i)weights.only"):
        load_checkpoint(path)


def test_manager_rotation(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    assert m.latest() is None
    for step in (10, 20, 30):
        m.save({"step": step}, step, keep=True)
    m.save({"step": 35}, 35)
    assert [p.name for p in m.step_checkpoints()] == ["step-00000020.ckpt", "step-00000030.ckpt"]
    assert load_checkpoint(m.latest())["step"] == 35
    assert load_checkpoint(tmp_path / "step-00000030.ckpt")["step"] == 30


def test_resume_options_and_logs(tmp_path, capsys):
    cfg = _cfg(max_steps=4)
    cfg["log"].update(tensorboard=True, progress="auto")  # not a terminal: one line per logged step
    _train(cfg, tmp_path / "run")
    assert "step 4/4 loss=" in capsys.readouterr().err
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    summary, rec, _ = _train(cfg, tmp_path / "run", resume="auto")  # already complete: nothing to do
    assert summary["stopped"] == "completed" and summary["step"] == 4 and rec == []
    summary, rec, _ = _train(cfg, tmp_path / "run", resume=None)  # fresh: starts over, logs rewritten
    assert [r["step"] for r in rec] == [1, 2, 3, 4]
    assert [r["step"] for r in _jsonl(tmp_path / "run") if r["split"] == "train"] == [1, 2, 3, 4]
    changed = _cfg(max_steps=4)
    changed["schedules"]["aux_weight"] = 0.3
    with pytest.warns(UserWarning, match=r"not an exact continuation: config changed: schedules\.aux_weight"):
        Trainer(changed, ToyTask(), out_dir=tmp_path / "run", resume="auto").close()
    with pytest.raises(InputError, match="no such checkpoint"):
        Trainer(cfg, ToyTask(), out_dir=tmp_path / "x", resume=tmp_path / "missing.ckpt")


class _SignalTask(ToyTask):
    def after_optimizer_step(self, model, state):
        super().after_optimizer_step(model, state)
        if state["step"] == 3:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_stop_signal_checkpoints_and_returns(tmp_path):
    cfg = _cfg(stop_signals=["SIGUSR1"])
    before = signal.getsignal(signal.SIGUSR1)
    summary, rec, _ = _train(cfg, tmp_path / "run", task=_SignalTask())
    assert summary["stopped"] == "signal" and summary["step"] == 3
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["progress"]["step"] == 3
    assert signal.getsignal(signal.SIGUSR1) == before  # handler restored


def test_bf16_mixed_on_cpu(tmp_path):
    summary, rec, _ = _train(_cfg(precision="bf16", max_steps=3), tmp_path / "run")
    assert summary["step"] == 3 and all(np.isfinite(r["loss"]) for r in rec)


class _ZeroBeforeClip(ToyTask):
    """Drops every gradient in the hook that runs before clipping: the clipped norm must then be 0."""

    def before_gradient_clip(self, model, state):
        for p in model.parameters():
            p.grad = None


def test_before_gradient_clip_runs_before_the_norm_is_taken(tmp_path):
    _, records, _ = _train(_cfg(max_steps=2), tmp_path / "run", task=_ZeroBeforeClip())
    assert [r["grad_norm"] for r in records] == [0.0, 0.0]
    _, records, _ = _train(_cfg(max_steps=2), tmp_path / "plain")
    assert all(r["grad_norm"] > 0 for r in records)
