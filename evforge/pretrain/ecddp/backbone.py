"""ECDDP backbone: a timm Swin whose 4 stages are fused into one stride-16 token map.

Public code (model/network/swin_pretrain.py, ``SWIN``): Swin-T/7 (patch 4, embed 96, depths 2-2-6-2, heads
3-6-12-24, in_chans 6 = voxel bins), a LayerNorm (eps 1e-6) on each stage output, then per stage
avg-pool 4 + 1x1 conv (stride 4), avg-pool 2 + 1x1 conv (stride 8), 1x1 conv (stride 16) and a 2x2 stride-2
transposed conv (stride 32), all bias-free to 768 = 8 * embed channels, summed and divided by 4. iBOT masking
replaces the (normed) patch embeddings of masked patches by a learned ``mask_token`` (zeros init there;
trunc-normal 0.02 here, see ``__init__``), the
stride-16 mask being repeated 4x4 onto the stride-4 patch grid.

Here the Swin comes from timm (``pretrained=False``); timm's ``features_only`` wrapper cannot take the mask
token between the patch embedding and the first stage, so the same modules (``patch_embed``, ``layers``)
are run directly. timm 1.0.31 accepts any input size with ``strict_img_size=False`` (attention masks built
per call); crop sizes that are not multiples of the window (192 and 96 with window 7) need padding, and
timm's shifted windows roll *before* padding while building the region mask on the padded grid, which lets a
few tokens across the cyclic wrap attend to each other. The blocks here pad first, then roll (as the
original Swin and the public code do) and also mask the padded keys, so a token's features do not depend on
how much padding its crop size needs. Window sizes / shifts per stage are timm's, fixed at ``img_size``.
"""

from __future__ import annotations

from functools import lru_cache, partial

import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse
from torch import nn

# A small Swin for CPU tests: 4 stages like Swin-T, so the fusion is exercised, at about 1/500 of the cost.
TINY_SWIN_KWARGS = dict(embed_dim=24, depths=(2, 2, 1, 1), num_heads=(1, 2, 2, 4), window_size=4)


@lru_cache(maxsize=128)
def _window_mask(h, w, hp, wp, ws, ss, device, dtype) -> torch.Tensor | None:
    """(nW, A, A) additive mask for windows of the padded (hp, wp) grid after a roll by -ss: -100 between
    tokens of different shift regions (standard Swin) and on keys that are padding."""
    if not any(ss) and (hp, wp) == (h, w):
        return None
    label = torch.zeros(1, hp, wp, 1)
    if any(ss):
        def bands(size, win, shift):  # region bands of one axis in rolled coordinates
            if shift == 0:
                return [slice(0, size)]
            return [slice(0, size - win), slice(size - win, size - shift), slice(size - shift, size)]

        cnt = 0
        for hs in bands(hp, ws[0], ss[0]):
            for wsl in bands(wp, ws[1], ss[1]):
                label[:, hs, wsl, :] = cnt
                cnt += 1
    pad = torch.zeros(1, hp, wp, 1)
    pad[:, h:, :, :] = 1.0
    pad[:, :, w:, :] = 1.0
    pad = torch.roll(pad, shifts=(-ss[0], -ss[1]), dims=(1, 2))
    area = ws[0] * ws[1]
    lw = window_partition(label, ws).reshape(-1, area)
    pw = window_partition(pad, ws).reshape(-1, area)
    mask = (lw.unsqueeze(1) != lw.unsqueeze(2)).float() * -100.0  # [window, query, key]
    mask = mask + pw.unsqueeze(1) * -100.0  # padded keys
    return mask.to(device=device, dtype=dtype)


class _PadFirstSwinBlock(SwinTransformerBlock):
    """timm Swin block whose window attention pads to the window multiple before the cyclic shift."""

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
        mask = _window_mask(h, w, hp, wp, ws, ss, x.device, x.dtype)
        out = self.attn(windows, mask=mask)
        out = window_reverse(out.view(-1, ws[0], ws[1], c), ws, hp, wp)
        if shifted:
            out = torch.roll(out, shifts=ss, dims=(1, 2))
        return out[:, :h, :w, :].contiguous()


class FusedSwin(nn.Module):
    """Swin with ECDDP's 4-stage fusion: (B, in_chans, H, W) -> tokens (B, H/16 * W/16, fused_dim), (H/16, W/16).

    H and W must be multiples of 16 (224, 192, 96; 64, 48, 32 for ``tiny``). ``tiny=True`` uses
    :data:`TINY_SWIN_KWARGS` (window 4) for CPU tests; ``timm_kwargs`` override anything passed to timm.
    """

    def __init__(
        self,
        in_chans: int = 6,
        variant: str = "swin_tiny_patch4_window7_224",
        img_size: int = 224,
        fused_dim: int = 768,
        drop_path_rate: float = 0.0,
        tiny: bool = False,
        **timm_kwargs,
    ):
        super().__init__()
        kwargs = dict(TINY_SWIN_KWARGS) if tiny else {}
        kwargs.update(timm_kwargs)
        self.swin = timm.create_model(
            variant,
            pretrained=False,
            in_chans=in_chans,
            img_size=img_size,
            num_classes=0,
            global_pool="",
            strict_img_size=False,
            drop_path_rate=drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            **kwargs,
        )
        self.swin.norm = nn.Identity()  # timm's final norm is replaced by the per-stage norms below
        for stage in self.swin.layers:
            for blk in stage.blocks:
                blk.__class__ = _PadFirstSwinBlock
        dims = [info["num_chs"] for info in self.swin.feature_info]
        if len(dims) != 4:
            raise ValueError(f"the fusion expects a 4-stage Swin, {variant} has {len(dims)}")
        self.patch_size = self.swin.patch_embed.patch_size[0]
        if 16 % self.patch_size:
            raise ValueError(f"patch size {self.patch_size} does not divide the stride 16")
        self.embed_dim, self.fused_dim, self.in_chans = dims[0], fused_dim, in_chans
        # Public: zeros. With timm's zero-initialised biases an all-zero token stays exactly zero through the
        # blocks, so every LayerNorm sees zero variance and scales its gradient by 1/sqrt(eps) = 1000; a small
        # random token (like the other embeddings) avoids that degenerate point.
        self.mask_token = nn.Parameter(torch.zeros(1, dims[0]))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.stage_norms = nn.ModuleList([nn.LayerNorm(d, eps=1e-6) for d in dims])
        self.fuse = nn.ModuleList([
            nn.Sequential(nn.AvgPool2d(4), nn.Conv2d(dims[0], fused_dim, 1, bias=False)),  # stride 4 -> 16
            nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(dims[1], fused_dim, 1, bias=False)),  # stride 8 -> 16
            nn.Conv2d(dims[2], fused_dim, 1, bias=False),  # stride 16
            nn.ConvTranspose2d(dims[3], fused_dim, kernel_size=2, stride=2, bias=False),  # stride 32 -> 16
        ])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """x (B, C, H, W); mask (B, H/16 * W/16) bool (True = masked patch, iBOT) or None.
        Returns tokens (B, N16, fused_dim) in row-major order of the (H/16, W/16) grid, and that grid."""
        b, _, hh, ww = x.shape
        if hh % 16 or ww % 16:
            raise ValueError(f"input {hh}x{ww} is not a multiple of 16")
        h16, w16 = hh // 16, ww // 16
        f = self.swin.patch_embed(x)  # (B, H/4, W/4, C0), normed
        if mask is not None:
            r = 16 // self.patch_size  # nearest upsampling of the stride-16 mask to the patch grid
            m = mask.view(b, h16, w16).repeat_interleave(r, 1).repeat_interleave(r, 2)
            f = torch.where(m.unsqueeze(-1), self.mask_token.to(f.dtype), f)
        fused = 0
        for stage, norm, proj in zip(self.swin.layers, self.stage_norms, self.fuse):
            f = stage(f)  # NHWC
            z = proj(norm(f).permute(0, 3, 1, 2))
            fused = fused + z[:, :, :h16, :w16]  # the stride-32 map was padded up when h16 is odd
        fused = fused / len(self.fuse)
        return fused.flatten(2).transpose(1, 2), (h16, w16)
