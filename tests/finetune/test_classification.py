"""Classification finetuning on the shared trainer, on data made by the real chain (synthetic shapes ->
N-Caltech101 layout -> converter -> shards), plus backbone adaptation, layer decay, evaluation and selection."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import evforge
from evforge.data.dataset import EventDataset
from evforge.export import backbone_weights, export_backbone, load_backbone, read_backbone
from evforge.finetune import get_task
from evforge.finetune.backbones import adapt_patch_embed, build_classifier
from evforge.finetune.classification import HOLDOUT, resolve_splits
from evforge.finetune.evaluate import checkpoint_scores, evaluate, load_for_eval, select_best
from evforge.finetune.layer_decay import layer_decay_groups, num_layers
from evforge.finetune.metrics import confusion_matrix
from evforge.pretrain.ecddp.task import ECDDPTask
from evforge.trainer.config import ConfigError, load_config
from evforge.trainer.trainer import Trainer

CONFIGS = Path(evforge.__file__).resolve().parent / "configs"
TINY = CONFIGS / "finetune" / "classification_tiny.yaml"
SENSOR = (64, 48)


@pytest.fixture(scope="module")
def shapes(shapes_dataset):
    """Four shape classes, 100 clips each: 300 train / 100 val samples (64x48 sensor; tests/conftest.py)."""
    return shapes_dataset


def _cfg(data, *extra):
    return load_config(TINY, [f"data.path={data}", "log.progress=false", "log.tensorboard=false",
                              "data.holdout_fraction=0.1", *extra])


def _log(run):
    return [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]


def _losses(run):
    return {r["step"]: r["loss"] for r in _log(run) if r["split"] == "train"}


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    """A short finetune of the tiny ViT from scratch: 400 steps, validated and kept every 100 steps."""
    run = tmp_path_factory.mktemp("finetune") / "run"
    cfg = _cfg(shapes, "trainer.max_steps=400", "trainer.val_every_n_steps=100", "checkpoint.keep_every_n_steps=100",
               "trainer.log_every_n_steps=20")
    with Trainer(cfg, get_task("classification"), out_dir=run, resume=None) as trainer:
        summary = trainer.fit()
    return run, summary


@pytest.fixture(scope="module")
def ecddp_backbone(tmp_path_factory, make_stream_dataset):
    """An exported ECDDP tiny backbone (Swin, 6 input channels) after 2 pretraining steps on a tiny stream set."""
    root = tmp_path_factory.mktemp("ecddp")
    ds = make_stream_dataset(root, frames=8)
    cfg = load_config(CONFIGS / "pretrain" / "ecddp_tiny.yaml",
                      [f"data.path={ds}", "trainer.max_steps=2", "log.progress=false", "log.tensorboard=false",
                       "checkpoint.every_n_steps=null"])
    with Trainer(cfg, ECDDPTask(), out_dir=root / "run", resume=None) as trainer:
        ckpt = trainer.fit()["checkpoint"]
    return export_backbone(ckpt, root / "backbone.safetensors")


# ------------------------------------------------------------------------------------------ patch embedding
def test_patch_embed_adaptation_rule():
    w = torch.randn(8, 6, 4, 4)
    assert adapt_patch_embed(w, 6) is w  # same channel count: the very weight
    assert torch.equal(adapt_patch_embed(w, 3), w[:, :3] * 2.0)  # truncated, scaled by C_old / C_new = 6 / 3
    assert torch.allclose(adapt_patch_embed(w, 12), torch.cat([w, w], 1) / 2.0)  # repeated, scaled by 6 / 12
    assert torch.allclose(adapt_patch_embed(w, 8), torch.cat([w, w[:, :2]], 1) * 6 / 8)  # cyclic repeat
    assert torch.allclose(adapt_patch_embed(w, 1), w.sum(1, keepdim=True))  # gray: the sum
    # a multiple of the channels: the repeated input gives the old response
    x = torch.randn(2, 6, 8, 8)
    old = F.conv2d(x, w, stride=4)
    assert torch.allclose(F.conv2d(torch.cat([x, x], 1), adapt_patch_embed(w, 12), stride=4), old, atol=1e-5)


def test_init_from_backbone_preserves_outputs_when_channels_match(ecddp_backbone):
    tensors, meta = read_backbone(ecddp_backbone)
    assert meta["in_chans"] == 6
    reference = load_backbone(ecddp_backbone, num_classes=0, strict_img_size=False).eval()
    net, spec = build_classifier({"global_pool": "avg"}, in_chans=6, num_classes=4, input_size=[48, 64],
                                 init=ecddp_backbone)
    net.eval()
    assert spec.arch == meta["arch"] and spec.init_in_chans == 6
    assert torch.equal(net.state_dict()["patch_embed.proj.weight"], tensors["patch_embed.proj.weight"])
    x = torch.randn(2, 6, 64, 64)
    with torch.no_grad():
        assert torch.equal(net.forward_features(x), reference.forward_features(x))
    # 3 channels (MEM image): the documented mapping, the rest of the network untouched
    net3, spec3 = build_classifier({}, in_chans=3, num_classes=4, input_size=[48, 64], init=ecddp_backbone)
    sd3 = net3.state_dict()
    assert spec3.in_chans == 3 and spec3.init_in_chans == 6
    assert torch.equal(sd3["patch_embed.proj.weight"], adapt_patch_embed(tensors["patch_embed.proj.weight"], 3))
    timm_part = backbone_weights(tensors)  # the file also holds ECDDP's stage norms, which a classifier has not
    assert all(torch.equal(sd3[k], v) for k, v in timm_part.items() if k != "patch_embed.proj.weight")


def test_vit_backbone_with_other_size_and_channels(tmp_path):
    """A ViT exported at 32x32 with 3 channels finetunes at 48x64 on 2 channels: position embeddings resampled,
    patch embedding adapted, everything else loaded as is."""
    import timm
    from safetensors.torch import save_file

    kwargs = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 32}
    src = timm.create_model("vit_tiny_patch16_224", num_classes=0, in_chans=3, **kwargs)
    meta = {"format": "evforge-backbone/1", "arch": "vit_tiny_patch16_224", "in_chans": 3, "timm_kwargs": kwargs}
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path),
              metadata={k: json.dumps(v) for k, v in meta.items()})
    net, spec = build_classifier({"global_pool": "avg"}, in_chans=2, num_classes=5, input_size=[48, 64], init=path)
    sd, ref = net.state_dict(), src.state_dict()
    assert spec.timm_kwargs["img_size"] == [48, 64] and sd["pos_embed"].shape == (1, 1 + 6 * 8, 32)
    assert torch.equal(sd["pos_embed"][:, :1], ref["pos_embed"][:, :1])  # the class token's entry is kept
    assert torch.equal(sd["patch_embed.proj.weight"], adapt_patch_embed(ref["patch_embed.proj.weight"], 2))
    assert torch.equal(sd["blocks.0.attn.qkv.weight"], ref["blocks.0.attn.qkv.weight"])
    assert torch.equal(sd["fc_norm.weight"], ref["norm.weight"])  # token-pooled backbone, mean-pooled classifier
    assert net(torch.randn(2, 2, 48, 64)).shape == (2, 5)


def test_unknown_task_options_are_refused(shapes):
    with pytest.raises(ConfigError, match="label_smooting: unknown option; did you mean 'label_smoothing'"):
        get_task("classification").options(_cfg(shapes, "task.label_smooting=0.2"))
    with pytest.raises(ConfigError, match="task.augment.flipx"):
        get_task("classification").options(_cfg(shapes, "task.augment.flipx=0.5"))


# ------------------------------------------------------------------------------------------------ layer decay
def test_layer_decay_scales_per_depth_vit():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", patch_size=4, embed_dim=16, depth=2, num_heads=2, img_size=16,
                            num_classes=3, global_pool="avg")
    assert num_layers(vit) == 4
    groups = layer_decay_groups(vit, weight_decay=0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    wd = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert scale["patch_embed.proj.weight"] == scale["pos_embed"] == scale["cls_token"] == 0.5 ** 3
    assert scale["blocks.0.attn.qkv.weight"] == 0.5 ** 2 and scale["blocks.1.mlp.fc1.weight"] == 0.5
    assert scale["fc_norm.weight"] == scale["fc_norm.bias"] == scale["head.weight"] == 1.0
    assert wd["blocks.0.attn.qkv.weight"] == wd["head.weight"] == 0.05
    assert wd["blocks.0.attn.qkv.bias"] == wd["blocks.0.norm1.weight"] == wd["pos_embed"] == wd["cls_token"] == 0.0
    assert sorted(scale) == sorted(n for n, _ in vit.named_parameters())  # every parameter once


def test_layer_decay_scales_per_depth_swin():
    import timm

    from evforge.models.swin import TINY_SWIN_KWARGS

    swin = timm.create_model("swin_tiny_patch4_window7_224", num_classes=3, **TINY_SWIN_KWARGS)
    assert num_layers(swin) == 2 + 2 + 1 + 1 + 2  # depths (2, 2, 1, 1)
    groups = layer_decay_groups(swin, weight_decay=0.05, layer_decay=0.9)
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    wd = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    d = 0.9
    assert scale["patch_embed.proj.weight"] == d ** 7
    assert scale["layers.0.blocks.0.attn.qkv.weight"] == d ** 6
    assert scale["layers.0.blocks.1.attn.qkv.weight"] == d ** 5
    assert scale["layers.1.downsample.reduction.weight"] == scale["layers.1.blocks.0.mlp.fc1.weight"] == d ** 4
    assert scale["layers.2.blocks.0.mlp.fc2.weight"] == d ** 2 and scale["layers.3.blocks.0.mlp.fc2.weight"] == d
    assert scale["norm.weight"] == scale["head.fc.weight"] == 1.0
    assert wd["layers.0.blocks.0.attn.relative_position_bias_table"] == 0.0
    assert wd["layers.1.downsample.reduction.weight"] == 0.05


# ----------------------------------------------------------------------------------------------------- splits
def test_split_resolution_never_selects_on_the_reported_split(shapes):
    assert resolve_splits(["train", "test"], {}) == (HOLDOUT, "test")
    assert resolve_splits(["train", "val"], {}) == (HOLDOUT, "val")
    assert resolve_splits(["train", "val", "test"], {}) == ("val", "test")
    assert resolve_splits(["train", "val"], {"val_split": "val"}) == ("val", "val")  # MEM's protocol, on request
    with pytest.raises(ConfigError, match="no split 'dev'"):
        resolve_splits(["train", "val"], {"val_split": "dev"})
    task = get_task("classification")
    cfg = _cfg(shapes)
    task.build_model(cfg)
    train, held = task.build_dataset(cfg, "train"), task.build_dataset(cfg, "val")
    keys_train = {train[i]["key"] for i in range(len(train))}
    keys_held = {held[i]["key"] for i in range(len(held))}
    assert len(held) == 30 and len(train) == 270 and not keys_train & keys_held
    assert sorted(np.bincount(held.labels, minlength=4)) == [7, 7, 8, 8]  # stratified
    again = get_task("classification").dataset(cfg, HOLDOUT)
    assert [again[i]["key"] for i in range(len(again))] == [held[i]["key"] for i in range(len(held))]
    # the holdout avoids the label-efficiency subsets: a subset run trains on all of its samples
    manifest = json.loads((shapes / "manifest.json").read_text())
    for name in ("train_20pct", "train_50pct"):
        sub = get_task("classification").dataset(_cfg(shapes, f"data.subset={name}"), "train")
        assert sorted(sub[i]["key"] for i in range(len(sub))) == sorted(manifest["subsets"][name]["keys"])
        assert not set(manifest["subsets"][name]["keys"]) & keys_held


# ---------------------------------------------------------------------------------------------- finetuning
def test_short_finetune_beats_chance_by_a_wide_margin(trained):
    run, summary = trained
    assert summary["step"] == 400 and summary["stopped"] == "completed"
    result = evaluate(run / "checkpoints" / "last.ckpt", out_dir=run / "eval_last")
    assert result["split"] == "val" and result["num_samples"] == 100
    assert result["metrics"]["top1"] > 0.7, result["metrics"]  # chance: 0.25
    assert summary["val"]["top1"] > 0.6  # the holdout (model selection split) agrees


def test_validation_metrics_are_exact_over_the_split(trained):
    """The trainer sums the batches' statistics; the logged metrics are the split's (batches of 16 and 14)."""
    run, _ = trained
    logged = {r["step"]: r for r in _log(run) if r["split"] == "val"}
    assert sorted(logged) == [100, 200, 300, 400]
    ckpt = run / "checkpoints" / "step-00000300.ckpt"
    res = evaluate(ckpt, split=HOLDOUT, out_dir=run / "eval_holdout")  # 30 items: batches of 16 and 14
    assert res["num_samples"] == 30
    for k in ("top1", "top5", "mean_class_acc"):
        assert logged[300][k] == pytest.approx(res["metrics"][k], abs=1e-12)
    assert logged[300]["loss"] == pytest.approx(res["metrics"]["loss"], rel=1e-5)


def test_evaluate_writes_reports_with_the_right_numbers(trained):
    run, _ = trained
    ckpt = run / "checkpoints" / "last.ckpt"
    res = evaluate(ckpt, out_dir=run / "eval")
    out = run / "eval"
    assert {p.name for p in out.iterdir()} >= {"metrics.json", "metrics.md", "confusion.png"}
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = json.loads((out / "metrics.json").read_text())
    assert stored["metrics"] == res["metrics"] and stored["split"] == "val" and stored["step"] == 400
    # direct computation: the EMA network on the central windows of the val split, batch by batch
    task, model, cfg, _ = load_for_eval(ckpt)
    ds = task.dataset(cfg, "val")
    logits, labels = [], []
    for batch in DataLoader(ds, batch_size=7, collate_fn=task.collate):
        with torch.no_grad():
            logits.append(model.ema.module(task.inputs(batch, cfg, train=False)))
        labels.append(batch["label"])
    logits, labels = torch.cat(logits), torch.cat(labels)
    pred = logits.argmax(-1)
    assert stored["metrics"]["top1"] == pytest.approx(float((pred == labels).double().mean()), abs=1e-12)
    cm = confusion_matrix(pred, labels, 4)
    assert stored["confusion"] == cm.tolist()
    per_class = (cm.diagonal().double() / cm.sum(1).double())
    assert stored["metrics"]["mean_class_acc"] == pytest.approx(float(per_class.mean()), abs=1e-12)
    assert [r["class"] for r in stored["per_class"]] == ["bar", "cross", "disc", "ring"]
    md = (out / "metrics.md").read_text()
    assert f"| top1 | {stored['metrics']['top1']:.4f} |" in md and "| disc |" in md


def test_best_checkpoint_is_the_max_validation_step(trained, tmp_path):
    run, _ = trained
    val = {r["step"]: r["top1"] for r in _log(run) if r["split"] == "val"}
    scores = checkpoint_scores(run, "top1")
    assert [s["step"] for s in scores] == [100, 200, 300, 400]
    best_step = max(sorted(val), key=lambda s: (val[s], -s))
    assert select_best(run, "top1") == run / "checkpoints" / f"step-{best_step:08d}.ckpt"
    low_loss = min(sorted(val), key=lambda s: next(r["loss"] for r in _log(run) if r["split"] == "val"
                                                    and r["step"] == s))
    assert select_best(run, "loss").name == f"step-{low_loss:08d}.ckpt"  # "loss" is minimised
    res = evaluate(run, out_dir=tmp_path / "best")  # a run folder: its best checkpoint, on the test split
    assert res["selected"]["step"] == best_step and res["selected"]["value"] == val[best_step]
    assert res["split"] == "val" and "best validation top1" in (tmp_path / "best" / "metrics.md").read_text()


def test_killed_and_resumed_run_reproduces_the_next_losses(shapes, tmp_path):
    cfg = _cfg(shapes, "trainer.max_steps=6", "trainer.log_every_n_steps=1", "trainer.val_every_n_steps=3",
               "task.augment.max_events=1500")  # every augmentation (window, shift, flips) drawn
    with Trainer(cfg, get_task("classification"), out_dir=tmp_path / "full", resume=None) as trainer:
        trainer.fit()
    with Trainer(cfg, get_task("classification"), out_dir=tmp_path / "killed", resume=None) as trainer:
        trainer.fit(stop_at_step=3)
    with Trainer(cfg, get_task("classification"), out_dir=tmp_path / "killed", resume="auto") as trainer:
        trainer.fit()
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "killed")
    assert [full[s] for s in (4, 5, 6)] == [resumed[s] for s in (4, 5, 6)]
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True)["model"]
    assert any(k.startswith("ema.") for k in a)  # the EMA is part of the model state
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_linear_probe_changes_only_the_head(shapes, tmp_path):
    cfg = _cfg(shapes, "task.mode=linear_probe", "trainer.max_steps=4", "trainer.val_every_n_steps=null")
    with Trainer(cfg, get_task("classification"), out_dir=tmp_path / "probe", resume=None) as trainer:
        before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
        trainable = [n for n, p in trainer.raw_model.named_parameters() if p.requires_grad]
        trainer.fit()
        after = trainer.raw_model.state_dict()
    assert trainable == ["net.head.weight", "net.head.bias"]
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["ema.module.head.bias", "ema.module.head.weight", "net.head.bias", "net.head.weight"]


def test_finetune_from_an_exported_ecddp_backbone(shapes, ecddp_backbone, tmp_path):
    cfg = _cfg(shapes, f"task.init={ecddp_backbone}", "trainer.max_steps=3", "trainer.log_every_n_steps=1",
               "trainer.val_every_n_steps=3", "checkpoint.keep_every_n_steps=3")
    with Trainer(cfg, get_task("classification"), out_dir=tmp_path / "run", resume=None) as trainer:
        net = trainer.raw_model.net
        tensors, meta = read_backbone(ecddp_backbone)
        assert type(net).__name__ == "SwinTransformer" and net.patch_embed.proj.in_channels == 3  # MEM image
        assert torch.equal(net.layers[1].blocks[0].mlp.fc1.weight, tensors["layers.1.blocks.0.mlp.fc1.weight"])
        summary = trainer.fit()
    assert all(math.isfinite(v) for v in _losses(tmp_path / "run").values())
    assert summary["step"] == 3 and 0 <= summary["val"]["top1"] <= 1
    # evaluation rebuilds the Swin from the checkpoint alone (the backbone file is not read again)
    ecddp_backbone.rename(ecddp_backbone.with_suffix(".moved"))
    try:
        res = evaluate(tmp_path / "run" / "checkpoints" / "last.ckpt", out_dir=tmp_path / "eval")
    finally:
        ecddp_backbone.with_suffix(".moved").rename(ecddp_backbone)
    assert res["num_samples"] == 100 and 0 <= res["metrics"]["top1"] <= 1


def test_paper_configs_load_and_resolve():
    for name in ("ncaltech101_vit_s", "ncars_vit_s", "nimagenet_vit_s"):
        cfg = load_config(CONFIGS / "finetune" / f"{name}.yaml")
        task = get_task(cfg["task"]["name"])
        o = task.options(cfg)
        assert o["layer_decay"] == 0.9 and o["label_smoothing"] == 0.1 and o["ema"]["enabled"]
        assert o["model"]["arch"] == "vit_small_patch16_224" and o["model"]["global_pool"] == "avg"
        assert "warmup_cosine" in cfg["schedules"]["lr"]
        assert cfg["trainer"]["val_every_n_steps"] == cfg["checkpoint"]["keep_every_n_steps"]


# ------------------------------------------------------------------------------------- MEM's reference recipe
def test_mem_reference_finetune_configs_hold_the_public_recipe():
    refs = {n: load_config(CONFIGS / "finetune" / f"mem_{n}_reference.yaml") for n in ("ncaltech101", "ncars",
                                                                                      "nimagenet")}
    for name, cfg in refs.items():
        o = get_task("classification").options(cfg)
        m = o["model"]
        assert (m["arch"], m["rel_pos_bias"], m["fc_norm"], m["global_pool"]) == (
            "beit_base_patch16_224", "per_layer", "fresh", "avg")
        assert o["ema"] == {"enabled": True, "decay": 0.9999, "warmup": False} and o["eval_ema"] is False
        assert o["no_decay_names"] == ["pos_embed", "cls_token"] and o["val_window"]["position"] == "random"
        assert cfg["optim"]["betas"] == [0.9, 0.95] and cfg["trainer"]["grad_clip"] is None
        lr = cfg["schedules"]["lr"]["warmup_cosine"]
        assert lr["warmup_epochs"] == 20 and lr["warmup_linspace"] and lr["end"] == 1e-6
        d, t = cfg["data"], cfg["trainer"]
        assert d["batch_size"] * t["accumulate_grad_batches"] * {"nimagenet": 4}.get(name, 2) == lr["batch_ref"]
        assert d["val_split"] == d["test_split"]  # MEM reports the best validation accuracy
        assert o["representation"]["uint8_wrap"] and o["representation"]["rand_augment"]["num_ops"] == 2
    cal, cars, imnet = refs["ncaltech101"], refs["ncars"], refs["nimagenet"]
    assert cal["schedules"]["lr"]["warmup_cosine"]["peak"] == 4e-3
    assert cars["schedules"]["lr"]["warmup_cosine"]["peak"] == 8e-3
    assert cars["optim"]["weight_decay"] == 0.0 and cars["task"]["layer_decay"] == 1.0  # MEM: wd 0 -> no groups
    assert (cal["task"]["model"]["block_dropout"], cars["task"]["model"]["block_dropout"]) == (0.1, 0.0)
    assert cars["task"]["representation"]["off_events"] == "ignore"
    assert imnet["task"]["representation"]["canvas"] == "scaled" and cal["task"]["representation"]["canvas"] == "extent"


@pytest.fixture(scope="module")
def mem_beit_backbone(tmp_path_factory):
    """A tiny MEM BEiT (shared relative position bias) exported as a backbone, as evforge export-backbone writes it."""
    from safetensors.torch import save_file

    from evforge.pretrain.mem import MEMConfig, MEMModel

    torch.manual_seed(0)
    cfg = MEMConfig(variant="beit_base_patch16_224", img_size=32, patch_size=8, num_tokens=16, init="beit",
                    vit_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0})
    model = MEMModel(cfg)
    with torch.no_grad():
        model.vit.rel_pos_bias.relative_position_bias_table.normal_()
    path = tmp_path_factory.mktemp("mem_beit") / "backbone.safetensors"
    meta = {"format": "evforge-backbone/1", "arch": cfg.variant, "in_chans": 3, "timm_kwargs": cfg.timm_kwargs(),
            "norm_eps": 1e-6, "method": "mem"}
    tensors = {k[len("vit."):]: v.contiguous() for k, v in model.state_dict().items() if k.startswith("vit.")}
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in meta.items()})
    return path, tensors


def test_mem_reference_finetune_runs_from_a_mem_beit_backbone(shapes, mem_beit_backbone, tmp_path):
    """The reference recipe at toy size: the shared bias copied into each block, a fresh fc_norm, MEM's dropout,
    its parameter groups and MEM's label-efficiency subset file; a few steps, then evaluation from the checkpoint."""
    path, tensors = mem_beit_backbone
    full = EventDataset(shapes, "train")
    keys = [full.key(i) for i in range(0, len(full), 10)]
    subset = tmp_path / "shapes-10percent.txt"  # MEM's format: train lines (the subset) and the whole val split
    subset.write_text("".join(f"train/{k}.npy\n" for k in keys) + "val/whatever/image_0001.npy\n")
    cfg = load_config(CONFIGS / "finetune" / "mem_ncaltech101_reference.yaml", [
        f"data.path={shapes}", f"task.init={path}", "task.input_size=[32, 32]", "task.augment.max_events=null",
        "task.val_window.max_events=null", "data.batch_size=8", "data.val_batch_size=16", "data.num_workers=0",
        f"data.subset_file={subset}", "trainer.devices=1", "trainer.strategy=auto", "trainer.accelerator=cpu",
        "trainer.precision=32-true", "trainer.accumulate_grad_batches=2", "trainer.epochs=null",
        "trainer.max_steps=2", "trainer.val_every_n_epochs=null", "trainer.val_every_n_steps=2",
        "trainer.log_every_n_steps=1", "log.progress=false", "log.tensorboard=false",
        "checkpoint.every_n_epochs=null", "checkpoint.keep_every_n_steps=2"])
    task = get_task("classification")
    with Trainer(cfg, task, out_dir=tmp_path / "run", resume=None) as trainer:
        assert len(trainer.loader.dataset) == len(keys)  # the subset file's train lines, nothing else
        net = trainer.raw_model.net
        sd = net.state_dict()
        assert "rel_pos_bias.relative_position_bias_table" not in sd
        for i in range(2):  # the pretrained shared table in every block
            assert torch.equal(sd[f"blocks.{i}.attn.relative_position_bias_table"],
                               tensors["rel_pos_bias.relative_position_bias_table"])
        assert torch.equal(sd["fc_norm.weight"], torch.ones(32)) and torch.equal(sd["fc_norm.bias"], torch.zeros(32))
        assert isinstance(net.blocks[0].mlp.drop1, torch.nn.Identity) and net.pos_drop.p == 0.1
        groups = {g["name"]: g for g in trainer.raw_optimizer.param_groups}
        table = [g for g in task.param_groups(trainer.raw_model, cfg)
                 if "net.blocks.0.attn.relative_position_bias_table" in g["param_names"]][0]
        assert table["weight_decay"] == 0.05 and table["lr_scale"] == pytest.approx(0.9 ** 2)  # decayed, as MEM
        assert groups and trainer.raw_model.ema.decay_at(1) == 0.9999  # EMA without warmup
        summary = trainer.fit()
    assert summary["step"] == 2 and all(math.isfinite(v) for v in _losses(tmp_path / "run").values())
    res = evaluate(tmp_path / "run" / "checkpoints" / "last.ckpt", out_dir=tmp_path / "eval")
    assert res["num_samples"] == 100 and 0 <= res["metrics"]["top1"] <= 1


def test_subset_file_names_unknown_samples(shapes, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("train/nosuchclass/image_0001.npy\n")
    task = get_task("classification")
    cfg = _cfg(shapes, f"data.subset_file={bad}", "data.val_split=val")
    with pytest.raises(ConfigError, match="1 sample\\(s\\) not in the 'train' split.*nosuchclass/image_0001"):
        task.dataset(cfg, "train")
    with pytest.raises(ConfigError, match="give one of them"):
        task.dataset(_cfg(shapes, f"data.subset_file={bad}", "data.subset=train_10pct", "data.val_split=val"), "train")
