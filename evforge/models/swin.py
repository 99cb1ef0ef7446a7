"""timm Swin Transformers with the window semantics of the original Swin code (and ECDDP's public code).

ECDDP's public backbone (model/network/swin_pretrain.py and model/swin_model.py of
Yan98/Event-Camera-Data-Dense-Pre-training, copied from the original Swin segmentation code) and timm 1.0 differ
in three ways that change the outputs by up to 0.3 on the same weights; each is a named option here:

``always_partition`` (timm's own keyword, fixed when the model is built)
    The public code keeps the 7x7 window and shifts every odd block at every stage. timm (default False) shrinks
    the window to a feature map that is no larger than it and then drops the shift: at 224 px the 7x7 stage-4
    map is never shifted, at 192 px the 6x6 one neither. ``True`` reproduces the public code.
pad first, then roll (always here)
    For maps that are not a multiple of the window (192 and 96 px crops), timm rolls *before* padding while
    building the region mask on the padded grid, so a few tokens across the cyclic wrap attend to each other.
    The original Swin code pads first, then rolls; :class:`PadFirstSwinBlock` does the same.
``mask_padded_keys``
    The public code lets every token attend to the zero padding (its shift mask only separates shift
    regions, and unshifted windows get no mask at all), so a token's features depend on how much padding its
    crop size needs. ``True`` (evforge's default) gives padded keys -100 like any other masked key; ``False``
    reproduces the public code.

:func:`create_swin` builds a timm Swin with these options and an ``init`` choice: timm's (trunc-normal 0.02
linear weights, zero biases) or ``"torch"``, PyTorch's default layer initialisation, which is what the public
code ends up with (its ``init_weights`` is never applied; the relative-position tables are trunc-normal 0.02 in
both).
"""

from __future__ import annotations

from functools import lru_cache, partial

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse
from torch import nn

__all__ = ["TINY_SWIN_KWARGS", "SWIN_INITS", "PadFirstSwinBlock", "window_mask", "use_pad_first_blocks",
           "reset_to_torch_init", "create_swin", "swin_block_options"]

# A small Swin for CPU tests: 4 stages like Swin-T, at about 1/500 of the cost.
TINY_SWIN_KWARGS = dict(embed_dim=24, depths=(2, 2, 1, 1), num_heads=(1, 2, 2, 4), window_size=4)
SWIN_INITS = ("timm", "torch")


@lru_cache(maxsize=256)
def window_mask(h: int, w: int, hp: int, wp: int, ws: tuple, ss: tuple, mask_padded_keys: bool,
                device, dtype) -> torch.Tensor | None:
    """(nW, A, A) additive mask for the windows of the padded (hp, wp) grid after a roll by -ss: -100 between
    tokens of different shift regions (standard Swin) and, with ``mask_padded_keys``, on keys that are padding.
    None where nothing is masked (no shift, and no masked padding)."""
    padded = (hp, wp) != (h, w)
    if not any(ss) and not (mask_padded_keys and padded):
        return None
    label = torch.zeros(1, hp, wp, 1)
    if any(ss):
        def bands(size, win, shift):  # region bands of one axis in rolled coordinates (the public slices)
            if shift == 0:
                return [slice(0, size)]
            return [slice(0, size - win), slice(size - win, size - shift), slice(size - shift, size)]

        cnt = 0
        for hs in bands(hp, ws[0], ss[0]):
            for wsl in bands(wp, ws[1], ss[1]):
                label[:, hs, wsl, :] = cnt
                cnt += 1
    area = ws[0] * ws[1]
    lw = window_partition(label, ws).reshape(-1, area)
    mask = (lw.unsqueeze(1) != lw.unsqueeze(2)).float() * -100.0  # [window, query, key]
    if mask_padded_keys and padded:
        pad = torch.zeros(1, hp, wp, 1)
        pad[:, h:, :, :] = 1.0
        pad[:, :, w:, :] = 1.0
        pad = torch.roll(pad, shifts=(-ss[0], -ss[1]), dims=(1, 2))
        mask = mask + window_partition(pad, ws).reshape(-1, area).unsqueeze(1) * -100.0
    return mask.to(device=device, dtype=dtype)


class PadFirstSwinBlock(SwinTransformerBlock):
    """timm Swin block whose window attention pads to the window multiple before the cyclic shift (original
    Swin order); ``mask_padded_keys`` (instance attribute, default True) masks the padding as keys."""

    mask_padded_keys: bool = True

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws, ss = tuple(self.window_size), tuple(self.shift_size)
        ph, pw = (-h) % ws[0], (-w) % ws[1]
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
        hp, wp = h + ph, w + pw
        shifted = any(ss)
        if shifted:
            x = torch.roll(x, shifts=(-ss[0], -ss[1]), dims=(1, 2))
        windows = window_partition(x, ws).view(-1, ws[0] * ws[1], c)
        mask = window_mask(h, w, hp, wp, ws, ss, bool(self.mask_padded_keys), x.device, x.dtype)
        out = self.attn(windows, mask=mask)
        out = window_reverse(out.view(-1, ws[0], ws[1], c), ws, hp, wp)
        if shifted:
            out = torch.roll(out, shifts=ss, dims=(1, 2))
        return out[:, :h, :w, :].contiguous()


def use_pad_first_blocks(net: nn.Module, *, mask_padded_keys: bool = True) -> nn.Module:
    """Turn every block of a timm Swin ``net`` into a :class:`PadFirstSwinBlock` (same parameters), in place."""
    for stage in net.layers:
        for blk in stage.blocks:
            blk.__class__ = PadFirstSwinBlock
            blk.mask_padded_keys = bool(mask_padded_keys)
    return net


def reset_to_torch_init(net: nn.Module) -> nn.Module:
    """PyTorch's default initialisation for every Linear, Conv and LayerNorm of ``net`` (what the public ECDDP
    Swin gets: its ``init_weights`` is defined but never applied); other parameters (relative-position tables,
    trunc-normal 0.02 in timm and in the public code) are left as they are."""
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.LayerNorm)):
            m.reset_parameters()
    return net


def swin_block_options(net: nn.Module) -> dict:
    """The block options of a Swin built by :func:`create_swin` (for export metadata)."""
    blocks = [blk for stage in net.layers for blk in stage.blocks]
    return {"pad_first": all(isinstance(b, PadFirstSwinBlock) for b in blocks),
            "mask_padded_keys": all(getattr(b, "mask_padded_keys", False) for b in blocks)}


def create_swin(
    variant: str = "swin_tiny_patch4_window7_224",
    *,
    in_chans: int = 6,
    img_size: int = 224,
    drop_path_rate: float = 0.0,
    tiny: bool = False,
    always_partition: bool = False,
    mask_padded_keys: bool = True,
    init: str = "timm",
    norm_eps: float = 1e-6,
    **timm_kwargs,
) -> nn.Module:
    """A timm Swin (``pretrained=False``: nothing is downloaded) with pad-first blocks, headless, any input size.

    ``tiny`` starts from :data:`TINY_SWIN_KWARGS`; ``timm_kwargs`` override anything passed to timm (e.g.
    ``num_classes`` for a classifier; default 0 with no pooling, as a feature extractor)."""
    import timm

    if init not in SWIN_INITS:
        raise ValueError(f"init must be one of {SWIN_INITS}, not {init!r}")
    kwargs = dict(TINY_SWIN_KWARGS) if tiny else {}
    kwargs.update(num_classes=0, global_pool="")
    kwargs.update(timm_kwargs)
    net = timm.create_model(
        variant, pretrained=False, in_chans=in_chans, img_size=img_size, strict_img_size=False,
        drop_path_rate=drop_path_rate, always_partition=always_partition,
        norm_layer=partial(nn.LayerNorm, eps=norm_eps), **kwargs,
    )
    if init == "torch":
        reset_to_torch_init(net)
    return use_pad_first_blocks(net, mask_padded_keys=mask_padded_keys)
