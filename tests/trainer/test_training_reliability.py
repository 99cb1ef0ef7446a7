"""Nothing silently wrong (issue 15) on the training side: configs, run-folder locks, checkpoints, a full disk.

Each test is a mistake or fault that used to pass silently or end in a traceback: a misspelt or mistyped config
key, an override a schedule ignores, two runs into one folder, a truncated or pickled checkpoint, a disk that
fills up while a checkpoint is written. Every shipped config is loaded under the strict rules.
"""

from __future__ import annotations

import errno
import fractions
from pathlib import Path

import pytest
import torch
import yaml

from evforge.errors import InputError, LockedError
from evforge.trainer import Trainer
from evforge.trainer import checkpoint as ckpt_mod
from evforge.trainer.config import ConfigError, check_config, load_config
from evforge.trainer.toy import ToyTask, toy_config

CONFIGS = Path(__file__).resolve().parents[2] / "evforge" / "configs"


def _cfg(**trainer):
    return toy_config(**{"max_steps": 4, **trainer})


def _yaml(tmp_path, cfg) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------------------------------ 7. configs
@pytest.mark.parametrize("edit,message", [
    (lambda c: c["data"].update(batch_sise=8), r"data\.batch_sise: unknown key; did you mean 'batch_size'\?"),
    (lambda c: c.update(foo=1), r"foo: unknown top-level key"),
    (lambda c: c["optim"].update(lr="fast"), r"optim\.lr: expected a number, got 'fast'"),
    (lambda c: c["trainer"].update(max_steps="ten"), r"trainer\.max_steps: expected an integer or null"),
    (lambda c: c["log"].update(progress="sometimes"), r"log\.progress: expected 'auto' or true or false"),
    (lambda c: c["schedules"].update(ema_momentun=0.9), r"schedules\.ema_momentun: unknown key; did you mean "
                                                         r"'ema_momentum'\?"),
    (lambda c: c["checkpoint"].update(every_n_step=2), r"checkpoint\.every_n_step: unknown key; did you mean"),
])
def test_config_mistakes_stop_the_trainer_before_it_starts(tmp_path, edit, message):
    cfg = _cfg()
    edit(cfg)
    with pytest.raises(ConfigError, match=message):
        Trainer(cfg, ToyTask(), out_dir=tmp_path / "run", resume=None)
    assert not (tmp_path / "run").exists()  # nothing was written


def test_override_that_a_schedule_replaces_is_an_error(tmp_path):
    path = _yaml(tmp_path, _cfg())
    with pytest.raises(ConfigError, match=r"optim\.lr: this config schedules it \(schedules\.lr = .*override the "
                                          r"schedule"):
        load_config(path, ["optim.lr=0.5"])
    with pytest.raises(ConfigError, match=r"optim\.weight_decay: .*schedules\.weight_decay"):
        load_config(path, ["optim.weight_decay=0.1"])
    cfg = load_config(path, ["schedules.lr=0.5"])  # the schedule itself, or a config without one, is fine
    assert cfg["schedules"]["lr"] == 0.5
    no_schedule = _cfg()
    del no_schedule["schedules"]["lr"]
    assert load_config(_yaml(tmp_path, no_schedule), ["optim.lr=0.5"])["optim"]["lr"] == 0.5


def _task_checks(cfg: dict):
    """The task's own option checks (what build_model runs first), without building the network."""
    name = (cfg.get("task") or {}).get("name")
    if name is None:
        return None
    if name == "ecddp":
        from evforge.pretrain.ecddp.model import ECDDPConfig
        from evforge.pretrain.ecddp.task import ECDDPTask, task_options

        ECDDPConfig.from_dict(task_options(cfg)["model"])
        return ECDDPTask()
    if name in ("mem", "mem_dvae"):
        from evforge.pretrain import get_task

        task = get_task(name)
        task.input_config(cfg)
        return task
    from evforge.finetune import get_task

    task = get_task(name)
    if name == "classification":
        task.options(cfg)
    else:
        from evforge.finetune.segmentation import task_options

        task_options(cfg)
    return task


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_shipped_config_loads_under_the_strict_rules(path):
    cfg = load_config(path)
    task = _task_checks(cfg)
    check_config(cfg, getattr(task, "config_keys", None))


# ------------------------------------------------------------------------------------------- 6. locks
def test_two_runs_into_one_folder_are_refused(tmp_path):
    first = Trainer(_cfg(), ToyTask(), out_dir=tmp_path / "run", resume=None, command="evforge pretrain first")
    try:
        with pytest.raises(LockedError, match=r"run: locked by another evforge run \(pid \d+ .*'evforge pretrain "
                                              r"first'"):
            Trainer(_cfg(), ToyTask(), out_dir=tmp_path / "run", resume=None)
        first.fit()
    finally:
        first.close()
    with Trainer(_cfg(), ToyTask(), out_dir=tmp_path / "run", resume="auto") as second:  # free again
        assert second.fit()["stopped"] == "completed"


def test_a_failed_start_releases_the_lock(tmp_path):
    with pytest.raises(InputError, match="no such checkpoint"):
        Trainer(_cfg(), ToyTask(), out_dir=tmp_path / "run", resume=tmp_path / "missing.ckpt")
    Trainer(_cfg(), ToyTask(), out_dir=tmp_path / "run", resume=None).close()


# -------------------------------------------------------------------------------------- 10. checkpoints
def test_truncated_checkpoint_on_resume_is_one_line_naming_it(tmp_path):
    with Trainer(_cfg(), ToyTask(), out_dir=tmp_path / "run", resume=None) as tr:
        tr.fit()
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(InputError) as info:
        Trainer(_cfg(), ToyTask(), out_dir=tmp_path / "run", resume="auto")
    assert str(info.value).startswith(f"{last}: not a readable checkpoint: truncated or damaged")
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


def test_pickled_checkpoint_is_refused_without_advice_to_unpickle(tmp_path):
    bad = tmp_path / "pickled.ckpt"
    torch.save({"model": {}, "payload": fractions.Fraction(1, 3)}, bad)  # any object loading would construct
    with pytest.raises(InputError) as info:
        Trainer(_cfg(), ToyTask(), out_dir=tmp_path / "run", resume=bad)
    assert str(info.value) == (f"{bad}: holds pickled Python objects, which evforge does not load (checkpoints are "
                               f"read with weights_only=True); it was not written by evforge's trainer")


# -------------------------------------------------------------------------------------- disk full (Show)
class _FullDisk:
    """A file whose writes fail with ENOSPC after ``room`` bytes, as a full disk's do."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data):
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_while_checkpointing_pretrain(tmp_path, monkeypatch, capsys):
    """``evforge pretrain`` (here on the toy task) when the disk fills up during the second checkpoint: one line
    naming the checkpoint, exit code 3, no temp file, the first checkpoint intact, and the rerun resumes from it."""
    from evforge import pretrain
    from evforge.cli import main

    monkeypatch.setattr(pretrain, "get_task", lambda name: ToyTask())
    cfg = _cfg(max_steps=6)
    cfg["checkpoint"] = {"every_n_steps": 2, "every_n_epochs": None}
    config = _yaml(tmp_path, cfg)
    saves = []

    def full_disk_open(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        saves.append(path)
        return _FullDisk(f, 2000) if len(saves) == 2 else f

    monkeypatch.setattr(ckpt_mod, "open", full_disk_open, raising=False)
    run = tmp_path / "run"
    rc = main(["pretrain", "--config", str(config), "--out", str(run)])
    err = capsys.readouterr().err
    last = run / "checkpoints" / "last.ckpt"
    assert rc == 3 and err == f"evforge: error: {last}: disk full (no space left on device)\n"
    assert not [p for p in run.rglob("*") if "tmp" in p.name]
    assert ckpt_mod.load_checkpoint(last)["progress"]["step"] == 2
    monkeypatch.setattr(ckpt_mod, "open", open, raising=False)
    assert main(["pretrain", "--config", str(config), "--out", str(run)]) == 0
    assert ckpt_mod.load_checkpoint(last)["progress"]["step"] == 6
    assert "completed at step 6" in capsys.readouterr().out
