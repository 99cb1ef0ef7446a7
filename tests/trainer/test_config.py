"""Config loading: defaults, _base_ inheritance, --set overrides and their errors, saving and hashing."""

from __future__ import annotations

import pytest
import yaml

from evforge.errors import InputError
from evforge.trainer.config import DEFAULTS, ConfigError, check_keys, config_hash, load_config, parse_value, save_config


def _write(path, text):
    path.write_text(text)
    return path


def test_defaults_file_and_overrides(tmp_path):
    p = _write(tmp_path / "run.yaml", "trainer:\n  max_steps: 10\ntask:\n  name: mem\n  depth: 12\n"
                                      "optim:\n  lr: 5e-4\n")
    cfg = load_config(p, ["trainer.precision=bf16-mixed", "task.depth=6", "task.new_key=[1, 2]",
                          "data.shuffle=false", "optim.lr_scales={patch_embed: 0.2}", "seed=3"])
    assert cfg["trainer"]["max_steps"] == 10
    assert cfg["trainer"]["precision"] == "bf16-mixed"  # from an override, the file has no such key
    assert cfg["trainer"]["accumulate_grad_batches"] == DEFAULTS["trainer"]["accumulate_grad_batches"]
    assert cfg["task"] == {"name": "mem", "depth": 6, "new_key": [1, 2]}  # unknown task keys are fine
    assert cfg["data"]["shuffle"] is False and cfg["seed"] == 3
    assert cfg["optim"]["lr"] == 5e-4 and isinstance(cfg["optim"]["lr"], float)  # 5e-4 is a float, not a str
    assert cfg["optim"]["lr_scales"] == {"patch_embed": 0.2}
    assert DEFAULTS["trainer"]["precision"] == "32-true"  # defaults are not mutated
    assert load_config(p, defaults={}) == yaml.safe_load(p.read_text()) | {"optim": {"lr": 5e-4}}


@pytest.mark.parametrize("text,value", [("3", 3), ("1e-3", 1e-3), ("-2.5E+2", -250.0), ("true", True),
                                        ("null", None), ("[1, 2]", [1, 2]), ("cosine", "cosine"),
                                        ("'5'", "5"), ("16-mixed", "16-mixed")])
def test_parse_value(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_base_inheritance(tmp_path):
    (tmp_path / "base").mkdir()
    _write(tmp_path / "base" / "common.yaml", "seed: 1\ntask: {depth: 12, heads: 6}\ndata: {batch_size: 64}\n")
    _write(tmp_path / "base" / "more.yaml", "_base_: common.yaml\ntask: {heads: 8}\nschedules: {lr: 0.1}\n")
    p = _write(tmp_path / "run.yaml", "_base_: [base/more.yaml]\ntask: {depth: 6}\nschedules: {teacher_temp: 0.04}\n")
    cfg = load_config(p, ["data.batch_size=8"])
    assert cfg["seed"] == 1
    assert cfg["task"] == {"depth": 6, "heads": 8}  # deep merge, later files win
    assert cfg["schedules"] == {"lr": 0.1, "teacher_temp": 0.04}
    assert cfg["data"]["batch_size"] == 8 and "_base_" not in cfg


def test_override_errors_name_the_key(tmp_path):
    p = _write(tmp_path / "run.yaml", "task: {depth: 12}\n")
    with pytest.raises(ConfigError, match=r"trainr\.max_steps.*'trainr'.*did you mean 'trainer'"):
        load_config(p, ["trainr.max_steps=5"])
    with pytest.raises(ConfigError, match=r"task\.depth\.x: 'task\.depth' is a int"):
        load_config(p, ["task.depth.x=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(p, ["trainer.max_steps"])
    with pytest.raises(ConfigError, match="empty name"):
        load_config(p, ["trainer..max_steps=1"])


def test_file_errors(tmp_path):
    with pytest.raises(InputError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(InputError, match="invalid YAML"):
        load_config(_write(tmp_path / "bad.yaml", "a: [1, 2\n"))
    with pytest.raises(InputError, match="mapping at the top level"):
        load_config(_write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    _write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    _write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(InputError, match="_base_ cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(InputError, match="no such config file"):
        load_config(_write(tmp_path / "c.yaml", "_base_: nope.yaml\n"))


def test_strict_sections(tmp_path):
    cfg = load_config(_write(tmp_path / "run.yaml", "{}"), ["trainer.acumulate_grad_batches=2"])
    with pytest.raises(ConfigError, match="trainer.acumulate_grad_batches: unknown key.*accumulate_grad_batches"):
        check_keys(cfg)
    with pytest.raises(ConfigError, match="data.root: unknown key"):  # every section is strict now
        check_keys(load_config(tmp_path / "run.yaml", ["data.root=/x"]))


def test_save_and_hash(tmp_path):
    cfg = load_config(_write(tmp_path / "run.yaml", "task: {a: 1, b: [1, 2]}\n"), ["optim.lr=2e-4"])
    save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(tmp_path / "out" / "config.yaml", defaults={})
    assert again == cfg
    assert config_hash(again) == config_hash(cfg) and len(config_hash(cfg)) == 16
    reordered = {k: cfg[k] for k in reversed(list(cfg))}
    assert config_hash(reordered) == config_hash(cfg)
    assert config_hash(load_config(tmp_path / "run.yaml", ["optim.lr=3e-4"])) != config_hash(cfg)
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_example_config_is_valid():
    from pathlib import Path

    from evforge.trainer.schedules import Schedules

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "trainer_example.yaml",
                      ["trainer.max_steps=10"])
    check_keys(cfg)
    sch = Schedules(cfg["schedules"], steps_per_epoch=100, total_steps=30000, global_batch=1024)
    assert sch.at(1000)["lr"] == pytest.approx(2e-3) and sch.at(3000)["teacher_temp"] == pytest.approx(0.07)


def test_fabric_kwargs_from_launchers():
    from evforge.trainer.launch import fabric_kwargs

    t = DEFAULTS["trainer"]
    assert fabric_kwargs(t, {}) == {"accelerator": "auto", "strategy": "auto", "devices": "auto",
                                         "num_nodes": 1, "precision": "32-true"}
    torchrun = {"LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1"}
    assert (fabric_kwargs(t, torchrun)["devices"], fabric_kwargs(t, torchrun)["num_nodes"]) == (4, 2)
    slurm = {"SLURM_NTASKS": "32", "SLURM_NTASKS_PER_NODE": "8(x4)", "SLURM_NNODES": "4", "SLURM_JOB_NAME": "pre"}
    assert (fabric_kwargs(t, slurm)["devices"], fabric_kwargs(t, slurm)["num_nodes"]) == (8, 4)
    interactive = {**slurm, "SLURM_JOB_NAME": "bash"}
    assert fabric_kwargs(t, interactive)["devices"] == "auto"
    explicit = {**t, "devices": 2, "num_nodes": 1, "precision": "bf16"}
    assert fabric_kwargs(explicit, torchrun) == {**fabric_kwargs(explicit, {}), "precision": "bf16-mixed"}
    assert fabric_kwargs({**t, "precision": "fp16"}, {})["precision"] == "16-mixed"
    with pytest.raises(ConfigError, match="trainer.precision"):
        fabric_kwargs({**t, "precision": "fp8"}, {})
    with pytest.raises(ConfigError, match="trainer.num_nodes"):
        fabric_kwargs({**t, "num_nodes": 0}, {})


def test_model_configs_refuse_unknown_fields():
    """MEM, dVAE and ECDDP model configs share one check: the unknown key and the known ones are named."""
    from evforge.pretrain.ecddp.model import ECDDPConfig
    from evforge.pretrain.mem.dvae import DVAEConfig
    from evforge.pretrain.mem.model import MEMConfig

    for cls, name in ((MEMConfig, "MEM"), (DVAEConfig, "tokenizer"), (ECDDPConfig, "ECDDP")):
        with pytest.raises(ConfigError, match=rf"task\.model \({name}\): unknown options \['dpeth'\] \(known: \['"):
            cls.from_dict({"dpeth": 12})
    assert MEMConfig.from_dict({"drop_path_rate": 0.2}).drop_path_rate == 0.2
