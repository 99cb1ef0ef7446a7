"""MEM's input pipeline, written once for the tokenizer, MEM pretraining and finetuning: :func:`mem_inputs`.

The public code builds every MEM input with ``mem/datasets.py: build_transformNPY`` (tokenizer training and
finetuning) and, for pretraining, the same transform followed by ``ColorJitter`` (``DataAugmentationForPT``).
Here the three stages call :func:`mem_inputs` with a :class:`MEMInputConfig` read from the same config keys
(``task.input_size``, ``task.augment``, ``task.val_window``, ``task.representation``), so they cannot drift.
On a packed batch, on the device, per sample:

1. ``off_events: ignore`` sets ``p = 0`` on OFF events (MEM's N-Cars files store p in {0, 1} and MEM counts
   only p = +1 / -1: its N-Cars images are ON-only, ``process_data/process_dataset.py:92``);
2. canvas ``scaled`` multiplies the coordinates (float64) onto a fixed canvas (``ReshapeScaleXandY``,
   ``mem/datasets.py:464-485``; MEM's N-ImageNet: short side 256 = 341 x 256 in training, the input size at
   validation);
3. a window of at most ``max_events`` consecutive events (``SliceRandomMaxEvs``, at validation too, where
   ``val_window.position`` says where: MEM draws it at random);
4. training: ``RandomTimeFlip``, ``Aug_FlipEvsAlongX``, ``Aug_RandomShiftEvs`` (events leaving the canvas are
   dropped; with the ``extent`` canvas the canvas is the sample's own ``[0, max x] x [0, max y]`` taken before
   each step, as MEM's ``H = W = None``);
5. ``EventArrToImg``: (ON count, 0, OFF count) at the canvas (coordinates truncated to integers; ``uint8_wrap``
   for MEM's uint8 counts), ``/ 255`` (``ToTensor``);
6. to ``input_size``: canvas ``sensor`` / ``extent``: bilinear antialiased resize (``transforms.Resize``), or with
   ``train_resize`` (sensor canvas, training) a resize to it then a random crop; canvas ``scaled``: a random
   crop in training (``RandomCrop``), nothing at validation;
7. ``RemoveHotPixels`` (> mean + ``hot_pixel_std`` std) and ``NormalizeEvent`` (times 1 / max), after the resize;
8. training with ``rand_augment.num_ops > 0``: ``ToUnit8``, ``EventRandAugment``, ``ToFloat32``
   (:mod:`.randaugment`);
9. ``color_jitter`` (pretraining): ``ColorJitter(brightness, 0, saturation)`` in training (and at validation
   with ``at_val``, as MEM's ``DataAugmentationForPT`` does).

Every random choice is drawn up front into :class:`Draws` (from one ``torch.Generator``), so a test can replay
the reference's own draws through :func:`mem_inputs` and compare images bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from evforge.data.augment import crop_windows, flip_x, random_window, shift, time_flip
from evforge.data.representations import mem_counts, normalize_max, remove_hot_pixels

from .randaugment import (
    ColorJitterConfig,
    RandAugmentConfig,
    color_jitter,
    draw_jitter,
    draw_ops,
    rand_augment,
    to_float,
    to_uint8,
)

__all__ = ["CANVASES", "WINDOW_POSITIONS", "MEMInputConfig", "Draws", "draw", "mem_inputs", "INPUT_KEYS"]

CANVASES = ("sensor", "extent", "scaled")
WINDOW_POSITIONS = ("random", "center", "first", "last")
OFF_EVENTS = ("count", "ignore")
# the task keys the pipeline reads (pretraining and finetuning alike), with MEM's values as defaults
INPUT_KEYS = {
    "input_size": [224, 224],
    "augment": {"max_events": 30000, "shift": 8, "flip_x": 0.5, "time_flip": 0.5},
    "val_window": {"max_events": 30000, "position": "random"},
}
REPRESENTATION_KEYS = {
    "canvas": "sensor", "train_resize": None, "scaled_short_side": 256, "off_events": "count", "uint8_wrap": False,
    "hot_pixel_std": 10.0, "rand_augment": {}, "color_jitter": {},
}


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


@dataclass
class MEMInputConfig:
    """What :func:`mem_inputs` does; see the module docstring for each step. Sizes are (H, W)."""

    size: tuple[int, int] = (224, 224)
    canvas: str = "sensor"
    train_resize: tuple[int, int] | None = None
    scaled_short_side: int = 256
    max_events: int | None = 30000
    val_max_events: int | None = 30000
    val_window: str = "random"
    time_flip: float = 0.5
    flip_x: float = 0.5
    shift: int = 8
    off_events: str = "count"
    uint8_wrap: bool = False
    hot_pixel_std: float | None = 10.0
    rand_augment: RandAugmentConfig = field(default_factory=RandAugmentConfig)
    color_jitter: ColorJitterConfig = field(default_factory=ColorJitterConfig)

    def __post_init__(self):
        if self.canvas not in CANVASES:
            raise ValueError(f"representation.canvas: expected one of {CANVASES}, got {self.canvas!r}")
        if self.val_window not in WINDOW_POSITIONS:
            raise ValueError(f"val_window.position: expected one of {WINDOW_POSITIONS}, got {self.val_window!r}")
        if self.off_events not in OFF_EVENTS:
            raise ValueError(f"representation.off_events: expected one of {OFF_EVENTS}, got {self.off_events!r}")
        if self.train_resize is not None:
            if self.canvas != "sensor":
                raise ValueError("representation.train_resize applies to the sensor canvas only "
                                 "(the scaled canvas crops from its own training size)")
            if self.train_resize[0] < self.size[0] or self.train_resize[1] < self.size[1]:
                raise ValueError(f"representation.train_resize {list(self.train_resize)} is smaller than the "
                                 f"input size {list(self.size)}")
        for name in ("max_events", "val_max_events"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {v}")

    @classmethod
    def from_task(cls, task: dict) -> "MEMInputConfig":
        """From a task's options: ``input_size``, ``augment`` (``max_events``, ``shift``, ``flip_x``,
        ``time_flip``), ``val_window`` (``max_events``, ``position``) and the ``representation`` keys
        ``canvas``, ``train_resize``, ``scaled_short_side``, ``off_events``, ``uint8_wrap``, ``hot_pixel_std``,
        ``rand_augment``, ``color_jitter`` (missing keys: MEM's values, see :data:`INPUT_KEYS`)."""
        aug = {**INPUT_KEYS["augment"], **(task.get("augment") or {})}
        win = {**INPUT_KEYS["val_window"], **(task.get("val_window") or {})}
        rep = {**REPRESENTATION_KEYS, **{k: v for k, v in (task.get("representation") or {}).items()
                                         if k in REPRESENTATION_KEYS}}
        tr = rep["train_resize"]
        return cls(size=_pair(task.get("input_size", INPUT_KEYS["input_size"])), canvas=rep["canvas"],
                   train_resize=None if tr is None else _pair(tr), scaled_short_side=int(rep["scaled_short_side"]),
                   max_events=aug["max_events"], val_max_events=win["max_events"], val_window=win["position"],
                   time_flip=float(aug["time_flip"]), flip_x=float(aug["flip_x"]), shift=int(aug["shift"] or 0),
                   off_events=rep["off_events"], uint8_wrap=bool(rep["uint8_wrap"]),
                   hot_pixel_std=None if rep["hot_pixel_std"] is None else float(rep["hot_pixel_std"]),
                   rand_augment=RandAugmentConfig.from_dict(rep["rand_augment"]),
                   color_jitter=ColorJitterConfig.from_dict(rep["color_jitter"]))

    def canvas_size(self, sensor_size: tuple[int, int], train: bool) -> tuple[int, int] | None:
        """(H, W) of the fixed canvas the events are binned on (None for ``extent``, one per sample)."""
        W, H = sensor_size
        if self.canvas == "sensor":
            return H, W
        if self.canvas == "scaled":
            if not train:
                return self.size
            s = self.scaled_short_side / min(H, W)
            return int(H * s), int(W * s)  # mem/datasets.py:618-621
        return None

    def crop_source(self, sensor_size: tuple[int, int], train: bool) -> tuple[int, int] | None:
        """(H, W) of the image the training crop is taken from, None when there is no crop."""
        if not train:
            return None
        if self.canvas == "scaled":
            return self.canvas_size(sensor_size, True)
        return self.train_resize if self.canvas == "sensor" else None


@dataclass
class Draws:
    """Every random choice of one batch (None: the step does not run). ``starts``: window start per sample;
    ``time_flip`` / ``flip_x``: bool per sample; ``shifts``: (dx, dy); ``crop``: (top, left) in the crop
    source; ``ops``: :func:`~.randaugment.draw_ops`; ``jitter``: :func:`~.randaugment.draw_jitter`."""

    starts: Tensor | None = None
    time_flip: Tensor | None = None
    flip_x: Tensor | None = None
    shifts: Tensor | None = None
    crop: Tensor | None = None
    ops: Tensor | None = None
    jitter: Tensor | None = None

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def _counts(batch: dict) -> Tensor:
    off = batch["offsets"].to(torch.int64).cpu()
    return off[1:] - off[:-1]


def draw(batch: dict, cfg: MEMInputConfig, sensor_size: tuple[int, int], *, train: bool,
         generator: torch.Generator | None = None) -> Draws:
    """The random choices :func:`mem_inputs` makes for ``batch`` (on the CPU, from ``generator``)."""
    n = _counts(batch)
    B = n.shape[0]
    d = Draws()
    k = cfg.max_events if train else cfg.val_max_events
    if k:
        room = (n - k).clamp(min=0)
        if train or cfg.val_window == "random":
            u = torch.rand(B, generator=generator, dtype=torch.float64)
            d.starts = (u * (room + 1)).long().clamp(max=room)  # uniform in [0, n - k]
        else:
            d.starts = {"center": room // 2, "first": torch.zeros_like(room), "last": room}[cfg.val_window]
    if train:
        d.time_flip = torch.rand(B, generator=generator) < cfg.time_flip
        d.flip_x = torch.rand(B, generator=generator) < cfg.flip_x
        d.shifts = torch.randint(-cfg.shift, cfg.shift + 1, (B, 2), generator=generator)
        src = cfg.crop_source(sensor_size, True)
        if src is not None:
            h, w = cfg.size
            if src[0] < h or src[1] < w:
                raise ValueError(f"the training canvas {list(src)} is smaller than the input size {[h, w]}")
            d.crop = torch.stack([torch.randint(0, src[0] - h + 1, (B,), generator=generator),
                                  torch.randint(0, src[1] - w + 1, (B,), generator=generator)], 1)
        if cfg.rand_augment.num_ops:
            d.ops = draw_ops(B, cfg.rand_augment, generator)
    if cfg.color_jitter.enabled and (train or cfg.color_jitter.at_val):
        d.jitter = draw_jitter(B, cfg.color_jitter, generator)
    return d


def _extent(batch: dict, col: str) -> Tensor:
    """Per sample ``int(max coordinate) + 1`` (MEM's H = W = None canvas side), 1 for an empty sample."""
    B = int(batch["offsets"].shape[0]) - 1
    v = batch[col]
    out = torch.full((B,), -1.0, dtype=torch.float64, device=v.device)
    out.scatter_reduce_(0, batch["batch_index"].to(v.device), v.double(), reduce="amax")
    return out.clamp(min=0).trunc().long() + 1


def _resize(img: Tensor, size: tuple[int, int]) -> Tensor:
    """torchvision ``Resize(size, BILINEAR, antialias=True)`` on float images (unchanged when already that size)."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    return F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=True)


def mem_inputs(batch: dict, cfg: MEMInputConfig, sensor_size: tuple[int, int], *, train: bool,
               generator: torch.Generator | None = None, draws: Draws | None = None) -> Tensor:
    """MEM's network input ``(B, 3, H, W)`` float32 for a packed batch (see the module docstring).

    ``sensor_size`` is the dataset's (W, H). The random choices come from ``draws`` when given, else from
    :func:`draw` with ``generator``."""
    d = draws if draws is not None else draw(batch, cfg, sensor_size, train=train, generator=generator)
    W, H = sensor_size
    b = dict(batch)
    b["x"], b["y"] = batch["x"].to(torch.float64), batch["y"].to(torch.float64)
    if cfg.off_events == "ignore":
        b["p"] = torch.where(batch["p"] < 0, torch.zeros_like(batch["p"]), batch["p"])
    canvas = cfg.canvas_size(sensor_size, train)
    if cfg.canvas == "scaled":
        sy, sx = (canvas[0] / H, canvas[1] / W) if not train else (cfg.scaled_short_side / min(H, W),) * 2
        b["x"], b["y"] = b["x"] * sx, b["y"] * sy
    k = cfg.max_events if train else cfg.val_max_events
    if d.starts is not None and k:
        b = random_window(b, int(k), starts=d.starts)
    if train:
        b = time_flip(b, which=d.time_flip)
        width = _extent(b, "x") if canvas is None else canvas[1]
        b = flip_x(b, width, which=d.flip_x)
        hw = (_extent(b, "y"), _extent(b, "x")) if canvas is None else canvas
        b = shift(b, 0, hw[0], hw[1], shifts=d.shifts)
    b["x"], b["y"] = b["x"].trunc().long(), b["y"].trunc().long()  # EventArrToImg: astype(int)
    if canvas is None:
        img = _extent_images(b, cfg)
    else:
        img = mem_counts(b, height=canvas[0], width=canvas[1], wrap_uint8=cfg.uint8_wrap) / 255
        if d.crop is not None:
            if cfg.canvas == "sensor":
                img = _resize(img, cfg.train_resize)
            img = crop_windows(img, d.crop, cfg.size)
        elif cfg.canvas == "sensor":
            img = _resize(img, cfg.size)
    if cfg.hot_pixel_std is not None:
        img = remove_hot_pixels(img, cfg.hot_pixel_std)
    img = normalize_max(img)
    if d.ops is not None:
        img = to_float(rand_augment(to_uint8(img), d.ops, cfg.rand_augment))
    if d.jitter is not None:
        img = color_jitter(img, d.jitter)
    return img


def _extent_images(b: dict, cfg: MEMInputConfig) -> Tensor:
    """Counts on each sample's own canvas [0, max x] x [0, max y], each resized to the input size."""
    ws, hs = _extent(b, "x"), _extent(b, "y")
    counts = mem_counts(b, height=int(hs.max()) if len(hs) else 1, width=int(ws.max()) if len(ws) else 1,
                        wrap_uint8=cfg.uint8_wrap) / 255
    out = counts.new_zeros(counts.shape[0], 3, *cfg.size)
    for i, (h, w) in enumerate(zip(hs.tolist(), ws.tolist())):  # one canvas size per sample
        out[i] = _resize(counts[i:i + 1, :, :h, :w], cfg.size)[0]
    return out
