"""MEM's image-space augmentations, batched with a draw per sample: ``EventRandAugment`` and ``ColorJitter``.

MEM (``mem/transforms.py: EventRandAugment``, torchvision's RandAugment with an event op list) quantises the
normalised event image to ``uint8`` (``ToUnit8``: ``(255 * x).to(uint8)``, a truncation), applies ``num_ops``
(2) ops drawn uniformly from 14 (``Identity, ShearX, ShearY, TranslateX, TranslateY, Rotate, Brightness, Color,
Contrast, Sharpness, Posterize, Solarize, AutoContrast, Equalize``), each with a magnitude index drawn from
``[0, magnitude]`` (20) of ``num_bins`` (31) bins and a random sign for the signed ops, then divides by 255
(``ToFloat32``). The pretraining set adds torchvision's ``ColorJitter(brightness, 0, saturation)`` on the float
image (``mem/datasets.py: DataAugmentationForPT``).

Here every op works on a whole batch with per-sample magnitudes and gives torchvision's tensor result for each
sample exactly (``tests/pretrain/test_mem_reference.py`` checks op by op against the reference): the affine
ops build torchvision's inverse matrix and sampling grid (bilinear, zero fill, rounded back to ``uint8``), the
colour ops blend in float32 and truncate as torchvision's ``_blend``, ``Equalize`` uses torchvision's CPU
(``bincount``) lookup table. Draws come from a ``torch.Generator`` in the reference's order (op, magnitude
index, sign; op after op, sample after sample), so a generator in a given state picks the same ops as
``EventRandAugment(gen=...)`` would.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ALL_OPS", "SMALL_OPS", "RandAugmentConfig", "ColorJitterConfig", "op_magnitudes", "draw_ops",
           "apply_op", "rand_augment", "to_uint8", "to_float", "draw_jitter", "color_jitter"]

# mem/transforms.py:393-394 (small=False) and :391 (small=True): the op list, in the order ops are drawn from
ALL_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
           "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
SMALL_OPS = ALL_OPS[:11]
_SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}


@dataclass
class RandAugmentConfig:
    """``EventRandAugment`` options; MEM: ``num_ops=2, magnitude=20, num_bins=31, ops="all"`` in training
    (``mem/datasets.py:655-658``). ``num_ops=0`` turns it off (no uint8 quantisation either)."""

    num_ops: int = 0
    magnitude: int = 20
    num_bins: int = 31
    ops: str = "all"  # all | small (MEM's small=True list, without Solarize, AutoContrast, Equalize)

    @classmethod
    def from_dict(cls, d: dict | None) -> "RandAugmentConfig":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"rand_augment: unknown options {sorted(unknown)} "
                             f"(known: {sorted(cls.__dataclass_fields__)})")
        cfg = cls(**d)
        if cfg.num_ops < 0 or not 0 <= cfg.magnitude < cfg.num_bins or cfg.ops not in ("all", "small"):
            raise ValueError(f"rand_augment: need num_ops >= 0, 0 <= magnitude < num_bins and ops all|small, "
                             f"got {asdict(cfg)}")
        return cfg

    @property
    def names(self) -> tuple[str, ...]:
        return ALL_OPS if self.ops == "all" else SMALL_OPS


@dataclass
class ColorJitterConfig:
    """torchvision ``ColorJitter(brightness, 0, saturation)`` on the float image. MEM's pretraining: 0.2 / 0.2
    (``pt_color_jitter``; 0 for N-Cars), applied to the validation images too (``at_val``)."""

    brightness: float = 0.0
    saturation: float = 0.0
    at_val: bool = False

    @classmethod
    def from_dict(cls, d: dict | None) -> "ColorJitterConfig":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"color_jitter: unknown options {sorted(unknown)} "
                             f"(known: {sorted(cls.__dataclass_fields__)})")
        cfg = cls(**d)
        if not (0 <= cfg.brightness < 1 and 0 <= cfg.saturation < 1):
            raise ValueError(f"color_jitter: brightness and saturation must be in [0, 1), got {asdict(cfg)}")
        return cfg

    @property
    def enabled(self) -> bool:
        return self.brightness > 0 or self.saturation > 0


# ------------------------------------------------------------------------------------------------- draws
def op_magnitudes(name: str, num_bins: int, height: int, width: int) -> Tensor | None:
    """The magnitude bins of op ``name`` (``mem/transforms.py:411-429``), float32 as torchvision builds them;
    None for the ops without a magnitude."""
    if name in ("ShearX", "ShearY"):
        return torch.linspace(0.0, 0.3, num_bins)
    if name == "TranslateX":
        return torch.linspace(0.0, 150.0 / 331.0 * width, num_bins)
    if name == "TranslateY":
        return torch.linspace(0.0, 150.0 / 331.0 * height, num_bins)
    if name == "Rotate":
        return torch.linspace(0.0, 30.0, num_bins)
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        return torch.linspace(0.0, 0.9, num_bins)
    if name == "Posterize":
        return (8 - (torch.arange(num_bins) / ((num_bins - 1) / 4)).round().int()).float()
    if name == "Solarize":
        return torch.linspace(255.0, 0.0, num_bins)
    return None


def draw_ops(batch_size: int, cfg: RandAugmentConfig, generator: torch.Generator | None = None) -> Tensor:
    """``(B, num_ops, 3)`` int64: per sample and op, (op index into ``cfg.names``, magnitude index, sign bit),
    drawn as ``EventRandAugment.forward`` draws them (``mem/transforms.py:450-456``)."""
    n = len(cfg.names)
    out = torch.zeros(batch_size, cfg.num_ops, 3, dtype=torch.int64)
    for b in range(batch_size):
        for k in range(cfg.num_ops):
            out[b, k, 0] = int(torch.randint(n, (1,), generator=generator).item())
            out[b, k, 1] = int(torch.randint(cfg.magnitude + 1, (1,), generator=generator).item())
            out[b, k, 2] = int(torch.randint(2, (1,), generator=generator).item())
    return out


def signed_magnitudes(name: str, index: Tensor, sign: Tensor, num_bins: int, height: int, width: int) -> Tensor:
    """float64 magnitudes of op ``name`` for magnitude indices ``index`` and sign bits ``sign`` (N,)."""
    table = op_magnitudes(name, num_bins, height, width)
    if table is None:
        return torch.zeros(index.shape[0], dtype=torch.float64)
    m = table.double()[index.cpu()]  # float(magnitudes[i].item()): the float32 bin value, exactly
    if name in _SIGNED:
        m = torch.where(sign.cpu().bool(), -m, m)
    return m


# ---------------------------------------------------------------------------------------------- helpers
def to_uint8(x: Tensor) -> Tensor:
    """MEM's ``ToUnit8`` (``mem/transforms.py:341-348``): ``(255 * x).to(uint8)``, truncating."""
    return (255 * x).to(torch.uint8)


def to_float(x: Tensor) -> Tensor:
    """MEM's ``ToFloat32`` (``mem/transforms.py:332-339``): ``x / 255`` in float32."""
    return x.to(torch.float32) / 255


def _ratio(r: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(ratio, 1 - ratio) per sample as float32 (B, 1, 1, 1), ``1 - ratio`` taken in float64 first, as a
    Python float would be."""
    r64 = r.to(torch.float64)
    shape = (-1,) + (1,) * (like.dim() - 1)
    return r64.float().view(shape).to(like.device), (1.0 - r64).float().view(shape).to(like.device)


def _blend(img1: Tensor, img2: Tensor, ratio: Tensor) -> Tensor:
    """torchvision ``_blend`` with a ratio per sample: ``(r * img1 + (1 - r) * img2).clamp(0, bound)`` cast
    back to ``img1``'s dtype (a truncation for ``uint8``)."""
    r, one_minus = _ratio(ratio, img1)
    bound = 255 if img1.dtype == torch.uint8 else 1.0
    return (r * img1.float() + one_minus * img2.float()).clamp(0, bound).to(img1.dtype)


def _grayscale(img: Tensor) -> Tensor:
    """torchvision ``rgb_to_grayscale`` (one channel, img's dtype: truncated for uint8)."""
    r, g, b = img.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).to(img.dtype).unsqueeze(-3)


def _inverse_affine(angle: float, translate: tuple[float, float], shear: tuple[float, float]) -> list[float]:
    """torchvision ``_get_inverse_affine_matrix`` with centre (0, 0) (the image centre) and scale 1."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    tx, ty = translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [d, -b, 0.0, -c, a, 0.0]
    m[2] += m[0] * (-tx) + m[1] * (-ty)
    m[5] += m[3] * (-tx) + m[4] * (-ty)
    return m


def _affine_matrix(name: str, magnitude: float) -> list[float]:
    """The inverse matrix torchvision's ``F.affine`` / ``F.rotate`` uses for op ``name`` (``_apply_op``,
    ``mem/transforms.py:294-307``)."""
    if name == "ShearX":
        return _inverse_affine(0.0, (0.0, 0.0), (math.degrees(magnitude), 0.0))
    if name == "ShearY":
        return _inverse_affine(0.0, (0.0, 0.0), (0.0, math.degrees(magnitude)))
    if name == "TranslateX":
        return _inverse_affine(0.0, (float(int(magnitude)), 0.0), (0.0, 0.0))
    if name == "TranslateY":
        return _inverse_affine(0.0, (0.0, float(int(magnitude))), (0.0, 0.0))
    if name == "Rotate":  # F.rotate passes -angle (its rotation sense differs from affine's)
        return _inverse_affine(-magnitude, (0.0, 0.0), (0.0, 0.0))
    raise ValueError(name)


def _affine(img: Tensor, name: str, magnitudes: Tensor) -> Tensor:
    """The geometric ops, per sample: torchvision's ``_gen_affine_grid`` then bilinear ``grid_sample`` with zero
    padding, rounded back to uint8. Grids are built one sample at a time with torchvision's exact float32 ops
    (a bmm of a (1, H*W, 3) base grid), so the result is bit-identical."""
    N, _, H, W = img.shape
    dev = img.device
    base = torch.empty(1, H, W, 3, dtype=torch.float32, device=dev)
    base[..., 0].copy_(torch.linspace(-W * 0.5 + 0.5, W * 0.5 + 0.5 - 1, steps=W, device=dev))
    base[..., 1].copy_(torch.linspace(-H * 0.5 + 0.5, H * 0.5 + 0.5 - 1, steps=H, device=dev).unsqueeze_(-1))
    base[..., 2].fill_(1)
    base = base.view(1, H * W, 3)
    norm = torch.tensor([0.5 * W, 0.5 * H], dtype=torch.float32, device=dev)
    grids = []
    for m in magnitudes.tolist():
        theta = torch.tensor(_affine_matrix(name, m), dtype=torch.float32, device=dev).reshape(1, 2, 3)
        grids.append(base.bmm(theta.transpose(1, 2) / norm).view(1, H, W, 2))
    out = F.grid_sample(img.float(), torch.cat(grids), mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.round().to(torch.uint8)


def _sharpness(img: Tensor, factor: Tensor) -> Tensor:
    """torchvision ``adjust_sharpness``: blend with the 3x3 (1, 5 in the centre) blur of the interior."""
    kernel = torch.ones((3, 3), dtype=torch.float32, device=img.device)
    kernel[1, 1] = 5.0
    kernel /= kernel.sum()
    kernel = kernel.expand(img.shape[-3], 1, 3, 3)
    blurred = F.conv2d(img.float(), kernel, groups=img.shape[-3]).round().to(img.dtype)
    degenerate = img.clone()
    degenerate[..., 1:-1, 1:-1] = blurred
    return _blend(img, degenerate, factor)


def _autocontrast(img: Tensor) -> Tensor:
    """torchvision ``autocontrast``: each channel stretched to [0, 255] (constant channels unchanged)."""
    lo = img.amin(dim=(-2, -1), keepdim=True).float()
    hi = img.amax(dim=(-2, -1), keepdim=True).float()
    scale = 255 / (hi - lo)
    flat = ~torch.isfinite(scale)
    lo = lo.masked_fill(flat, 0)
    scale = scale.masked_fill(flat, 1)
    return ((img - lo) * scale).clamp(0, 255).to(img.dtype)


def _equalize(img: Tensor) -> Tensor:
    """torchvision ``equalize`` (its CPU ``bincount`` path), every channel of every sample at once."""
    N, C, H, W = img.shape
    flat = img.reshape(N * C, H * W).long()
    rows = torch.arange(N * C, device=img.device).unsqueeze(1)
    hist = torch.zeros(N * C, 256, dtype=torch.int64, device=img.device)
    hist.view(-1).index_add_(0, (rows * 256 + flat).view(-1), torch.ones_like(flat).view(-1))
    # step = sum of the non-zero bins but the last non-zero one, // 255
    last = 255 - (hist > 0).flip(1).long().argmax(1)
    step = torch.div(hist.sum(1) - hist.gather(1, last[:, None])[:, 0], 255, rounding_mode="floor")
    safe = step.clamp(min=1)[:, None]
    lut = torch.div(torch.cumsum(hist, 1) + torch.div(safe, 2, rounding_mode="floor"), safe, rounding_mode="floor")
    lut = F.pad(lut, [1, 0])[:, :-1].clamp(0, 255)
    out = lut.gather(1, flat).to(torch.uint8)
    return torch.where((step == 0)[:, None], img.reshape(N * C, H * W), out).view(N, C, H, W)


def apply_op(img: Tensor, name: str, magnitudes: Tensor) -> Tensor:
    """Op ``name`` on uint8 images (N, 3, H, W) with a magnitude per sample (N,), as ``_apply_op`` in
    ``mem/transforms.py:292-330`` (interpolation bilinear, fill None)."""
    if img.dtype != torch.uint8:
        raise TypeError(f"EventRandAugment works on uint8 images, got {img.dtype}")
    if name == "Identity" or img.shape[0] == 0:
        return img
    if name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
        return _affine(img, name, magnitudes)
    factor = 1.0 + magnitudes
    if name == "Brightness":
        return _blend(img, torch.zeros_like(img), factor)
    if name == "Color":
        return _blend(img, _grayscale(img), factor)
    if name == "Contrast":
        mean = _grayscale(img).float().mean(dim=(-3, -2, -1), keepdim=True)
        return _blend(img, mean, factor)
    if name == "Sharpness":
        return img if min(img.shape[-2:]) <= 2 else _sharpness(img, factor)
    if name == "Posterize":
        bits = magnitudes.long().to(img.device)
        mask = (256 - 2 ** (8 - bits)).to(torch.uint8).view(-1, 1, 1, 1)  # -2**(8 - bits) as uint8
        return img & mask
    if name == "Solarize":
        thr = magnitudes.float().to(img.device).view(-1, 1, 1, 1)
        return torch.where(img >= thr, 255 - img, img)
    if name == "AutoContrast":
        return _autocontrast(img)
    if name == "Equalize":
        return _equalize(img)
    raise ValueError(f"unknown EventRandAugment op {name!r}")


def rand_augment(img: Tensor, ops: Tensor, cfg: RandAugmentConfig) -> Tensor:
    """``EventRandAugment`` on uint8 images (B, 3, H, W) with the draws ``ops`` of :func:`draw_ops`: op ``k``
    of every sample is applied before op ``k + 1``; samples drawing the same op are processed together."""
    H, W = img.shape[-2:]
    names = cfg.names
    for k in range(ops.shape[1]):
        out = img.clone()
        for j, name in enumerate(names):
            sel = (ops[:, k, 0] == j).nonzero()[:, 0]
            if not len(sel) or name == "Identity":
                continue
            mags = signed_magnitudes(name, ops[sel, k, 1], ops[sel, k, 2], cfg.num_bins, H, W)
            idx = sel.to(img.device)
            out[idx] = apply_op(img[idx], name, mags)
        img = out
    return img


# ------------------------------------------------------------------------------------------ colour jitter
def draw_jitter(batch_size: int, cfg: ColorJitterConfig, generator: torch.Generator | None = None) -> Tensor:
    """``(B, 3)`` float64: brightness factor, saturation factor (1 when off), and 1.0 where brightness comes
    first (torchvision draws a random order of its four adjustments; only the order of these two matters)."""
    u = torch.rand(batch_size, 3, generator=generator, dtype=torch.float64)
    b = 1 - cfg.brightness + 2 * cfg.brightness * u[:, 0]
    s = 1 - cfg.saturation + 2 * cfg.saturation * u[:, 1]
    return torch.stack([b, s, (u[:, 2] < 0.5).double()], 1)


def color_jitter(img: Tensor, params: Tensor) -> Tensor:
    """``ColorJitter(brightness, 0, saturation)`` on float images in [0, 1] with per-sample ``params`` of
    :func:`draw_jitter`: ``adjust_brightness`` and ``adjust_saturation`` in the drawn order."""
    def bright(x):
        return _blend(x, torch.zeros_like(x), params[:, 0])

    def sat(x):
        return _blend(x, _grayscale(x), params[:, 1])

    first = params[:, 2].bool().to(img.device).view(-1, 1, 1, 1)
    return torch.where(first, sat(bright(img)), bright(sat(img)))
