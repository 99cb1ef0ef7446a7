"""MEM as two :class:`~evforge.trainer.task.Task` s: the tokenizer (``mem_dvae``) and masked event modelling (``mem``).

Data (both): an evforge *samples* dataset (N-Caltech101, N-Cars, N-ImageNet shards; ``data.path``), the
``train`` split for training and ``data.val_split`` (default ``val``; N-Cars has ``test``) for validation.
Each packed batch becomes MEM's input with :func:`~evforge.pretrain.mem.inputs.mem_inputs`, the one function
finetuning uses too, configured by the same keys: ``task.input_size`` (square here: the tokenizer's and the
model's image size), ``task.augment``, ``task.val_window`` and ``task.representation`` (canvas, uint8 wrap,
OFF events, hot pixels, ``rand_augment``, ``color_jitter``; see :mod:`.inputs`).

Random draws (windows, flips, shifts, crops, RandAugment, jitter, masks) come from CPU generators seeded by
``(seed, step, micro-step, rank)`` in training and by the batch's sample keys in validation, so a resumed run
repeats them exactly and validation sees the same inputs every time. The tokenizer's Gumbel noise has its own
seeded generator.

``mem`` loads a trained tokenizer (``task.tokenizer``: a ``mem_dvae`` trainer checkpoint, read with
``weights_only=True``), frozen in eval mode and kept outside the optimised model (not in MEM checkpoints);
its argmax codes of the same image are the targets (MEM's ``CreateTwoPic``: one image for both). Channel
count, patch size = tokenizer stride, image size and vocabulary are checked against the tokenizer.

Validation reports whole-split statistics besides the means over items: the tokenizer's ``codebook_used``
(distinct codes over the whole split, MEM's ``evaluate``), ``codebook_usage`` (that / codebook size) and
``codebook_perplexity``; MEM's ``majority_share`` (share of the most frequent target code among the masked
patches) next to ``mlm_acc``. They come from code histograms summed over the split's batches and ranks by
the trainer (:mod:`evforge.trainer.metrics`): exact on any number of processes.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from evforge.data.collate import collate_events
from evforge.data.dataset import EventDataset

from ...errors import InputError
from ...trainer.checkpoint import read_trainer_checkpoint
from ...trainer.config import ConfigError, merge
from ...trainer.metrics import Histogram, Mean, batch_count, mean_metrics
from ...trainer.task import Task, keys_generator
from .dvae import DiscreteVAE, DVAEConfig
from .inputs import INPUT_KEYS, REPRESENTATION_KEYS, MEMInputConfig, mem_inputs
from .masking import make_mask_generator
from .model import MEMConfig, MEMModel
from .restart import CodeRestartConfig, CodeRestarter

IMAGE_CHANNELS = 3  # mem_image: (ON count, zeros, OFF count), MEM's EventArrToImg with timesurface = 0

# Task options shared by both tasks, with their defaults (MEM's values); unknown keys are refused.
_DATA_DEFAULTS: dict = {
    "name": None,
    "input_size": 224,
    "augment": dict(INPUT_KEYS["augment"]),
    "val_window": dict(INPUT_KEYS["val_window"]),
    "representation": {"name": "mem_image", **REPRESENTATION_KEYS},
    "model": {},
}
_OPEN = ("task.model", "task.representation.rand_augment", "task.representation.color_jitter", "task.code_restart")


def _perplexity(hist: torch.Tensor) -> float:
    p = hist / hist.sum().clamp(min=1)
    p = p[p > 0]
    return float((-(p * p.log()).sum()).exp())


def _codebook_metrics(hist: torch.Tensor) -> dict[str, float]:
    used = float((hist > 0).sum())
    return {"codebook_used": used, "codebook_usage": used / len(hist), "codebook_perplexity": _perplexity(hist)}


# whole-split histograms of the validation codes (tokenizer) and of the masked targets (MEM)
_CODES = Histogram("codes", _codebook_metrics)
_TARGETS = Histogram("targets", lambda h: {"majority_share": float(h.max() / h.sum().clamp(min=1))})


class _MEMData(Task):
    """The data side shared by both tasks: options, dataset, collate, MEM's input pipeline, seeded generators."""

    name = ""
    option_defaults: dict = _DATA_DEFAULTS
    open_options = _OPEN
    config_keys = {"data": {"path": "str", "val_split": "str", "subset": "str|null", "min_events": "int"}, "schedules": {"gumbel_tau": "any"}}  # noqa: E501 (read besides the trainer's keys: trainer.config.check_config)

    def __init__(self):
        self.sensor_size: tuple[int, int] | None = None  # (W, H)
        self.cfg: dict = {}

    def input_config(self, cfg: dict | None = None) -> MEMInputConfig:
        o = self.options(cfg)
        rep = o["representation"]
        if rep.get("name", "mem_image") != "mem_image":
            raise ConfigError(f"task.representation.name: MEM takes mem_image, got {rep['name']!r}")
        icfg = MEMInputConfig.from_task(o)
        if icfg.size[0] != icfg.size[1]:
            raise ConfigError(f"task.input_size: MEM's tokenizer and model take square images, got {list(icfg.size)}")
        return icfg

    def image_size(self, cfg: dict) -> int:
        return self.input_config(cfg).size[0]

    # ---- data
    def build_dataset(self, cfg: dict, split: str):
        data = cfg["data"]
        name = split if split == "train" else data.get("val_split", "val")
        subset = data.get("subset") if split == "train" else None
        ds = EventDataset(data["path"], name, subset=subset, min_events=int(data.get("min_events", 1)))
        if ds.kind != "samples":
            raise ValueError(f"MEM pretrains on samples datasets (N-Caltech101, N-Cars, N-ImageNet); "
                             f"{data['path']} holds {ds.kind}")
        size = tuple(int(v) for v in ds.sensor_size)
        if self.sensor_size is not None and size != self.sensor_size:
            raise ValueError(f"{data['path']}: split {name!r} has sensor size {size}, "
                             f"the train split {self.sensor_size}")
        self.sensor_size = size
        return ds

    def collate(self, items: list):
        return collate_events(items)

    def images(self, batch: dict, *, train: bool, generator: torch.Generator) -> torch.Tensor:
        """MEM's input images (B, 3, S, S) of a packed batch (:func:`~.inputs.mem_inputs`)."""
        if self.sensor_size is None:
            raise RuntimeError("build_dataset must run before images (the sensor size comes from the data)")
        return mem_inputs(batch, self.input_config(), self.sensor_size, train=train, generator=generator)

    def after_optimizer_step(self, model: nn.Module, state: dict) -> None:
        """Nothing to do after a step (no EMA teacher in MEM)."""


def _check_channels(n: int, what: str) -> None:
    if n != IMAGE_CHANNELS:
        raise ValueError(f"{what} = {n}, but MEM's event images have {IMAGE_CHANNELS} channels (ON, 0, OFF): "
                         f"one channel count must run from the data through the tokenizer to the model")


# ------------------------------------------------------------------------------------------------ tokenizer
def _dvae_config(task_opts: dict) -> DVAEConfig:
    model = dict(task_opts.get("model", {}))
    if "image_size" in model:
        raise ValueError("task.model.image_size: set task.input_size (shared by the data and the model)")
    size = task_opts.get("input_size", _DATA_DEFAULTS["input_size"])
    size = int(size if isinstance(size, (int, float)) else size[0])
    return DVAEConfig.from_dict({**model, "image_size": size})


def mem_gumbel_tau(step: int, steps_per_epoch: int, start: float = 1.0, rate: float = 1e-6,
                   minimum: float = 0.5) -> float:
    """MEM's Gumbel temperature at optimizer step ``step`` (``eventvae/train_vae.py:293,342-347``): at the first
    step of every epoch ``e``, after that step, ``tau <- max(tau * exp(-rate * e * S), minimum)`` (``S`` steps per
    epoch). Before step ``s`` ``c = ceil(s / S)`` updates happened: ``tau = max(start * exp(-rate * S * c (c - 1)
    / 2), minimum)``."""
    c = -(-int(step) // int(steps_per_epoch))
    return max(start * math.exp(-rate * steps_per_epoch * c * (c - 1) / 2), minimum)


class MEMDVAETask(_MEMData):
    """MEM's tokenizer training (``task.name: mem_dvae``): the discrete VAE on MEM's event images.

    Logs ``recon_mse`` and ``kl`` (train, relaxed codes at the Gumbel temperature) and, on validation, the
    hard-code reconstruction ``recon_mse`` / ``loss`` (as MEM's ``evaluate``) and the whole-split codebook
    statistics of the module docstring. The temperature is ``schedules.gumbel_tau`` (evforge) or, with
    ``task.legacy_tau_anneal: {start, rate, min}``, MEM's per-epoch rule (:func:`mem_gumbel_tau`).
    ``task.code_restart`` restarts dead codes (:mod:`.restart`; evforge's counter-measure to the collapse).
    """

    name = "mem_dvae"
    option_defaults = merge(_DATA_DEFAULTS, {"legacy_tau_anneal": None, "code_restart": {}})

    def __init__(self):
        super().__init__()
        self.restarter: CodeRestarter | None = None

    def build_model(self, cfg: dict) -> nn.Module:
        self.cfg = cfg
        o = self.options(cfg)
        mcfg = _dvae_config(o)
        _check_channels(mcfg.channels, "task.model.channels")
        rc = CodeRestartConfig.from_dict(o["code_restart"])
        self.restarter = CodeRestarter(rc, mcfg.num_tokens, seed=int(cfg.get("seed", 0))) if rc.enabled else None
        return DiscreteVAE(mcfg)

    def param_groups(self, model: nn.Module, cfg: dict) -> list[dict]:
        """The trainer's default groups (MEM: Adam without weight decay, optim.weight_decay 0), except that
        ``task.code_restart.logit_lr_scale`` scales the code-logit layer's lr (see :mod:`.restart`)."""
        scale = CodeRestartConfig.from_dict(self.options(cfg)["code_restart"]).logit_lr_scale
        if scale == 1.0:
            return super().param_groups(model, cfg)
        conv = {id(p) for p in model.logit_conv.parameters()}
        rest = [p for p in model.parameters() if id(p) not in conv]
        return [{"name": "default", "params": rest, "lr_scale": 1.0},
                {"name": "code_logits", "params": list(model.logit_conv.parameters()), "lr_scale": float(scale)}]

    def _tau(self, state: dict) -> float:
        legacy = self.options(self.cfg)["legacy_tau_anneal"]
        if legacy:
            unknown = set(legacy) - {"start", "rate", "min"}
            if unknown:
                raise ConfigError(f"task.legacy_tau_anneal: unknown options {sorted(unknown)} (start, rate, min)")
            return mem_gumbel_tau(int(state["step"]), int(state["steps_per_epoch"]), float(legacy.get("start", 1.0)),
                                  float(legacy.get("rate", 1e-6)), float(legacy.get("min", 0.5)))
        if "gumbel_tau" not in state:
            raise KeyError("schedules.gumbel_tau: the tokenizer needs a Gumbel temperature schedule "
                           "(MEM: from 1.0 annealed to 0.5), or task.legacy_tau_anneal for MEM's own rule")
        return float(state["gumbel_tau"])

    def training_step(self, model: nn.Module, batch, state: dict):
        tau = self._tau(state)
        img = self.images(batch, train=True, generator=self.step_generator(state, salt=1))
        noise = self.step_generator(state, salt=3, device=img.device)
        if self.restarter is None:
            loss, parts = model(img, tau=tau, generator=noise)
        else:
            loss, parts, stats = model(img, tau=tau, generator=noise, return_stats=True)
            self.restarter.observe(stats, keep=self.restarter.wants_stats(int(state["step"])))
            parts["codes_restarted"] = float(self.restarter.restarted)  # after the previous step
        return loss, {**parts, "gumbel_tau_used": tau}

    def after_optimizer_step(self, model: nn.Module, state: dict) -> None:
        if self.restarter is not None:
            self.restarter.after_step(model, int(state["step"]))

    def state_dict(self) -> dict:
        return {"restart": self.restarter.state_dict()} if self.restarter is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.restarter is not None and "restart" in state:
            self.restarter.load_state_dict(state["restart"])

    @torch.no_grad()
    def validation_step(self, model: nn.Module, batch, state: dict) -> dict:
        img = self.images(batch, train=False, generator=keys_generator(self.cfg.get("seed", 0), 2, batch))
        loss, parts = model(img)  # eval mode: the argmax codes
        codes = model.get_codebook_indices(img)
        n, stats = img.shape[0], {}
        for name, v in (("loss", loss), ("recon_mse", parts["recon_mse"]), ("kl", parts["kl"])):
            Mean(name).update(stats, v, n)
        return _CODES.update(stats, torch.bincount(codes.reshape(-1), minlength=model.num_tokens))

    def validation_metrics(self, stats: dict) -> dict[str, float]:
        return {**mean_metrics(stats), **_CODES.compute(stats)}


def load_tokenizer(path) -> tuple[DiscreteVAE, dict]:
    """A frozen, eval-mode tokenizer and its run's config from a ``mem_dvae`` trainer checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such tokenizer checkpoint (train one with configs/pretrain/mem_dvae.yaml "
                               "and point task.tokenizer at its checkpoints/last.ckpt)")
    ck, cfg = read_trainer_checkpoint(path)  # weights_only=True
    task = cfg.get("task", {})
    if task.get("name") != MEMDVAETask.name:
        raise InputError(path, f"not a tokenizer checkpoint: its task is {task.get('name')!r}, not 'mem_dvae'")
    tok = DiscreteVAE(_dvae_config(task))
    tok.load_state_dict(ck["model"])
    tok.requires_grad_(False)
    return tok.eval(), cfg


# ------------------------------------------------------------------------------------------------------ MEM
def mem_model_config(cfg: dict) -> MEMConfig:
    """The :class:`MEMConfig` of a ``mem`` run's config (``task.model`` with ``img_size = task.input_size``)."""
    task = cfg.get("task", {})
    model = dict(task.get("model", {}))
    if "img_size" in model:
        raise ValueError("task.model.img_size: set task.input_size (shared by the data and the model)")
    size = task.get("input_size", _DATA_DEFAULTS["input_size"])
    return MEMConfig.from_dict({**model, "img_size": int(size if isinstance(size, (int, float)) else size[0])})


class MEMTask(_MEMData):
    """Masked event modelling (``task.name: mem``): BEiT-style ViT on MEM event images, 50 % block masks.

    ``task.tokenizer``: the ``mem_dvae`` checkpoint (not needed with ``task.model.objective: mae``).
    ``task.mask``: ``kind`` (block | random), ``ratio`` (0.5) or ``num_patches`` (MEM: 98 of 196),
    ``min_num_patches`` (16), ``max_num_patches`` (null = all), ``legacy_skip_last`` (random masks: MEM's
    ``MaskingGeneratorRandomLocation`` never masks the last patch). Logs ``loss``, ``mlm_acc`` (beit: top-1
    code accuracy on the masked patches), ``n_masked`` (masked patches per sample) and, on validation, the
    whole-split ``majority_share`` of the targets (the accuracy of always answering the commonest code).
    """

    name = "mem"
    option_defaults = merge(_DATA_DEFAULTS, {"tokenizer": None, "mask": {
        "kind": "block", "ratio": None, "num_patches": None, "min_num_patches": 16, "max_num_patches": None,
        "legacy_skip_last": False}})

    def __init__(self):
        super().__init__()
        self.tokenizer: DiscreteVAE | None = None
        self.mask_generator = None

    def build_model(self, cfg: dict) -> nn.Module:
        self.cfg = cfg
        o = self.options(cfg)
        mcfg = mem_model_config(cfg)
        if mcfg.objective == "beit":
            if not o["tokenizer"]:
                raise ValueError("task.tokenizer: the BEiT objective needs a trained tokenizer checkpoint "
                                 "(a mem_dvae run's checkpoints/last.ckpt)")
            self.tokenizer, _ = load_tokenizer(o["tokenizer"])
            self._check_tokenizer(mcfg, self.tokenizer.cfg, o["tokenizer"])
            if mcfg.num_tokens is None:
                mcfg.num_tokens = self.tokenizer.cfg.num_tokens
        _check_channels(mcfg.in_chans, "task.model.in_chans")
        m = o["mask"]
        ratio = m["ratio"] if m["ratio"] is not None else (0.5 if m["num_patches"] is None else None)
        self.mask_generator = make_mask_generator(
            m["kind"], mcfg.grid, ratio=ratio, num_patches=m["num_patches"],
            min_num_patches=int(m["min_num_patches"]), max_num_patches=m["max_num_patches"],
            legacy_skip_last=bool(m["legacy_skip_last"]))
        return MEMModel(mcfg)

    @staticmethod
    def _check_tokenizer(mcfg: MEMConfig, tcfg: DVAEConfig, path) -> None:
        """The tokenizer and the model must agree on channels, grid and vocabulary (clear errors otherwise)."""
        where = f"the tokenizer {path}"
        if tcfg.channels != mcfg.in_chans:
            raise ValueError(f"task.model.in_chans = {mcfg.in_chans}, but {where} was trained on {tcfg.channels}-"
                             f"channel images: one channel count must run from the data through the tokenizer "
                             f"to the model")
        if tcfg.downsample != mcfg.patch_size:
            raise ValueError(f"task.model.patch_size = {mcfg.patch_size}, but {where} has one code per "
                             f"{tcfg.downsample}x{tcfg.downsample} pixels (2**num_layers): they must match")
        if tcfg.image_size != mcfg.img_size:
            raise ValueError(f"task.input_size = {mcfg.img_size}, but {where} was trained at {tcfg.image_size}")
        if mcfg.num_tokens is not None and mcfg.num_tokens != tcfg.num_tokens:
            raise ValueError(f"task.model.num_tokens = {mcfg.num_tokens}, but {where} has {tcfg.num_tokens} codes")

    def param_groups(self, model: nn.Module, cfg: dict) -> list[dict]:
        return [g for g in model.param_groups() if g["params"]]

    def backbone_tensors(self, state: dict, cfg: dict, which: str, with_neck: bool) -> tuple[dict, dict]:
        """MEM's ViT (``vit.*`` of :class:`~evforge.pretrain.mem.model.MEMModel`) under timm's keys; the mask token
        and the MIM head are pretraining-only. MEM has one network, so ``which`` does not apply."""
        if with_neck:
            raise ValueError("MEM has no neck to export (with_neck is for ECDDP)")
        tensors = {key[len("vit."):]: value for key, value in state.items() if key.startswith("vit.")}
        if not tensors:
            raise ValueError("no 'vit.' weights in the checkpoint (not a MEM model)")
        model_cfg = mem_model_config(cfg)
        meta = {"arch": model_cfg.variant, "in_chans": int(model_cfg.in_chans), "timm_kwargs": model_cfg.timm_kwargs(),
                "norm_eps": 1e-6}  # timm's ViT LayerNorms use eps 1e-6
        return tensors, meta

    @torch.no_grad()
    def targets(self, img: torch.Tensor) -> torch.Tensor | None:
        """The tokenizer's codes (B, h*w) of ``img``, in fp32 outside autocast (as MEM computes them)."""
        if self.tokenizer is None:
            return None
        tok = self.tokenizer.to(img.device)
        with torch.autocast(device_type=img.device.type, enabled=False):
            return tok.get_codebook_indices(img.float())

    def _step(self, model: nn.Module, batch, *, train: bool, generator: torch.Generator):
        img = self.images(batch, train=train, generator=generator)
        mask = self.mask_generator(img.shape[0], generator=generator).to(img.device)
        targets = self.targets(img)
        loss, logs = model(img, mask, targets)
        return loss, logs, targets, mask

    def training_step(self, model: nn.Module, batch, state: dict):
        loss, logs, _, _ = self._step(model, batch, train=True, generator=self.step_generator(state, salt=1))
        return loss, logs

    @torch.no_grad()
    def validation_step(self, model: nn.Module, batch, state: dict) -> dict:
        loss, logs, targets, mask = self._step(model, batch, train=False,
                                               generator=keys_generator(self.cfg.get("seed", 0), 2, batch))
        n, stats = batch_count(batch), {}
        for name, v in {"loss": loss, **logs}.items():
            Mean(name).update(stats, v, n)
        if targets is not None:
            masked = targets[mask.to(targets.device)]
            _TARGETS.update(stats, torch.bincount(masked, minlength=self.tokenizer.num_tokens))
        return stats

    def validation_metrics(self, stats: dict) -> dict[str, float]:
        return {**mean_metrics(stats), **_TARGETS.compute(stats)}
