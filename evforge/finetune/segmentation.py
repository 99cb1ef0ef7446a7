"""Semantic segmentation finetuning on DSEC-Semantic shards (ECDDP's protocol) as a trainer Task.

Data (:class:`LabelWindowDataset`): a ``dsec`` stream dataset (``evforge convert dsec``) holds one sample per
label: the last ``events_per_label`` events before the label time and the label PNG (640x440, class ids, 255 =
ignore) as its frame image. An item is that sample's events (the newest ``chunks * events_per_chunk``) and its
label. ``EventDataset`` cannot serve these: its stream items are *intervals between* frames, and a label window
has a single frame time.

Input (:meth:`SegmentationTask.inputs`, on the device): ECDDP's 20-channel ``stacked_histograms`` (10 chunks of
50k events, 2-channel counts each, OFF then ON as ECDDP's ``generate_event_histogram``) on the 640x480 sensor,
then the bottom ``crop_bottom = 40`` rows are dropped so the input is 640x440 like the labels (DSEC-Semantic
labels cover the rectified frame without its bottom 40 rows; ECDDP/ESS do ``event_tensor[:, :-40]``).
Training: one random affine per sample applied jointly to input and label (flip, random-resized crop to
``train_size``, rotation; nearest for labels, outside = ignore), drawn from a generator seeded by
``(seed, step, micro-step, rank)`` so resumed runs repeat it exactly. Build the data with ``--rectify``: the
labels live in the rectified frame.

The public code's input, exactly (configs/finetune/dsec_swin_t_reference.yaml): shards built *without*
``--rectify`` and ``task.rectify`` = ``{maps: DSEC source, rounding: trunc, wrap_negative_rows: true}`` (the
loader's rectification and histogram, :mod:`evforge.finetune.rectify`), and ``task.data_resize: [448, 640]``
(inputs bilinear ``align_corners=True`` and labels nearest to 448x640 when read, so training, the loss and the
metrics are at 448x640, where evforge by default zero-pads 440 -> 448 inside the model and scores the 440 label
rows). ``augment.pad_to``, ``border``, ``shift``, ``scale_jitter`` bring the affine close to its albumentations
pipeline.

Model (:class:`SegmentationModel`): a timm Swin (4 LayerNorm'ed stages, strides 4-32) or ViT (4 blocks rescaled
to strides 4-32) -> :class:`~evforge.finetune.uper.UPerHead` (+ :class:`~evforge.finetune.uper.FCNHead` on
stage 3 for the auxiliary loss); inputs are zero-padded to the backbone's multiple (32: 440 -> 448, ECDDP's
448x640) and the logits cropped back. From a backbone file the Swin has the file's window semantics and stage
norms, and its patch embedding is adapted to the 20 channels (``init_patch_embed: adapt``) or fresh with its
norm (``fresh``, the public code). Loss: CE (ignore 255) + Dice on the main logits, plus ``aux_weight`` (0.4)
times the same on the auxiliary logits (ECDDP's ``TaskLoss`` on both heads). ``optim.decay_all: true`` puts
weight decay on every parameter (the public AdamW) instead of sparing norms, biases and position tables.

Validation metrics: :meth:`SegmentationTask.validation_step` returns the batch's confusion matrix and loss sum;
the trainer sums them over batches and ranks and :meth:`SegmentationTask.validation_metrics` turns the total
into ``mIoU``, ``mAcc``, ``aAcc`` and each class's ``iou/<class>``: exact on any number of ranks.
:meth:`SegmentationTask.confusion` gives the last pass's matrix.

Evaluation (:mod:`evforge.finetune.evaluate`): :meth:`SegmentationTask.evaluate_split` (confusion over a split,
ECDDP's flip x scale TTA by default through :func:`predict_logits`, example predictions) and
:meth:`SegmentationTask.write_reports` (IoU bars, colourised predictions: :mod:`evforge.finetune.seg_report`).
The best checkpoint is chosen on ``val`` (``default_metric = "mIoU"``): a manifest ``val`` split, else
``data.val_sequences`` held out of training; never the reported ``data.test_split``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from evforge.data.collate import to_device
from evforge.data.dataset import resolve_manifest
from evforge.data.representations import stacked_histograms
from evforge.formats.manifest import Manifest

from ..labels import DSEC_CLASSES
from ..trainer.metrics import Mean, mean_metrics
from ..trainer.optim import default_param_groups
from ..trainer.task import Task
from .backbones import ModelSpec
from .metrics import SegmentationMetrics, confusion_matrix
from .rectify import Rectifier

# the parts of the task, re-exported: their names were this module's
from .seg_data import SENSOR_SIZE, LabelWindowDataset, SegCollate
from .seg_model import TINY_VIT_KWARGS, SegmentationModel, SwinFeatures, ViTFeatures, build_backbone  # noqa: F401
from .seg_ops import (  # noqa: F401
    BORDERS,
    IGNORE_INDEX,
    dice_loss,
    predict_logits,
    random_affine,
    resize_sample,
    segmentation_loss,
    segmentation_metrics,
    warp_pair,
)

__all__ = ["DSEC_CLASSES", "IGNORE_INDEX", "TASK_DEFAULTS", "LabelWindowDataset", "SegCollate", "SwinFeatures",
           "ViTFeatures", "SegmentationModel", "build_backbone", "dice_loss", "segmentation_loss", "random_affine",
           "warp_pair", "resize_sample", "predict_logits", "segmentation_metrics",
           "task_options", "SegmentationTask"]

# cfg["task"] defaults; the keys are checked (typos are errors). Paper values in configs/finetune/dsec_swin_t.yaml.
TASK_DEFAULTS: dict = {
    "name": "segmentation",
    "init": None,                  # exported backbone (.safetensors, evforge export); its metadata fixes the arch
    "num_classes": 11,
    "ignore_index": IGNORE_INDEX,
    "chunks": 10,                  # stacked histograms: the last chunks * events_per_chunk events ...
    "events_per_chunk": 50_000,    # ... as `chunks` 2-channel histograms -> 2 * chunks input channels
    "neg_first": True,             # OFF then ON per chunk (ECDDP's generate_event_histogram)
    "crop_bottom": 40,             # 480 sensor rows -> 440 label rows
    "data_resize": None,           # [H, W]: inputs (bilinear, align_corners) and labels (nearest) resized when
                                   # read, for training and metrics (ECDDP's resize: true, 448x640); null = as is
    "rectify": {"maps": None,      # DSEC source folder: rectify raw shards when read (null: the shards are as
                                   # the converter wrote them, rectified there or not)
                "rounding": "rint",             # rint (the converter's) | trunc (ECDDP's float -> int cast)
                "wrap_negative_rows": False},   # ECDDP's histogram wraps rows -H..-1 to H-1..0 (a typo)
    "resize": None,                # [H, W]: evaluate at this size (bilinear; logits resized back); null = as is
    "train_size": None,            # [H, W] of the training crops; null = the label size
    "init_patch_embed": "adapt",   # adapt (timm's adapt_input_conv) | fresh (ECDDP: patch_embed + norm dropped)
    "augment": {"hflip": 0.5, "scale": [0.08, 1.0], "ratio": [0.525, 0.933], "rotate_deg": 15.0,
                "rotate_prob": 0.5, "mode": "nearest",
                "pad_to": None,     # [H, W]: crops drawn on a canvas this large around the input (PadIfNeeded)
                "border": "zeros",  # outside the input: zeros + ignore | reflect (inputs and labels mirrored)
                "shift": 0.0,       # ShiftScaleRotate's shift and scale limits, applied with the rotation
                "scale_jitter": 0.0},
    "loss": {"dice_weight": 1.0, "aux_weight": 0.4},
    "val_tta": None,               # TTA during training-time validation ({flip, scales}); null = none
    "tta": {"flip": True, "scales": [1.0, 1.5, 2.0]},  # TTA of evaluate() unless given there
    "sync_bn": True,               # BatchNorm -> SyncBatchNorm when training on several ranks
    "model": {"arch": "swin_tiny_patch4_window7_224", "tiny": False, "kwargs": {}, "norm_eps": None,
              "drop_path_rate": 0.0, "channels": 512, "pool_scales": [1, 2, 3, 6], "aux_channels": 256,
              "aux_index": 2, "aux_num_convs": 1, "dropout": 0.1, "out_indices": None,
              "always_partition": None,   # Swin window options (evforge.models.swin); null = the backbone
              "mask_padded_keys": None},  # file's (pretraining's), else timm's / evforge's defaults
}
OPEN_KEYS = ("task.model.kwargs",)  # free-form (timm keyword arguments)


def task_options(cfg: dict) -> dict:
    """``cfg["task"]`` over :data:`TASK_DEFAULTS` (unknown keys raise :class:`ConfigError`)."""
    return SegmentationTask().options(cfg)


# ------------------------------------------------------------------------------------------------------- task
class SegmentationTask(Task):
    """Semantic segmentation finetuning (see the module docstring for data, model, loss and metrics)."""

    name = "segmentation"
    option_defaults = TASK_DEFAULTS
    open_options = OPEN_KEYS
    default_metric = "mIoU"  # what evforge.finetune.evaluate.select_best picks checkpoints by
    # keys read besides the trainer's (trainer.config.check_config refuses any other)
    config_keys = {"data": {"path": "str", "train_split": "str", "val_split": "str|null", "test_split": "str|null",
                            "train_sequences": "list|null", "val_sequences": "list|null", "label_stride": "int",
                            "first_label": "int", "min_events": "int"},
                   "optim": {"decay_all": "bool"}, "schedules": {}}

    def __init__(self):
        self.cfg: dict = {}
        self.sensor_size: tuple[int, int] | None = None
        self.label_size: tuple[int, int] | None = None
        self.classes: list[str] = list(DSEC_CLASSES)
        self._spec: ModelSpec | None = None
        self._val_cm: torch.Tensor | None = None  # the last validation pass's confusion matrix

    # ---- config, model, data
    def build_model(self, cfg: dict) -> nn.Module:
        self.cfg = cfg
        o, m = self.options(cfg), self.options(cfg)["model"]
        size = o["train_size"] or o["data_resize"] or [SENSOR_SIZE[1] - int(o["crop_bottom"]), SENSOR_SIZE[0]]
        model = SegmentationModel(m["arch"], in_chans=2 * int(o["chunks"]), num_classes=int(o["num_classes"]),
                                  init=o["init"], tiny=bool(m["tiny"]), channels=int(m["channels"]),
                                  pool_scales=tuple(m["pool_scales"]), aux_channels=int(m["aux_channels"] or 0),
                                  aux_index=int(m["aux_index"]), aux_num_convs=int(m["aux_num_convs"]),
                                  dropout=float(m["dropout"]), drop_path_rate=m["drop_path_rate"],
                                  backbone_kwargs=m["kwargs"], norm_eps=m["norm_eps"], input_size=size,
                                  out_indices=m["out_indices"], spec=self._spec,
                                  init_patch_embed=str(o["init_patch_embed"]),
                                  always_partition=m["always_partition"], mask_padded_keys=m["mask_padded_keys"])
        self._spec = model.spec
        dist = torch.distributed
        if o["sync_bn"] and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def state_dict(self) -> dict:
        """The backbone spec (JSON), so evaluation rebuilds the network without the ``init`` file."""
        return {"model_spec": json.dumps(self._spec.to_dict()) if self._spec else ""}

    def load_state_dict(self, d: dict) -> None:
        if d.get("model_spec"):
            self._spec = ModelSpec.from_dict(json.loads(d["model_spec"]))

    def build_dataset(self, cfg: dict, split: str):
        """``train``: ``data.train_split`` minus ``data.val_sequences`` (only ``data.train_sequences`` when set);
        ``val``: the manifest split ``data.val_split`` when it exists, else ``data.val_sequences`` held out of
        the train split, else None (no validation); any other name: ``data.<name>_split`` or that split."""
        self.cfg = self.cfg or cfg
        d, o = cfg["data"], self.options(cfg)
        path = d["path"]
        train_split = d.get("train_split", "train")
        held_out = list(d.get("val_sequences") or [])
        rect = o["rectify"]
        common = dict(label_stride=int(d.get("label_stride", 1)), first_label=int(d.get("first_label", 0)),
                      min_events=int(d.get("min_events", 1)),
                      max_events=int(o["chunks"]) * int(o["events_per_chunk"]),
                      rectifier=Rectifier(rect["maps"], str(rect["rounding"])) if rect["maps"] else None)
        if split == "train":
            ds = LabelWindowDataset(path, train_split, sequences=d.get("train_sequences"),
                                    exclude_sequences=held_out, **common)
        elif split == "val":
            val_split = d.get("val_split", "val")
            if val_split and val_split in Manifest.load(resolve_manifest(path)).splits:
                ds = LabelWindowDataset(path, val_split, **common)
            elif held_out:
                ds = LabelWindowDataset(path, train_split, sequences=held_out, **common)
            else:
                return None
        else:
            ds = LabelWindowDataset(path, d.get(f"{split}_split", split), **common)
        self._check_sizes(ds, o)
        return ds

    def _check_sizes(self, ds: LabelWindowDataset, o: dict) -> None:
        W, H = ds.sensor_size
        if ds.label_size is not None and tuple(ds.label_size) != (W, H - int(o["crop_bottom"])):
            lw, lh = ds.label_size
            raise ValueError(f"{ds.manifest_path}: labels are {lw}x{lh}, the {W}x{H} sensor minus "
                             f"task.crop_bottom={o['crop_bottom']} rows is {W}x{H - int(o['crop_bottom'])}")
        self.sensor_size, self.label_size = (W, H), ds.label_size
        self.classes = list(ds.classes) or list(DSEC_CLASSES)

    def collate(self, items: list) -> dict:
        return SegCollate()(items)

    def param_groups(self, model: nn.Module, cfg: dict) -> list[dict]:
        """evforge's groups (no weight decay on norms, biases, position tables), or with ``optim.decay_all``
        one group that decays every parameter, as the public code's ``AdamW(self.model.parameters(),
        weight_decay=...)`` (trainer/seg_trainer.py:136-140)."""
        o = cfg.get("optim", {})
        wd = o.get("weight_decay", 0.05)
        if o.get("decay_all"):
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            return [{"params": [p for _, p in named], "weight_decay": float(wd), "lr_scale": 1.0,
                     "name": "decay_all", "param_names": [n for n, _ in named]}]
        return default_param_groups(model, wd, o.get("lr_scales"), o.get("no_decay", ()))

    # ---- tensors
    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(stacked histograms ``(B, 2 * chunks, H - crop_bottom, W)``, labels ``(B, H', W')`` int64), both
        resized to ``data_resize`` when set (:func:`resize_sample`)."""
        o = self.options()
        W, H = self.sensor_size or SENSOR_SIZE
        x = stacked_histograms(batch, chunks=int(o["chunks"]), events_per_chunk=int(o["events_per_chunk"]),
                               height=H, width=W, neg_first=bool(o["neg_first"]),
                               wrap_negative_rows=bool(o["rectify"]["wrap_negative_rows"]))
        x = x[:, :, : H - int(o["crop_bottom"])]
        target = batch["mask"].to(x.device).long()
        if target.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"labels are {tuple(target.shape[-2:])}, inputs {tuple(x.shape[-2:])} after "
                             f"task.crop_bottom={o['crop_bottom']}")
        if o["data_resize"]:
            x, target = resize_sample(x, target, o["data_resize"])
        return x, target

    def augment(self, x: torch.Tensor, target: torch.Tensor, generator: torch.Generator):
        """The training views: :func:`random_affine` + :func:`warp_pair` to ``train_size``."""
        o = self.options()
        a = o["augment"]
        out_hw = tuple(o["train_size"] or x.shape[-2:])
        theta = random_affine(x.shape[0], x.shape[-2:], out_hw, generator=generator, scale=a["scale"],
                              ratio=a["ratio"], hflip=float(a["hflip"]), rotate_deg=float(a["rotate_deg"]),
                              rotate_prob=float(a["rotate_prob"]), pad_to=a["pad_to"], shift=float(a["shift"]),
                              scale_jitter=float(a["scale_jitter"]))
        return warp_pair(x, target, theta, out_hw, mode=a["mode"], ignore_index=int(o["ignore_index"]),
                         border=a["border"])

    def loss(self, logits, target, aux=None) -> tuple[torch.Tensor, dict]:
        o = self.options()
        k, ig, dw = int(o["num_classes"]), int(o["ignore_index"]), float(o["loss"]["dice_weight"])
        main, parts = segmentation_loss(logits, target, k, ig, dw)
        logs = {"loss_main": main.detach(), **parts}
        total = main
        if aux is not None:
            aux_loss, _ = segmentation_loss(aux, target, k, ig, dw)
            total = total + float(o["loss"]["aux_weight"]) * aux_loss
            logs["loss_aux"] = aux_loss.detach()
        return total, logs

    # ---- steps
    def training_step(self, model: nn.Module, batch, state: dict):
        x, target = self.inputs(batch)
        x, target = self.augment(x, target, self.step_generator(state, salt=1, device=state["device"]))
        out = model(x)
        logits, aux = out if isinstance(out, (tuple, list)) else (out, None)
        return self.loss(logits, target, aux)

    def predict(self, model: nn.Module, batch: dict, tta: dict | None = None):
        """(logits at the label size, labels, inputs) of a batch; ``tta`` as :func:`predict_logits`."""
        x, target = self.inputs(batch)
        logits = predict_logits(model, x, out_size=target.shape[-2:], resize=self.options()["resize"], tta=tta)
        return logits, target, x

    @torch.no_grad()
    def validation_step(self, model: nn.Module, batch, state) -> dict:
        """The batch's loss and confusion matrix (additive: the trainer sums them over batches and ranks)."""
        o = self.options()
        k = int(o["num_classes"])
        logits, target, _ = self.predict(model, batch, tta=o["val_tta"])
        loss, _ = segmentation_loss(logits, target, k, int(o["ignore_index"]), float(o["loss"]["dice_weight"]))
        stats = self._val_metrics().update({}, logits.argmax(1), target)
        return Mean("loss").update(stats, loss, int(target.shape[0]))

    def _val_metrics(self) -> SegmentationMetrics:
        o = self.options()
        return SegmentationMetrics(int(o["num_classes"]), self.classes, ignore_index=int(o["ignore_index"]))

    def validation_metrics(self, stats: dict) -> dict[str, float]:
        """``mIoU``, ``mAcc``, ``aAcc``, ``iou/<class>`` of the split's confusion matrix, and ``loss``; the
        matrix is kept (:meth:`confusion`)."""
        metrics = self._val_metrics()
        self._val_cm = metrics.matrix(stats)
        return {**metrics.compute(stats), **mean_metrics(stats)}

    def confusion(self) -> torch.Tensor:
        """The confusion matrix ``[true, pred]`` of the last validation pass (all ranks')."""
        if self._val_cm is None:
            raise RuntimeError("no validation pass yet")
        return self._val_cm.clone()

    # ---- evaluation (evforge.finetune.evaluate)
    def test_split(self, cfg: dict) -> str:
        """The reported split: ``data.test_split`` (default ``test``)."""
        return (cfg.get("data") or {}).get("test_split") or "test"

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, *, device=None, tta: dict | None | bool = True,
                 num_examples: int = 4) -> tuple[torch.Tensor, list]:
        """(confusion matrix ``[true, pred]``, examples) over ``loader`` (batches of :meth:`collate`), the model
        in eval mode. ``tta``: True = ``task.tta`` (flip x scales), False/None = none, or a dict; ``examples``:
        up to ``num_examples`` ``(input (C, H, W), prediction (H, W) uint8, label (H, W))`` CPU tensors."""
        o = self.options()
        tta = o["tta"] if tta is True else (tta or None)
        k, ig = int(o["num_classes"]), int(o["ignore_index"])
        device = torch.device(device) if device is not None else next(model.parameters()).device
        was = model.training
        model.eval()
        cm = torch.zeros(k, k, dtype=torch.int64)
        examples: list = []
        for batch in loader:
            batch = to_device(batch, device)
            logits, target, x = self.predict(model, batch, tta=tta)
            pred = logits.argmax(1)
            cm += confusion_matrix(pred, target, k, ignore_index=ig)
            for b in range(min(x.shape[0], num_examples - len(examples))):
                examples.append((x[b].cpu(), pred[b].to(torch.uint8).cpu(), target[b].cpu()))
        model.train(was)
        return cm, examples

    def evaluate_split(self, model: nn.Module, cfg: dict, split: str, *, device="cpu",
                       batch_size: int | None = None, tta: dict | None | bool = True, num_examples: int = 4) -> dict:
        """Score ``model`` on ``split`` (in dataset order, ``task.tta`` unless ``tta`` says otherwise).

        Returns ``{"metrics": {mIoU, mAcc, aAcc}, "confusion", "class_names", "num_samples", "per_class"
        (class, iou, accuracy, support), "segmentation" (:func:`segmentation_metrics`), "examples", "tta"}``.
        """
        from torch.utils.data import DataLoader

        self.cfg = cfg
        ds = self.build_dataset(cfg, split)
        if ds is None:
            raise ValueError(f"no {split!r} split: set data.val_split or data.val_sequences")
        bs = int(batch_size or cfg["data"].get("val_batch_size") or cfg["data"]["batch_size"])
        loader = DataLoader(ds, batch_size=bs, shuffle=False, collate_fn=self.collate, num_workers=0)
        tta = self.options()["tta"] if tta is True else (tta or None)
        cm, examples = self.evaluate(model.to(device), loader, device=device, tta=tta, num_examples=num_examples)
        seg = segmentation_metrics(cm, self.classes)
        seg["tta"] = tta
        per_class = [{"class": name, "iou": seg["iou"][name], "accuracy": seg["acc"][name],
                      "support": int(cm[i].sum())} for i, name in enumerate(seg["iou"])]
        return {"metrics": {k: seg[k] for k in ("mIoU", "mAcc", "aAcc")}, "confusion": cm,
                "class_names": list(seg["iou"]), "num_samples": len(ds), "per_class": per_class,
                "segmentation": seg, "examples": examples, "tta": tta}

    def write_reports(self, out: dict, out_dir, *, split: str | None = None) -> list[Path]:
        """The segmentation report of an :meth:`evaluate_split` result into ``out_dir``: per-class IoU bars,
        colourised predictions, ``segmentation_metrics.json``, ``segmentation_report.md``
        (:func:`evforge.finetune.seg_report.write_segmentation_report`)."""
        from .seg_report import write_segmentation_report

        metrics = dict(out["segmentation"])
        if split is not None:
            metrics["split"] = split
        return write_segmentation_report(metrics, out_dir, out["class_names"], examples=out.get("examples") or (),
                                         ignore_index=int(self.options()["ignore_index"]))
