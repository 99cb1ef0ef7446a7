"""The segmentation network: a timm Swin or ViT as 4 feature maps (strides 4-32) -> UPerNet (+ FCN auxiliary head)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.backbone_file import read_backbone
from ..models.swin import TINY_SWIN_KWARGS, PadFirstSwinBlock, use_pad_first_blocks
from .backbones import ModelSpec, create_model, family, load_init, resolve_spec
from .uper import FCNHead, UPerHead

__all__ = ["SwinFeatures", "ViTFeatures", "build_backbone", "SegmentationModel", "TINY_VIT_KWARGS", "resize_logits"]

TINY_VIT_KWARGS = dict(embed_dim=48, depth=4, num_heads=2)


class SwinFeatures(nn.Module):
    """timm Swin -> 4 NCHW maps (strides 4, 8, 16, 32), each through its own LayerNorm (mmseg's ``norm{i}``).

    The blocks are as the spec built them (:func:`~evforge.finetune.backbones.create_model`: the backbone file's
    window semantics); a Swin built without block options gets evforge's pad-first blocks with padded-key
    masking. The stage norms start from the backbone file's ``stage_norms.{i}`` (older files:
    ``ecddp_neck.stage_norms.{i}``) as the public code loads its ``norm0..norm3`` (model/swin_model.py), the
    last one else from timm's ``norm``.
    """

    def __init__(self, net: nn.Module, tensors: dict | None = None):
        super().__init__()
        if not all(isinstance(b, PadFirstSwinBlock) for stage in net.layers for b in stage.blocks):
            use_pad_first_blocks(net)
        dims = [int(info["num_chs"]) for info in net.feature_info]
        eps = float(getattr(net.norm, "eps", 1e-5))
        self.patch_embed, self.layers = net.patch_embed, net.layers
        self.stage_norms = nn.ModuleList([nn.LayerNorm(d, eps=eps) for d in dims])
        tensors = tensors or {}
        for i, norm in enumerate(self.stage_norms):
            w, b = (next((tensors[k] for k in (f"stage_norms.{i}.{n}", f"ecddp_neck.stage_norms.{i}.{n}")
                          if k in tensors), None) for n in ("weight", "bias"))
            if w is not None and b is not None:
                norm.load_state_dict({"weight": w, "bias": b})
            elif i == len(dims) - 1 and tensors and isinstance(net.norm, nn.LayerNorm):
                norm.load_state_dict(net.norm.state_dict())
        self.out_channels = dims
        self.pad_multiple = int(self.patch_embed.patch_size[0]) * 2 ** (len(dims) - 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.patch_embed(x)  # NHWC
        outs = []
        for stage, norm in zip(self.layers, self.stage_norms):
            f = stage(f)
            outs.append(norm(f).permute(0, 3, 1, 2).contiguous())
        return outs


class ViTFeatures(nn.Module):
    """timm ViT -> 4 NCHW maps at strides 4, 8, 16, 32 from 4 blocks (default: evenly spaced, the last
    included), rescaled by 2 stacked / 1 transposed conv, identity, max-pool (the BEiT / MAE UPerNet neck)."""

    def __init__(self, net: nn.Module, out_indices: Sequence[int] | None = None):
        super().__init__()
        depth = len(net.blocks)
        idx = list(out_indices) if out_indices else sorted({max(0, depth * k // 4 - 1) for k in (1, 2, 3, 4)})
        if len(idx) != 4:
            raise ValueError(f"ViT segmentation needs 4 distinct block indices, got {idx} (depth {depth})")
        self.indices = idx
        net.prune_intermediate_layers(idx, prune_norm=True, prune_head=True)  # no unused parameters (DDP)
        self.net = net
        d = int(net.embed_dim)
        self.fpn = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(d, d, 2, 2), nn.BatchNorm2d(d), nn.GELU(), nn.ConvTranspose2d(d, d, 2, 2)),
            nn.ConvTranspose2d(d, d, 2, 2), nn.Identity(), nn.MaxPool2d(2)])
        self.out_channels = [d] * 4
        self.pad_multiple = int(net.patch_embed.patch_size[0]) * 2

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.net.forward_intermediates(x, indices=self.indices, output_fmt="NCHW", intermediates_only=True)
        return [f(m) for f, m in zip(self.fpn, feats)]


def build_backbone(arch: str, in_chans: int, *, init=None, tiny: bool = False, kwargs: dict | None = None,
                   norm_eps: float | None = None, drop_path_rate: float | None = None, input_size=(448, 640),
                   out_indices=None, spec: ModelSpec | dict | None = None, init_patch_embed: str = "adapt",
                   always_partition: bool | None = None, mask_padded_keys: bool | None = None
                   ) -> tuple[nn.Module, ModelSpec]:
    """(feature extractor, its :class:`~evforge.finetune.backbones.ModelSpec`). With ``init`` (an exported
    backbone) the architecture comes from the file and its weights are loaded (patch embedding adapted to
    ``in_chans`` or fresh: ``init_patch_embed``, :func:`~evforge.finetune.backbones.load_init`); with ``spec``
    (from a checkpoint) nothing is read. ``always_partition`` / ``mask_padded_keys`` (Swin) override the
    file's window semantics when not None."""
    tensors = None
    if spec is None:
        meta = None
        if init:
            tensors, meta = read_backbone(init)
        fam = family(meta["arch"] if meta else arch)
        base = (dict(TINY_SWIN_KWARGS) if fam == "swin" else dict(TINY_VIT_KWARGS)) if tiny else {}
        model_cfg = {"arch": arch, "kwargs": {**base, **(kwargs or {})}, "norm_eps": norm_eps,
                     "drop_path_rate": drop_path_rate, "always_partition": always_partition,
                     "mask_padded_keys": mask_padded_keys}
        spec = resolve_spec(model_cfg, in_chans=in_chans, num_classes=0, input_size=list(input_size),
                            init_meta=meta, init=None if init is None else str(init))
        if fam == "vit":
            spec.timm_kwargs["dynamic_img_size"] = True  # any input size (position embeddings resampled)
    elif isinstance(spec, dict):
        spec = ModelSpec.from_dict(spec)
    net = create_model(spec)
    if tensors is not None:
        load_init(net, tensors, source=init, patch_embed=init_patch_embed)
    if family(spec.arch) == "swin":
        return SwinFeatures(net, tensors), spec
    return ViTFeatures(net, out_indices), spec


# ------------------------------------------------------------------------------------------------------ model
def resize_logits(x: torch.Tensor, size, align_corners: bool = False) -> torch.Tensor:
    """``x`` resized bilinearly to ``size`` (unchanged when it already has that size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


class SegmentationModel(nn.Module):
    """Backbone + UPerNet (+ FCN auxiliary head): ``(B, in_chans, H, W)`` -> logits ``(B, K, H, W)``, and
    ``(logits, aux_logits)`` in training mode. Any ``H, W``: zero-padded to the backbone's multiple (32) and the
    (bilinearly upsampled) logits cropped back. ``tiny`` builds a CPU-sized backbone (tests); ``aux_channels=0``
    drops the auxiliary head. The backbone's spec is ``self.spec`` (rebuild without the ``init`` file);
    ``init_patch_embed``, ``always_partition``, ``mask_padded_keys``: see :func:`build_backbone`."""

    def __init__(self, backbone: str = "swin_tiny_patch4_window7_224", in_chans: int = 20, num_classes: int = 11,
                 init=None, tiny: bool = False, *, channels: int = 512, pool_scales: Sequence[int] = (1, 2, 3, 6),
                 aux_channels: int = 256, aux_index: int = 2, aux_num_convs: int = 1, dropout: float = 0.1,
                 drop_path_rate: float | None = None, backbone_kwargs: dict | None = None,
                 norm_eps: float | None = None, input_size=(448, 640), out_indices=None,
                 spec: ModelSpec | dict | None = None, init_patch_embed: str = "adapt",
                 always_partition: bool | None = None, mask_padded_keys: bool | None = None):
        super().__init__()
        self.backbone, self.spec = build_backbone(backbone, in_chans, init=init, tiny=tiny, kwargs=backbone_kwargs,
                                                  norm_eps=norm_eps, drop_path_rate=drop_path_rate,
                                                  input_size=input_size, out_indices=out_indices, spec=spec,
                                                  init_patch_embed=init_patch_embed,
                                                  always_partition=always_partition,
                                                  mask_padded_keys=mask_padded_keys)
        dims = self.backbone.out_channels
        self.num_classes, self.aux_index = int(num_classes), int(aux_index)
        self.decode_head = UPerHead(dims, channels, pool_scales, num_classes, dropout)
        self.aux_head = (FCNHead(dims[aux_index], aux_channels, aux_num_convs, num_classes, dropout)
                         if aux_channels else None)
        self.pad_multiple = self.backbone.pad_multiple

    def forward(self, x: torch.Tensor):
        h, w = x.shape[-2:]
        m = self.pad_multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        feats = self.backbone(x)
        size = x.shape[-2:]
        logits = resize_logits(self.decode_head(feats), size)[..., :h, :w]
        if self.training and self.aux_head is not None:
            aux = resize_logits(self.aux_head(feats[self.aux_index]), size)[..., :h, :w]
            return logits, aux
        return logits
