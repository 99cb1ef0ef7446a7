"""UPerNet decode head and FCN auxiliary head in plain PyTorch (mmseg's ``UPerHead`` / ``FCNHead``, no mmcv).

:class:`UPerHead` (Xiao et al., ECCV 2018, as in mmseg): a pyramid pooling module (PPM) on the last backbone stage,
1x1 lateral convs on the other stages, a top-down pathway (each level adds the bilinearly upsampled coarser
level), 3x3 FPN convs, then all levels upsampled to the finest, concatenated and fused by a 3x3 conv, dropout
and a 1x1 classifier. :class:`FCNHead` is the auxiliary head ECDDP puts on stage 3 (index 2). Both return logits
at the resolution of their (finest) input; the segmentation model upsamples them to the image.

Conv blocks are Conv (no bias) - BatchNorm - ReLU, initialised as mmcv's ``ConvModule`` (Kaiming normal, fan_out;
BN weight 1, bias 0); classifiers are normal(0, 0.01) with zero bias, as mmseg's ``conv_seg``. Under DDP, convert
the BatchNorms with ``nn.SyncBatchNorm.convert_sync_batchnorm`` (ECDDP trains with SyncBN).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvBNReLU", "PPM", "UPerHead", "FCNHead"]


class ConvBNReLU(nn.Sequential):
    """Conv2d (bias-free) -> BatchNorm2d -> ReLU: mmcv's ConvModule with ``norm_cfg=BN``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
        nn.init.kaiming_normal_(self[0].weight, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self[1].weight)
        nn.init.zeros_(self[1].bias)


def _classifier(channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    conv = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv.weight, 0.0, 0.01)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(), conv)


def _resize(x: torch.Tensor, size, align_corners: bool = False) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


class PPM(nn.ModuleList):
    """Pyramid pooling: per scale ``s``, adaptive average pooling to ``s x s`` -> 1x1 ConvBNReLU -> bilinear
    upsampling back to the input size. Returns the list of pooled maps (PSPNet / mmseg's ``PPM``)."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int, align_corners: bool = False):
        super().__init__([nn.Sequential(nn.AdaptiveAvgPool2d(int(s)), ConvBNReLU(in_channels, channels, 1))
                          for s in pool_scales])
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [_resize(stage(x), x.shape[-2:], self.align_corners) for stage in self]


class UPerHead(nn.Module):
    """UPerNet head over multi-scale features ``[(B, in_channels[i], H_i, W_i)]`` (finest first) -> logits
    ``(B, num_classes, H_0, W_0)``.

    ``channels`` is the width of every internal map (ECDDP / mmseg: 512), ``pool_scales`` the PPM bins on the
    last (coarsest) stage, ``dropout`` the rate before the classifier (mmseg: 0.1).
    """

    def __init__(self, in_channels: Sequence[int], channels: int = 512, pool_scales: Sequence[int] = (1, 2, 3, 6),
                 num_classes: int = 11, dropout: float = 0.1, align_corners: bool = False):
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if len(in_channels) < 2:
            raise ValueError(f"UPerHead needs at least 2 feature levels, got {len(in_channels)}")
        self.in_channels, self.channels, self.num_classes = in_channels, int(channels), int(num_classes)
        self.align_corners = align_corners
        self.psp_modules = PPM(pool_scales, in_channels[-1], channels, align_corners)
        self.bottleneck = ConvBNReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList([ConvBNReLU(c, channels, 1) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1]])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.cls_seg = _classifier(channels, num_classes, dropout)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage with its pyramid-pooled maps, fused to ``channels``."""
        return self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))

    def features(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The fused ``(B, channels, H_0, W_0)`` map before the classifier."""
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"UPerHead expects {len(self.in_channels)} feature maps, got {len(inputs)}")
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(inputs[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse to fine
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:], self.align_corners)
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)]
        outs.append(laterals[-1])
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [_resize(o, size, self.align_corners) for o in outs[1:]]
        return self.fpn_bottleneck(torch.cat(outs, dim=1))

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.cls_seg(self.features(inputs))


class FCNHead(nn.Module):
    """FCN head on one feature map: ``num_convs`` 3x3 ConvBNReLU of ``channels`` -> dropout -> 1x1 classifier
    (mmseg's ``FCNHead`` with ``concat_input=False``); ECDDP's auxiliary head (stage 3, 256 channels, 1 conv)."""

    def __init__(self, in_channels: int, channels: int = 256, num_convs: int = 1, num_classes: int = 11,
                 dropout: float = 0.1):
        super().__init__()
        if num_convs < 0:
            raise ValueError(f"num_convs must be >= 0, got {num_convs}")
        self.in_channels, self.channels, self.num_classes = int(in_channels), int(channels), int(num_classes)
        convs = [ConvBNReLU(in_channels if i == 0 else channels, channels, 3) for i in range(num_convs)]
        self.convs = nn.Sequential(*convs)
        self.cls_seg = _classifier(channels if num_convs else in_channels, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls_seg(self.convs(x))
