"""Classifier networks: timm ViT / Swin built from a config or from an exported backbone (``--init``).

:func:`build_classifier` resolves a :class:`ModelSpec` (what to build), builds the timm model with a fresh
``num_classes`` head and, given an exported backbone (:mod:`evforge.export`), loads its weights: the file's
metadata (``arch``, ``timm_kwargs``, ``norm_eps``) then defines the architecture, the config only adds
regularisation (drop path, dropout) and the pooling. The spec is stored in the trainer checkpoint (task
state), so evaluation rebuilds the same network without the backbone file.

Input channels (:func:`adapt_patch_embed`): the representation fixes ``in_chans`` (MEM image 3, histogram 2,
voxel grid ``bins``); a backbone pretrained on another count gets its patch-embedding weight adapted with
timm's ``adapt_input_conv`` rule, documented there (``patch_embed="adapt"``, evforge's default), or the patch
embedding and its norm start fresh (``patch_embed="fresh"``: the public ECDDP finetuning code,
model/swin_model.py ``keep_patch_keys: false``). ViT position embeddings are resampled (bicubic, timm's
``resample_abs_pos_embed``) when the input size differs from pretraining; Swin keeps its pretraining
``img_size`` (it fixes the window sizes and relative-position tables) and runs on any input size.

Swin window semantics (:mod:`evforge.models.swin`): ``always_partition`` travels in ``timm_kwargs`` and the
block options (pad first, ``mask_padded_keys``) in ``ModelSpec.swin_blocks``, both from the backbone file's
metadata unless the config sets ``always_partition`` / ``mask_padded_keys``; the finetuning network then
computes what the pretrained one did.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from torch import nn

from ..errors import InputError
from ..models.backbone_file import NON_TIMM_PREFIXES, read_backbone
from ..models.swin import use_pad_first_blocks

__all__ = ["ModelSpec", "family", "adapt_patch_embed", "resolve_spec", "create_model", "load_init",
           "build_classifier", "PATCH_EMBED_MODES"]

PATCH_EMBED = "patch_embed.proj.weight"
PATCH_EMBED_MODES = ("adapt", "fresh")
# task.model keys that are not architecture: they apply also when an exported backbone defines the rest
REGULARISATION_KEYS = ("drop_path_rate", "drop_rate", "global_pool")


def family(arch: str) -> str:
    """``"vit"`` or ``"swin"`` from a timm model name (ValueError for anything else)."""
    name = arch.split(".")[0]
    if name.startswith("swin"):
        return "swin"
    if name.startswith(("vit_", "deit_", "beit_")):
        return "vit"
    raise ValueError(f"task.model.arch: {arch!r} is neither a timm ViT (vit_*, deit_*) nor a Swin (swin*)")


def adapt_patch_embed(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """The patch-embedding conv weight ``(D, C_old, p, p)`` for ``in_chans`` input channels.

    Rule (timm's ``adapt_input_conv``, used as is):

    * ``in_chans == C_old``: the weight itself, unchanged (outputs are identical);
    * ``in_chans == 1``: the sum over the old channels (a gray input equal to every old channel gives the
      same output);
    * otherwise: the old channels repeated cyclically (new channel ``c`` takes old channel ``c % C_old``),
      truncated to ``in_chans`` and scaled by ``C_old / in_chans``. When ``in_chans`` is a multiple of
      ``C_old``, an input whose channels repeat the old input (``x_new[c] = x_old[c % C_old]``) gives the
      old output; otherwise the response to a channel-constant input keeps its scale approximately.

    The bias is independent of the channels and kept.
    """
    from timm.models._manipulate import adapt_input_conv

    if weight.ndim != 4:
        raise ValueError(f"expected a (D, C, p, p) conv weight, got shape {tuple(weight.shape)}")
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    if weight.shape[1] == in_chans:
        return weight
    return adapt_input_conv(in_chans, weight.clone(), base_chans=weight.shape[1])


@dataclass
class ModelSpec:
    """Everything needed to build the network again (JSON-able; stored in checkpoints as task state)."""

    arch: str
    in_chans: int
    num_classes: int
    timm_kwargs: dict = field(default_factory=dict)
    norm_eps: float | None = None  # LayerNorm eps of the backbone (ECDDP exports use 1e-6); None = timm's
    init: str | None = None  # the backbone file the weights came from (a record; not read again)
    init_in_chans: int | None = None
    swin_blocks: dict | None = None  # {"pad_first", "mask_padded_keys"} (evforge.models.swin); None = timm's

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _input_size(size) -> list[int]:
    return [int(size), int(size)] if isinstance(size, (int, float)) else [int(v) for v in size]


def resolve_spec(model_cfg: dict, *, in_chans: int, num_classes: int, input_size, init_meta: dict | None = None,
                 init: str | None = None) -> ModelSpec:
    """The spec from ``task.model`` (``arch``, ``kwargs``, regularisation keys) or, with ``init_meta`` (an
    exported backbone's metadata), from that file's architecture plus the config's regularisation keys."""
    if init_meta is not None:
        arch, kwargs, eps = init_meta["arch"], dict(init_meta.get("timm_kwargs", {})), init_meta.get("norm_eps")
    else:
        arch, kwargs, eps = model_cfg.get("arch"), dict(model_cfg.get("kwargs") or {}), model_cfg.get("norm_eps")
        if not arch:
            raise ValueError("task.model.arch: give a timm model name (or task.init, an exported backbone)")
    fam = family(arch)
    for k in REGULARISATION_KEYS:
        if model_cfg.get(k) is not None:
            kwargs[k] = model_cfg[k]
    size = _input_size(input_size)
    blocks = dict((init_meta or {}).get("swin_blocks") or {}) or None
    if fam == "vit":
        kwargs["img_size"] = size  # position embeddings at the finetuning size (resampled from the backbone's)
    else:
        kwargs.setdefault("img_size", 224)
        kwargs["strict_img_size"] = False  # Swin: windows fixed by img_size, any input size (padded)
        if model_cfg.get("always_partition") is not None:  # else the backbone file's (or timm's False)
            kwargs["always_partition"] = bool(model_cfg["always_partition"])
        if model_cfg.get("mask_padded_keys") is not None:  # else the backbone file's (or none: timm's blocks)
            blocks = {"pad_first": True, "mask_padded_keys": bool(model_cfg["mask_padded_keys"])}
    return ModelSpec(arch=arch, in_chans=int(in_chans), num_classes=int(num_classes), timm_kwargs=kwargs,
                     norm_eps=None if eps is None else float(eps), init=init,
                     init_in_chans=None if init_meta is None else int(init_meta["in_chans"]),
                     swin_blocks=blocks if fam == "swin" else None)


def create_model(spec: ModelSpec) -> nn.Module:
    """The timm model of ``spec`` with random weights (``pretrained=False``: nothing is downloaded)."""
    import timm

    kwargs = dict(spec.timm_kwargs)
    for k in ("img_size", "window_size", "depths", "num_heads"):
        if isinstance(kwargs.get(k), list):
            kwargs[k] = tuple(kwargs[k])
    if spec.norm_eps is not None:
        kwargs["norm_layer"] = partial(nn.LayerNorm, eps=spec.norm_eps)
    net = timm.create_model(spec.arch, pretrained=False, num_classes=spec.num_classes, in_chans=spec.in_chans,
                            **kwargs)
    if spec.swin_blocks and spec.swin_blocks.get("pad_first"):
        use_pad_first_blocks(net, mask_padded_keys=bool(spec.swin_blocks.get("mask_padded_keys", True)))
    return net


def load_init(model: nn.Module, tensors: dict, *, source="backbone", patch_embed: str = "adapt") -> dict:
    """Load exported backbone ``tensors`` into ``model``: the patch embedding adapted to the input channels
    (``patch_embed="adapt"``) or left as initialised with its norm (``"fresh"``), ViT position embeddings
    resampled to the input size, and a ViT's final norm moved between ``norm`` (token pooling) and ``fc_norm``
    (mean pooling, where timm normalises the pooled features instead) when the two poolings differ. The
    classifier (``head*``) stays fresh. Returns what was done."""
    from timm.layers import resample_abs_pos_embed

    if patch_embed not in PATCH_EMBED_MODES:
        raise ValueError(f"patch_embed must be one of {PATCH_EMBED_MODES}, not {patch_embed!r}")
    own = model.state_dict()
    weights = {k: v for k, v in tensors.items() if not k.startswith((*NON_TIMM_PREFIXES, "head"))}
    done = {"adapted_patch_embed": False, "resampled_pos_embed": False, "fresh_patch_embed": patch_embed == "fresh"}
    fresh = [k for k in weights if k.startswith("patch_embed.")] if patch_embed == "fresh" else []
    for k in fresh:  # the public ECDDP finetuning drops patch_embed.proj *and* patch_embed.norm
        del weights[k]
    if PATCH_EMBED in weights and PATCH_EMBED in own and weights[PATCH_EMBED].shape != own[PATCH_EMBED].shape:
        weights[PATCH_EMBED] = adapt_patch_embed(weights[PATCH_EMBED], own[PATCH_EMBED].shape[1])
        done["adapted_patch_embed"] = True
    if "pos_embed" in weights and "pos_embed" in own and weights["pos_embed"].shape != own["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        weights["pos_embed"] = resample_abs_pos_embed(weights["pos_embed"], list(model.patch_embed.grid_size),
                                                      num_prefix_tokens=prefix)
        done["resampled_pos_embed"] = True
    for a, b in (("norm", "fc_norm"), ("fc_norm", "norm")):  # token vs mean pooling (ViT): the final norm moves
        if f"{a}.weight" in weights and f"{a}.weight" not in own and f"{b}.weight" in own \
                and f"{b}.weight" not in weights:
            for k in [k for k in weights if k.startswith(f"{a}.")]:
                weights[b + k[len(a):]] = weights.pop(k)
            done["moved_final_norm"] = f"{a} -> {b}"
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith(("head", "fc_norm")) and k not in fresh]
    if missing or unexpected:
        raise InputError(source, f"weights do not fit {type(model).__name__}: missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}")
    return done


def build_classifier(model_cfg: dict, *, in_chans: int, num_classes: int, input_size, init=None,
                     spec: ModelSpec | dict | None = None) -> tuple[nn.Module, ModelSpec]:
    """(timm classifier, its spec). With ``spec`` (e.g. from a checkpoint) nothing else is read; with ``init``
    (an exported backbone file) the architecture comes from the file and its weights are loaded."""
    if spec is not None:
        spec = spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(spec)
        return create_model(spec), spec
    if init:
        tensors, meta = read_backbone(init)
        spec = resolve_spec(model_cfg, in_chans=in_chans, num_classes=num_classes, input_size=input_size,
                            init_meta=meta, init=str(init))
        model = create_model(spec)
        load_init(model, tensors, source=init)
        return model, spec
    spec = resolve_spec(model_cfg, in_chans=in_chans, num_classes=num_classes, input_size=input_size)
    return create_model(spec), spec
