"""Segmentation finetuning: exact metrics, the UPerNet heads, the model, augmentation, and a DSEC-format fixture
through conversion -> SegmentationTask on the shared trainer -> evaluation -> reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import evforge
from evforge.dataset_builder.build import build_dataset
from evforge.finetune import segmentation as seg
from evforge.finetune.metrics import SegmentationMetrics, confusion_matrix
from evforge.finetune.seg_report import DSEC_PALETTE, colorize, write_segmentation_report
from evforge.finetune.segmentation import (
    SegCollate,
    SegmentationModel,
    SegmentationTask,
    dice_loss,
    predict_logits,
    random_affine,
    segmentation_loss,
    segmentation_metrics,
    warp_pair,
)
from evforge.finetune.uper import FCNHead, UPerHead
from evforge.trainer.config import load_config
from evforge.trainer.metrics import accumulate
from evforge.trainer.trainer import Trainer

CONFIGS = Path(evforge.__file__).resolve().parent / "configs" / "finetune"


# ----------------------------------------------------------------------------------------------- metrics
# 4 classes; class 2 is only predicted (IoU 0, accuracy undefined), class 3 is absent (nan everywhere);
# two ignored pixels are predicted as class 2 and must not count.
TARGET = torch.tensor([[0, 0, 1, 1],
                       [0, 0, 1, 255],
                       [255, 0, 1, 1]])
PRED = torch.tensor([[0, 1, 1, 1],
                     [0, 0, 2, 2],
                     [2, 0, 1, 0]])
# truth 0: 4 right, 1 -> 1; truth 1: 3 right, 1 -> 2, 1 -> 0
CM = [[4, 1, 0, 0], [1, 3, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_miou_and_class_accuracy_exact_on_hand_made_masks():
    cm = confusion_matrix(PRED, TARGET, 4, ignore_index=255)
    assert cm.tolist() == CM
    m = segmentation_metrics(cm, ["a", "b", "c", "d"])
    assert m["iou"]["a"] == 4 / 6 and m["iou"]["b"] == 3 / 6 and m["iou"]["c"] == 0.0 and math.isnan(m["iou"]["d"])
    assert m["acc"]["a"] == 4 / 5 and m["acc"]["b"] == 3 / 5
    assert math.isnan(m["acc"]["c"]) and math.isnan(m["acc"]["d"])
    assert m["mIoU"] == pytest.approx((4 / 6 + 3 / 6 + 0) / 3, rel=1e-15)  # absent class 3 left out
    assert m["mAcc"] == pytest.approx(0.7, rel=1e-15)  # classes with truth only
    assert m["aAcc"] == 7 / 10 and m["num_pixels"] == 10

    # the confusion statistics of unequal "batches", summed as the trainer does, give the same metrics
    metric, total = SegmentationMetrics(4, ["a", "b", "c", "d"], ignore_index=255), {}
    for p, t in [(PRED[:1], TARGET[:1]), (PRED[1:], TARGET[1:])]:
        accumulate(total, metric.update({}, p, t))
    r = metric.compute(total)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert r[key] == pytest.approx(m[key], rel=1e-14)
    assert r["iou/c"] == 0.0 and math.isnan(r["iou/d"])

    # everything ignored: nothing counted, every metric nan
    empty = segmentation_metrics(confusion_matrix(PRED, torch.full_like(TARGET, 255), 4, ignore_index=255))
    assert math.isnan(empty["mIoU"]) and math.isnan(empty["mAcc"]) and math.isnan(empty["aAcc"])


class _Replay(nn.Module):
    """Returns one-hot logits of queued prediction masks (whatever the input)."""

    def __init__(self, preds, k):
        super().__init__()
        self.preds, self.k = list(preds), k
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        p = self.preds.pop(0)
        return nn.functional.one_hot(p, self.k).permute(0, 3, 1, 2).float() * 5


def _mask_batch(masks):
    """A packed batch of one event per sample on a 4x6 sensor with these 4x3 labels (crop_bottom 1)."""
    items = [{"events": np.array([(1, 1, 10, 1)], dtype=evforge.formats.events.EVENT_DTYPE), "label": -1, "key": str(i),
              "mask": m.numpy().astype(np.uint8)} for i, m in enumerate(masks)]
    return SegCollate()(items)


def _small_task():
    task = SegmentationTask()
    task.cfg = {"task": {"num_classes": 4, "crop_bottom": 1, "chunks": 1, "events_per_chunk": 1},
                "data": {"batch_size": 2, "val_batch_size": 2}}
    task.sensor_size = (4, 4)
    return task


def _masks(seed, n):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 4, (n, 3, 4), generator=g)
    t[t == 3] = 255  # some ignored pixels; class 3 absent from the truth
    return t, torch.randint(0, 4, (n, 3, 4), generator=g)


@pytest.mark.parametrize("world", [1, 2])
def test_validation_statistics_give_the_exact_split_metrics_for_unequal_batches(world):
    """The trainer's sharding (item i on rank i % world, batches of 2: unequal batches and batch counts); every
    rank's statistics summed, as the trainer's all-reduce does, give the split's metrics."""
    n = 7
    target, pred = _masks(1, n)
    exact = segmentation_metrics(confusion_matrix(pred, target, 4, ignore_index=255))
    task, total = _small_task(), {}
    for rank in range(world):
        idx = list(range(rank, n, world))
        batches = [idx[i:i + 2] for i in range(0, len(idx), 2)]
        model = _Replay([pred[b] for b in batches], 4)
        for b in batches:
            accumulate(total, task.validation_step(model, _mask_batch(target[b]), {"device": "cpu"}))
    got = task.validation_metrics(total)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert got[key] == pytest.approx(exact[key], rel=1e-12, abs=1e-15)
    assert task.confusion().tolist() == exact["confusion"]
    for c in range(3):
        assert got[f"iou/{task.classes[c]}"] == pytest.approx(exact["iou"][str(c)], rel=1e-12)


# ------------------------------------------------------------------------------------------------- heads
def _all_params_have_gradients(module):
    missing = [n for n, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_uper_and_fcn_heads_shapes_and_gradients():
    torch.manual_seed(0)
    chans, sizes = [8, 16, 24, 32], [(28, 40), (14, 20), (7, 10), (4, 5)]  # the last stage padded up (odd 7)
    feats = [torch.randn(2, c, h, w, requires_grad=True) for c, (h, w) in zip(chans, sizes)]
    head = UPerHead(chans, channels=16, pool_scales=(1, 2, 3, 6), num_classes=5)
    out = head(feats)
    assert out.shape == (2, 5, 28, 40)
    assert head.features(feats).shape == (2, 16, 28, 40)
    out.square().mean().backward()
    _all_params_have_gradients(head)
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)  # every stage feeds the output

    aux = FCNHead(24, channels=12, num_convs=2, num_classes=5)
    y = aux(feats[2].detach())
    assert y.shape == (2, 5, 7, 10)
    y.square().mean().backward()
    _all_params_have_gradients(aux)
    assert FCNHead(24, num_convs=0, num_classes=3)(feats[2].detach()).shape == (2, 3, 7, 10)
    with pytest.raises(ValueError, match="expects 4 feature maps"):
        head(feats[:3])


@pytest.mark.parametrize("arch", ["swin_tiny_patch4_window7_224", "vit_small_patch16_224"])
def test_tiny_model_shapes_padding_and_gradients(arch):
    torch.manual_seed(0)
    model = SegmentationModel(arch, in_chans=20, num_classes=11, tiny=True, channels=16, aux_channels=8,
                              input_size=(44, 64))
    x = torch.randn(2, 20, 44, 64)  # 440x640 / 10: padded to 64 x 64, logits cropped back
    logits, aux = model(x)
    assert logits.shape == aux.shape == (2, 11, 44, 64)
    (logits.square().mean() + aux.square().mean()).backward()
    _all_params_have_gradients(model)
    model.eval()
    with torch.no_grad():
        y = model(torch.randn(1, 20, 37, 50))
    assert y.shape == (1, 11, 37, 50)


def test_init_from_an_exported_backbone_adapts_the_patch_embedding(tmp_path):
    """A file in evforge.export's format (tiny Swin, 6 input channels, ECDDP neck norms) -> a 20-channel model."""
    import timm
    from safetensors.torch import save_file

    from evforge.export import FORMAT
    from evforge.finetune.backbones import adapt_patch_embed
    from evforge.models.swin import TINY_SWIN_KWARGS

    kwargs = {**TINY_SWIN_KWARGS, "img_size": 64}
    src = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, in_chans=6, **kwargs)
    tensors = {k: v.clone() for k, v in src.state_dict().items() if not k.startswith("head")}
    dims = [24, 48, 96, 192]
    for i, d in enumerate(dims):
        tensors[f"ecddp_neck.stage_norms.{i}.weight"] = torch.full((d,), 1.0 + i)
        tensors[f"ecddp_neck.stage_norms.{i}.bias"] = torch.full((d,), 0.1 * i)
    meta = {"format": FORMAT, "arch": "swin_tiny_patch4_window7_224", "in_chans": 6, "timm_kwargs": kwargs,
            "norm_eps": 1e-6, "method": "ecddp"}
    path = tmp_path / "backbone.safetensors"
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in meta.items()})

    model = SegmentationModel(in_chans=20, num_classes=11, init=path, channels=16, aux_channels=8)
    bb = model.backbone
    w = tensors["patch_embed.proj.weight"]
    assert torch.equal(bb.patch_embed.proj.weight.detach(), adapt_patch_embed(w, 20))
    assert torch.equal(bb.layers[2].blocks[0].attn.qkv.weight.detach(), tensors["layers.2.blocks.0.attn.qkv.weight"])
    assert [float(n.weight[0].detach()) for n in bb.stage_norms] == [1.0, 2.0, 3.0, 4.0]
    assert bb.stage_norms[0].eps == 1e-6
    assert model.spec.init_in_chans == 6 and model.spec.in_chans == 20
    rebuilt = SegmentationModel(in_chans=20, num_classes=11, channels=16, aux_channels=8, spec=model.spec)
    rebuilt.load_state_dict(model.state_dict())  # the checkpointed spec rebuilds it without the file


# ------------------------------------------------------------------------------------ loss, augmentation, TTA
def test_loss_ignores_255_and_dice_is_zero_for_a_perfect_prediction():
    target = torch.tensor([[[0, 1], [2, 255]]])
    perfect = nn.functional.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 100
    assert float(dice_loss(perfect, target, 3)) == pytest.approx(0.0, abs=1e-6)
    loss, parts = segmentation_loss(perfect, target, 3)
    assert float(parts["ce"]) == pytest.approx(0.0, abs=1e-6)
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss, parts = segmentation_loss(logits, torch.full_like(target, 255), 3)  # nothing valid: finite, no nan
    assert torch.isfinite(loss) and float(parts["ce"]) == 0.0
    loss.backward()


def test_random_affine_identity_flip_and_ignored_outside():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 11, 16)
    t = torch.randint(0, 5, (3, 11, 16))
    theta = random_affine(3, (11, 16), (11, 16), generator=g)
    xo, to = warp_pair(x, t, theta, (11, 16))
    assert torch.equal(xo, x) and torch.equal(to, t)
    theta = random_affine(3, (11, 16), (11, 16), generator=g, hflip=1.0)
    xo, to = warp_pair(x, t, theta, (11, 16))
    assert torch.equal(xo, x.flip(-1)) and torch.equal(to, t.flip(-1))
    theta = random_affine(3, (11, 16), (22, 32), generator=g, rotate_deg=30.0, rotate_prob=1.0, scale=(0.3, 1.0))
    xo, to = warp_pair(x, t, theta, (22, 32), mode="bilinear")
    assert xo.shape == (3, 2, 22, 32) and to.shape == (3, 22, 32)
    assert set(to.unique().tolist()) <= set(range(5)) | {255}
    # the same seed draws the same views (exact resume)
    a = random_affine(4, (11, 16), (8, 8), generator=torch.Generator().manual_seed(5), scale=(0.1, 1), hflip=0.5)
    b = random_affine(4, (11, 16), (8, 8), generator=torch.Generator().manual_seed(5), scale=(0.1, 1), hflip=0.5)
    assert torch.equal(a, b)


def test_tta_flip_of_a_flip_equivariant_model_changes_nothing():
    torch.manual_seed(0)
    model = nn.Conv2d(4, 3, 1).eval()  # per-pixel: flip-equivariant
    x = torch.randn(2, 4, 9, 12)
    with torch.no_grad():
        plain = predict_logits(model, x)
        flipped = predict_logits(model, x, tta={"flip": True, "scales": [1.0]})
        scaled = predict_logits(model, x, out_size=(9, 12), tta={"flip": True, "scales": [1.0, 1.5]})
    torch.testing.assert_close(flipped, plain)
    assert scaled.shape == (2, 3, 9, 12)


# ----------------------------------------------------------------------------------- DSEC fixture end to end
T_OFFSET = 5_000_000
LABEL_T = (100_000, 200_000, 300_000)  # us after t_offset; 3 labels per sequence


def _class_map(shift: int) -> np.ndarray:
    """480 x 640 blocks of classes 0..9 (class 10 never occurs)."""
    yy, xx = np.mgrid[0:480, 0:640]
    return (((xx // 80) + 3 * (yy // 120) + shift) % 10).astype(np.uint8)


def write_dsec_sequence(seq: Path, seed: int, n_events: int = 120_000) -> None:
    """A DSEC-Semantic sequence (ESS layout): events.h5 (Blosc, ms_to_idx, t_offset), 640x440 label PNGs (class
    blocks, top rows 255) and timestamps.txt. Event density and polarity depend on the class under the pixel."""
    rng = np.random.default_rng(seed)
    classes = _class_map(seed)
    w = (1.0 + classes).ravel().astype(np.float64)
    pix = rng.choice(w.size, n_events, p=w / w.sum())
    y, x = np.divmod(pix, 640)
    t = np.sort(rng.integers(0, LABEL_T[-1] + 1000, n_events)).astype(np.uint32)
    cols = {"x": x.astype(np.uint16), "y": y.astype(np.uint16), "p": (classes.ravel()[pix] % 2).astype(np.uint8),
            "t": t}
    ev_dir = seq / "events" / "left"
    ev_dir.mkdir(parents=True)
    with h5py.File(ev_dir / "events.h5", "w") as f:
        for name, v in cols.items():
            f.create_dataset(f"events/{name}", data=v, chunks=(8192,), **hdf5plugin.Blosc(cname="zstd", clevel=1))
        ms = np.arange(0, math.ceil(int(t[-1]) / 1000) + 1, dtype=np.int64)
        f.create_dataset("ms_to_idx", data=np.searchsorted(t.astype(np.int64), ms * 1000).astype(np.uint64))
        f.create_dataset("t_offset", data=np.int64(T_OFFSET))
    label_dir = seq / "semantic" / "left" / "11classes" / "data"
    label_dir.mkdir(parents=True)
    label = classes[:440].copy()
    label[:4] = 255
    for i in range(len(LABEL_T)):
        Image.fromarray(label, mode="L").save(label_dir / f"{i:06d}.png")
    (seq / "semantic" / "timestamps.txt").write_text("".join(f"{T_OFFSET + lt}\n" for lt in LABEL_T))


@pytest.fixture(scope="module")
def dsec_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsec_seg")
    write_dsec_sequence(root / "src" / "train" / "zurich_city_00_a", 0)
    write_dsec_sequence(root / "src" / "train" / "zurich_city_01_a", 1)
    write_dsec_sequence(root / "src" / "test" / "zurich_city_13_a", 2)
    report = build_dataset("dsec", root / "src", root / "ds", events_per_label=20_000, progress=False)
    assert report.num_errors == 0 and report.splits == {"train": 6, "test": 3}
    return report.out


def _cfg(path, *extra):
    return load_config(CONFIGS / "dsec_tiny.yaml", [
        f"data.path={path}", "data.val_sequences=[zurich_city_01_a]", "log.progress=false",
        "log.tensorboard=false", *extra])


def test_dataset_items_inputs_and_splits(dsec_dataset):
    task = SegmentationTask()
    cfg = _cfg(dsec_dataset)
    task.cfg = cfg
    train, val, test = (task.build_dataset(cfg, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (3, 3, 3)
    assert set(train.sequences) == {"zurich_city_00_a"} and set(val.sequences) == {"zurich_city_01_a"}
    assert set(test.sequences) == {"zurich_city_13_a"} and task.label_size == (640, 440)
    item = train[1]
    assert len(item["events"]) == 20_000 and item["mask"].shape == (440, 640)  # the last 10 x 2000 events
    x, target = task.inputs(task.collate([train[0], train[1]]))
    assert x.shape == (2, 20, 440, 640) and target.shape == (2, 440, 640)
    assert float(x.sum()) <= 2 * 20_000 and int((target == 255).sum()) == 2 * 4 * 640
    strided = seg.LabelWindowDataset(dsec_dataset, "train", label_stride=2, first_label=1)
    assert [k.split("/")[1] for k in strided.keys] == ["000001", "000001"]
    with pytest.raises(ValueError, match="no sequence 'zurich_city_99_a'"):
        seg.LabelWindowDataset(dsec_dataset, "train", sequences=["zurich_city_99_a"])


def test_dsec_fixture_through_training_evaluation_and_reports(dsec_dataset, tmp_path):
    from evforge.finetune.evaluate import load_for_eval, select_best

    # a fixed view of a fixed set: no augmentation, all 3 training items in every batch
    cfg = _cfg(dsec_dataset, "data.batch_size=3", "task.augment.scale=[1.0, 1.0]", "task.augment.ratio=[1.0, 1.0]",
               "task.augment.hflip=0.0", "task.augment.rotate_prob=0.0")
    task = SegmentationTask()
    run = tmp_path / "run"
    with Trainer(cfg, task, out_dir=run, resume=None) as trainer:
        summary = trainer.fit()
    assert summary["step"] == 8
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = np.array([r["loss"] for r in rows if r["split"] == "train"])
    assert len(losses) == 8 and np.isfinite(losses).all()
    assert losses[-3:].mean() < losses[:3].mean() and losses[-1] < losses[0], losses.round(3)
    val = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in val] == [4, 8]
    last = val[-1]
    exact = segmentation_metrics(task.confusion())  # the last pass's matrix: 3 items in batches of 2 and 1
    assert exact["num_pixels"] == 3 * 436 * 640
    for key in ("mIoU", "mAcc", "aAcc"):
        assert 0.0 <= last[key] <= 1.0
        assert last[key] == pytest.approx(exact[key], rel=1e-12)

    # evaluation: the kept checkpoint with the best validation mIoU, rebuilt from its own task state (no
    # backbone file), on the test split with TTA (flip x 2 scales)
    best = select_best(run, "mIoU")
    assert int(best.stem.split("-")[1]) in (4, 8)
    task2, model2, cfg2, _ = load_for_eval(best)
    out = task2.evaluate_split(model2, cfg2, task2.test_split(cfg2), device="cpu", num_examples=2)
    assert out["tta"] == {"flip": True, "scales": [1.0, 1.5]} and len(out["examples"]) == 2
    assert out["num_samples"] == 3 and set(out["metrics"]) == {"mIoU", "mAcc", "aAcc"}
    cm = out["confusion"]
    assert int(cm.sum()) == 3 * 436 * 640 and out["metrics"]["mIoU"] == segmentation_metrics(cm)["mIoU"]
    files = task2.write_reports(out, tmp_path / "report", split="test")
    names = sorted(p.name for p in files)
    assert names == ["segmentation_class_iou.png", "segmentation_metrics.json", "segmentation_predictions.png",
                     "segmentation_report.md"]
    for p in files:
        assert p.stat().st_size > 0
        if p.suffix == ".png":
            with Image.open(p) as im:
                assert im.size[0] > 100 and im.size[1] > 100
    js = json.loads((tmp_path / "report" / "segmentation_metrics.json").read_text())
    assert js["iou"]["traffic sign"] is None and js["split"] == "test"  # absent class: null, not NaN
    assert "| mIoU |" in (tmp_path / "report" / "segmentation_report.md").read_text()


def test_resumed_run_repeats_the_augmented_losses(dsec_dataset, tmp_path):
    """Random crops / flips come from (seed, step, micro-step, rank): a run stopped and resumed is exact."""
    cfg = _cfg(dsec_dataset, "trainer.max_steps=3", "trainer.val_every_n_steps=null",
               "checkpoint.keep_every_n_steps=null")

    def losses(run):
        rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}

    with Trainer(cfg, SegmentationTask(), out_dir=tmp_path / "full", resume=None) as trainer:
        trainer.fit()
    with Trainer(cfg, SegmentationTask(), out_dir=tmp_path / "cut", resume=None) as trainer:
        assert trainer.fit(stop_at_step=1)["stopped"] == "stop_at_step"
    with Trainer(cfg, SegmentationTask(), out_dir=tmp_path / "cut", resume="auto") as trainer:
        trainer.fit()
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(full) == [1, 2, 3] and all(full[s] == cut[s] for s in full), (full, cut)


def test_report_writer_and_palette(tmp_path):
    mask = torch.tensor([[0, 5, 255], [10, 8, 3]])
    img = colorize(mask)
    assert img[0, 1].tolist() == DSEC_PALETTE[5].tolist() == [128, 64, 128]  # road
    assert img[0, 2].tolist() == [255, 255, 255] and img[1, 0].tolist() == [220, 220, 0]  # ignore, traffic sign
    metrics = segmentation_metrics(confusion_matrix(PRED, TARGET, 4, ignore_index=255), ["a", "b", "c", "d"])
    example = (torch.rand(20, 3, 4), PRED.to(torch.uint8), TARGET)
    files = write_segmentation_report(metrics, tmp_path, ["a", "b", "c", "d"], examples=[example], prefix="x")
    assert [p.name for p in files] == ["x_metrics.json", "x_report.md", "x_class_iou.png", "x_predictions.png"]
    md = (tmp_path / "x_report.md").read_text()
    assert "| mIoU | 38.89 |" in md and "| d | n/a | n/a |" in md


def test_unknown_task_options_are_refused_with_a_suggestion():
    from evforge.finetune.segmentation import task_options
    from evforge.trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"task\.loss\.dice_wieght: unknown option; did you mean 'dice_weight'"):
        task_options({"task": {"loss": {"dice_wieght": 1.0}}})
    assert task_options({"task": {"model": {"kwargs": {"anything": 1}}}})["model"]["kwargs"] == {"anything": 1}
