"""ECDDP backbone: a timm Swin whose 4 stages are fused into one stride-16 token map.

Public code (model/network/swin_pretrain.py, ``SWIN``): Swin-T/7 (patch 4, embed 96, depths 2-2-6-2, heads
3-6-12-24, in_chans 6 = voxel bins), a LayerNorm (eps 1e-6) on each stage output, then per stage
avg-pool 4 + 1x1 conv (stride 4), avg-pool 2 + 1x1 conv (stride 8), 1x1 conv (stride 16) and a 2x2 stride-2
transposed conv (stride 32), all bias-free to 768 = 8 * embed channels, summed and divided by 4. iBOT masking
replaces the (normed) patch embeddings of masked patches by a learned ``mask_token``, the stride-16 mask being
repeated 4x4 onto the stride-4 patch grid.

The Swin comes from :func:`evforge.models.swin.create_swin` (timm modules, pad-first blocks); its window
options (``always_partition``, ``mask_padded_keys``) and its ``init`` are named there. timm's
``features_only`` wrapper cannot take the mask token between the patch embedding and the first stage, so the
modules (``patch_embed``, ``layers``) are run directly.
"""

from __future__ import annotations

import torch
from torch import nn

from ...models.swin import TINY_SWIN_KWARGS, create_swin

__all__ = ["FusedSwin", "TINY_SWIN_KWARGS", "MASK_TOKEN_INITS"]

MASK_TOKEN_INITS = ("trunc_normal", "zeros")


class FusedSwin(nn.Module):
    """Swin with ECDDP's 4-stage fusion: (B, in_chans, H, W) -> tokens (B, H/16 * W/16, fused_dim), (H/16, W/16).

    H and W must be multiples of 16 (224, 192, 96; 64, 48, 32 for ``tiny``). ``tiny=True`` uses
    :data:`TINY_SWIN_KWARGS` (window 4) for CPU tests; ``timm_kwargs`` override anything passed to timm.
    ``always_partition``, ``mask_padded_keys``, ``init``: see :mod:`evforge.models.swin`.
    ``mask_token_init``: ``"trunc_normal"`` (std 0.02, evforge) or ``"zeros"`` (the public code; with timm's
    zero biases an all-zero token stays exactly zero through the blocks, so every LayerNorm sees zero variance
    and scales its gradient by 1/sqrt(eps) = 1000; a small random token, like the other embeddings, avoids
    that degenerate point).
    """

    def __init__(
        self,
        in_chans: int = 6,
        variant: str = "swin_tiny_patch4_window7_224",
        img_size: int = 224,
        fused_dim: int = 768,
        drop_path_rate: float = 0.0,
        tiny: bool = False,
        always_partition: bool = False,
        mask_padded_keys: bool = True,
        init: str = "timm",
        mask_token_init: str = "trunc_normal",
        **timm_kwargs,
    ):
        super().__init__()
        if mask_token_init not in MASK_TOKEN_INITS:
            raise ValueError(f"mask_token_init must be one of {MASK_TOKEN_INITS}, not {mask_token_init!r}")
        self.swin = create_swin(variant, in_chans=in_chans, img_size=img_size, drop_path_rate=drop_path_rate,
                                tiny=tiny, always_partition=always_partition, mask_padded_keys=mask_padded_keys,
                                init=init, **timm_kwargs)
        self.swin.norm = nn.Identity()  # timm's final norm is replaced by the per-stage norms below
        dims = [info["num_chs"] for info in self.swin.feature_info]
        if len(dims) != 4:
            raise ValueError(f"the fusion expects a 4-stage Swin, {variant} has {len(dims)}")
        self.patch_size = self.swin.patch_embed.patch_size[0]
        if 16 % self.patch_size:
            raise ValueError(f"patch size {self.patch_size} does not divide the stride 16")
        self.embed_dim, self.fused_dim, self.in_chans = dims[0], fused_dim, in_chans
        self.mask_token = nn.Parameter(torch.zeros(1, dims[0]))
        if mask_token_init == "trunc_normal":
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
