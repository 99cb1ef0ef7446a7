"""MEM (tokenizer + masked event modelling) on the shared trainer, on samples shards made by the real chain
(synthetic N-Caltech101-layout recordings -> the ncaltech101 converter), as ``evforge demo`` builds them: the
codebook-usage target, masked-token accuracy against the majority-code share, exact resume, the configs and a
few steps of the reference recipe. Parity with the public code: ``test_mem_reference.py``."""

import json
import logging
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import evforge
from evforge.cli import main
from evforge.errors import InputError
from evforge.export import export_backbone, load_backbone, read_backbone
from evforge.pretrain import get_task
from evforge.pretrain.mem import (
    BEiTMaskGenerator,
    DiscreteVAE,
    DVAEConfig,
    MEMConfig,
    MEMModel,
    RandomMaskGenerator,
    patchify,
)
from evforge.pretrain.mem.demo import pretrain_mem
from evforge.pretrain.mem.dvae import ResBlock
from evforge.pretrain.mem.randaugment import ColorJitterConfig
from evforge.pretrain.mem.restart import CodeRestartConfig, CodeRestarter
from evforge.pretrain.mem.task import (
    MEMDVAETask,
    MEMTask,
    _dvae_config,
    load_tokenizer,
    mem_gumbel_tau,
    mem_model_config,
)
from evforge.trainer.config import load_config
from evforge.trainer.schedules import make_schedule
from evforge.trainer.task import keys_generator
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
def dataset(shapes_dataset):
    """The demo's synthetic classification set (four shapes, 64 x 48 sensor, 300 train / 100 val; tests/conftest.py),
    on which mem_dvae_tiny's codebook target is stated."""
    return shapes_dataset


def _cfg(name, dataset, *extra):
    return load_config(CONFIGS / name, [f"data.path={dataset}", "log.progress=false", "log.tensorboard=false",
                                        "checkpoint.every_n_steps=null", "trainer.log_every_n_steps=1", *extra])


def _rows(out_dir, split="train"):
    rows = [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") == split]


def _fit(cfg, name, out):
    with Trainer(cfg, get_task(name), out_dir=out, resume=None) as trainer:
        return trainer.fit()


@pytest.fixture(scope="module")
def tokenizer_run(dataset, tmp_path_factory):
    """mem_dvae_tiny (evforge's recipe: dead-code restarts) for 100 steps, restarts until step 90."""
    out = tmp_path_factory.mktemp("dvae_run")
    cfg = _cfg("mem_dvae_tiny.yaml", dataset, "trainer.max_steps=100", "trainer.val_every_n_steps=50",
               "task.code_restart.until_step=90")
    return out, _fit(cfg, "mem_dvae", out)


def _mem_cfg(dataset, tokenizer_run, *extra):
    return _cfg("mem_tiny.yaml", dataset, f"task.tokenizer={tokenizer_run[1]['checkpoint']}", *extra)


@pytest.fixture(scope="module")
def mem_run(dataset, tokenizer_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("mem_run")
    cfg = _mem_cfg(dataset, tokenizer_run, "trainer.max_steps=200", "trainer.val_every_n_steps=200",
                   "trainer.log_every_n_steps=10")
    return out, _fit(cfg, "mem", out)


# ------------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_reconstruction_falls_and_whole_val_usage_is_reported(tokenizer_run):
    out, summary = tokenizer_run
    train = _rows(out)
    assert summary["step"] == 100 and len(train) == 100
    mse = np.array([r["recon_mse"] for r in train])
    assert np.isfinite(mse).all()
    assert mse[-10:].mean() < 0.7 * mse[:5].mean(), mse.round(4)
    tau = [r["gumbel_tau"] for r in train]  # annealed by the trainer schedule
    assert tau[0] == pytest.approx(1.0) and tau[-1] < tau[0] and min(tau) >= 0.5
    val = _rows(out, "val")
    assert [r["step"] for r in val] == [50, 100]
    for r in val:  # distinct codes over the whole val split (not a per-batch mean): a whole number
        assert r["codebook_used"] == round(r["codebook_used"]) and 1 <= r["codebook_used"] <= TINY_TOKENS
        assert r["codebook_usage"] == pytest.approx(r["codebook_used"] / TINY_TOKENS)
        assert 1 <= r["codebook_perplexity"] <= r["codebook_used"]
        assert math.isfinite(r["recon_mse"]) and r["loss"] == pytest.approx(r["recon_mse"] + 1e-10 * r["kl"])
    assert val[-1]["recon_mse"] < val[0]["recon_mse"] * 1.2


def test_whole_val_usage_counts_distinct_codes_of_the_whole_split(dataset, tokenizer_run):
    """The logged codebook_used equals the distinct argmax codes of every val image, counted here by hand."""
    tok, cfg = load_tokenizer(tokenizer_run[1]["checkpoint"])
    task = MEMDVAETask()
    task.build_model(cfg)
    ds = task.build_dataset(cfg, "val")
    codes = []
    for i in range(0, len(ds), 8):  # the trainer's val batches (data.batch_size 8)
        b = task.collate([ds[j] for j in range(i, min(i + 8, len(ds)))])
        g = keys_generator(task.cfg.get("seed", 0), 2, b)
        codes.append(tok.get_codebook_indices(task.images(b, train=False, generator=g)))
    codes = torch.cat(codes)
    assert _rows(tokenizer_run[0], "val")[-1]["codebook_used"] == len(codes.unique())
    assert len(codes.unique()) > torch.tensor([len(c.unique()) for c in codes.split(8)]).float().mean()


def test_dead_code_restarts_use_half_the_codebook_without_hurting_reconstruction(dataset, tmp_path):
    """mem_dvae_tiny (40 steps): MEM's tokenizer collapses to a few codes; with evforge's restarts at least half
    of the 64 codes are used on the whole val split, and the reconstruction is no worse."""
    off = _fit(_cfg("mem_dvae_tiny.yaml", dataset, "task.code_restart.enabled=false"), "mem_dvae", tmp_path / "off")
    on = _fit(_cfg("mem_dvae_tiny.yaml", dataset), "mem_dvae", tmp_path / "on")
    assert off["val"]["codebook_used"] <= 12, off["val"]
    assert on["val"]["codebook_used"] >= TINY_TOKENS / 2, on["val"]
    assert on["val"]["recon_mse"] <= 1.05 * off["val"]["recon_mse"], (on["val"], off["val"])
    restarted = [r["step"] for r in _rows(tmp_path / "on") if r.get("codes_restarted", 0) > 0]
    assert restarted and set(restarted) <= {6, 11, 16, 21, 26, 31, 36}  # logged the step after the restart


@pytest.mark.parametrize("embedding", ["source", "cells"])
def test_restart_splits_a_code_on_one_side_of_its_mean(embedding):
    torch.manual_seed(0)
    vae = DiscreteVAE(DVAEConfig(image_size=32, num_layers=2, hidden_dim=8, num_resnet_blocks=1, num_tokens=16,
                                 code_dim=4))
    img = torch.rand(4, 3, 32, 32)
    cfg = CodeRestartConfig(enabled=True, every_n_steps=2, margin=2.0, max_per_check=1, embedding=embedding)
    r = CodeRestarter(cfg, 16, seed=3)
    assert not r.wants_stats(0) and r.wants_stats(1)
    _, _, stats = vae(img, return_stats=True)
    conv = vae.logit_conv
    before = {"bias": conv.bias.detach().clone(), "weight": conv.weight.detach().clone()}
    codes0 = vae.logits(img).argmax(1)
    used = set(stats["codes"].unique().tolist())
    r.observe(stats, keep=False)
    assert r.after_step(vae, 1) == 0  # not a check step: counts only
    r.observe(stats, keep=True)
    assert r.after_step(vae, 2) == 1
    changed = [k for k in range(16) if not torch.equal(conv.bias[k], before["bias"][k])]
    assert len(changed) == 1 and changed[0] not in used
    k = changed[0]
    codes1 = vae.logits(img).argmax(1)
    moved = codes0 != codes1
    assert moved.any() and (codes1[moved] == k).all()  # k takes cells of a single code, nothing else changes
    (a,) = codes0[moved].unique().tolist()
    feats = stats["features"].permute(0, 2, 3, 1).reshape(-1, 8)
    mine = codes0.reshape(-1) == a
    m = feats[mine].mean(0)
    w = vae.logit_conv.weight.detach().view(16, -1)
    v = w[k] - before["weight"].view(16, -1)[a]
    side = (feats - m) @ v > 0
    assert torch.equal(moved.reshape(-1), mine & side)  # the half of a's cells on one side of their mean
    if embedding == "source":  # a copy of a's vector: argmax decoding is unchanged
        assert torch.equal(vae.codebook.weight[k], vae.codebook.weight[a])
        vae.eval()
        assert torch.allclose(vae.decode(codes1.flatten(1)), vae.decode(codes0.flatten(1)), atol=1e-6)
    else:  # the mean decoder input (relaxed mixture) of the cells it took
        sampled = stats["sampled"].permute(0, 2, 3, 1).reshape(-1, 4)
        assert torch.allclose(vae.codebook.weight[k], sampled[moved.reshape(-1)].mean(0), atol=1e-6)
    r2 = CodeRestarter(cfg, 16)
    r2.load_state_dict(r.state_dict())
    assert torch.equal(r2.counts, r.counts)


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
    summed = DiscreteVAE(DVAEConfig(**{**small.cfg.to_dict(), "kl_reduction": "sum"}))
    summed.load_state_dict(small.state_dict())
    summed.eval()
    assert float(summed(img)[1]["kl"]) == pytest.approx(2 * float(parts["kl"]), rel=1e-5)  # MEM's sum over B = 2
    with pytest.raises(ValueError, match=r"takes \(B, 3, 32, 32\)"):
        small(torch.rand(2, 2, 32, 32))


def test_mem_temperature_and_lr_follow_the_reference_loop():
    """MEM's loop (eventvae/train_vae.py:304-353): after the first step of each epoch, ``temp = max(temp *
    exp(-1e-6 * global_step), 0.5)`` and ``ExponentialLR.step()``; replayed here step by step."""
    S, rate = 7, 0.02
    temp, lr, lr0, gamma, global_step = 1.0, 2e-4, 2e-4, 0.9, 0
    sched = make_schedule({"exponential": {"start": lr0, "factor": gamma, "every_epochs": 1, "offset_steps": 1}},
                          steps_per_epoch=S)
    for epoch in range(6):
        for i in range(S):
            assert mem_gumbel_tau(global_step, S, rate=rate) == pytest.approx(temp)
            assert sched(global_step) == pytest.approx(lr)
            if i % 10000 == 0:  # after this step's update
                temp = max(temp * math.exp(-rate * global_step), 0.5)
                lr *= gamma
            global_step += 1
    assert min(mem_gumbel_tau(s, S, rate=rate) for s in range(200)) == 0.5
    plain = make_schedule({"exponential": {"start": 1.0, "factor": 0.5, "every_steps": 3}})
    assert [plain(s) for s in range(7)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]  # evforge: decay at each period's end


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
    assert (rand.sum(1) == count).all() and rand[:, -1].any()
    legacy = RandomMaskGenerator(grid, count, legacy_skip_last=True)(200, torch.Generator().manual_seed(0))
    assert (legacy.sum(1) == count).all() and not legacy[:, -1].any()  # MEM's never masks the last patch


# ---------------------------------------------------------------------------------------------------- MEM
def test_masked_token_accuracy_is_well_above_the_majority_code_share(mem_run):
    """Not merely above 1/K: the commonest code (mostly empty cells) is a large share of the targets, and a model
    that always answers it scores exactly that share. After 200 steps MEM must beat it by a wide margin."""
    out, summary = mem_run
    rows = _rows(out)
    assert summary["step"] == 200 and len(rows) == 20
    val = summary["val"]
    share, acc = val["majority_share"], val["mlm_acc"]
    assert 0.1 < share < 0.6, val  # restarts keep the commonest code from dominating the targets
    assert acc >= share + 0.1 and acc >= 1.3 * share, val
    assert val["n_masked"] == pytest.approx(32, abs=2)
    loss = np.array([r["loss"] for r in rows])
    assert loss[-5:].mean() < 0.75 * loss[0], loss.round(2)


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
    task.cfg["task"]["representation"]["train_resize"] = [72, 96]  # resize, then a random input_size crop
    crop = task.images(batch, train=True, generator=g())
    assert crop.shape == (4, 3, 64, 64) and not torch.equal(crop, img)
    assert task.images(batch, train=False, generator=g()).allclose(val)  # validation resizes directly
    # the same function and options as finetuning: a classification task on the same keys gives the same images
    from evforge.finetune.classification import ClassificationTask

    ft = ClassificationTask()
    fcfg = load_config(CONFIGS.parent / "finetune" / "classification_tiny.yaml", [f"data.path={dataset}"])
    fcfg["task"].update({k: task.cfg["task"][k] for k in ("input_size", "augment", "val_window")})
    fcfg["task"]["representation"] = dict(task.cfg["task"]["representation"])
    ft.sensor_size = task.sensor_size
    assert torch.equal(ft.inputs(batch, fcfg, train=True, generator=g()), crop)
    assert ft.mem_input_config(ft.options(fcfg)) == task.input_config()


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
    refs = {n: load_config(CONFIGS / f"mem_{n}_reference.yaml") for n in ("ncaltech101", "ncars", "nimagenet")}
    for cfg in (cal, cars, imnet, *refs.values()):
        m = mem_model_config(cfg)
        assert (m.img_size, m.patch_size, m.in_chans, m.grid) == (224, 16, 3, 14)
        assert cfg["task"]["mask"]["num_patches"] == 98 and cfg["task"]["augment"]["max_events"] == 30000
        assert cfg["optim"]["betas"] == [0.9, 0.95] and cfg["schedules"]["weight_decay"] == 0.05
        assert cfg["schedules"]["lr"]["warmup_cosine"]["warmup_steps"] == 1000
        assert MEMTask().input_config(cfg).rand_augment.num_ops == 2
    assert {mem_model_config(c).variant for c in (cal, cars, imnet)} == {"vit_base_patch16_224"}
    assert {(mem_model_config(c).variant, mem_model_config(c).init) for c in refs.values()} == {
        ("beit_base_patch16_224", "beit")}
    assert (cal["trainer"]["epochs"], imnet["trainer"]["epochs"]) == (3000, 300)
    assert (cal["trainer"]["grad_clip"], cars["trainer"]["grad_clip"], imnet["trainer"]["grad_clip"]) == (30, 30, 1)
    assert imnet["schedules"]["lr"]["warmup_cosine"]["peak"] == 7.5e-5
    assert cars["data"]["val_split"] == "test" and imnet["task"]["representation"]["train_resize"] == [256, 341]
    inputs = {n: MEMTask().input_config(c) for n, c in refs.items()}
    assert {n: (i.canvas, i.off_events, i.uint8_wrap) for n, i in inputs.items()} == {
        "ncaltech101": ("extent", "count", True), "ncars": ("extent", "ignore", True),
        "nimagenet": ("scaled", "count", True)}
    assert inputs["ncaltech101"].color_jitter == ColorJitterConfig(0.2, 0.2, at_val=True)
    assert not inputs["ncars"].color_jitter.enabled and not MEMTask().input_config(cars).color_jitter.enabled
    assert MEMTask().input_config(cal).color_jitter == ColorJitterConfig(0.2, 0.2, at_val=False)
    for name, tokens_cfg in (("mem_dvae.yaml", True), ("mem_dvae_reference.yaml", False)):
        dvae = load_config(CONFIGS / name)
        t = _dvae_config(dvae["task"])
        assert t.downsample == 16 and t.channels == 3 and t.num_tokens == 8192 and t.image_size == 224
        assert dvae["optim"]["name"] == "adam" and dvae["trainer"]["grad_clip"] == 0.01
        assert dvae["task"]["code_restart"]["enabled"] is tokens_cfg
        assert t.kl_reduction == ("batchmean" if tokens_cfg else "sum")
    ref = load_config(CONFIGS / "mem_dvae_reference.yaml")
    assert ref["schedules"]["lr"]["exponential"] == {"start": 2.0e-4, "factor": 0.99, "every_epochs": 1,
                                                     "offset_steps": 1, "batch_ref": 192}
    assert ref["task"]["legacy_tau_anneal"] == {"start": 1.0, "rate": 1.0e-6, "min": 0.5}


def test_reference_recipe_runs_a_few_cpu_steps(dataset, tmp_path, capsys):
    """``evforge pretrain`` with the reference configs at toy size: the tokenizer, then BEiT with a shared relative
    position bias on the reference input pipeline (per-sample canvas, uint8 wrap, RandAugment, ColorJitter)."""
    toy = ["--set", f"data.path={dataset}", "--set", "task.input_size=64", "--set", "task.augment.max_events=2500",
           "--set", "task.val_window.max_events=2500", "--set", "data.batch_size=4", "--set", "data.num_workers=0",
           "--set", "trainer.devices=1", "--set", "trainer.strategy=auto", "--set", "trainer.accelerator=cpu",
           "--set", "trainer.epochs=null", "--set", "trainer.max_steps=2", "--set", "trainer.val_every_n_epochs=null",
           "--set", "log.progress=false", "--set", "log.tensorboard=false", "--set", "trainer.log_every_n_steps=1"]
    tok = ["--set", "task.model.num_layers=3", "--set", "task.model.hidden_dim=16", "--set",
           "task.model.num_resnet_blocks=1", "--set", "task.model.num_tokens=64", "--set", "task.model.code_dim=8"]
    assert main(["pretrain", "--config", "configs/pretrain/mem_dvae_reference.yaml", *toy, *tok,
                 "--out", str(tmp_path / "tok")]) == 0
    mem = ["--set", f"task.tokenizer={tmp_path / 'tok' / 'checkpoints' / 'last.ckpt'}", "--set",
           "task.model.patch_size=8", "--set", "task.model.vit_kwargs={embed_dim: 32, depth: 2, num_heads: 2}",
           "--set", "task.model.num_tokens=64", "--set", "task.mask.num_patches=32", "--set",
           "task.mask.min_num_patches=4", "--set", "trainer.precision=32-true", "--set", "data.val_batch_size=4"]
    assert main(["pretrain", "--config", "configs/pretrain/mem_ncaltech101_reference.yaml", *toy, *mem,
                 "--out", str(tmp_path / "mem")]) == 0
    assert "step 2" in capsys.readouterr().out
    rows = _rows(tmp_path / "mem")
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    state = torch.load(tmp_path / "mem" / "checkpoints" / "last.ckpt", weights_only=True)["model"]
    assert "vit.rel_pos_bias.relative_position_bias_table" in state and "vit.pos_embed" not in state
    assert not any(".attn.relative_position_bias_table" in k for k in state)  # one table, shared


def test_demo_helper_and_cli(dataset, tmp_path, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="evforge"):
        backbone = pretrain_mem(dataset, tmp_path / "demo", dvae_steps=2, mem_steps=2, device="cpu", progress=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "evforge.pretrain.mem.demo"]
    assert backbone.is_file() and len(lines) == 2 and "codebook usage" in lines[0] and str(backbone) in lines[1]
    assert "MEM" not in capsys.readouterr().out  # logged, not printed
    assert load_backbone(backbone)(torch.rand(1, 3, 64, 64)).shape == (1, 64)
    args = ["pretrain", "--config", "configs/pretrain/mem_dvae_tiny.yaml", "--set", f"data.path={dataset}",
            "--set", "trainer.max_steps=2", "--set", "log.progress=false", "--out", str(tmp_path / "cli")]
    assert main(args) == 0
    assert "step 2" in capsys.readouterr().out
