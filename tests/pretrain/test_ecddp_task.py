"""ECDDP on the shared trainer, on stream shards made by the real chain (scenes -> simulate -> convert)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import evforge
from evforge.cli import main
from evforge.data.representations import voxel_grid
from evforge.export import export_backbone, load_backbone, read_backbone
from evforge.pretrain.ecddp.task import ECDDPTask
from evforge.trainer.config import load_config
from evforge.trainer.trainer import Trainer

CONFIG = str(Path(evforge.__file__).resolve().parent / "configs" / "pretrain" / "ecddp_tiny.yaml")
REFERENCE_CONFIG = CONFIG.replace("ecddp_tiny.yaml", "ecddp_tiny_reference.yaml")


@pytest.fixture(scope="module")
def streams(tmp_path_factory, make_stream_dataset):
    return make_stream_dataset(tmp_path_factory.mktemp("ecddp"))


def _cfg(streams, *extra, config=CONFIG):
    return load_config(config, [f"data.path={streams}", "log.progress=false", "log.tensorboard=false",
                                "checkpoint.every_n_steps=null", *extra])


def _losses(out_dir):
    rows = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("split", "train") == "train" and "loss" in r}


def test_loss_goes_down_over_a_few_dozen_cpu_steps(streams, tmp_path):
    cfg = _cfg(streams, "trainer.max_steps=30", "trainer.log_every_n_steps=1")
    with Trainer(cfg, ECDDPTask(), out_dir=tmp_path / "run", resume=None) as trainer:
        summary = trainer.fit()
    losses = _losses(tmp_path / "run")
    assert summary["step"] == 30 and len(losses) == 30
    values = np.array([losses[s] for s in sorted(losses)])
    assert np.isfinite(values).all()
    assert values[-10:].mean() < values[:5].mean() - 0.2, values.round(2)


def test_killed_and_resumed_run_reproduces_the_next_losses(streams, tmp_path):
    cfg = _cfg(streams, "trainer.max_steps=6", "trainer.log_every_n_steps=1")
    with Trainer(cfg, ECDDPTask(), out_dir=tmp_path / "full", resume=None) as trainer:
        trainer.fit()
    with Trainer(cfg, ECDDPTask(), out_dir=tmp_path / "killed", resume=None) as trainer:
        trainer.fit(stop_at_step=3)  # checkpoints and stops, as a run killed after step 3 would have
    with Trainer(cfg, ECDDPTask(), out_dir=tmp_path / "killed", resume="auto") as trainer:
        trainer.fit()
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "killed")
    assert [full[s] for s in (4, 5, 6)] == [resumed[s] for s in (4, 5, 6)]
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_backbone_loads_into_timm(streams, tmp_path):
    cfg = _cfg(streams, "trainer.max_steps=2")
    with Trainer(cfg, ECDDPTask(), out_dir=tmp_path / "run", resume=None) as trainer:
        ckpt = trainer.fit()["checkpoint"]
    out = export_backbone(ckpt, tmp_path / "backbone.safetensors")
    tensors, meta = read_backbone(out)
    assert meta["method"] == "ecddp" and meta["in_chans"] == 6 and meta["which"] == "teacher"
    model = load_backbone(out, num_classes=3)  # strict apart from the new head
    state = torch.load(ckpt, weights_only=True)["model"]
    sd = model.state_dict()
    assert torch.equal(sd["patch_embed.proj.weight"], state["teacher.backbone.swin.patch_embed.proj.weight"])
    assert torch.equal(sd["norm.weight"], state["teacher.backbone.stage_norms.3.weight"])
    assert model(torch.zeros(1, 6, 224, 224)).shape == (1, 3)


def test_legacy_off_weight_flag_reaches_the_voxels(streams):
    task = ECDDPTask()
    for legacy in (False, True):
        cfg = _cfg(streams, f"task.legacy_off_weight_zero={str(legacy).lower()}", "task.input_size=10000")
        model = task.build_model(cfg)
        ds = task.build_dataset(cfg, "train")
        batch = task.collate([ds[0], ds[1]])
        g = torch.Generator().manual_seed(0)
        W, H = ds.sensor_size
        expected = voxel_grid(batch, bins=6, height=H, width=W, off_weight=0.0 if legacy else -1.0)
        assert torch.equal(task.inputs(model, batch, cfg, g), expected)


def test_pretrain_and_export_cli(streams, tmp_path, capsys):
    args = ["pretrain", "--config", CONFIG, "--set", f"data.path={streams}", "--set", "trainer.max_steps=2",
            "--set", "log.progress=false", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    assert "step 2" in capsys.readouterr().out
    # a rerun with more steps resumes from the checkpoint instead of starting over
    with pytest.warns(UserWarning, match="config changed: trainer.max_steps"):
        assert main(args[:-2] + ["--set", "trainer.max_steps=3", "--out", str(tmp_path / "run")]) == 0
    assert max(_losses(tmp_path / "run")) == 3
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert main(["export-backbone", str(ckpt), "--out", str(tmp_path / "b.safetensors")]) == 0
    assert main(["export-backbone", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "c.safetensors")]) == 2


def test_reference_recipe_trains_with_the_public_options(streams, tmp_path):
    """The public code's recipe at toy size: its options reach the model and task, and a few steps train."""
    cfg = _cfg(streams, "trainer.max_steps=4", "trainer.log_every_n_steps=1", config=REFERENCE_CONFIG)
    task = ECDDPTask()
    with Trainer(cfg, task, out_dir=tmp_path / "run", resume=None) as trainer:
        m = trainer.raw_model
        assert (m.cfg.crop_mode, m.cfg.kmeans_init, m.cfg.kmeans_reseed_empty) == ("reference", "random", False)
        assert m.cfg.always_partition and not m.cfg.mask_padded_keys and m.cfg.legacy_mask_ratio
        g = m.student["image_head"].last_layer.parametrizations.weight.original0
        assert g.requires_grad  # public: prototype norms trainable
        assert (task.opts["time_norm"], task.opts["ema_timing"]) == ("crop", "before_forward")
        teacher0 = {k: v.clone() for k, v in m.teacher.state_dict().items()}
        trainer.fit()
        moved = [k for k, v in m.teacher.state_dict().items() if not torch.equal(v, teacher0[k])]
    losses = _losses(tmp_path / "run")
    assert sorted(losses) == [1, 2, 3, 4] and np.isfinite(list(losses.values())).all()
    assert moved  # the teacher follows the student (updated at the start of steps 2-4)
