"""MEM's finetuning network from a pretrained BEiT/ViT backbone, as the public code builds it.

MEM finetunes its BEiT with ``mem/modeling_finetune.py: VisionTransformer`` (``ft_vit``) loaded by
``mem/utils.py: finetune``. Three things differ from loading the backbone into timm's model as it is, each a
``task.model`` option of the classification task:

* ``rel_pos_bias: per_layer``: the relative position bias shared by all blocks during pretraining is copied into
  every block, which then learn their own (``utils.py:636-643``, "Expand the shared relative position embedding
  to each transformer block"); :func:`per_layer_rel_pos_bias`. ``shared`` keeps one table.
* ``fc_norm: fresh``: the pooled features' LayerNorm starts from 1 / 0 (``ft_vit`` with mean pooling has a new
  ``fc_norm`` and no final ``norm``; the checkpoint's ``norm`` is dropped, ``utils.py: load_state_dict``);
  ``from_norm`` (evforge) starts it from the pretrained final norm. :func:`reset_fc_norm`.
* ``block_dropout: p``: MEM's ``class_dropout`` (0.1; 0 for N-Cars) is a dropout after the position embedding,
  after the attention projection and after the MLP (``modeling_finetune.py:64-70,124-126,271``), not after the
  MLP's activation nor before the head, where timm's ``drop_rate`` / ``proj_drop_rate`` put one;
  :func:`block_dropout`.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .backbones import ModelSpec, create_model

__all__ = ["per_layer_rel_pos_bias", "reset_fc_norm", "block_dropout"]


def per_layer_rel_pos_bias(net: nn.Module, spec: ModelSpec) -> tuple[nn.Module, ModelSpec]:
    """A timm BEiT with a shared relative position bias rebuilt with one table per block, each a copy of the
    shared one (everything else loaded unchanged). Other networks are returned as they are."""
    kw = dict(spec.timm_kwargs)
    if not kw.get("use_shared_rel_pos_bias"):
        return net, spec
    kw.update(use_shared_rel_pos_bias=False, use_rel_pos_bias=True)
    new_spec = replace(spec, timm_kwargs=kw)
    new = create_model(new_spec)
    state = net.state_dict()
    table = state.pop("rel_pos_bias.relative_position_bias_table")
    for i in range(len(new.blocks)):
        state[f"blocks.{i}.attn.relative_position_bias_table"] = table.clone()
    new.load_state_dict(state, strict=True)
    return new, new_spec


@torch.no_grad()
def reset_fc_norm(net: nn.Module) -> bool:
    """Re-initialise a ViT's ``fc_norm`` (the LayerNorm after mean pooling) to weight 1, bias 0. Returns whether
    there was one."""
    norm = getattr(net, "fc_norm", None)
    if not isinstance(norm, nn.LayerNorm):
        return False
    nn.init.ones_(norm.weight)
    nn.init.zeros_(norm.bias)
    return True


def block_dropout(net: nn.Module, p: float) -> nn.Module:
    """MEM's dropout placement (see the module docstring) on a timm ViT / BEiT, in place: ``p`` after the
    position embedding, each attention projection and each MLP output; none after the MLP activation, in the
    attention weights or before the head."""
    if not 0 <= p < 1:
        raise ValueError(f"task.model.block_dropout must be in [0, 1), got {p}")
    net.pos_drop = nn.Dropout(p)
    for blk in net.blocks:
        blk.attn.proj_drop = nn.Dropout(p)
        blk.attn.attn_drop = nn.Dropout(0.0)
        blk.mlp.drop1 = nn.Identity()
        blk.mlp.drop2 = nn.Dropout(p)
    if hasattr(net, "head_drop"):
        net.head_drop = nn.Dropout(0.0)
    return net
