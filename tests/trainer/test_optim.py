"""Parameter groups (no decay on biases/norms/tokens, lr scales), the optimizer builder, scheduled values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from evforge.trainer.config import ConfigError
from evforge.trainer.optim import apply_schedules, build_optimizer, default_param_groups


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 4, 2)
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 4))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.norm = nn.LayerNorm(4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2)
        self.teacher = nn.Linear(4, 2).requires_grad_(False)


def _by_name(groups):
    return {n: g for g in groups for n in g["param_names"]}


def test_groups_decay_and_scales():
    groups = default_param_groups(Tiny(), weight_decay=0.05, lr_scales={"patch_embed": 0.2})
    g = _by_name(groups)
    assert g["patch_embed.weight"]["weight_decay"] == 0.05 and g["patch_embed.weight"]["lr_scale"] == 0.2
    assert g["patch_embed.bias"]["weight_decay"] == 0.0 and g["patch_embed.bias"]["lr_scale"] == 0.2
    assert g["head.weight"]["weight_decay"] == 0.05 and g["head.weight"]["lr_scale"] == 1.0
    for name in ("head.bias", "norm.weight", "norm.bias", "bn.weight", "bn.bias", "pos_embed", "cls_token"):
        assert g[name]["weight_decay"] == 0.0, name
    assert not any(n.startswith("teacher") for n in g)  # frozen parameters are left out
    assert len(groups) == 4 and len({id(p) for grp in groups for p in grp["params"]}) == 10


def test_regex_first_match_and_no_decay():
    groups = default_param_groups(Tiny(), 0.1, lr_scales={r"^head\.": 2.0, "head": 3.0}, no_decay=[r"head\.weight"])
    g = _by_name(groups)
    assert g["head.weight"]["lr_scale"] == 2.0 and g["head.weight"]["weight_decay"] == 0.0
    with pytest.raises(ConfigError, match="bad name pattern"):
        default_param_groups(Tiny(), 0.1, lr_scales={"(": 1.0})


def test_build_and_apply():
    model = Tiny()
    groups = default_param_groups(model, 0.05, {"patch_embed": 0.2})
    opt = build_optimizer(groups, {"name": "adamw", "betas": [0.9, 0.95], "eps": 1e-6}, lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)
    assert all("param_names" not in g for g in opt.param_groups)
    apply_schedules(opt, lr=2e-3, weight_decay=0.3)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(2e-3 * g["lr_scale"])
        assert g["weight_decay"] == (0.3 if g["apply_weight_decay"] else 0.0)
    apply_schedules(opt, lr=1e-3, weight_decay=0.0)  # a decaying group stays one even after wd reached 0
    apply_schedules(opt, lr=1e-3, weight_decay=0.4)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.0, 0.4, 0.4]
    sgd = build_optimizer(default_param_groups(model), {"name": "sgd", "momentum": 0.8, "nesterov": True}, 0.1)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"]
    with pytest.raises(ConfigError, match="unknown optimizer 'lamb'"):
        build_optimizer(groups, {"name": "lamb"}, 1e-3)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer([], {"name": "adamw"}, 1e-3)


def test_task_groups_without_flags():
    """Groups a task writes by hand: default lr_scale 1, decay decided by their weight_decay."""
    lin = nn.Linear(2, 2)
    opt = build_optimizer([{"params": [lin.weight]}, {"params": [lin.bias], "weight_decay": 0.0, "lr_scale": 0.5}],
                          {"name": "adamw", "weight_decay": 0.05}, lr=1.0)
    apply_schedules(opt, lr=0.1, weight_decay=0.2)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.1, 0.2), (0.05, 0.0)]
