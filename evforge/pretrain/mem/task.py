"""MEM as two :class:`~evforge.trainer.task.Task` s: the tokenizer (``mem_dvae``) and masked event modelling (``mem``).

Data (both): an evforge *samples* dataset (N-Caltech101, N-Cars, N-ImageNet shards; ``data.path``), the
``train`` split for training and ``data.val_split`` (default ``val``; N-Cars has ``test``) for validation.
Each packed batch goes through MEM's event pipeline (``mem/datasets.py: build_transformNPY``), on the device:

1. ``SliceRandomMaxEvs``: a random window of at most ``max_events`` (30k) consecutive events, at validation too;
2. training only: ``RandomTimeFlip`` (p 0.5), ``Aug_FlipEvsAlongX`` (p 0.5), ``Aug_RandomShiftEvs`` (+-``max_shift``
   px, 8 in MEM's configs; events leaving the sensor dropped);
3. ``EventArrToImg``: the 3-channel image (ON count, 0, OFF count) at the sensor size
   (:func:`~evforge.representations.mem_image`), resized to ``image_size`` (bilinear, antialiased, as MEM's
   ``transforms.Resize``); with ``train_resize: [H, W]`` training resizes to that and takes a random
   ``image_size`` crop instead (MEM's N-ImageNet: short side 256, ``RandomCrop(224)``; validation 224 x 224);
4. ``RemoveHotPixels`` (> mean + 10 std) and ``NormalizeEvent`` (divide by the max), after the resize as MEM.

MEM counts into ``uint8`` (a pixel with 256 events reads 0); ``legacy_uint8_wrap: true`` reproduces that.
Not reproduced: MEM's image-space RandAugment(2, 20) and ColorJitter (0.2) after these steps.

Random draws (windows, flips, shifts, masks) come from CPU generators seeded by ``(seed, step, micro-step,
rank)`` in training and by the batch's sample keys in validation, so a resumed run repeats them exactly and
validation sees the same windows every time. The tokenizer's Gumbel noise has its own seeded generator.

``mem`` loads a trained tokenizer (``task.tokenizer``: a ``mem_dvae`` trainer checkpoint, read with
``weights_only=True``), frozen in eval mode and kept outside the optimised model (not in MEM checkpoints);
its argmax codes of the same image are the targets (MEM's ``CreateTwoPic``: one image for both). Channel
count, patch size = tokenizer stride, image size and vocabulary are checked against the tokenizer.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...augment import flip_x, random_window, shift, time_flip
from ...dataset_builder.dataset import EventDataset, collate_events
from ...errors import InputError
from ...representations import mem_image, normalize_max, remove_hot_pixels
from ...trainer.checkpoint import load_checkpoint
from ...trainer.sampler import mix_seed
from .dvae import DiscreteVAE, DVAEConfig, code_usage
from .masking import make_mask_generator
from .model import MEMConfig, MEMModel

IMAGE_CHANNELS = 3  # mem_image: (ON count, zeros, OFF count), MEM's EventArrToImg with timesurface = 0

_DATA_DEFAULTS = {
    "image_size": 224,
    "max_events": 30000,       # MEM slice_max_evs
    "time_flip_p": 0.5,
    "flip_x_p": 0.5,
    "max_shift": 8,            # MEM max_random_shift_evs (configs); 0 = off
    "hot_pixel_std": 10.0,     # MEM hotpix_num_stds; null = off
    "normalize": True,         # MEM normalize_events
    "legacy_uint8_wrap": False,
    "train_resize": None,      # [H, W]: resize then random image_size crop (MEM's N-ImageNet training)
}


def _key_seed(batch: dict) -> int:
    """A seed from the batch's sample keys (stable across processes, unlike ``hash``)."""
    return zlib.crc32("\x00".join(batch["key"]).encode())


class _MEMData:
    """The data side shared by both tasks: dataset, collate, MEM's event pipeline, seeded generators."""

    name = ""
    _opt_defaults: dict = {}

    def __init__(self):
        self.sensor_size: tuple[int, int] | None = None  # (W, H)
        self.cfg: dict = {}

    def _opts(self, cfg: dict) -> dict:
        t = dict(cfg.get("task", {}))
        for k, v in {**_DATA_DEFAULTS, **self._opt_defaults}.items():
            t.setdefault(k, v)
        return t

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

    # ---- MEM's event pipeline
    def images(self, batch: dict, *, train: bool, generator: torch.Generator) -> torch.Tensor:
        """MEM event images (B, 3, image_size, image_size) of a packed batch (see the module doc)."""
        o = self._opts(self.cfg)
        if self.sensor_size is None:
            raise RuntimeError("build_dataset must run before images (the sensor size comes from the data)")
        W, H = self.sensor_size
        S = int(o["image_size"])
        b = random_window(batch, int(o["max_events"]), generator=generator)
        if train:
            b = time_flip(b, float(o["time_flip_p"]), generator=generator)
            b = flip_x(b, W, float(o["flip_x_p"]), generator=generator)
            if o["max_shift"]:
                b = shift(b, int(o["max_shift"]), H, W, generator=generator)
        # counts at the sensor size; MEM's ToTensor /255 is left out (it cancels in the max normalisation)
        img = mem_image(b, height=H, width=W, hot_pixel_std=None, normalize=False,
                        wrap_uint8=bool(o["legacy_uint8_wrap"]))
        if train and o["train_resize"]:
            rh, rw = (int(v) for v in o["train_resize"])
            if rh < S or rw < S:
                raise ValueError(f"task.train_resize {[rh, rw]} is smaller than image_size {S}")
            img = self._resize(img, (rh, rw))
            img = self._random_crop(img, S, generator)
        else:
            img = self._resize(img, (S, S))
        if o["hot_pixel_std"] is not None:
            img = remove_hot_pixels(img, float(o["hot_pixel_std"]))
        if o["normalize"]:
            img = normalize_max(img)
        return img

    @staticmethod
    def _resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(img.shape[-2:]) == tuple(size):
            return img
        return F.interpolate(img, size=size, mode="bilinear", antialias=True, align_corners=False)

    @staticmethod
    def _random_crop(img: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
        """A random ``size`` x ``size`` window per sample (integer offsets, gathered exactly)."""
        B, C, H, W = img.shape
        y0 = torch.randint(0, H - size + 1, (B,), generator=generator).to(img.device)
        x0 = torch.randint(0, W - size + 1, (B,), generator=generator).to(img.device)
        r = torch.arange(size, device=img.device)
        rows = (y0[:, None] + r)[:, None, :, None]
        cols = (x0[:, None] + r)[:, None, None, :]
        b = torch.arange(B, device=img.device)[:, None, None, None]
        c = torch.arange(C, device=img.device)[None, :, None, None]
        return img[b, c, rows, cols]

    # ---- seeding
    def _generator(self, state: dict, salt: int, batch: dict | None = None,
                   device: torch.device | str = "cpu") -> torch.Generator:
        """Training: seeded by (seed, salt, step, micro-step, rank); validation (``batch`` given): by the keys."""
        seed = int(self.cfg.get("seed", 0))
        parts = (seed, salt, _key_seed(batch)) if batch is not None else (
            seed, salt, state["step"], state.get("micro_step", 0), state.get("rank", 0))
        g = torch.Generator(device=device)
        g.manual_seed(mix_seed(*parts))
        return g

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
        raise ValueError("task.model.image_size: set task.image_size (shared by the data and the model)")
    return DVAEConfig.from_dict({**model, "image_size": int(task_opts.get("image_size", _DATA_DEFAULTS["image_size"]))})


class MEMDVAETask(_MEMData):
    """MEM's tokenizer training (``task.name: mem_dvae``): the discrete VAE on MEM's event images.

    Logs ``recon_mse`` and ``kl`` (train, relaxed codes at ``schedules.gumbel_tau``) and, on validation, the
    hard-code reconstruction ``recon_mse`` / ``loss`` (as MEM's ``evaluate``), ``codebook_usage`` (fraction of
    the codes used) and ``codebook_perplexity`` (exp entropy of the code histogram), both per validation batch
    averaged over batches (MEM counts distinct codes over the whole val set: a superset of any batch's).
    """

    name = "mem_dvae"

    def build_model(self, cfg: dict) -> nn.Module:
        self.cfg = cfg
        mcfg = _dvae_config(self._opts(cfg))
        _check_channels(mcfg.channels, "task.model.channels")
        return DiscreteVAE(mcfg)

    def param_groups(self, model: nn.Module, cfg: dict) -> list[dict]:
        return []  # the trainer's defaults (MEM: Adam without weight decay, optim.weight_decay 0)

    def training_step(self, model: nn.Module, batch, state: dict):
        if "gumbel_tau" not in state:
            raise KeyError("schedules.gumbel_tau: the tokenizer needs a Gumbel temperature schedule "
                           "(MEM: from 1.0 annealed to 0.5)")
        img = self.images(batch, train=True, generator=self._generator(state, salt=1))
        noise = self._generator(state, salt=3, device=img.device)
        loss, parts = model(img, tau=float(state["gumbel_tau"]), generator=noise)
        return loss, parts

    @torch.no_grad()
    def validation_step(self, model: nn.Module, batch, state: dict) -> dict:
        img = self.images(batch, train=False, generator=self._generator(state, salt=2, batch=batch))
        loss, parts = model(img)  # eval mode: the argmax codes
        usage, perplexity = code_usage(model.get_codebook_indices(img), model.num_tokens)
        return {"loss": float(loss), "recon_mse": float(parts["recon_mse"]), "kl": float(parts["kl"]),
                "codebook_usage": usage, "codebook_perplexity": perplexity}


def load_tokenizer(path) -> tuple[DiscreteVAE, dict]:
    """A frozen, eval-mode tokenizer and its run's config from a ``mem_dvae`` trainer checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such tokenizer checkpoint (train one with configs/pretrain/mem_dvae.yaml "
                               "and point task.tokenizer at its checkpoints/last.ckpt)")
    try:
        ck = load_checkpoint(path)  # weights_only=True
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one line naming it
        raise InputError(path, f"not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ck, dict) or "model" not in ck or "config" not in ck:
        raise InputError(path, "not an evforge trainer checkpoint (no model/config)")
    cfg = json.loads(ck["config"]) if isinstance(ck["config"], str) else ck["config"]
    task = cfg.get("task", {})
    if task.get("name") != MEMDVAETask.name:
        raise InputError(path, f"not a tokenizer checkpoint: its task is {task.get('name')!r}, not 'mem_dvae'")
    tok = DiscreteVAE(_dvae_config(task))
    tok.load_state_dict(ck["model"])
    tok.requires_grad_(False)
    return tok.eval(), cfg


# ------------------------------------------------------------------------------------------------------ MEM
def mem_model_config(cfg: dict) -> MEMConfig:
    """The :class:`MEMConfig` of a ``mem`` run's config (``task.model`` with ``img_size = task.image_size``)."""
    task = cfg.get("task", {})
    model = dict(task.get("model", {}))
    if "img_size" in model:
        raise ValueError("task.model.img_size: set task.image_size (shared by the data and the model)")
    return MEMConfig.from_dict({**model, "img_size": int(task.get("image_size", _DATA_DEFAULTS["image_size"]))})


class MEMTask(_MEMData):
    """Masked event modelling (``task.name: mem``): BEiT-style ViT on MEM event images, 50 % block masks.

    ``task.tokenizer``: the ``mem_dvae`` checkpoint (not needed with ``task.model.objective: mae``).
    ``task.mask``: ``kind`` (block | random), ``ratio`` (0.5) or ``num_patches`` (MEM: 98 of 196),
    ``min_num_patches`` (16), ``max_num_patches`` (null = all). Logs ``loss``, ``mlm_acc`` (beit: top-1 code
    accuracy on the masked patches) and ``n_masked`` (masked patches per sample).
    """

    name = "mem"
    _opt_defaults = {"tokenizer": None, "mask": {}}

    def __init__(self):
        super().__init__()
        self.tokenizer: DiscreteVAE | None = None
        self.mask_generator = None

    def build_model(self, cfg: dict) -> nn.Module:
        self.cfg = cfg
        o = self._opts(cfg)
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
        m = dict(o["mask"])
        unknown = set(m) - {"kind", "ratio", "num_patches", "min_num_patches", "max_num_patches"}
        if unknown:
            raise ValueError(f"task.mask: unknown options {sorted(unknown)}")
        self.mask_generator = make_mask_generator(
            m.get("kind", "block"), mcfg.grid, ratio=m.get("ratio", 0.5 if m.get("num_patches") is None else None),
            num_patches=m.get("num_patches"), min_num_patches=int(m.get("min_num_patches", 16)),
            max_num_patches=m.get("max_num_patches"))
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
            raise ValueError(f"task.image_size = {mcfg.img_size}, but {where} was trained at {tcfg.image_size}")
        if mcfg.num_tokens is not None and mcfg.num_tokens != tcfg.num_tokens:
            raise ValueError(f"task.model.num_tokens = {mcfg.num_tokens}, but {where} has {tcfg.num_tokens} codes")

    def param_groups(self, model: nn.Module, cfg: dict) -> list[dict]:
        return [g for g in model.param_groups() if g["params"]]

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
        return model(img, mask, self.targets(img))

    def training_step(self, model: nn.Module, batch, state: dict):
        return self._step(model, batch, train=True, generator=self._generator(state, salt=1))

    @torch.no_grad()
    def validation_step(self, model: nn.Module, batch, state: dict) -> dict:
        loss, logs = self._step(model, batch, train=False, generator=self._generator(state, salt=2, batch=batch))
        return {"loss": float(loss), **{k: float(v) for k, v in logs.items()}}
