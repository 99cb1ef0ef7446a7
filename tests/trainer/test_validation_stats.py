"""Validation as additive statistics: the trainer sums each batch's statistics over batches and ranks and the task
turns the totals into metrics once, so top-1, per-class accuracy, top-5, mean loss and mIoU equal the values
computed directly on all samples, on 1 and on 2 (gloo) ranks with uneven batches."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from evforge.finetune.metrics import (
    SegmentationMetrics,
    confusion_matrix,
    mean_class_accuracy,
    mean_iou_from_confusion,
    topk_accuracy,
)
from evforge.trainer.metrics import Mean, accumulate, all_reduce_stats, mean_metrics

K = 5

TASK = textwrap.dedent('''
    """A task whose validation items carry fixed logits, labels and label masks (the model is not used)."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from evforge.finetune.metrics import ClassificationMetrics, SegmentationMetrics, topk_correct
    from evforge.trainer.metrics import Mean, mean_metrics
    from evforge.trainer.task import Task

    K = 5


    def items(n, seed=7):
        g = torch.Generator().manual_seed(seed)
        logits, labels = torch.randn(n, K, generator=g), torch.randint(0, K, (n,), generator=g)
        masks = torch.randint(0, K, (n, 2, 3), generator=g)
        masks[masks == 4] = 255  # ignored pixels; class 4 absent from the truth
        preds = torch.randint(0, K, (n, 2, 3), generator=g)
        return [{"logits": logits[i], "label": labels[i], "mask": masks[i], "pred": preds[i]} for i in range(n)]


    class StatsTask(Task):
        name = "stats"
        option_defaults = {"name": "stats", "n_val": 13}

        def build_model(self, cfg):
            self.cfg = cfg
            return nn.Linear(2, 1)

        def build_dataset(self, cfg, split):
            return items(8 if split == "train" else self.options(cfg)["n_val"], seed=1 if split == "train" else 7)

        def training_step(self, model, batch, state):
            return model(batch["logits"][:, :2]).pow(2).mean(), {}

        def validation_step(self, model, batch, state):
            logits, label = batch["logits"], batch["label"]
            stats = ClassificationMetrics(K).update({}, logits.argmax(-1), label)
            SegmentationMetrics(K, ignore_index=255, name="seg").update(stats, batch["pred"], batch["mask"])
            Mean("top5").update(stats, topk_correct(logits, label, 3).double(), count=None)
            return Mean("loss").update(stats, F.cross_entropy(logits, label), label.numel())

        def validation_metrics(self, stats):
            return {**ClassificationMetrics(K).compute(stats),
                    **SegmentationMetrics(K, ignore_index=255, name="seg").compute(stats), **mean_metrics(stats)}
''')

SCRIPT = textwrap.dedent('''
    import json, sys
    from evforge.trainer import Trainer
    from stats_task import StatsTask

    out, devices, n_val, val_batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    cfg = {"seed": 0, "task": {"n_val": n_val},
           "trainer": {"accelerator": "cpu", "devices": devices, "strategy": "ddp" if devices > 1 else "auto",
                       "max_steps": 1, "val_every_n_steps": 1, "stop_signals": []},
           "data": {"batch_size": 2, "val_batch_size": val_batch, "num_workers": 0},
           "log": {"jsonl": True, "tensorboard": False, "progress": False}}
    tr = Trainer(cfg, StatsTask(), out_dir=out, resume=None)
    summary = tr.fit()
    with open(f"{out}/val{tr.rank}.json", "w") as f:
        json.dump({"world": tr.world_size, "val": summary["val"]}, f)
    tr.close()
''')


def _expected(items) -> dict:
    """The metrics computed directly on all validation samples at once."""
    logits = torch.stack([it["logits"] for it in items])
    labels = torch.stack([it["label"] for it in items])
    masks, preds = torch.stack([it["mask"] for it in items]), torch.stack([it["pred"] for it in items])
    cm = confusion_matrix(preds, masks, K, ignore_index=255)
    return {"top1": float((logits.argmax(-1) == labels).double().mean()),
            "mean_class_acc": mean_class_accuracy(logits, labels, K),
            "top5": topk_accuracy(logits, labels, (3,))[3], "loss": float(F.cross_entropy(logits, labels)),
            "mIoU": mean_iou_from_confusion(cm)}


def _run(tmp_path, launch, devices: int, n_val: int, val_batch: int) -> list[dict]:
    (tmp_path / "stats_task.py").write_text(TASK)
    (tmp_path / "run.py").write_text(SCRIPT)
    out = tmp_path / f"out{devices}_{n_val}"
    launch([sys.executable, str(tmp_path / "run.py"), str(out), str(devices), str(n_val), str(val_batch)], tmp_path,
           out_dir=out)
    return [json.loads((out / f"val{r}.json").read_text()) for r in range(devices)]


def _task_module(tmp_path):
    (tmp_path / "stats_task.py").write_text(TASK)
    spec = importlib.util.spec_from_file_location("stats_task", tmp_path / "stats_task.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("devices, n_val, val_batch", [(1, 13, 4), (2, 13, 3), (2, 1, 4)])
def test_validation_metrics_equal_the_direct_ones_on_any_number_of_ranks(tmp_path, launch, devices, n_val,
                                                                         val_batch):
    """13 items in batches of 4 (4, 4, 4, 1) on one rank; on two ranks 7 and 6 items in batches of 3 (3, 3, 1 and
    3, 3: unequal counts of unequal batches); and 1 item on 2 ranks (rank 1 validates nothing)."""
    expected = _expected(_task_module(tmp_path).items(n_val))
    results = _run(tmp_path, launch, devices, n_val, val_batch)
    for r in results:
        assert r["world"] == devices
        for key, want in expected.items():
            got, rel = r["val"][key], 1e-6 if key == "loss" else 1e-12  # float32 batch losses; exact counts
            assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want, rel=rel, abs=1e-15), key


def test_metric_objects_sum_batches_to_the_whole_split():
    """Accumulated batch statistics give the whole split's metrics (no collective on one rank)."""
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (9, 3, 4), generator=g)
    target[target == 3] = 255
    pred = torch.randint(0, 3, (9, 3, 4), generator=g)  # class 3 neither true nor predicted: nan
    losses = torch.rand(9, generator=g, dtype=torch.float64)
    seg = SegmentationMetrics(4, ["a", "b", "c", "d"], ignore_index=255)
    total: dict = {}
    for a, b in ((0, 2), (2, 3), (3, 9)):
        stats = seg.update({}, pred[a:b], target[a:b])
        accumulate(total, Mean("loss").update(stats, losses[a:b].mean(), b - a))
    total = all_reduce_stats(total, None, 1)
    got = {**seg.compute(total), **mean_metrics(total)}
    cm = confusion_matrix(pred, target, 4, ignore_index=255)
    assert got["mIoU"] == pytest.approx(mean_iou_from_confusion(cm), rel=1e-14)
    assert got["loss"] == pytest.approx(float(losses.double().mean()), rel=1e-12)
    assert math.isnan(got["iou/d"]) and seg.matrix(total).tolist() == cm.tolist()
