"""MEM (tokenizer + masked event modelling) on the shared trainer, on samples shards made by the real chain
(synthetic N-Caltech101-layout recordings -> the ncaltech101 converter), as ``evforge demo`` builds them."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import evforge
from evforge.cli import main
from evforge.dataset_builder.build import build_dataset
from evforge.dataset_builder.synthetic import make_synthetic_classification
from evforge.errors import InputError
from evforge.export import export_backbone, load_backbone, read_backbone
from evforge.pretrain import get_task
from evforge.pretrain.mem import (BEiTMaskGenerator, DiscreteVAE, DVAEConfig, MEMConfig, MEMModel,
                                  RandomMaskGenerator, patchify)
from evforge.pretrain.mem.demo import pretrain_mem
from evforge.pretrain.mem.dvae import ResBlock
from evforge.pretrain.mem.task import MEMDVAETask, MEMTask, mem_model_config
from evforge.trainer.config import load_config
from evforge.trainer.trainer import Trainer

CONFIGS = Path(evforge.__file__).resolve().parent / "configs" / "pretrain"
TINY_TOKENS = 64  # mem_dvae_tiny's codebook: chance accuracy 1/64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Toy models gain nothing from intra-op threads, and on a loaded machine OpenMP's spinning threads make
    them 10-50x slower: run this module single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem")
    raw = make_synthetic_classification(root / "raw", per_class=6, size=(64, 48), seed=0)
    report = build_dataset("ncaltech101", raw, root / "ds", val_fraction=0.25, seed=0, sensor_size=(64, 48),
                           progress=False)
    assert report.num_errors == 0 and report.splits == {"train": 18, "val": 6}
    return report.out


def _cfg(name, dataset, *extra):
    return load_config(CONFIGS / name, [f"data.path={dataset}", "log.progress=false", "log.tensorboard=false",
                                        "checkpoint.every_n_steps=null", "trainer.log_every_n_steps=1", *extra])


def _rows(out_dir, split="train"):
    rows = [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") == split]


@pytest.fixture(scope="module")
def tokenizer_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("dvae_run")
    cfg = _cfg("mem_dvae_tiny.yaml", dataset, "trainer.max_steps=30", "trainer.val_every_n_steps=10")
    with Trainer(cfg, get_task("mem_dvae"), out_dir=out, resume=None) as trainer:
        summary = trainer.fit()
    return out, summary


def _mem_cfg(dataset, tokenizer_run, *extra):
    return _cfg("mem_tiny.yaml", dataset, f"task.tokenizer={tokenizer_run[1]['checkpoint']}", *extra)


@pytest.fixture(scope="module")
def mem_run(dataset, tokenizer_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("mem_run")
    cfg = _mem_cfg(dataset, tokenizer_run, "trainer.max_steps=40", "trainer.val_every_n_steps=40")
    with Trainer(cfg, get_task("mem"), out_dir=out, resume=None) as trainer:
        summary = trainer.fit()
    return out, summary


# ------------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_reconstruction_falls_and_codebook_usage_is_reported(tokenizer_run):
    out, summary = tokenizer_run
    train = _rows(out)
    assert summary["step"] == 30 and len(train) == 30
    mse = np.array([r["recon_mse"] for r in train])
    assert np.isfinite(mse).all()
    assert mse[-10:].mean() < 0.7 * mse[:5].mean(), mse.round(4)
    tau = [r["gumbel_tau"] for r in train]  # annealed by the trainer schedule
    assert tau[0] == pytest.approx(1.0) and tau[-1] < tau[0] and min(tau) >= 0.5
    val = _rows(out, "val")
    assert [r["step"] for r in val] == [10, 20, 30]
    for r in val:
        assert 0 < r["codebook_usage"] <= 1 and 1 <= r["codebook_perplexity"] <= TINY_TOKENS
        assert math.isfinite(r["recon_mse"]) and r["loss"] == pytest.approx(r["recon_mse"], rel=1e-6)
    assert val[-1]["recon_mse"] < val[0]["recon_mse"]


def test_tokenizer_has_mems_architecture():
    cfg = load_config(CONFIGS / "mem_dvae.yaml")
    task = MEMDVAETask()
    vae = task.build_model(cfg)
    convs = [m for m in vae.encoder.modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(384, (4, 4))] * 4
    assert sum(isinstance(m, ResBlock) for m in vae.encoder) == 3 == sum(isinstance(m, ResBlock) for m in vae.decoder)
    assert tuple(vae.codebook.weight.shape) == (8192, 32) and vae.cfg.kl_weight == 1e-10
    assert vae.cfg.image_size == 224 and vae.cfg.grid == 14 and vae.cfg.channels == 3
    # relaxed codes in training, hard argmax codes at eval; targets are (B, h*w)
    small = DiscreteVAE(DVAEConfig(image_size=32, num_layers=2, hidden_dim=8, num_resnet_blocks=1, num_tokens=16,
                                   code_dim=4))
    img = torch.rand(2, 3, 32, 32)
    ids = small.get_codebook_indices(img)
    assert ids.shape == (2, 64) and ids.dtype == torch.int64
    small.eval()
    loss, parts, recon = small(img, return_recon=True)
    assert torch.equal(recon, small.decode(ids))
    with pytest.raises(ValueError, match=r"takes \(B, 3, 32, 32\)"):
        small(torch.rand(2, 2, 32, 32))


# ------------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("grid, count, min_patches", [(14, 98, 16), (8, 32, 4)])
def test_block_masks_hit_the_ratio_and_block_constraints(grid, count, min_patches):
    gen = BEiTMaskGenerator(grid, count, min_num_patches=min_patches)
    masks = gen(400, torch.Generator().manual_seed(0))
    assert masks.shape == (400, grid * grid) and masks.dtype == torch.bool
    n = masks.sum(1)
    assert (n <= count).all()  # a block never overshoots the budget
    assert n.float().mean() >= 0.97 * count and (n == count).float().mean() >= 0.6
    assert torch.equal(masks, gen(400, torch.Generator().manual_seed(0)))  # a function of the generator
    rng = random.Random(1)
    lo, hi = gen.log_aspect
    for _ in range(50):
        mask, blocks = gen.sample(count, rng, return_blocks=True)
        painted = np.zeros_like(mask)
        for top, left, h, w, ar in blocks:
            assert 1 <= h < grid and 1 <= w < grid and top + h <= grid and left + w <= grid
            assert math.exp(lo) - 1e-9 <= ar <= math.exp(hi) + 1e-9  # drawn aspect (h/w) in [0.3, 1/0.3]
            assert (h - 0.5) / (w + 0.5) <= ar <= (h + 0.5) / max(w - 0.5, 1e-9)  # h, w are its rounding
            assert h * w <= count
            painted[top:top + h, left:left + w] = True
        assert np.array_equal(painted, mask)  # the mask is exactly the union of rectangles
    rand = RandomMaskGenerator(grid, count)(50, torch.Generator().manual_seed(0))
    assert (rand.sum(1) == count).all() and rand[:, -1].any()  # MEM's version never masks the last patch


# ---------------------------------------------------------------------------------------------------- MEM
def test_masked_token_accuracy_rises_above_chance(mem_run):
    out, summary = mem_run
    acc = np.array([r["mlm_acc"] for r in _rows(out)])
    loss = np.array([r["loss"] for r in _rows(out)])
    assert summary["step"] == 40 and len(acc) == 40
    chance = 1 / TINY_TOKENS
    assert acc[-10:].mean() > 8 * chance, acc.round(3)
    assert acc[-10:].mean() > acc[:3].mean() + 0.2, acc.round(3)
    assert loss[-10:].mean() < loss[:3].mean() - 1.0, loss.round(2)
    val = summary["val"]
    assert val["mlm_acc"] > 8 * chance and val["n_masked"] == pytest.approx(32, abs=2)


@pytest.mark.parametrize("config", ["mem_dvae_tiny.yaml", "mem_tiny.yaml"])
def test_killed_and_resumed_run_reproduces_the_next_losses(config, dataset, tokenizer_run, tmp_path):
    name = "mem" if config == "mem_tiny.yaml" else "mem_dvae"
    extra = [f"task.tokenizer={tokenizer_run[1]['checkpoint']}"] if name == "mem" else []
    cfg = _cfg(config, dataset, "trainer.max_steps=6", "trainer.val_every_n_steps=null", *extra)
    with Trainer(cfg, get_task(name), out_dir=tmp_path / "full", resume=None) as trainer:
        trainer.fit()
    with Trainer(cfg, get_task(name), out_dir=tmp_path / "killed", resume=None) as trainer:
        trainer.fit(stop_at_step=3)  # checkpoints and stops, as a run killed after step 3 would have
    with Trainer(cfg, get_task(name), out_dir=tmp_path / "killed", resume="auto") as trainer:
        trainer.fit()
    full = {r["step"]: r["loss"] for r in _rows(tmp_path / "full")}
    resumed = {r["step"]: r["loss"] for r in _rows(tmp_path / "killed")}
    assert [full[s] for s in (4, 5, 6)] == [resumed[s] for s in (4, 5, 6)]
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if name == "mem":  # the frozen tokenizer stays out of MEM's checkpoint
        assert all(k.startswith(("vit.", "mask_token", "head.")) for k in a)


def test_export_backbone_loads_into_timm(mem_run, tmp_path):
    ckpt = mem_run[1]["checkpoint"]
    out = export_backbone(ckpt, tmp_path / "backbone.safetensors")
    tensors, meta = read_backbone(out)
    assert meta["method"] == "mem" and meta["in_chans"] == 3 and meta["arch"] == "vit_tiny_patch16_224"
    assert meta["timm_kwargs"] == {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2,
                                   "mlp_ratio": 2.0, "init_values": 0.1}
    model = load_backbone(out, num_classes=4)  # strict apart from the new head
    state = torch.load(ckpt, weights_only=True)["model"]
    sd = model.state_dict()
    assert all(torch.equal(sd[k[len("vit."):]], v) for k, v in state.items() if k.startswith("vit."))
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 4)
    with pytest.raises(ValueError, match="no neck"):
        export_backbone(ckpt, tmp_path / "b2.safetensors", with_neck=True)


def test_channel_count_is_checked_from_data_to_tokenizer_to_model(dataset, tokenizer_run, tmp_path):
    with pytest.raises(ValueError, match=r"in_chans = 2, but the tokenizer .* trained on 3-channel images"):
        MEMTask().build_model(_mem_cfg(dataset, tokenizer_run, "task.model.in_chans=2"))
    with pytest.raises(ValueError, match=r"patch_size = 16, but the tokenizer .* 8x8 pixels"):
        MEMTask().build_model(_mem_cfg(dataset, tokenizer_run, "task.model.patch_size=16"))
    with pytest.raises(ValueError, match="channels = 2, but MEM's event images have 3 channels"):
        MEMDVAETask().build_model(_cfg("mem_dvae_tiny.yaml", dataset, "task.model.channels=2"))
    state = torch.load(tokenizer_run[1]["checkpoint"], weights_only=True)
    ck = tmp_path / "not_a_tokenizer.ckpt"
    torch.save({**state, "config": json.dumps({"task": {"name": "mem"}})}, ck)
    with pytest.raises(InputError, match="not a tokenizer checkpoint"):  # e.g. a MEM checkpoint
        MEMTask().build_model(_mem_cfg(dataset, tokenizer_run, f"task.tokenizer={ck}"))
    with pytest.raises(InputError, match="no such tokenizer checkpoint"):
        MEMTask().build_model(_mem_cfg(dataset, tokenizer_run, "task.tokenizer=/nonexistent/last.ckpt"))


def test_event_pipeline_gives_mems_images(dataset, tokenizer_run):
    task = MEMTask()
    cfg = _mem_cfg(dataset, tokenizer_run)
    task.build_model(cfg)
    ds = task.build_dataset(cfg, "train")
    batch = task.collate([ds[i] for i in range(4)])
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    img = task.images(batch, train=True, generator=g())
    assert img.shape == (4, 3, 64, 64) and torch.equal(img, task.images(batch, train=True, generator=g()))
    assert (img[:, 1] == 0).all() and img[:, 0::2].amax(dim=(1, 2, 3)).allclose(torch.ones(4))  # max-normalised
    val = task.images(batch, train=False, generator=g())  # window only, no flips/shifts
    assert not torch.equal(val, img)
    task.cfg["task"]["train_resize"] = [72, 96]  # N-ImageNet style: resize, then a random image_size crop
    crop = task.images(batch, train=True, generator=g())
    assert crop.shape == (4, 3, 64, 64) and not torch.equal(crop, img)
    assert task.images(batch, train=False, generator=g()).allclose(val)  # validation resizes directly


def test_mae_variant_regresses_masked_pixels(dataset, tmp_path):
    img = torch.rand(2, 3, 16, 16)
    p = patchify(img, 8)
    assert p.shape == (2, 4, 192) and torch.equal(p[0, 1], img[0, :, 0:8, 8:16].permute(1, 2, 0).reshape(-1))
    # normalised-pixel targets: a zero prediction scores the per-patch variance of the target, (n - 1) / n
    model = MEMModel(MEMConfig(variant="vit_tiny_patch16_224", img_size=16, patch_size=8, objective="mae",
                               norm_pix_loss=True, vit_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2}))
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    loss, logs = model(img, torch.tensor([[True, False, True, True], [False, True, False, False]]))
    assert float(loss.detach()) == pytest.approx(191 / 192, rel=1e-4) and logs["n_masked"] == 2.0
    cfg = _cfg("mem_tiny.yaml", dataset, "task.model.objective=mae", "task.tokenizer=null", "trainer.max_steps=8",
               "trainer.val_every_n_steps=8")  # MEM's --mae runs use raw pixels (norm_pix_loss=0)
    with Trainer(cfg, get_task("mem"), out_dir=tmp_path / "mae", resume=None) as trainer:
        summary = trainer.fit()
    loss = [r["loss"] for r in _rows(tmp_path / "mae")]
    assert all(map(math.isfinite, loss)) and np.mean(loss[-3:]) < 0.8 * np.mean(loss[:3]), loss
    assert "mlm_acc" not in summary["val"] and math.isfinite(summary["val"]["loss"])


# ------------------------------------------------------------------------------------- configs, demo, CLI
def test_paper_configs_hold_mems_settings():
    cal = load_config(CONFIGS / "mem_ncaltech101.yaml")
    cars = load_config(CONFIGS / "mem_ncars.yaml")
    imnet = load_config(CONFIGS / "mem_nimagenet.yaml")
    dvae = load_config(CONFIGS / "mem_dvae.yaml")
    for cfg in (cal, cars, imnet):
        m = mem_model_config(cfg)
        assert (m.variant, m.img_size, m.patch_size, m.in_chans, m.grid) == ("vit_base_patch16_224", 224, 16, 3, 14)
        assert cfg["task"]["mask"]["num_patches"] == 98 and cfg["task"]["max_events"] == 30000
        assert cfg["optim"]["betas"] == [0.9, 0.95] and cfg["schedules"]["weight_decay"] == 0.05
        assert cfg["schedules"]["lr"]["warmup_cosine"]["warmup_steps"] == 1000
    assert (cal["trainer"]["epochs"], imnet["trainer"]["epochs"]) == (3000, 300)
    assert (cal["trainer"]["grad_clip"], cars["trainer"]["grad_clip"], imnet["trainer"]["grad_clip"]) == (30, 30, 1)
    assert imnet["schedules"]["lr"]["warmup_cosine"]["peak"] == 7.5e-5
    assert cars["data"]["val_split"] == "test" and imnet["task"]["train_resize"] == [256, 341]
    t = DVAEConfig.from_dict({**dvae["task"]["model"], "image_size": dvae["task"]["image_size"]})
    assert t.downsample == 16 and t.channels == 3 and t.num_tokens == 8192
    assert dvae["optim"]["name"] == "adam" and dvae["trainer"]["grad_clip"] == 0.01


def test_demo_helper_and_cli(dataset, tmp_path, capsys):
    lines = []
    backbone = pretrain_mem(dataset, tmp_path / "demo", dvae_steps=2, mem_steps=2, device="cpu", progress=False,
                            log=lines.append)
    assert backbone.is_file() and len(lines) == 2 and "codebook usage" in lines[0]
    assert load_backbone(backbone)(torch.rand(1, 3, 64, 64)).shape == (1, 64)
    args = ["pretrain", "--config", "configs/pretrain/mem_dvae_tiny.yaml", "--set", f"data.path={dataset}",
            "--set", "trainer.max_steps=2", "--set", "log.progress=false", "--out", str(tmp_path / "cli")]
    assert main(args) == 0
    assert "step 2" in capsys.readouterr().out
