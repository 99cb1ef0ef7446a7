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
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..dataset_builder.dataset import collate_events, resolve_manifest
from ..dataset_builder.manifest import Manifest
from ..dataset_builder.shards import ShardReader
from ..export import read_backbone
from ..models.swin import TINY_SWIN_KWARGS, PadFirstSwinBlock, use_pad_first_blocks
from ..representations import stacked_histograms
from ..trainer.optim import default_param_groups
from ..trainer.metrics import Mean, mean_metrics
from ..trainer.task import Task
from .backbones import ModelSpec, create_model, family, load_init, resolve_spec
from .rectify import Rectifier
from .metrics import (SegmentationMetrics, accuracy_from_confusion, class_accuracy_from_confusion, confusion_matrix,
                      iou_from_confusion, mean_class_accuracy_from_confusion, mean_iou_from_confusion)
from .uper import FCNHead, UPerHead

__all__ = ["DSEC_CLASSES", "IGNORE_INDEX", "TASK_DEFAULTS", "LabelWindowDataset", "SegCollate", "SwinFeatures",
           "ViTFeatures", "SegmentationModel", "build_backbone", "dice_loss", "segmentation_loss", "random_affine",
           "warp_pair", "resize_sample", "predict_logits", "segmentation_metrics",
           "task_options", "SegmentationTask"]

# DSEC-Semantic's 11 classes (the converter writes them into the manifest; this is the fallback without one)
DSEC_CLASSES = ["background", "building", "fence", "person", "pole", "road", "sidewalk", "vegetation", "car", "wall",
                "traffic sign"]
IGNORE_INDEX = 255
SENSOR_SIZE = (640, 480)  # DSEC's event camera (width, height), used when no dataset was built
TINY_VIT_KWARGS = dict(embed_dim=48, depth=4, num_heads=2)

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


# ------------------------------------------------------------------------------------------------------ data
def _sequence_and_index(reader: ShardReader, i: int, key: str) -> tuple[str, int, bool]:
    """(sequence, label index, rectified by the converter) of a DSEC sample: its attrs, else its key
    ``<sequence>/<index:06d>``."""
    attrs = reader.sample_attrs(i)
    seq, _, tail = key.rpartition("/")
    seq = str(attrs.get("sequence", seq or key))
    index = attrs.get("label_index", int(tail) if tail.isdigit() else 0)
    return seq, int(index), bool(attrs.get("rectified", False))


class LabelWindowDataset(Dataset):
    """One item per labelled stream sample of a manifest split: ``{events, label: -1, key, mask}``.

    ``events``: the newest ``max_events`` events of the sample (all when None); ``mask``: its label image
    (H, W) uint8 (frame image 0). ``sequences`` keeps only those sequences, ``exclude_sequences`` drops some
    (both are checked to exist); ``label_stride`` / ``first_label`` keep label indices
    ``first_label, first_label + stride, ...`` of every sequence (ECDDP/ESS: 6 and 2); ``min_events`` drops
    samples with fewer events (index only). ``rectifier`` (:class:`~evforge.finetune.rectify.Rectifier`)
    rectifies the events of raw (unrectified) shards when an item is read; their x, y are then int32 and may lie
    outside the sensor (the representation drops them after chunking, as the public loader).
    """

    def __init__(self, manifest_path, split: str, *, sequences: Sequence[str] | None = None,
                 exclude_sequences: Sequence[str] = (), label_stride: int = 1, first_label: int = 0,
                 min_events: int = 1, max_events: int | None = None, rectifier: Rectifier | None = None):
        path = resolve_manifest(manifest_path)
        m = Manifest.load(path)
        if split not in m.splits:
            raise ValueError(f"{path}: no split {split!r} (splits: {', '.join(m.splits)})")
        if label_stride < 1 or first_label < 0:
            raise ValueError(f"label_stride must be >= 1 and first_label >= 0, got {label_stride}, {first_label}")
        self.manifest_path, self.split, self.name, self.classes = path, split, m.name, list(m.classes)
        self.max_events = None if max_events is None else int(max_events)
        self.rectifier = rectifier
        self.readers = [ShardReader(p) for p in m.shard_paths(path.absolute().parent, split)]
        for r in self.readers:
            if r.kind != "streams" or not r.has_frame_images:
                raise ValueError(f"{r.path}: segmentation needs stream shards with label images "
                                 f"(evforge convert dsec), got kind={r.kind!r} without frame images")
        sizes = {(r.sensor_size, r.frame_image_size) for r in self.readers}
        if len(sizes) > 1:
            raise ValueError(f"{path}: shards of split {split!r} mix sensor / label sizes {sorted(sizes)}")
        self.sensor_size, self.label_size = sizes.pop() if sizes else (SENSOR_SIZE, None)
        wanted = None if sequences is None else set(sequences)
        excluded = set(exclude_sequences or ())
        seen: set[str] = set()
        self._items: list[tuple[int, int]] = []
        self.keys: list[str] = []
        self.sequences: list[str] = []
        for si, r in enumerate(self.readers):
            counts = r.index["count"]
            for i, key in enumerate(r.keys):
                seq, index, rectified = _sequence_and_index(r, i, key)
                if rectifier is not None and rectified:
                    raise ValueError(f"{r.path}: sample {key!r} was rectified by the converter (--rectify); "
                                     f"rectifying when read needs shards built without --rectify")
                seen.add(seq)
                if (wanted is not None and seq not in wanted) or seq in excluded:
                    continue
                if index < first_label or (index - first_label) % label_stride or counts[i] < min_events:
                    continue
                self._items.append((si, i))
                self.keys.append(key)
                self.sequences.append(seq)
        missing = sorted(((wanted or set()) | excluded) - seen)
        if missing:
            raise ValueError(f"{path}: split {split!r} has no sequence {', '.join(map(repr, missing))} "
                             f"(has: {', '.join(sorted(seen))})")
        if rectifier is not None:
            for seq in sorted(set(self.sequences)):
                rectifier.path(seq)  # a missing map fails here, not in a loader worker

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i) -> dict:
        si, s = self._items[i]
        r = self.readers[si]
        count = int(r.index["count"][s])
        start = 0 if self.max_events is None else max(0, count - self.max_events)
        mask = r.frame_image(s, 0)
        if mask is None:
            raise ValueError(f"{r.path}: sample {self.keys[i]!r} has no label image")
        events = r.events(s, start)
        if self.rectifier is not None:
            events = self.rectifier(events, self.sequences[i])
        return {"events": events, "label": -1, "key": self.keys[i], "mask": np.asarray(mask)}

    def close(self) -> None:
        """Close this process's shard handles (they reopen on the next read)."""
        for r in self.readers:
            r.close()

    def __repr__(self) -> str:
        return f"LabelWindowDataset({self.manifest_path}, split={self.split!r}, {len(self)} items)"


class SegCollate:
    """``collate_events`` plus ``mask``: the stacked label images ``(B, H, W)`` uint8."""

    def __call__(self, items: list[dict]) -> dict:
        out = collate_events(items)
        out["mask"] = torch.from_numpy(np.stack([np.asarray(it["mask"], dtype=np.uint8) for it in items]))
        return out


# -------------------------------------------------------------------------------------------------- backbones
class SwinFeatures(nn.Module):
    """timm Swin -> 4 NCHW maps (strides 4, 8, 16, 32), each through its own LayerNorm (mmseg's ``norm{i}``).

    The blocks are as the spec built them (:func:`~evforge.finetune.backbones.create_model`: the backbone file's
    window semantics); a Swin built without block options gets evforge's pad-first blocks with padded-key
    masking. The stage norms start from the backbone file's ``stage_norms.{i}`` (older files:
    ``ecddp_neck.stage_norms.{i}``) as the public code loads its ``norm0..norm3`` (model/swin_model.py), the
    last one else from timm's ``norm``.
    """

    def __init__(self, net: nn.Module, tensors: dict | None = None):
        super().__init__()
        if not all(isinstance(b, PadFirstSwinBlock) for stage in net.layers for b in stage.blocks):
            use_pad_first_blocks(net)
        dims = [int(info["num_chs"]) for info in net.feature_info]
        eps = float(getattr(net.norm, "eps", 1e-5))
        self.patch_embed, self.layers = net.patch_embed, net.layers
        self.stage_norms = nn.ModuleList([nn.LayerNorm(d, eps=eps) for d in dims])
        tensors = tensors or {}
        for i, norm in enumerate(self.stage_norms):
            w, b = (next((tensors[k] for k in (f"stage_norms.{i}.{n}", f"ecddp_neck.stage_norms.{i}.{n}")
                          if k in tensors), None) for n in ("weight", "bias"))
            if w is not None and b is not None:
                norm.load_state_dict({"weight": w, "bias": b})
            elif i == len(dims) - 1 and tensors and isinstance(net.norm, nn.LayerNorm):
                norm.load_state_dict(net.norm.state_dict())
        self.out_channels = dims
        self.pad_multiple = int(self.patch_embed.patch_size[0]) * 2 ** (len(dims) - 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.patch_embed(x)  # NHWC
        outs = []
        for stage, norm in zip(self.layers, self.stage_norms):
            f = stage(f)
            outs.append(norm(f).permute(0, 3, 1, 2).contiguous())
        return outs


class ViTFeatures(nn.Module):
    """timm ViT -> 4 NCHW maps at strides 4, 8, 16, 32 from 4 blocks (default: evenly spaced, the last
    included), rescaled by 2 stacked / 1 transposed conv, identity, max-pool (the BEiT / MAE UPerNet neck)."""

    def __init__(self, net: nn.Module, out_indices: Sequence[int] | None = None):
        super().__init__()
        depth = len(net.blocks)
        idx = list(out_indices) if out_indices else sorted({max(0, depth * k // 4 - 1) for k in (1, 2, 3, 4)})
        if len(idx) != 4:
            raise ValueError(f"ViT segmentation needs 4 distinct block indices, got {idx} (depth {depth})")
        self.indices = idx
        net.prune_intermediate_layers(idx, prune_norm=True, prune_head=True)  # no unused parameters (DDP)
        self.net = net
        d = int(net.embed_dim)
        self.fpn = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(d, d, 2, 2), nn.BatchNorm2d(d), nn.GELU(), nn.ConvTranspose2d(d, d, 2, 2)),
            nn.ConvTranspose2d(d, d, 2, 2), nn.Identity(), nn.MaxPool2d(2)])
        self.out_channels = [d] * 4
        self.pad_multiple = int(net.patch_embed.patch_size[0]) * 2

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.net.forward_intermediates(x, indices=self.indices, output_fmt="NCHW", intermediates_only=True)
        return [f(m) for f, m in zip(self.fpn, feats)]


def build_backbone(arch: str, in_chans: int, *, init=None, tiny: bool = False, kwargs: dict | None = None,
                   norm_eps: float | None = None, drop_path_rate: float | None = None, input_size=(448, 640),
                   out_indices=None, spec: ModelSpec | dict | None = None, init_patch_embed: str = "adapt",
                   always_partition: bool | None = None, mask_padded_keys: bool | None = None
                   ) -> tuple[nn.Module, ModelSpec]:
    """(feature extractor, its :class:`~evforge.finetune.backbones.ModelSpec`). With ``init`` (an exported
    backbone) the architecture comes from the file and its weights are loaded (patch embedding adapted to
    ``in_chans`` or fresh: ``init_patch_embed``, :func:`~evforge.finetune.backbones.load_init`); with ``spec``
    (from a checkpoint) nothing is read. ``always_partition`` / ``mask_padded_keys`` (Swin) override the
    file's window semantics when not None."""
    tensors = None
    if spec is None:
        meta = None
        if init:
            tensors, meta = read_backbone(init)
        fam = family(meta["arch"] if meta else arch)
        base = (dict(TINY_SWIN_KWARGS) if fam == "swin" else dict(TINY_VIT_KWARGS)) if tiny else {}
        model_cfg = {"arch": arch, "kwargs": {**base, **(kwargs or {})}, "norm_eps": norm_eps,
                     "drop_path_rate": drop_path_rate, "always_partition": always_partition,
                     "mask_padded_keys": mask_padded_keys}
        spec = resolve_spec(model_cfg, in_chans=in_chans, num_classes=0, input_size=list(input_size),
                            init_meta=meta, init=None if init is None else str(init))
        if fam == "vit":
            spec.timm_kwargs["dynamic_img_size"] = True  # any input size (position embeddings resampled)
    elif isinstance(spec, dict):
        spec = ModelSpec.from_dict(spec)
    net = create_model(spec)
    if tensors is not None:
        load_init(net, tensors, source=init, patch_embed=init_patch_embed)
    if family(spec.arch) == "swin":
        return SwinFeatures(net, tensors), spec
    return ViTFeatures(net, out_indices), spec


# ------------------------------------------------------------------------------------------------------ model
def _resize(x: torch.Tensor, size, align_corners: bool = False) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


class SegmentationModel(nn.Module):
    """Backbone + UPerNet (+ FCN auxiliary head): ``(B, in_chans, H, W)`` -> logits ``(B, K, H, W)``, and
    ``(logits, aux_logits)`` in training mode. Any ``H, W``: zero-padded to the backbone's multiple (32) and the
    (bilinearly upsampled) logits cropped back. ``tiny`` builds a CPU-sized backbone (tests); ``aux_channels=0``
    drops the auxiliary head. The backbone's spec is ``self.spec`` (rebuild without the ``init`` file);
    ``init_patch_embed``, ``always_partition``, ``mask_padded_keys``: see :func:`build_backbone`."""

    def __init__(self, backbone: str = "swin_tiny_patch4_window7_224", in_chans: int = 20, num_classes: int = 11,
                 init=None, tiny: bool = False, *, channels: int = 512, pool_scales: Sequence[int] = (1, 2, 3, 6),
                 aux_channels: int = 256, aux_index: int = 2, aux_num_convs: int = 1, dropout: float = 0.1,
                 drop_path_rate: float | None = None, backbone_kwargs: dict | None = None,
                 norm_eps: float | None = None, input_size=(448, 640), out_indices=None,
                 spec: ModelSpec | dict | None = None, init_patch_embed: str = "adapt",
                 always_partition: bool | None = None, mask_padded_keys: bool | None = None):
        super().__init__()
        self.backbone, self.spec = build_backbone(backbone, in_chans, init=init, tiny=tiny, kwargs=backbone_kwargs,
                                                  norm_eps=norm_eps, drop_path_rate=drop_path_rate,
                                                  input_size=input_size, out_indices=out_indices, spec=spec,
                                                  init_patch_embed=init_patch_embed,
                                                  always_partition=always_partition,
                                                  mask_padded_keys=mask_padded_keys)
        dims = self.backbone.out_channels
        self.num_classes, self.aux_index = int(num_classes), int(aux_index)
        self.decode_head = UPerHead(dims, channels, pool_scales, num_classes, dropout)
        self.aux_head = (FCNHead(dims[aux_index], aux_channels, aux_num_convs, num_classes, dropout)
                         if aux_channels else None)
        self.pad_multiple = self.backbone.pad_multiple

    def forward(self, x: torch.Tensor):
        h, w = x.shape[-2:]
        m = self.pad_multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        feats = self.backbone(x)
        size = x.shape[-2:]
        logits = _resize(self.decode_head(feats), size)[..., :h, :w]
        if self.training and self.aux_head is not None:
            aux = _resize(self.aux_head(feats[self.aux_index]), size)[..., :h, :w]
            return logits, aux
        return logits


# ------------------------------------------------------------------------------------------------------- loss
def dice_loss(logits: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX,
              smooth: float = 1.0, p: int = 2) -> torch.Tensor:
    """ECDDP's multi-class Dice: per class ``1 - (2 sum(P T) + s) / (sum(P^p + T^p) + s)`` over the whole batch
    (softmax P, one-hot T, ignored pixels zeroed in both), averaged over the classes."""
    valid = (target != ignore_index).unsqueeze(1)
    probs = logits.float().softmax(1) * valid
    onehot = F.one_hot(torch.where(valid[:, 0], target, 0), num_classes).permute(0, 3, 1, 2).float() * valid
    dims = (0, 2, 3)
    num = 2 * (probs * onehot).sum(dims) + smooth
    den = (probs.pow(p) + onehot.pow(p)).sum(dims) + smooth
    return (1 - num / den).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, num_classes: int,
                      ignore_index: int = IGNORE_INDEX, dice_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """CE (mean over non-ignored pixels; 0 when there are none) + ``dice_weight`` x :func:`dice_loss`."""
    valid = (target != ignore_index).sum().clamp(min=1)
    ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum") / valid
    dice = dice_loss(logits, target, num_classes, ignore_index) if dice_weight else logits.new_zeros(())
    return ce + dice_weight * dice, {"ce": ce.detach(), "dice": dice.detach()}


# ---------------------------------------------------------------------------------------------- augmentation
def random_affine(n: int, in_hw, out_hw, *, generator: torch.Generator, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                  hflip: float = 0.0, rotate_deg: float = 0.0, rotate_prob: float = 0.0, pad_to=None,
                  shift: float = 0.0, scale_jitter: float = 0.0) -> torch.Tensor:
    """``(n, 2, 3)`` ``affine_grid`` matrices mapping an ``out_hw`` output onto random crops of an ``in_hw`` input.

    Per sample: crop area ``scale`` x the canvas area, crop aspect ``ratio`` x the output aspect (log-uniform;
    clamped to the canvas), uniform position on the canvas, horizontal flip with probability ``hflip``; then,
    with probability ``rotate_prob``, a rotation about the crop centre by U(-rotate_deg, rotate_deg) together
    with a zoom by U(1 - scale_jitter, 1 + scale_jitter) and a shift of the output by U(-shift, shift) of its
    size (albumentations' ``ShiftScaleRotate``). The canvas is the input, or with ``pad_to`` [H, W] an area of
    ``max(input, pad_to)`` centred on it (albumentations' ``PadIfNeeded``; what falls outside the input is
    :func:`warp_pair`'s ``border``). The same 7 + 3 uniform draws per sample are taken whatever the options, so
    streams do not shift when options change. ``scale=ratio=(1, 1)`` with ``out_hw == in_hw`` and no flip /
    rotation is the identity.
    """
    (H, W), (Ho, Wo) = in_hw, out_hw
    Hc, Wc = (max(H, int(pad_to[0])), max(W, int(pad_to[1]))) if pad_to else (H, W)
    top, left = (Hc - H) // 2, (Wc - W) // 2  # PadIfNeeded centres the input: int((min_height - rows) / 2)
    dev = generator.device
    u = torch.rand(7, n, generator=generator, device=dev, dtype=torch.float64)
    v = torch.rand(3, n, generator=generator, device=dev, dtype=torch.float64)  # drawn after u: u is unchanged
    s = scale[0] + (scale[1] - scale[0]) * u[0]
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[1]) * (Wo / Ho)
    cw = torch.sqrt(s * Hc * Wc * aspect).clamp(max=Wc)
    ch = torch.sqrt(s * Hc * Wc / aspect).clamp(max=Hc)
    cx = cw / 2 + (Wc - cw) * u[2] - left
    cy = ch / 2 + (Hc - ch) * u[3] - top
    f = torch.where(u[4] < hflip, -1.0, 1.0).to(u)
    ssr = u[5] < rotate_prob
    ang = torch.where(ssr, (2 * u[6] - 1) * math.radians(rotate_deg), 0.0).to(u)
    zoom = torch.where(ssr, 1.0 + scale_jitter * (2 * v[2] - 1), 1.0).to(u)
    tu = torch.where(ssr, 2 * shift * (2 * v[0] - 1), 0.0).to(u)  # in normalised output units (2 = full size)
    tv = torch.where(ssr, 2 * shift * (2 * v[1] - 1), 0.0).to(u)
    cos, sin = torch.cos(ang), torch.sin(ang)
    a, b = cw / 2 * f / zoom, ch / 2 / zoom
    m00, m01, m10, m11 = 2 / W * cos * a, -2 / W * sin * b, 2 / H * sin * a, 2 / H * cos * b
    theta = torch.stack([torch.stack([m00, m01, 2 * cx / W - 1 - (m00 * tu + m01 * tv)], -1),
                         torch.stack([m10, m11, 2 * cy / H - 1 - (m10 * tu + m11 * tv)], -1)], 1)
    return theta.float()


BORDERS = {"zeros": "zeros", "reflect": "reflection"}


def warp_pair(x: torch.Tensor, target: torch.Tensor, theta: torch.Tensor, out_hw, *, mode: str = "nearest",
              ignore_index: int = IGNORE_INDEX, border: str = "zeros") -> tuple[torch.Tensor, torch.Tensor]:
    """Resample input (``mode``) and label (nearest) with ``theta``. Outside the input: ``border="zeros"``
    gives zeros and ``ignore_index``; ``"reflect"`` mirrors both about the input's edges (grid_sample's
    reflection, i.e. OpenCV's BORDER_REFLECT; ECDDP's albumentations pads with BORDER_REFLECT_101, which does
    not repeat the edge pixel)."""
    if border not in BORDERS:
        raise ValueError(f"border must be one of {sorted(BORDERS)}, not {border!r}")
    pad = BORDERS[border]
    grid = F.affine_grid(theta.to(x.device), [x.shape[0], x.shape[1], *out_hw], align_corners=False)
    xo = F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode=pad, align_corners=False)
    t = F.grid_sample((target.float() + 1).unsqueeze(1), grid.float(), mode="nearest", padding_mode=pad,
                      align_corners=False)[:, 0]
    t = t.round().long() - 1
    return xo, torch.where(t < 0, torch.full_like(t, ignore_index), t)


def resize_sample(x: torch.Tensor, target: torch.Tensor, size) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(B, C, H, W)`` and labels ``(B, H, W)`` resized to ``size`` as ECDDP's loader does with
    ``resize: true`` (data/DESC_dataset.py:237-241, 308-311): inputs bilinear with ``align_corners=True``,
    labels nearest as ``cv2.INTER_NEAREST`` (output row ``i`` takes input row ``floor(i * H / H')``)."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    h, w = target.shape[-2:]
    rows = torch.arange(size[0], device=target.device) * h // size[0]
    cols = torch.arange(size[1], device=target.device) * w // size[1]
    return x, target[:, rows[:, None], cols[None, :]]


# ------------------------------------------------------------------------------------------------- inference
def predict_logits(model: nn.Module, x: torch.Tensor, *, out_size=None, resize=None, tta: dict | None = None
                   ) -> torch.Tensor:
    """Logits ``(B, K, *out_size)`` (float32), averaged over test-time augmentations.

    ``tta``: ``{"flip": bool, "scales": [1.0, 1.5, 2.0]}`` (ECDDP's ttach setup: horizontal flip x scales, the
    logits of every view flipped back, resized to ``out_size`` and averaged). Views are scaled from ``resize``
    (default: the input size) with bilinear ``align_corners=True``; ``out_size`` defaults to the input size.
    Call with the model in eval mode (under ``torch.no_grad()`` for inference).
    """
    out_size = tuple(out_size or x.shape[-2:])
    base = tuple(resize or x.shape[-2:])
    tta = tta or {}
    scales = [float(s) for s in (tta.get("scales") or [1.0])]
    flips = [False, True] if tta.get("flip") else [False]
    total = None
    for s in scales:
        size = (int(round(base[0] * s)), int(round(base[1] * s)))
        xs = _resize(x, size, align_corners=True)
        for flip in flips:
            out = model(xs.flip(-1) if flip else xs)
            if isinstance(out, (tuple, list)):
                out = out[0]
            out = _resize(out.float().flip(-1) if flip else out.float(), out_size, align_corners=True)
            total = out if total is None else total + out
    return total / (len(scales) * len(flips))


# --------------------------------------------------------------------------------------------------- metrics
def segmentation_metrics(cm: torch.Tensor, class_names: Sequence[str] | None = None) -> dict:
    """mIoU, mAcc (mean class accuracy), aAcc (pixel accuracy), per-class IoU / accuracy and the confusion
    matrix ``[true][pred]`` from a summed confusion matrix (fractions in [0, 1]; absent classes nan, left out
    of the means: :mod:`evforge.finetune.metrics`)."""
    cm = torch.as_tensor(cm).cpu().long()
    names = list(class_names) if class_names else [str(k) for k in range(cm.shape[0])]
    iou, acc = iou_from_confusion(cm), class_accuracy_from_confusion(cm)
    return {"mIoU": mean_iou_from_confusion(cm), "mAcc": mean_class_accuracy_from_confusion(cm),
            "aAcc": accuracy_from_confusion(cm), "iou": dict(zip(names, iou.tolist())),
            "acc": dict(zip(names, acc.tolist())), "num_pixels": int(cm.sum()), "confusion": cm.tolist()}


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
            batch = {key: v.to(device) if torch.is_tensor(v) else v for key, v in batch.items()}
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
