"""MEMModel: a timm ViT or BEiT with a learnable mask token and a masked-image-modelling head.

MEM (``mem/modeling_pretrain.py: VisionTransformerForMaskedImageModeling``, BEiT's): patch embeddings of the
masked patches are replaced by one learnable ``mask_token`` (``x * (1 - w) + mask_token * w``) before the
class token (and position embeddings, if any) are added; after the blocks and the final norm, a linear
``lm_head`` (embed_dim -> 8192) scores the tokenizer's codes at the masked patches only, trained with
cross-entropy against the tokenizer's argmax ids (``engine_for_pretraining.py``; ``mlm_acc`` = top-1 accuracy).

The network is a timm model, so its weights export under timm's keys and load into the finetuning model:

* ``variant: beit_*`` is MEM's: timm's ``Beit`` with one relative position bias shared by all blocks and no
  absolute embedding (``run_mem_pretraining.py:63-67,181-182``: ``rel_pos_bias`` on, ``abs_pos_emb`` off), q/v
  biases, layer scale ``init_values`` 0.1; ``init: beit`` is MEM's init (``modeling_pretrain.py:61-88``: every
  weight truncated normal, std 0.02 cut at +-1 std, biases 0, then each block's ``attn.proj`` and ``mlp.fc2``
  divided by ``sqrt(2 * layer)``). Finetuning expands the shared bias into every block
  (:mod:`evforge.finetune.beit`), as MEM's ``utils.finetune`` does.
* ``variant: vit_*`` (evforge's default) is timm's ``VisionTransformer`` with learned absolute position
  embeddings and timm's init: the standard timm ViT that every timm consumer loads and that resizes its
  position table to other input sizes; layer scale and drop path as MEM.

``objective: mae`` replaces the code head by a linear pixel head (embed_dim -> patch_size**2 * C) trained with
MSE on the masked patches, per-patch-normalised targets when ``norm_pix_loss`` (MAE's option). This is a
SimMIM-style variant on the same masked ViT; MEM's ``--mae 1`` instead trains a separate MAE encoder-decoder
(``modeling_mae.py``, random 50 % masking, ``norm_pix_loss=0``, loss on masked patches only).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...models.options import check_fields

# MEM's BEiT optimiser skip list (``no_weight_decay``): besides biases and 1-D parameters, only these.
NO_DECAY = ("pos_embed", "cls_token")


@dataclass
class MEMConfig:
    """MEM model options; defaults are the paper's ViT-B/16 (``configs/ncaltech.conf``)."""

    variant: str = "vit_base_patch16_224"   # timm architecture: vit_* (evforge) or beit_* (MEM's BEiT)
    img_size: int = 224
    patch_size: int = 16                    # must equal the tokenizer's 2**num_layers
    in_chans: int = 3                       # MEM's event image: (pos, 0, neg)
    vit_kwargs: dict = field(default_factory=dict)  # timm overrides (embed_dim, depth, num_heads, mlp_ratio, ...)
    drop_path_rate: float = 0.1             # MEM pt_dropout
    init_values: float | None = 0.1         # layer scale (MEM layer_scale_init_value; None = off)
    objective: str = "beit"                 # beit: CE on tokenizer codes | mae: pixel regression
    num_tokens: int | None = None           # code vocabulary; None = the tokenizer's
    norm_pix_loss: bool = False             # mae: normalise each target patch (mean 0, var 1)
    init: str = "timm"                      # timm | beit (MEM's pretraining init, see the module doc)

    @classmethod
    def from_dict(cls, d: dict | None) -> "MEMConfig":
        d = dict(d or {})
        check_fields(cls, d, "task.model (MEM)")
        cfg = cls(**d)
        if cfg.objective not in ("beit", "mae"):
            raise ValueError(f"task.model.objective: expected 'beit' or 'mae', got {cfg.objective!r}")
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"task.model: img_size {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}")
        if cfg.init not in ("timm", "beit"):
            raise ValueError(f"task.model.init: expected 'timm' or 'beit', got {cfg.init!r}")
        if not cfg.variant.startswith(("vit_", "beit_")):
            raise ValueError(f"task.model.variant: a timm vit_* or beit_* model, got {cfg.variant!r}")
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def is_beit(self) -> bool:
        return self.variant.startswith("beit_")

    def timm_kwargs(self) -> dict:
        """What ``timm.create_model(variant, **kwargs)`` needs to rebuild this network (no training-only options).
        BEiT: MEM's shared relative position bias, no absolute embedding, the final norm on the tokens."""
        kw = {"img_size": self.img_size, "patch_size": self.patch_size}
        if self.is_beit:
            kw.update(use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True, global_pool="")
        kw.update(self.vit_kwargs)
        if self.init_values is not None:
            kw["init_values"] = float(self.init_values)
        return kw


def build_vit(cfg: MEMConfig) -> nn.Module:
    import timm

    return timm.create_model(cfg.variant, pretrained=False, num_classes=0, in_chans=cfg.in_chans,
                             drop_path_rate=cfg.drop_path_rate, **cfg.timm_kwargs())


def _trunc_std(t: torch.Tensor, std: float = 0.02) -> None:
    """MEM/BEiT pretraining's ``trunc_normal_(t, std)``: a normal cut at +-1 std (``modeling_pretrain.py:19-20``,
    ``a=-std, b=std``; timm's default cuts at +-2, in absolute units)."""
    nn.init.trunc_normal_(t, mean=0.0, std=std, a=-std, b=std)


@torch.no_grad()
def beit_init(model: "MEMModel", std: float = 0.02) -> None:
    """MEM's pretraining init (``modeling_pretrain.py:61-88``): positions (if any), class and mask token and the
    MIM head truncated normal; every Linear and Conv2d weight too (biases 0), LayerNorms 1 / 0; then each block's
    attention projection and MLP output divided by ``sqrt(2 * (i + 1))``."""
    vit = model.vit
    for t in (getattr(vit, "pos_embed", None), vit.cls_token, model.mask_token, model.head.weight):
        if t is not None:
            _trunc_std(t, std)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            _trunc_std(m.weight, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for i, blk in enumerate(vit.blocks):
        blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
        blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))


def patchify(img: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, h*w, p*p*C), patches row-major, pixels (row, col, channel) inside (MAE's order)."""
    B, C, H, W = img.shape
    x = img.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


class MEMModel(nn.Module):
    """``forward(images, mask, target_ids=None) -> (loss, logs)``; ``vit`` is the exported backbone."""

    def __init__(self, cfg: MEMConfig | None = None):
        super().__init__()
        cfg = cfg or MEMConfig()
        if cfg.objective == "beit" and not cfg.num_tokens:
            raise ValueError("task.model.num_tokens: the BEiT objective needs the code vocabulary size")
        self.cfg = cfg
        self.vit = build_vit(cfg)
        grid = tuple(self.vit.patch_embed.grid_size)
        if grid != (cfg.grid, cfg.grid):
            raise ValueError(f"timm built a {grid} patch grid, expected {cfg.grid}x{cfg.grid}")
        dim = self.vit.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        out = cfg.num_tokens if cfg.objective == "beit" else cfg.patch_size ** 2 * cfg.in_chans
        self.head = nn.Linear(dim, out)
        nn.init.trunc_normal_(self.mask_token, std=0.02)  # BEiT: trunc_normal_(std=init_std=0.02)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        if cfg.init == "beit":
            beit_init(self)

    @property
    def num_patches(self) -> int:
        return self.cfg.grid ** 2

    def param_groups(self) -> list[dict]:
        """MEM/BEiT's groups: no weight decay for biases, 1-D parameters, ``pos_embed`` and ``cls_token``;
        everything else (``mask_token`` included, as BEiT) decays."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            short = name.split(".", 1)[-1] if name.startswith("vit.") else name
            if p.ndim <= 1 or name.endswith(".bias") or short in NO_DECAY:
                no_decay.append(p)
            else:
                decay.append(p)
        return [{"name": "decay", "params": decay, "lr_scale": 1.0},
                {"name": "no_decay", "params": no_decay, "lr_scale": 1.0, "weight_decay": 0.0}]

    def encode(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final-normed patch tokens (B, h*w, D) of ``images`` with the ``mask`` (B, h*w) patches replaced by
        the mask token (timm's ``forward_features`` with the replacement after the patch embedding)."""
        vit = self.vit
        x = vit.patch_embed(images)  # (B, N, D)
        w = mask.unsqueeze(-1).to(x.dtype)
        x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        if self.cfg.is_beit:  # timm's Beit.forward_features with the replacement after the patch embedding
            x = torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            if vit.pos_embed is not None:
                x = x + vit.pos_embed
            x = vit.pos_drop(x)
            rel = vit.rel_pos_bias() if vit.rel_pos_bias is not None else None
            for blk in vit.blocks:
                x = blk(x, shared_rel_pos_bias=rel)
            return vit.norm(x)[:, 1:]
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        x = vit.norm(x)
        return x[:, vit.num_prefix_tokens:]

    def forward(self, images: torch.Tensor, mask: torch.Tensor, target_ids: torch.Tensor | None = None):
        """Loss on the masked patches and logs (``mlm_acc`` for beit, ``n_masked``). ``images`` (B, C, H, W),
        ``mask`` (B, h*w) bool, ``target_ids`` (B, h*w) int64 tokenizer codes (beit)."""
        cfg = self.cfg
        if images.shape[1] != cfg.in_chans:
            raise ValueError(f"MEM model takes {cfg.in_chans}-channel images, got {images.shape[1]}")
        mask = mask.to(images.device, torch.bool)
        tokens = self.encode(images, mask)[mask]  # (M, D): the masked patches of the whole batch
        pred = self.head(tokens)
        logs = {"n_masked": float(mask.sum()) / mask.shape[0]}
        if cfg.objective == "beit":
            if target_ids is None:
                raise ValueError("the BEiT objective needs target_ids (tokenizer codes)")
            labels = target_ids.to(images.device)[mask]
            loss = F.cross_entropy(pred.float(), labels)
            logs["mlm_acc"] = (pred.detach().argmax(-1) == labels).float().mean()
            return loss, logs
        target = patchify(images, cfg.patch_size)[mask].float()
        if cfg.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        loss = (pred.float() - target).pow(2).mean()  # per-patch mean, averaged over the masked patches
        return loss, logs
