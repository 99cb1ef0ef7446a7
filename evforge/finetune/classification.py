"""Event classification finetuning (full finetune or linear probe) as a :class:`~evforge.trainer.task.Task`.

Data: a ``samples`` dataset (``evforge convert ncaltech101|ncars|nimagenet``), the training split or one of
its label-efficiency subsets (``data.subset``, e.g. ``train_10pct``). On the device each batch becomes a
representation at the sensor size (``task.representation``: MEM's 3-channel image, a 2-channel histogram or
a voxel grid), resized (bilinear, antialiased) to ``task.input_size`` and fed to a timm ViT, BEiT or Swin
(:mod:`.backbones`). Training draws MEM's event augmentations per sample from a generator seeded by
``(seed, step, micro-batch, rank)`` (exact resume): a random window of ``max_events`` events, a random
shift, flips in x and in time. Validation and evaluation are deterministic: the central (or first / last, or
``random``: drawn from a generator seeded by the batch's keys, as MEM draws a window at validation)
``val_window.max_events`` events, no augmentation.

MEM's image (``representation.name: mem_image``) is made by :func:`evforge.pretrain.mem.inputs.mem_inputs`, the
function MEM's tokenizer and pretraining use, from the same keys (``input_size``, ``augment``, ``val_window``
and the representation's ``canvas``, ``train_resize``, ``scaled_short_side``, ``off_events``, ``uint8_wrap``,
``hot_pixel_std``, ``rand_augment``, ``color_jitter``): finetuning sees exactly the pretraining inputs, the
hot-pixel filter and max-normalisation after the resize. Finetuning a MEM BEiT as the public code does
(``task.model``: ``rel_pos_bias``, ``fc_norm``, ``block_dropout``) is :mod:`.beit`.

Splits (``data.*``; :func:`resolve_splits`): the trainer validates, and checkpoints are selected, on
``val_split``; :func:`evforge.finetune.evaluate.evaluate` reports on ``test_split``. ``auto`` picks
``test_split`` = ``test`` when the manifest has one, else ``val``; and ``val_split`` = ``val`` when that is
not the test split, else ``train_holdout`` (:func:`holdout_indices`): a stratified ``holdout_fraction`` of the
training split, drawn (seeded by ``holdout_seed``) from the samples in none of the manifest's label-efficiency
subsets of that split, and left out of training. So the holdout is the same for every run on a dataset, and a
``subset`` run trains on exactly the subset's samples. N-Cars (train/test) thus selects on a slice of train and
reports test; N-Caltech101 / N-ImageNet (train/val, val being what papers report) select on a slice of train and
report val; ``data.val_split=val`` gives MEM's protocol (best val reported).

Validation metrics (``top1``, ``top5``, ``mean_class_acc``, ``loss``; on the EMA model when enabled) are
exact over the validation split on any number of ranks: each batch returns its confusion matrix and sums,
which the trainer adds up before :meth:`ClassificationTask.validation_metrics`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from evforge.data import augment
from evforge.data.collate import collate_events, to_device
from evforge.data.dataset import EventDataset, resolve_manifest
from evforge.data.representations import REPRESENTATIONS, channels, represent
from evforge.formats.manifest import Manifest

from ..dataset_builder.subsets import read_subset_file
from ..pretrain.mem.inputs import MEMInputConfig, mem_inputs
from ..trainer.config import ConfigError, merge
from ..trainer.metrics import Mean, mean_metrics
from ..trainer.task import Task, keys_generator
from .backbones import ModelSpec, build_classifier
from .beit import block_dropout, per_layer_rel_pos_bias, reset_fc_norm
from .cls_splits import HOLDOUT, Items, holdout_indices, resolve_splits
from .ema import ModelEMA
from .layer_decay import layer_decay_groups
from .metrics import ClassificationMetrics, confusion_matrix, topk_correct

__all__ = ["ClassificationTask", "ClassifierModel", "TASK_DEFAULTS", "HOLDOUT", "resolve_splits", "holdout_indices"]

MODES = ("finetune", "linear_probe")
WINDOW_POSITIONS = ("center", "first", "last", "random")

OPEN_KEYS = ("task.model.kwargs",)  # free-form (timm keyword arguments)


def _rep_options(rep: dict) -> dict:
    """The representation section's options for its function. The section's default ``normalize`` is the voxel
    grid's (nonzero_std); a histogram normalises only when asked for ``max``."""
    out = {k: v for k, v in rep.items() if k != "name"}
    if rep["name"] == "histogram" and out.get("normalize") != "max":
        out["normalize"] = None
    return out


# Every task option with its default (MEM's finetuning recipe where it has one).
TASK_DEFAULTS: dict = {
    "name": "classification",
    "mode": "finetune",               # finetune | linear_probe (frozen backbone, linear head on pooled features)
    "init": None,                     # exported backbone (.safetensors) to start from; null = random init
    "num_classes": None,              # null = the manifest's class count
    "model": {
        "arch": "vit_small_patch16_224",  # timm ViT or Swin (ignored with init: the backbone's metadata wins)
        "kwargs": {},                 # timm architecture kwargs (embed_dim, depth, ...; ignored with init)
        "norm_eps": None,             # LayerNorm eps (null = timm's; exported backbones carry theirs)
        "global_pool": "avg",         # MEM: mean pool over the patch tokens
        "drop_path_rate": 0.1,
        "drop_rate": None,
        "rel_pos_bias": "shared",     # BEiT backbones: shared (as pretrained) | per_layer (MEM: copied per block)
        "fc_norm": "from_norm",       # mean pooling: from_norm (the pretrained final norm) | fresh (MEM)
        "block_dropout": None,        # MEM's class_dropout placement (see beit.py); null = timm's
    },
    "representation": {
        "name": "mem_image",          # mem_image (3 ch) | histogram (2 ch) | voxel_grid (bins ch)
        "bins": 5,                    # voxel_grid
        "polarity_split": False,      # voxel_grid: ON and OFF bins separately (2 * bins channels)
        "normalize": "nonzero_std",   # voxel_grid: null | nonzero_std; histogram: null | max
        "hot_pixel_std": 10.0,        # mem_image: MEM's hot-pixel filter (null = off)
        # mem_image only (evforge/pretrain/mem/inputs.py, shared with MEM's pretraining):
        "canvas": "sensor",           # sensor | extent (MEM N-Caltech101 / N-Cars) | scaled (MEM N-ImageNet)
        "train_resize": None,         # sensor canvas: [H, W] resize then a random input_size crop in training
        "scaled_short_side": 256,     # scaled canvas: the training canvas's short side
        "off_events": "count",        # count | ignore (MEM's N-Cars: OFF stored as p = 0, never counted)
        "uint8_wrap": False,          # MEM's uint8 counts (256 events read 0)
        "rand_augment": {"num_ops": 0, "magnitude": 20, "num_bins": 31, "ops": "all"},  # MEM: 2 ops
        "color_jitter": {"brightness": 0.0, "saturation": 0.0, "at_val": False},
    },
    "input_size": [224, 224],         # [H, W] (or one int) the representation is resized to; null = sensor size
    "augment": {                      # training only, MEM's event augmentations
        "max_events": 30000,          # random contiguous window of at most this many events (null = all)
        "shift": 8,                   # random integer shift in [-shift, shift] pixels (0 = off)
        "flip_x": 0.5,                # probability of a horizontal flip
        "time_flip": 0.5,             # probability of playing the sample backwards (t -> -t, p -> -p)
    },
    "val_window": {"max_events": 30000, "position": "center"},  # deterministic window at val/test
    "label_smoothing": 0.1,
    "layer_decay": 0.9,               # lr scale layer_decay ** (depth - layer) (see layer_decay.py)
    "no_decay_names": None,           # names never decayed; null = evforge's list, MEM: [pos_embed, cls_token]
    "ema": {"enabled": True, "decay": 0.9999, "warmup": True},
    "eval_ema": True,                 # validate / evaluate the EMA weights when the EMA is enabled
}
DATA_DEFAULTS: dict = {"train_split": "train", "subset": None, "subset_file": None, "val_split": "auto",
                       "test_split": "auto", "holdout_fraction": 0.1, "holdout_seed": 0}


class ClassifierModel(nn.Module):
    """The trained network (``net``, a timm classifier) and its EMA copy (``ema``, or None).

    ``linear_probe`` freezes everything but the classifier (``net.get_classifier()``) and keeps the backbone
    in eval mode, so only the head changes.
    """

    def __init__(self, net: nn.Module, *, linear_probe: bool = False, ema: dict | None = None):
        super().__init__()
        self.net, self.linear_probe = net, bool(linear_probe)
        if self.linear_probe:
            net.requires_grad_(False)
            net.get_classifier().requires_grad_(True)
        self.ema = ModelEMA(net, float(ema["decay"]), bool(ema.get("warmup", True))) if ema else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def eval_net(self, use_ema: bool = True) -> nn.Module:
        """The network that validation / evaluation scores: the EMA when present and asked for."""
        return self.ema.module if use_ema and self.ema is not None else self.net

    def train(self, mode: bool = True) -> "ClassifierModel":
        super().train(mode)
        if self.linear_probe:
            self.net.eval()  # frozen features: no dropout / drop path in the backbone
        return self


class ClassificationTask(Task):
    """Finetuning or linear probing of a ViT / Swin on event classification (see the module docstring)."""

    name = "classification"
    option_defaults = TASK_DEFAULTS
    open_options = OPEN_KEYS
    default_metric = "top1"  # what checkpoint selection maximises
    # data keys read besides the trainer's (trainer.config.check_config refuses any other)
    config_keys = {"data": {"path": "str", "train_split": "str", "subset": "str|null", "subset_file": "str|null",
                            "val_split": "str|null", "test_split": "str|null", "holdout_fraction": "number",
                            "holdout_seed": "int"},
                   "schedules": {}}

    def __init__(self):
        self.cfg: dict = {}
        self.spec: ModelSpec | None = None
        self.classes: list[str] = []
        self.sensor_size: tuple[int, int] | None = None  # (W, H)
        self._manifest_cache: tuple | None = None

    # ----------------------------------------------------------------------------------------- options
    def check_options(self, o: dict) -> None:
        """Values of :data:`TASK_DEFAULTS`'s keys (the keys are checked by :meth:`Task.options`)."""
        for key, allowed in (("mode", MODES), ("representation.name", REPRESENTATIONS.names()),
                             ("val_window.position", WINDOW_POSITIONS), ("model.rel_pos_bias", ("shared", "per_layer")),
                             ("model.fc_norm", ("from_norm", "fresh"))):
            self.require_choice(o, key, allowed)
        if not 0 <= float(o["label_smoothing"]) < 1:
            raise ConfigError(f"task.label_smoothing: expected a number in [0, 1), got {o['label_smoothing']!r}")

    @staticmethod
    def data_options(cfg: dict) -> dict:
        return merge(DATA_DEFAULTS, cfg.get("data", {}))

    def in_chans(self, o: dict) -> int:
        rep = o["representation"]
        return channels(rep["name"], **_rep_options(rep))

    def input_size(self, o: dict) -> tuple[int, int]:
        """(H, W) the network sees."""
        size = o["input_size"]
        if size is None:
            W, H = self.sensor_size
            return int(H), int(W)
        if isinstance(size, (int, float)):
            return int(size), int(size)
        return int(size[0]), int(size[1])

    def _manifest(self, cfg: dict) -> Manifest:
        path = cfg.get("data", {}).get("path")
        if not path:
            raise ConfigError("data.path: give the dataset folder (manifest.json)")
        where = resolve_manifest(path)
        if self._manifest_cache is not None and self._manifest_cache[0] == where:
            return self._manifest_cache[1]  # large datasets (N-ImageNet) have large manifests: read once
        m = Manifest.load(where)
        if m.kind != "samples":
            raise ConfigError(f"data.path: classification needs a 'samples' dataset, {path} holds {m.kind}")
        self._manifest_cache = (where, m)
        return m

    def splits(self, cfg: dict) -> tuple[str, str]:
        """``(val_split, test_split)`` of the configured dataset."""
        return resolve_splits(self._manifest(cfg).splits, self.data_options(cfg))

    # ---------------------------------------------------------------------------------------------- model
    def build_model(self, cfg: dict) -> nn.Module:
        self.cfg = cfg
        o = self.options(cfg)
        m = self._manifest(cfg)
        self.classes, self.sensor_size = list(m.classes), tuple(m.sensor_size)
        num_classes = int(o["num_classes"] or len(self.classes))
        if num_classes < 1:
            raise ConfigError("task.num_classes: the dataset lists no classes; set task.num_classes")
        fresh = self.spec is None  # a spec from a checkpoint rebuilds the trained network, its weights follow
        net, self.spec = build_classifier(o["model"], in_chans=self.in_chans(o), num_classes=num_classes,
                                          input_size=self.input_size(o), init=o["init"], spec=self.spec)
        mo = o["model"]
        if mo["rel_pos_bias"] == "per_layer":
            net, self.spec = per_layer_rel_pos_bias(net, self.spec)
        if mo["fc_norm"] == "fresh" and fresh and o["init"]:
            reset_fc_norm(net)
        if mo["block_dropout"] is not None:
            block_dropout(net, float(mo["block_dropout"]))
        ema = o["ema"] if o["ema"].get("enabled") else None
        return ClassifierModel(net, linear_probe=o["mode"] == "linear_probe", ema=ema)

    def param_groups(self, model: ClassifierModel, cfg: dict) -> list[dict]:
        o = self.options(cfg)
        decay = 1.0 if o["mode"] == "linear_probe" else float(o["layer_decay"])
        return layer_decay_groups(model.net, weight_decay=float(cfg["optim"]["weight_decay"]), layer_decay=decay,
                                  no_decay=cfg["optim"].get("no_decay", ()), prefix="net.",
                                  skip_names=o["no_decay_names"])

    def state_dict(self) -> dict:
        """What evaluation needs to rebuild the network without the backbone file (checkpointed)."""
        return {"model_spec": self.spec.to_dict() if self.spec else None, "classes": list(self.classes)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("model_spec"):
            self.spec = ModelSpec.from_dict(state["model_spec"])

    # ----------------------------------------------------------------------------------------------- data
    def dataset(self, cfg: dict, split: str) -> Dataset:
        """Items of a manifest split, of :data:`HOLDOUT`, or of ``"train"`` (the training items: the train
        split or its ``subset``, without the holdout when validation uses it)."""
        d = self.data_options(cfg)
        val, _ = self.splits(cfg)
        if split == HOLDOUT or (split == "train" and val == HOLDOUT):
            full = EventDataset(d["path"], d["train_split"])
            held = holdout_indices(full, self._manifest(cfg), d["train_split"], float(d["holdout_fraction"]),
                                   int(d["holdout_seed"]))
            if split == HOLDOUT:
                return Items(full, held)
            base = self._train_items(d)
            held_keys = {full.key(int(i)) for i in held}
            keep = [i for i, k in enumerate(base.keys) if k not in held_keys]
            return Items(base, np.asarray(keep, dtype=np.int64))
        if split == "train":
            return self._train_items(d)
        return EventDataset(d["path"], split)

    @staticmethod
    def _train_items(d: dict):
        """The training split, or its manifest ``subset``, or the samples of a MEM subset file
        (``subset_file``, e.g. ``fig1-subsets/ncaltech101-2percent.txt``, read as it is)."""
        if d["subset_file"] is None:
            return EventDataset(d["path"], d["train_split"], subset=d["subset"])
        if d["subset"] is not None:
            raise ConfigError("data.subset and data.subset_file: give one of them")
        full = EventDataset(d["path"], d["train_split"])
        index = {k: i for i, k in enumerate(full.keys)}
        want = read_subset_file(d["subset_file"], d["train_split"])
        missing = [k for k in want if k not in index]
        if missing:
            raise ConfigError(f"data.subset_file: {len(missing)} sample(s) not in the {d['train_split']!r} split of "
                              f"{d['path']}, e.g. {missing[0]!r}")
        return Items(full, np.sort(np.asarray([index[k] for k in want], dtype=np.int64)))

    def build_dataset(self, cfg: dict, split: str) -> Dataset:
        ds = self.dataset(cfg, self.splits(cfg)[0] if split == "val" else split)
        self.sensor_size = tuple(ds.sensor_size)
        return ds

    def collate(self, items: list):
        return collate_events(items)

    # --------------------------------------------------------------------------------------------- inputs
    def mem_input_config(self, o: dict) -> MEMInputConfig:
        """The MEM pipeline's options from this task's (``input_size`` null = the sensor size)."""
        return MEMInputConfig.from_task({**o, "input_size": list(self.input_size(o))})

    def inputs(self, batch: dict, cfg: dict, *, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """The network input ``(B, C, H, W)``: augmented (train) or fixed-window events -> representation -> resize;
        MEM's image through :func:`~evforge.pretrain.mem.inputs.mem_inputs` (as in MEM's pretraining)."""
        o = self.options(cfg)
        W, H = self.sensor_size
        if not train and o["val_window"]["position"] == "random":
            # a window drawn as MEM draws it, from the batch's keys: the same for every validation pass
            generator = keys_generator(int(cfg.get("seed", 0)), 0x5A1, batch)
        if o["representation"]["name"] == "mem_image":
            return mem_inputs(batch, self.mem_input_config(o), (W, H), train=train, generator=generator)
        if train:
            a = o["augment"]
            if a["max_events"]:
                batch = augment.random_window(batch, int(a["max_events"]), generator=generator)
            if a["shift"]:
                batch = augment.shift(batch, int(a["shift"]), H, W, generator=generator)
            if a["flip_x"]:
                batch = augment.flip_x(batch, W, float(a["flip_x"]), generator=generator)
            if a["time_flip"]:
                batch = augment.time_flip(batch, float(a["time_flip"]), generator=generator)
        else:
            batch = self.fixed_window(batch, o["val_window"], generator)
        x = self.represent(batch, o["representation"], H, W)
        size = self.input_size(o)
        if tuple(x.shape[-2:]) != size:
            down = size[0] < x.shape[-2] or size[1] < x.shape[-1]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=down)
        return x

    @staticmethod
    def fixed_window(batch: dict, window: dict, generator: torch.Generator | None = None) -> dict:
        """The deterministic evaluation window: ``max_events`` consecutive events at ``position`` of each sample
        (``random``: drawn from ``generator``, seeded by the batch's keys)."""
        if not window.get("max_events"):
            return batch
        k = int(window["max_events"])
        pos = window.get("position", "center")
        if pos == "random":
            return augment.random_window(batch, k, generator=generator)
        offsets = batch["offsets"].to(batch["t"].device, torch.int64)
        room = (offsets[1:] - offsets[:-1] - k).clamp(min=0)
        starts = room // 2 if pos == "center" else room if pos == "last" else torch.zeros_like(room)
        return augment.random_window(batch, k, starts=starts)

    @staticmethod
    def represent(batch: dict, rep: dict, height: int, width: int) -> torch.Tensor:
        """``rep["name"]`` from :data:`~evforge.data.representations.REPRESENTATIONS` with the section's options."""
        return represent(batch, rep["name"], height=height, width=width, **_rep_options(rep))

    # ------------------------------------------------------------------------------------------- training
    def training_step(self, model: nn.Module, batch, state: dict):
        cfg = self.cfg
        # a CPU generator: the same augmentation on CPU and GPU (augment.py draws on the generator's device)
        x = self.inputs(batch, cfg, train=True, generator=self.step_generator(state, salt=1))
        logits = model(x).float()
        label = batch["label"]
        loss = F.cross_entropy(logits, label, label_smoothing=float(self.options(cfg)["label_smoothing"]))
        return loss, {"top1": (logits.argmax(-1) == label).float().mean().detach()}

    def after_optimizer_step(self, model: ClassifierModel, state: dict) -> None:
        if model.ema is not None:
            model.ema.update(model.net, int(state["step"]))

    # ----------------------------------------------------------------------------------------- validation
    def _val_metrics(self) -> ClassificationMetrics:
        return ClassificationMetrics(int(self.spec.num_classes if self.spec else len(self.classes)))

    @torch.no_grad()
    def validation_step(self, model: ClassifierModel, batch, state) -> dict:
        """The batch's confusion matrix, top-5 hits and loss sum (additive: the trainer sums them)."""
        cfg = self.cfg
        o = self.options(cfg)
        logits = model.eval_net(bool(o["eval_ema"]))(self.inputs(batch, cfg, train=False)).float()
        label = batch["label"]
        n = int(label.numel())
        loss = F.cross_entropy(logits, label, label_smoothing=float(o["label_smoothing"]))
        stats = self._val_metrics().update({}, logits.argmax(-1), label)
        Mean("top5").update(stats, topk_correct(logits, label, 5).double(), count=None)
        return Mean("loss").update(stats, loss, n)

    def validation_metrics(self, stats: dict) -> dict[str, float]:
        """``top1``, ``mean_class_acc`` (from the split's confusion matrix), ``top5``, ``loss``."""
        return {**self._val_metrics().compute(stats), **mean_metrics(stats)}

    # ----------------------------------------------------------------------------------------- evaluation
    def test_split(self, cfg: dict) -> str:
        return self.splits(cfg)[1]

    @torch.no_grad()
    def evaluate_split(self, model: ClassifierModel, cfg: dict, split: str, *, device="cpu",
                       batch_size: int | None = None) -> dict:
        """Score ``model`` on ``split`` deterministically (fixed windows, in dataset order).

        Returns ``{"metrics", "confusion" (K x K int64, [true, predicted]), "class_names", "num_samples",
        "per_class"}``; metrics: ``top1``, ``top5``, ``mean_class_acc``, ``nll`` (cross-entropy without
        label smoothing), ``loss`` (with it, as in training).
        """
        from .metrics import class_accuracy_from_confusion, mean_class_accuracy_from_confusion

        self.cfg = cfg
        o = self.options(cfg)
        ds = self.dataset(cfg, split)
        self.sensor_size = tuple(ds.sensor_size)
        bs = int(batch_size or cfg["data"].get("val_batch_size") or cfg["data"]["batch_size"])
        loader = DataLoader(ds, batch_size=bs, shuffle=False, collate_fn=self.collate, num_workers=0)
        net = model.eval_net(bool(o["eval_ema"])).to(device).eval()
        logits_all, labels_all = [], []
        for batch in loader:
            batch = to_device(batch, device)
            logits_all.append(net(self.inputs(batch, cfg, train=False)).float().cpu())
            labels_all.append(batch["label"].cpu())
        k = int(self.spec.num_classes if self.spec else len(self.classes))
        logits = torch.cat(logits_all) if logits_all else torch.zeros(0, k)
        labels = torch.cat(labels_all) if labels_all else torch.zeros(0, dtype=torch.int64)
        n = len(labels)
        cm = confusion_matrix(logits.argmax(-1), labels, k)
        nan = math.nan
        metrics = {
            "top1": float((logits.argmax(-1) == labels).double().mean()) if n else nan,
            "top5": float(topk_correct(logits, labels, 5).double().mean()) if n else nan,
            "mean_class_acc": mean_class_accuracy_from_confusion(cm),
            "nll": float(F.cross_entropy(logits, labels)) if n else nan,
            "loss": float(F.cross_entropy(logits, labels, label_smoothing=float(o["label_smoothing"]))) if n else nan,
        }
        names = [self.classes[i] if i < len(self.classes) else str(i) for i in range(k)]
        acc = class_accuracy_from_confusion(cm)
        per_class = [{"class": names[i], "support": int(cm[i].sum()), "accuracy": float(acc[i])} for i in range(k)]
        return {"metrics": metrics, "confusion": cm, "class_names": names, "num_samples": n,
                "per_class": per_class, "predictions": logits.argmax(-1), "labels": labels}
