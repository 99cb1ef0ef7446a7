"""ECDDPModel: student + EMA teacher, multi-crop, context mining and the loss of one training step.

Flow of :meth:`ECDDPModel.forward` (public ``PretrainModel``, model/pretrain_model.py):
crops (224 view, 2 global, 8 local) -> teacher on the view -> cosine k-means (K = 8) of its tokens = contexts
-> teacher context vectors (context head's AttPool, one query per context, attending only to its tokens) ->
context masks resampled into each global crop's token grid (coverage > 0.25) -> teacher on the unmasked global
crops (image vectors, masked-patch tokens) -> student on the block-masked global crops and the local crops ->
:class:`~.loss.ECDDPLoss`. The teacher is a frozen copy updated by :meth:`ema_update` (momentum 0.992 -> 1,
cosine), always in eval mode (no drop path), as the public code's teacher.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...models.masking import BlockMaskGenerator
from ...models.options import check_fields
from .backbone import FusedSwin
from .heads import DINOHead
from .kmeans import cosine_kmeans
from .loss import ECDDPLoss
from .multicrop import MultiCrop, MultiCropOutput


@dataclass
class ECDDPConfig:
    """All ECDDP model options; defaults are evforge's (the public code's config/pretrain/swin_small.yml where it
    is not improved on). Each difference from the public code is one of these options; ``reference_defaults``
    lists the values that reproduce the public code (docs/FIDELITY.md says why each differs)."""

    # backbone: Swin-T/7 on 6 voxel bins, 4 stages fused to stride 16 / 768 channels
    in_chans: int = 6
    variant: str = "swin_tiny_patch4_window7_224"
    img_size: int = 224
    fused_dim: int = 768
    drop_path_rate: float = 0.0
    tiny: bool = False
    backbone_kwargs: dict = field(default_factory=dict)
    always_partition: bool = False  # public: True (every odd block shifts, at every stage)
    mask_padded_keys: bool = True  # public: False (tokens attend to the window padding)
    swin_init: str = "timm"  # public: "torch" (its init_weights is never applied)
    mask_token_init: str = "trunc_normal"  # public: "zeros"
    # heads: 768-2048-2048-256 -> 32768 weight-normed prototypes; AttPool 2 blocks (dim // 32 heads)
    head_hidden: int = 2048
    head_bottleneck: int = 256
    head_out_dim: int = 32768
    head_nlayers: int = 3
    norm_last_layer: bool = True  # public: False (prototype norms g trainable, and weight-decayed)
    attpool_blocks: int = 2
    attpool_heads: int | None = None
    separate_patch_head: bool = True
    # crops
    view_size: int = 224
    global_size: int = 192
    n_global: int = 2
    global_scale: tuple = (0.32, 1.0)
    local_size: int = 96
    n_local: int = 8
    local_scale: tuple = (0.05, 0.32)
    flip_p: float = 0.5
    crop_mode: str = "exact"  # public: "reference" (kornia 0.7.1 integer boxes and grids)
    # context mining
    num_clusters: int = 8
    kmeans_iters: int = 10
    kmeans_init: str = "kmeans++"  # public: "random"
    kmeans_reseed_empty: bool = True  # public: False
    coverage_threshold: float = 0.25
    # iBOT block masks on half of the global crops
    mask_probability: float = 0.5
    mask_ratio: tuple = (0.1, 0.5)
    mask_min_patches: int = 4
    legacy_mask_ratio: bool = False  # public: True (an effective 4.4-22 % instead of 10-50 %)
    # loss
    student_temp: float = 0.1
    context_weight: float = 1.0  # factor on the public context weight 2w = 0.1 (the paper's lambda1); see loss.py
    patch_weight: float = 1.0
    sinkhorn_iters: int = 3
    # optimisation hints for the task (schedules live in the trainer)
    patch_embed_lr_scale: float = 0.2
    freeze_last_layer_epochs: int = 1
    ema_momentum_base: float = 0.992
    teacher_temp_warmup: float = 0.04
    teacher_temp: float = 0.07
    teacher_temp_warmup_epochs: int = 30

    @classmethod
    def from_dict(cls, d: dict | None) -> "ECDDPConfig":
        """Build from a plain dict (e.g. ``cfg["task"]["model"]``, optional ``preset: tiny`` or ``reference``, or
        both as a list); unknown keys are an error."""
        d = dict(d or {})
        if "context_lambda" in d:
            raise ValueError(
                "task.model.context_lambda was removed: it multiplied the context term by a second 0.1. The public "
                "code weights it 2w = 0.1, which is the paper's lambda1; set context_weight (a factor on that, "
                "default 1.0) instead")
        presets = d.pop("preset", None)
        presets = [presets] if isinstance(presets, str) else list(presets or [])
        base: dict = {}
        for name in presets:
            if name not in PRESETS:
                raise ValueError(f"task.model.preset: unknown preset {name!r} (known: {sorted(PRESETS)})")
            base.update(PRESETS[name]())
        check_fields(cls, d, "task.model (ECDDP)")
        return cls(**{**base, **d})

    @staticmethod
    def tiny_defaults() -> dict:
        """A CPU-sized model: tiny Swin, small heads, 96 view / 64 global / 32 local crops, K = 4."""
        return dict(
            img_size=64, fused_dim=64, tiny=True, head_hidden=64, head_bottleneck=32, head_out_dim=256,
            attpool_heads=2, view_size=96, global_size=64, local_size=32, n_local=4, num_clusters=4,
        )

    @staticmethod
    def reference_defaults() -> dict:
        """The values that reproduce the public code (model/pretrain_model.py, model/network/*.py)."""
        return dict(
            always_partition=True, mask_padded_keys=False, swin_init="torch", mask_token_init="zeros",
            norm_last_layer=False, crop_mode="reference", kmeans_init="random", kmeans_reseed_empty=False,
            legacy_mask_ratio=True,
        )

    @classmethod
    def tiny_config(cls, **overrides) -> "ECDDPConfig":
        """The CPU-sized config (named so it cannot shadow the ``tiny`` field's default)."""
        return cls(**{**cls.tiny_defaults(), **overrides})


PRESETS = {"tiny": ECDDPConfig.tiny_defaults, "reference": ECDDPConfig.reference_defaults}


def ema_momentum(progress: float, base: float = 0.992) -> float:
    """Teacher momentum at training progress in [0, 1] (epochs done / total): cosine from ``base`` to 1."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - base)


def teacher_temperature(epoch: int, warmup: float = 0.04, final: float = 0.07, warmup_epochs: int = 30) -> float:
    """Per-epoch teacher temperature: linear from ``warmup`` (epoch 0) to ``final`` (epoch warmup_epochs - 1)."""
    if epoch >= warmup_epochs - 1 or warmup_epochs <= 1:
        return final
    return warmup + (final - warmup) * epoch / (warmup_epochs - 1)


class ECDDPModel(nn.Module):
    """Student (trained) and teacher (EMA) networks with ECDDP's training forward.

    Both are ``nn.ModuleDict`` s of ``backbone`` (:class:`FusedSwin`), ``image_head`` and ``context_head``
    (DINO heads with AttPool) and ``patch_head`` (iBOT, absent when shared with the image head).
    """

    def __init__(self, cfg: ECDDPConfig | dict | None = None):
        super().__init__()
        cfg = cfg if isinstance(cfg, ECDDPConfig) else ECDDPConfig.from_dict(cfg)
        self.cfg = cfg
        dim = cfg.fused_dim
        head = dict(hidden=cfg.head_hidden, bottleneck=cfg.head_bottleneck, out_dim=cfg.head_out_dim,
                    nlayers=cfg.head_nlayers, norm_last_layer=cfg.norm_last_layer)
        pooled = dict(pool=True, pool_blocks=cfg.attpool_blocks, pool_heads=cfg.attpool_heads)
        student = {
            "backbone": FusedSwin(cfg.in_chans, cfg.variant, cfg.img_size, dim, cfg.drop_path_rate, cfg.tiny,
                                  always_partition=cfg.always_partition, mask_padded_keys=cfg.mask_padded_keys,
                                  init=cfg.swin_init, mask_token_init=cfg.mask_token_init, **cfg.backbone_kwargs),
            "image_head": DINOHead(dim, **head, **pooled),
            "context_head": DINOHead(dim, **head, **pooled),
        }
        if cfg.separate_patch_head:
            student["patch_head"] = DINOHead(dim, **head)
        self.student = nn.ModuleDict(student)
        self.teacher = copy.deepcopy(self.student)  # same initial weights, as the public load_state_dict copy
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.multicrop = MultiCrop(cfg.view_size, cfg.global_size, cfg.n_global, cfg.global_scale,
                                   cfg.local_size, cfg.n_local, cfg.local_scale, flip_p=cfg.flip_p,
                                   mode=cfg.crop_mode)
        g = cfg.global_size // 16
        self.mask_generator = BlockMaskGenerator((g, g), cfg.mask_ratio, cfg.mask_min_patches,
                                                 mask_probability=cfg.mask_probability,
                                                 legacy_ratio=cfg.legacy_mask_ratio)
        self.loss_fn = ECDDPLoss(cfg.n_global, cfg.n_local, cfg.student_temp, cfg.context_weight,
                                 cfg.patch_weight, cfg.sinkhorn_iters)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never drops paths
        return self

    @staticmethod
    def _patch_head(net: nn.ModuleDict) -> DINOHead:
        return net["patch_head"] if "patch_head" in net else net["image_head"]

    @torch.no_grad()
    def ema_update(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
        t = list(self.teacher.parameters())
        s = [p.detach() for p in self.student.parameters()]
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1.0 - momentum)

    def cancel_last_layer_gradients(self) -> None:
        """Drop the prototype layers' gradients (public ``delay_epoch``: call during the first
        ``cfg.freeze_last_layer_epochs`` epochs, between backward and the optimizer step)."""
        for name, p in self.student.named_parameters():
            if "last_layer" in name:
                p.grad = None

    def param_groups(self) -> list[dict]:
        """Student parameter groups as the public ``params_groups``: ``patch_embed`` (lr x patch_embed_lr_scale,
        decayed), ``no_decay`` (biases and 1-D parameters, weight_decay 0), ``decay`` (the rest). Teacher
        parameters and frozen ones (g of a normed last layer) are left out."""
        groups = {"decay": [], "no_decay": [], "patch_embed": []}
        for name, p in self.student.named_parameters():
            if not p.requires_grad:
                continue
            if "patch_embed" in name:
                groups["patch_embed"].append(p)
            elif name.endswith(".bias") or p.ndim == 1:
                groups["no_decay"].append(p)
            else:
                groups["decay"].append(p)
        return [
            {"name": "decay", "params": groups["decay"], "lr_scale": 1.0},
            {"name": "no_decay", "params": groups["no_decay"], "lr_scale": 1.0, "weight_decay": 0.0},
            {"name": "patch_embed", "params": groups["patch_embed"], "lr_scale": self.cfg.patch_embed_lr_scale},
        ]

    def forward(
        self,
        voxels: torch.Tensor,
        teacher_temp: float,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One ECDDP step on voxel grids (B, in_chans, H, W), H, W >= view_size. Random crops, flips, masks and
        k-means seeds come from ``generator`` (a CPU generator is fine on any device).
        Returns the total loss and its parts (+ counts ``n_context``, ``n_masked``)."""
        crops = self.multicrop(voxels, generator)
        masks = self.mask_generator(self.cfg.n_global * voxels.shape[0], generator)
        return self.forward_crops(crops, masks, teacher_temp, generator)

    def forward_crops(
        self,
        crops: MultiCropOutput,
        masks: torch.Tensor,
        teacher_temp: float,
        generator: torch.Generator | None = None,
        kmeans_seeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The step after the random draws: ``crops`` (view, global and local crops), ``masks`` (nG*B, Ng) bool
        iBOT masks of the global crops; ``kmeans_seeds`` (B, K) token indices seeding the context k-means (else
        drawn from ``generator``). The reference fixtures replay the public code's draws through here."""
        cfg = self.cfg
        view, gl, lo = crops.view, crops.global_crops, crops.local_crops
        b, ng, k = view.shape[0], gl.n, cfg.num_clusters
        masks = masks.to(view.device)  # (nG*B, Ng) iBOT masks
        teacher, student = self.teacher, self.student

        with torch.no_grad():
            tv, hw_v = teacher["backbone"](view)
            assign, _ = cosine_kmeans(tv, k, cfg.kmeans_iters, generator, cfg.kmeans_init,
                                      reseed_empty=cfg.kmeans_reseed_empty, seeds=kmeans_seeds)
            onehot = F.one_hot(assign, k).transpose(1, 2)  # (B, K, Nv): context membership on the view
            t_context = teacher["context_head"].forward_tokens(tv, hw_v, k, onehot.bool())  # (B, K, P)
            tg, hw_g = teacher["backbone"](gl.images)
            t_global = teacher["image_head"].forward_tokens(tg, hw_g).squeeze(1)  # (nG*B, P)
            t_patch = self._patch_head(teacher)(tg[masks])  # (Mp, P)
            # context masks in each global crop's token grid: bilinear coverage > 0.25
            cover = gl.resample(onehot.view(b, k, *hw_v).to(tv.dtype), hw_g)
            ctx_mask = (cover > cfg.coverage_threshold).flatten(2)  # (nG*B, K, Ng)
            present = ctx_mask.any(-1)  # (nG*B, K): context k visible in the crop
            crop_sample = torch.arange(ng * b, device=view.device) % b
            context_index = (crop_sample[:, None] * k + torch.arange(k, device=view.device))[present]

        sg, _ = student["backbone"](gl.images, mask=masks)
        sl, hw_l = student["backbone"](lo.images) if lo.n else (None, None)
        s_global = student["image_head"].forward_tokens(sg, hw_g).squeeze(1)
        s_local = student["image_head"].forward_tokens(sl, hw_l).squeeze(1) if sl is not None else None
        s_context = student["context_head"].att(sg, hw_g, k, ctx_mask)[present]  # (M, D)
        s_context = student["context_head"](s_context)
        s_patch = self._patch_head(student)(sg[masks])

        total, parts = self.loss_fn(
            student_global=s_global, teacher_global=t_global, student_local=s_local,
            student_context=s_context, teacher_context=t_context.flatten(0, 1), context_index=context_index,
            student_patch=s_patch, teacher_patch=t_patch, patch_crop_index=masks.nonzero()[:, 0],
            teacher_temp=teacher_temp,
        )
        parts["n_context"] = present.sum().float()
        parts["n_masked"] = masks.sum().float()
        return total, parts
