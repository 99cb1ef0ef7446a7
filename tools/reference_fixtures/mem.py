"""Golden fixtures of MEM from its public code: run the reference's own functions on seeded inputs, write what
they return.

Reference: tum-vision/mem at commit c60c930 (2023-11-16, Apache-2.0), run with evforge's environment (torch
2.14.1, torchvision 0.29.1, timm 1.0.31, numpy 2.4) plus ``einops`` (its dVAE) and ``scipy`` (its finetuning
loader) from a side folder. Shims, nothing else changed: ``np.int`` (removed from numpy) is ``int``; ``mmcv``,
``tensorboardX`` and ``torch._six`` are stubs (imported, never used by what runs here); the timm optimisers
``optim_factory.py`` imports at the top (gone from timm 1.0) are placeholders, as its parameter-group code
does not use them. Nothing of the reference is copied into evforge; the fixtures hold seeded inputs, weights
drawn here and the reference's outputs.

Rerun (about a minute on 2 CPU cores)::

    git clone https://github.com/tum-vision/mem mem && git -C mem checkout c60c930
    pip install --target /tmp/memdeps einops scipy          # beside evforge's environment, no second torch
    python tools/reference_fixtures/mem.py --ref mem --extra-path /tmp/memdeps

It writes ``tests/fixtures/mem/reference.npz`` (arrays, compressed: the event images are mostly zeros),
``reference.json`` (scalars, draws, configs, provenance) and ``docs/mem_event_images.png`` (the reference
pipeline's event images next to evforge's);
``tests/pretrain/test_mem_reference.py`` checks evforge against the fixtures without the reference.

What is recorded (all small: 64-112 px images, a 2-block ViT of width 32):

* ``images/<geometry>/<train|val>``: ``mem/datasets.py: build_transformNPY`` (and, for ``pretrain``,
  ``DataAugmentationForPT``'s ColorJitter) on seeded events: N-Caltech101 (per-sample canvas, uint8 wrap),
  N-Cars (p in {0, 1}: ON-only), N-ImageNet (coordinates scaled to 341 x 256, RandomCrop) and two real
  recordings (N-Cars ``.dat``, an ATIS ``.bin`` as N-Caltech101 stores them), with every random draw it made
  (replayed from the same seeds) so evforge can be run on the same draws;
* ``hotpix/*``: ``RemoveHotPixels`` on images with planted hot pixels;
* ``randaug/*``: ``transforms._apply_op`` op by op at fixed magnitudes, and ``EventRandAugment(gen=...)``;
* ``jitter/*``: torchvision ``ColorJitter(0.2, 0, 0.2)`` with its draws;
* ``masks/*``: ``MaskingGenerator`` (14 x 14 / 98 / 16 and 8 x 8 / 32 / 4) and ``MaskingGeneratorRandomLocation``
  masks after ``random.seed``;
* ``dvae/*``: ``eventvae/vae/vae_model.py: DiscreteVAE`` weights, logits, codes, decode, loss with its Gumbel noise;
* ``beit_pt/*``: ``modeling_pretrain.VisionTransformerForMaskedImageModeling`` (shared relative position bias)
  weights and masked-token logits; ``beit_ft/*``: ``modeling_finetune.VisionTransformer`` after
  ``utils.finetune`` loaded those weights (shared bias expanded per block), and its logits;
* ``groups``: ``optim_factory.get_parameter_groups`` with ``LayerDecayValueAssigner`` on that finetuning model;
* ``schedules``: ``utils.cosine_scheduler`` as pretraining and finetuning call it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import types
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT = ROOT / "tests" / "fixtures" / "mem"
PNG = ROOT / "docs" / "mem_event_images.png"
COMMIT = "c60c930"
REALDATA = ROOT.parent / "shared" / "realdata"


# ------------------------------------------------------------------------------------------------ loading
def load_reference(root: Path) -> dict:
    """Import the reference modules from the checkout (``mem/`` and ``eventvae/`` on ``sys.path``, as its
    scripts run them), with the shims of the module docstring."""
    root = root.resolve()
    if not (root / "mem" / "datasets.py").is_file() or not (root / "eventvae" / "vae" / "vae_model.py").is_file():
        raise SystemExit(f"{root}: not a checkout of tum-vision/mem")
    np.int = int  # removed in numpy 1.24; EventArrToImg and the masking generators use it
    for name in ("mmcv", "tensorboardX"):
        stub = types.ModuleType(name)
        stub.SummaryWriter = object
        sys.modules.setdefault(name, stub)
    six = types.ModuleType("torch._six")
    six.inf = math.inf
    sys.modules["torch._six"] = six
    for mod, cls in (("adafactor", "Adafactor"), ("adahessian", "Adahessian"), ("adamp", "AdamP"),
                     ("lookahead", "Lookahead"), ("nadam", "Nadam"), ("novograd", "NovoGrad"),
                     ("nvnovograd", "NvNovoGrad"), ("radam", "RAdam"), ("rmsprop_tf", "RMSpropTF"), ("sgdp", "SGDP")):
        stub = types.ModuleType(f"timm.optim.{mod}")
        setattr(stub, cls, None)  # optim_factory imports them; the parameter groups never use them
        sys.modules[f"timm.optim.{mod}"] = stub
    sys.path[:0] = [str(root / "mem"), str(root / "eventvae"), str(root)]
    import datasets  # noqa: E402  (the reference's mem/datasets.py)
    import masking_generator
    import modeling_finetune
    import modeling_pretrain
    import optim_factory
    import transforms
    import utils
    from vae import vae_model
    for name in ("datasets", "transforms", "utils", "masking_generator"):
        mod = sys.modules[name]
        if not str(Path(mod.__file__).resolve()).startswith(str(root)):
            raise SystemExit(f"imported {name} from {mod.__file__}, not from the reference checkout")
    return {"datasets": datasets, "transforms": transforms, "masking": masking_generator, "utils": utils,
            "pretrain": modeling_pretrain, "finetune": modeling_finetune, "optim": optim_factory, "vae": vae_model}


class Recorder:
    """Arrays (a compressed npz) and JSON values of the fixture."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.meta: dict = {}

    def t(self, key: str, value) -> None:
        v = torch.as_tensor(value)
        self.tensors[key] = v.detach().contiguous().clone()

    def j(self, key: str, value) -> None:
        self.meta[key] = value


# ------------------------------------------------------------------------------------------------- events
def blob_events(rng: np.random.Generator, n: int, width: int, height: int, *, hot: tuple[int, int] | None = None,
                hot_count: int = 0, binary_p: bool = False) -> np.ndarray:
    """``(n, 4)`` float64 [x, y, t, p] as MEM's npy files hold them: a few moving Gaussian blobs (an object
    smaller than the sensor, so the per-sample canvas matters), sorted in t; ``hot``: a pixel with
    ``hot_count`` extra events (> 255 of one polarity exercises the uint8 wrap)."""
    t = np.sort(rng.integers(0, 200_000, n))
    k = 3
    cx = rng.uniform(0.25, 0.6, k) * width
    cy = rng.uniform(0.25, 0.6, k) * height
    which = rng.integers(0, k, n)
    drift = t / 200_000.0
    x = cx[which] + rng.normal(0, width / 12, n) + 6 * drift
    y = cy[which] + rng.normal(0, height / 12, n) - 4 * drift
    x = np.clip(np.round(x), 0, width - 1)
    y = np.clip(np.round(y), 0, height - 1)
    p = np.where(rng.random(n) < 0.55, 1.0, -1.0)
    ev = np.stack([x, y, t.astype(np.float64), p], 1)
    if hot is not None and hot_count:
        th = np.sort(rng.integers(0, 200_000, hot_count)).astype(np.float64)
        h = np.stack([np.full(hot_count, hot[0]), np.full(hot_count, hot[1]), th,
                      np.where(np.arange(hot_count) % 7 == 0, -1.0, 1.0)], 1)
        ev = np.concatenate([ev, h])
        ev = ev[np.argsort(ev[:, 2], kind="stable")]
    if binary_p:
        ev[:, 3] = (ev[:, 3] > 0).astype(np.float64)
    return ev


def real_events() -> dict:
    """The two real recordings of ``shared/realdata`` (when present), decoded by evforge, as MEM's npy rows."""
    from evforge.formats.decoders import read_atis_bin, read_prophesee_dat

    out = {}
    for name, path, read in (("ncars_real", REALDATA / "sample_ncars.dat", read_prophesee_dat),
                             ("atis_real", REALDATA / "sample_nmnist.bin", read_atis_bin)):
        if path.is_file():
            ev = read(path)
            out[name] = np.stack([ev["x"], ev["y"], ev["t"] - ev["t"][0], ev["p"]], 1).astype(np.float64)
    return out


# ------------------------------------------------------------------------------------------- event images
# (name, MEM data_path (its transforms branch on it), sensor (W, H), input size (H, W), canvas, off events)
GEOMETRIES = {
    "ncaltech101": ("/data/ncaltech101/", (240, 180), (64, 64), "extent", "count"),
    "ncars": ("/data/ncars/", (120, 100), (64, 64), "extent", "ignore"),
    "nimagenet": ("/data/nimagenet_npy/", (640, 480), (112, 112), "scaled", "count"),
    "ncars_real": ("/data/ncars/", (120, 100), (64, 64), "extent", "ignore"),
    "atis_real": ("/data/ncaltech101/", (34, 34), (64, 64), "extent", "count"),
}
MAX_EVENTS = 5000  # SliceRandomMaxEvs asserts >= 5000
SHIFT = 8


def ref_args(data_path: str, size: tuple[int, int], *, color_jitter: float = 0.0) -> argparse.Namespace:
    """The argument namespace MEM's scripts build from ``configs/ncaltech.conf`` (its preprocessing keys)."""
    return argparse.Namespace(
        data_path=data_path, data_set="npy", input_H=size[0], input_W=size[1], slice_max_evs=MAX_EVENTS,
        max_random_shift_evs=SHIFT, timesurface=0, hotpixfilter=1, hotpix_num_stds=10.0, logtrafo=0, gammatrafo=0,
        gamma=0.5, normalize_events=1, rand_aug=1, color_jitter=color_jitter, discrete_vae_type="event",
        masking="block", window_size=(size[0] // 16, size[1] // 16), num_mask_patches=2,
        max_mask_patches_per_block=None, min_mask_patches_per_block=1)


def replay_draws(n: int, seed: int, *, train: bool, crop: tuple[int, int] | None, size: tuple[int, int],
                 jitter: bool) -> dict:
    """The draws MEM's transforms make after ``random.seed(seed); np.random.seed(seed); torch.manual_seed(seed)``,
    made again in the same order on each generator: SliceRandomMaxEvs (random), RandomTimeFlip, FlipX, Shift
    (numpy), RandomCrop, EventRandAugment x 2 ops, ColorJitter (torch)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    d = {"start": random.choice(range(n - MAX_EVENTS + 1)) if n > MAX_EVENTS else 0}
    if train:
        d["time_flip"] = bool(np.random.random() < 0.5)
        d["flip_x"] = bool(np.random.random() < 0.5)
        d["shift"] = [int(v) for v in np.random.randint(-SHIFT, SHIFT + 1, size=(2,))]
        d["crop"] = [0, 0]
        if crop is not None and tuple(crop) != tuple(size):
            d["crop"] = [int(torch.randint(0, crop[0] - size[0] + 1, size=(1,)).item()),
                         int(torch.randint(0, crop[1] - size[1] + 1, size=(1,)).item())]
        d["ops"] = [[int(torch.randint(14, (1,)).item()), int(torch.randint(21, (1,)).item()),
                     int(torch.randint(2, (1,)).item())] for _ in range(2)]
    if jitter:
        perm = torch.randperm(4).tolist()
        b = float(torch.empty(1).uniform_(0.8, 1.2))
        s = float(torch.empty(1).uniform_(0.8, 1.2))
        d["jitter"] = [b, s, 1.0 if perm.index(0) < perm.index(2) else 0.0]
    return d


def run_reference_images(ref: dict, ev: np.ndarray, data_path: str, size, *, train: bool, seed: int,
                         pretrain: bool) -> torch.Tensor:
    """MEM's own transform on one sample (its npy row layout), seeded as :func:`replay_draws`."""
    args = ref_args(data_path, size, color_jitter=0.2 if pretrain else 0.0)
    if pretrain:
        transform = ref["datasets"].DataAugmentationForPT(args, is_train=train).common_transform
    else:
        transform = ref["datasets"].build_transformNPY(train, args)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    out = transform(ev.copy())
    return out[0] if pretrain else out


def record_images(ref: dict, rec: Recorder) -> dict:
    """Every geometry, train and val (N-Caltech101 also as MEM pretraining: + ColorJitter), three synthetic
    samples (or the real recording); returns {(geometry, mode): (events, draws, images)} for the PNG."""
    rng = np.random.default_rng(7)
    real = real_events()
    shown = {}
    for geo, (path, (W, H), size, canvas, off) in GEOMETRIES.items():
        if geo in real:
            samples = [real[geo]]
        elif geo in ("atis_real", "ncars_real"):
            continue
        else:
            n = {"ncaltech101": 7000, "ncars": 6000, "nimagenet": 7000}[geo]
            samples = [blob_events(rng, n - 600 * i, W, H, hot=(W // 3, H // 2) if i == 0 else None,
                                   hot_count=300 if i == 0 else 0) for i in range(3)]
        if geo == "nimagenet":
            s = 256 / 480
            crop = (int(480 * s), int(640 * s))
        else:
            crop = None
        modes = [("train", True, False), ("val", False, False)]
        if geo == "ncaltech101":
            modes += [("pretrain", True, True), ("pretrain_val", False, True)]
        for j, ev in enumerate(samples):
            rec.t(f"images/{geo}/events{j}", torch.from_numpy(ev.astype(np.int32)))  # integral x, y, t, p
        for mode, train, pretrain in modes:
            imgs, draws = [], []
            for j, ev in enumerate(samples):
                seed = 1000 * j + 17 * len(mode) + len(geo)
                mem_ev = ev.copy()
                if off == "ignore":  # MEM's N-Cars npy files: p stored as 0/1 (process_data/process_dataset.py:92)
                    mem_ev[:, 3] = (mem_ev[:, 3] > 0).astype(np.float64)
                img = run_reference_images(ref, mem_ev, path, size, train=train, seed=seed, pretrain=pretrain)
                draws.append(replay_draws(len(ev), seed, train=train, crop=crop, size=size, jitter=pretrain))
                imgs.append(img.float())
            rec.t(f"images/{geo}/{mode}", torch.stack(imgs))
            rec.j(f"images/{geo}/{mode}/draws", draws)
            shown[(geo, mode)] = (samples, draws, torch.stack(imgs))
        rec.j(f"images/{geo}/setup", {"data_path": path, "sensor_size": [W, H], "size": list(size), "canvas": canvas,
                                      "off_events": off, "num_samples": len(samples)})
    rec.j("images/max_events", MAX_EVENTS)
    rec.j("images/shift", SHIFT)
    return shown


# ----------------------------------------------------------------------------------------- hot pixels
def record_hot_pixels(ref: dict, rec: Recorder) -> None:
    """``RemoveHotPixels(num_stds=10)`` on images with planted hot pixels (one per image, either polarity)."""
    g = torch.Generator().manual_seed(11)
    imgs = torch.zeros(4, 3, 20, 24)
    imgs[:, 0::2] = (torch.rand(4, 2, 20, 24, generator=g) < 0.3) * torch.randint(1, 6, (4, 2, 20, 24), generator=g)
    imgs[0, 0, 3, 5] = 400
    imgs[1, 2, 10, 2] = 300
    imgs[2, 0, 7, 7], imgs[2, 2, 7, 7] = 120, 200
    imgs = imgs / 255  # after ToTensor, as MEM filters them
    outs = torch.stack([ref["transforms"].RemoveHotPixels(num_stds=10)(x.clone()) for x in imgs])
    rec.t("hotpix/input", imgs)
    rec.t("hotpix/output", outs)


# ------------------------------------------------------------------------------------------- RandAugment
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
MAGNITUDE_INDICES = (3, 20)  # EventRandAugment draws indices in [0, magnitude = 20] of 31 bins


def record_rand_augment(ref: dict, rec: Recorder, images: torch.Tensor) -> None:
    """``_apply_op`` op by op at fixed magnitudes (both signs), and ``EventRandAugment(gen=...)``, on uint8
    event images (``ToUnit8`` of pipeline outputs)."""
    T = ref["transforms"]
    from torchvision.transforms import InterpolationMode

    u8 = (255 * images).to(torch.uint8)
    rec.t("randaug/input", u8)
    H, W = u8.shape[-2:]
    aug = T.EventRandAugment(magnitude=20)
    space = aug._augmentation_space(31, (H, W))
    assert tuple(space) == OPS, tuple(space)
    cases = []
    for name in OPS:
        table, signed = space[name]
        for idx in (MAGNITUDE_INDICES if table.ndim > 0 else (0,)):
            for sign in ((0, 1) if signed else (0,)):
                mag = float(table[idx].item()) if table.ndim > 0 else 0.0
                mag = -mag if sign else mag
                out = torch.stack([T._apply_op(x, name, mag, interpolation=InterpolationMode.BILINEAR, fill=None)
                                   for x in u8])
                rec.t(f"randaug/op/{name}/{idx}/{sign}", out)
                cases.append([name, idx, sign, mag])
    rec.j("randaug/cases", cases)
    gen = torch.Generator().manual_seed(23)
    aug = T.EventRandAugment(magnitude=20, gen=gen)
    rec.t("randaug/full", torch.stack([aug(x) for x in u8]))
    rec.j("randaug/full_seed", 23)


# ---------------------------------------------------------------------------------------------- jitter
def record_jitter(rec: Recorder, images: torch.Tensor) -> None:
    """torchvision ``ColorJitter(0.2, 0, 0.2)`` (MEM's pretraining) on float event images, with its draws."""
    from torchvision import transforms as tvt

    jitter = tvt.ColorJitter(0.2, 0, 0.2)
    outs, draws = [], []
    for i, x in enumerate(images):
        torch.manual_seed(100 + i)
        outs.append(jitter(x.clone()))
        torch.manual_seed(100 + i)
        perm = torch.randperm(4).tolist()
        b = float(torch.empty(1).uniform_(0.8, 1.2))
        s = float(torch.empty(1).uniform_(0.8, 1.2))
        draws.append([b, s, 1.0 if perm.index(0) < perm.index(2) else 0.0])
    rec.t("jitter/input", images)
    rec.t("jitter/output", torch.stack(outs))
    rec.t("jitter/draws", torch.tensor(draws, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------- masks
MASK_SETUPS = {"beit14": ((14, 14), 98, 16), "tiny8": ((8, 8), 32, 4)}


def record_masks(ref: dict, rec: Recorder) -> None:
    """``MaskingGenerator`` after ``random.seed(s)`` (BEiT blocks, as MEM's DataAugmentationForPT builds it) and
    ``MaskingGeneratorRandomLocation`` (never the last patch)."""
    M = ref["masking"]
    for name, (grid, count, min_patches) in MASK_SETUPS.items():
        gen = M.MaskingGenerator(grid, num_masking_patches=count, max_num_patches=None, min_num_patches=min_patches)
        random.seed(5)
        rec.t(f"masks/{name}", torch.from_numpy(np.stack([gen() for _ in range(200)]).astype(bool)))
    gen = M.MaskingGeneratorRandomLocation((14, 14), num_masking_patches=98)
    random.seed(6)
    rec.t("masks/random14", torch.from_numpy(np.stack([gen() for _ in range(100)]).astype(bool)))
    rec.j("masks/setups", {k: [list(v[0]), v[1], v[2]] for k, v in MASK_SETUPS.items()})
    rec.j("masks/seeds", {"beit14": 5, "tiny8": 5, "random14": 6})


# ------------------------------------------------------------------------------------------------ dVAE
DVAE = dict(input_H=32, input_W=32, num_tokens=16, codebook_dim=8, num_layers=2, num_resnet_blocks=1, hidden_dim=16,
            channels=3)


def record_dvae(ref: dict, rec: Recorder, images: torch.Tensor) -> None:
    """``DiscreteVAE`` of eventvae: logits, codes, decode, and the training loss with its own Gumbel noise
    (``torch.manual_seed(5)`` before the call), KL weight 0.01 so that its reduction shows."""
    torch.manual_seed(1)
    vae = ref["vae"].DiscreteVAE(**DVAE, loss="mse", kl_div_loss_weight=0.01, straight_through=False)
    img = torch.nn.functional.interpolate(images[:3], size=(32, 32), mode="bilinear", antialias=True)
    with torch.no_grad():
        vae.eval()
        logits = vae(img, return_logits=True)
        codes = vae.get_codebook_indices(img)
        decoded = vae.decode(codes)
        vae.train()
        torch.manual_seed(5)
        loss, recon = vae(img, return_loss=True, return_recons=True, temp=0.7)
    for k, v in vae.state_dict().items():
        rec.t(f"dvae/weights/{k}", v)
    rec.t("dvae/input", img)
    rec.t("dvae/logits", logits)
    rec.t("dvae/codes", codes)
    rec.t("dvae/decoded", decoded)
    rec.t("dvae/recon", recon)
    rec.j("dvae/loss", float(loss))
    rec.j("dvae/setup", {**DVAE, "kl_div_loss_weight": 0.01, "temp": 0.7, "noise_seed": 5})


# ------------------------------------------------------------------------------------------------ BEiT
BEIT = dict(img_size=(32, 32), patch_size=(8, 8), embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, init_values=0.1,
            in_chans=3)


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Every parameter off its initial value (zero relative-position tables and biases, unit norms would hide
    mix-ups)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def record_beit(ref: dict, rec: Recorder, images: torch.Tensor, tmp: Path) -> None:
    """MEM's pretraining BEiT (shared relative position bias, no absolute embedding) on masked images; its
    finetuning ViT after ``utils.finetune`` loaded those weights; the layer-decay parameter groups of the latter."""
    img = torch.nn.functional.interpolate(images[:2], size=(32, 32), mode="bilinear", antialias=True)
    torch.manual_seed(2)
    pt = ref["pretrain"].pt_vit(pretrained=False, vocab_size=16, use_abs_pos_emb=False, use_shared_rel_pos_bias=True,
                                drop_path_rate=0.0, **BEIT)
    perturb(pt, 3)
    pt.eval()
    gen = ref["masking"].MaskingGenerator((4, 4), num_masking_patches=8, min_num_patches=2)
    random.seed(9)
    mask = torch.from_numpy(np.stack([gen() for _ in range(2)])).flatten(1).bool()
    with torch.no_grad():
        masked_logits = pt(img, bool_masked_pos=mask)
        all_logits = pt(img, bool_masked_pos=mask, return_all_tokens=True)
    state = pt.state_dict()
    for k, v in state.items():
        rec.t(f"beit_pt/weights/{k}", v)
    rec.t("beit_pt/input", img)
    rec.t("beit_pt/mask", mask)
    rec.t("beit_pt/masked_logits", masked_logits)
    rec.t("beit_pt/all_logits", all_logits)
    rec.j("beit_pt/setup", {**{k: list(v) if isinstance(v, tuple) else v for k, v in BEIT.items()}, "vocab_size": 16})

    # finetuning: ft_vit as run_class_finetuning.py builds it, loaded by utils.finetune from a checkpoint file
    ckpt = tmp / "pt.pth"
    torch.save({"model": state}, ckpt)
    torch.manual_seed(4)
    ft = ref["finetune"].ft_vit(pretrained=False, num_classes=5, drop_rate=0.1, drop_path_rate=0.1,
                                attn_drop_rate=0.0, use_mean_pooling=True, init_scale=0.001, use_rel_pos_bias=True,
                                use_abs_pos_emb=False, **BEIT)
    args = argparse.Namespace(finetune=str(ckpt), model_key="model|module", model_prefix="")
    ref["utils"].finetune(args, ft)
    ft.eval()
    with torch.no_grad():
        logits = ft(img)
    for k, v in ft.state_dict().items():
        rec.t(f"beit_ft/weights/{k}", v)
    rec.t("beit_ft/logits", logits)

    # layer-decay groups (run_class_finetuning.py:560-585; the fixture's depth instead of its hard-coded 12,
    # which equals ViT-B's depth)
    O = ref["optim"]
    depth = BEIT["depth"]
    assigner = O.LayerDecayValueAssigner(list(0.9 ** (depth + 1 - i) for i in range(depth + 2)))
    groups = O.get_parameter_groups(ft, 0.05, ft.no_weight_decay(), assigner.get_layer_id, assigner.get_scale)
    names = {id(p): n for n, p in ft.named_parameters()}
    rec.j("groups", sorted([sorted(names[id(p)] for p in g["params"]), g["lr_scale"], g["weight_decay"]]
                           for g in groups))


# ------------------------------------------------------------------------------------------- schedules
def record_schedules(ref: dict, rec: Recorder) -> None:
    """``utils.cosine_scheduler`` as pretraining (warmup_steps given, warmup_epochs at its default 5) and
    finetuning (warmup_epochs) call it."""
    U = ref["utils"]
    rec.t("schedules/pretrain", torch.from_numpy(U.cosine_scheduler(5e-4, 1e-5, 3, 50, warmup_epochs=5,
                                                                     warmup_steps=20)))
    rec.t("schedules/finetune", torch.from_numpy(U.cosine_scheduler(4e-3, 1e-6, 6, 10, warmup_epochs=2)))
    rec.j("schedules/setup", {"pretrain": [5e-4, 1e-5, 3, 50, 20], "finetune": [4e-3, 1e-6, 6, 10, 2]})


# ------------------------------------------------------------------------------------------------- PNG
def evforge_images(samples, draws, geo: str, *, train: bool, recipe: str) -> torch.Tensor:
    """evforge's :func:`mem_inputs` on ``samples`` with the reference's ``draws``: ``recipe`` reference (the
    input keys of configs/pretrain/mem_<dataset>_reference.yaml) or evforge (those of mem_<dataset>.yaml), at
    the fixture's input size and window."""
    from evforge.data.collate import collate_events
    from evforge.formats.events import make_events
    from evforge.pretrain.mem.inputs import Draws, MEMInputConfig, mem_inputs
    from evforge.trainer.config import load_config

    path, sensor, size, canvas, off = GEOMETRIES[geo]
    dataset = {"ncaltech101": "ncaltech101", "atis_real": "ncaltech101", "ncars": "ncars", "ncars_real": "ncars",
               "nimagenet": "nimagenet"}[geo]
    name = f"mem_{dataset}_reference.yaml" if recipe == "reference" else f"mem_{dataset}.yaml"
    task = load_config(ROOT / "configs" / "pretrain" / name)["task"]
    task = {**task, "input_size": list(size), "augment": {**task["augment"], "max_events": MAX_EVENTS},
            "val_window": {**task["val_window"], "max_events": MAX_EVENTS}}
    rep = dict(task["representation"])
    rep["color_jitter"] = {**rep.get("color_jitter", {}), "brightness": 0.0, "saturation": 0.0}
    if rep.get("train_resize"):  # the fixture's 112 input instead of 224: scale the training resize with it
        rep["train_resize"] = [round(v * size[0] / 224) for v in rep["train_resize"]]
    cfg = MEMInputConfig.from_task({**task, "representation": rep})
    items = [{"events": make_events(e[:, 0].astype(int), e[:, 1].astype(int), e[:, 2].astype(np.int64), e[:, 3]),
              "label": 0, "key": str(i)} for i, e in enumerate(samples)]
    d = Draws(starts=torch.tensor([x["start"] for x in draws]))
    if train:
        d.time_flip = torch.tensor([x["time_flip"] for x in draws])
        d.flip_x = torch.tensor([x["flip_x"] for x in draws])
        d.shifts = torch.tensor([x["shift"] for x in draws])
        d.ops = torch.tensor([x["ops"] for x in draws])
        src = cfg.crop_source(sensor, True)
        if src is not None:
            d.crop = torch.tensor([x["crop"] for x in draws])
            d.crop = torch.minimum(d.crop, torch.tensor([src[0] - size[0], src[1] - size[1]]))
    return mem_inputs(collate_events(items), cfg, sensor, train=train, draws=d)


def render_png(shown: dict, path: Path) -> dict:
    """Rows: one sample per geometry; columns: the public pipeline and evforge's with the reference recipe on the
    same draws (validation and training), and evforge's own recipe. Returns the max differences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [g for g in ("ncaltech101", "atis_real", "ncars_real", "ncars", "nimagenet") if (g, "val") in shown]
    cols = ["public code, val", "evforge reference recipe, val", "evforge recipe, val", "public code, train",
            "evforge reference recipe, train"]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.6 * len(cols), 2.7 * len(rows)))
    diffs = {}
    for r, geo in enumerate(rows):
        samples, vdraws, vref = shown[(geo, "val")]
        _, tdraws, tref = shown[(geo, "train")]
        ours_v = evforge_images(samples, vdraws, geo, train=False, recipe="reference")
        ours_t = evforge_images(samples, tdraws, geo, train=True, recipe="reference")
        own_v = evforge_images(samples, vdraws, geo, train=False, recipe="evforge")
        diffs[geo] = [float((ours_v - vref).abs().max()), float((ours_t - tref).abs().max())]
        for c, img in enumerate((vref[0], ours_v[0], own_v[0], tref[0], ours_t[0])):
            ax = axes[r, c]
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1).pow(0.5).numpy())  # ON red, OFF blue; gamma 0.5 to show
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(geo, fontsize=9)
    fig.suptitle(f"MEM event images: tum-vision/mem {COMMIT} vs evforge (same random draws); "
                 f"max |difference| reference recipe: {max(max(v) for v in diffs.values()):.1e}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return diffs


# -------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ref", required=True, type=Path, help="checkout of tum-vision/mem at commit " + COMMIT)
    p.add_argument("--extra-path", action="append", default=[],
                   help="side folder with einops / scipy (appended to the end of sys.path)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--png", type=Path, default=PNG)
    args = p.parse_args(argv)
    sys.path.extend(str(x) for x in args.extra_path)
    torch.set_num_threads(1)
    ref = load_reference(args.ref)
    rec = Recorder()
    shown = record_images(ref, rec)
    val = rec.tensors["images/ncaltech101/val"]
    record_hot_pixels(ref, rec)
    record_rand_augment(ref, rec, val[:, :, 8:56, 8:56].contiguous())
    record_jitter(rec, val)
    record_masks(ref, rec)
    record_dvae(ref, rec, val)
    args.out.mkdir(parents=True, exist_ok=True)
    record_beit(ref, rec, val, args.out)
    (args.out / "pt.pth").unlink()
    record_schedules(ref, rec)
    diffs = render_png(shown, args.png)
    rec.j("provenance", {"repository": "tum-vision/mem", "commit": COMMIT, "torch": torch.__version__,
                         "numpy": np.__version__, "tool": "tools/reference_fixtures/mem.py"})
    np.savez_compressed(args.out / "reference.npz", **{k: v.numpy() for k, v in rec.tensors.items()})
    (args.out / "reference.json").write_text(json.dumps(rec.meta, indent=1, sort_keys=True) + "\n")
    size = sum((args.out / f).stat().st_size for f in ("reference.npz", "reference.json"))
    print(f"wrote {args.out} ({size / 1e6:.2f} MB, {len(rec.tensors)} tensors) and {args.png}")
    print("evforge reference recipe vs the public pipeline, max |difference| (val, train):", diffs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
