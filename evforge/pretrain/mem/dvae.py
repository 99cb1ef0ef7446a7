"""MEM's tokenizer: a discrete VAE (DALL-E style) over MEM's 3-channel event images.

Follows ``tum-vision/mem`` ``eventvae/vae/vae_model.py: DiscreteVAE`` with the settings of its configs
(``configs/ncaltech.conf``: ``num_layers = 4``, ``vae_hidden_dim = 384``, ``vae_num_resnet_blocks = 3``,
``num_tokens = 8192``, ``emb_dim = 32``, ``vae_loss = mse``, ``vae_kl_loss_weight = 1e-10``):

* encoder: ``num_layers`` x (conv 4x4 stride 2 pad 1 + ReLU), ``num_resnet_blocks`` residual blocks
  (conv3-ReLU-conv3-ReLU-conv1, + skip), a 1x1 conv to ``num_tokens`` logits: one categorical over the codes
  per cell of the ``1 / 2**num_layers`` grid (224 -> 14 x 14 with 4 layers, ViT-B/16's patch grid);
* codebook ``num_tokens x code_dim``; training mixes it with relaxed one-hots from a Gumbel softmax at
  temperature ``tau`` (MEM anneals ``tau`` from 1 towards 0.5; here a trainer schedule, ``gumbel_tau``);
* decoder, the mirror: 1x1 conv ``code_dim -> hidden``, the residual blocks, ``num_layers`` x (transposed
  conv 4x4 stride 2 + ReLU), a 1x1 conv to the image channels (no output activation, as MEM);
* loss: ``MSE(image, reconstruction) + kl_weight * KL(q || uniform)``, the KL summed over grid cells and codes
  and averaged over the batch (``kl_reduction: batchmean``). MEM calls ``F.kl_div(log_uniform, log_qy, ...,
  'batchmean', log_target=True)`` with a one-element ``log_uniform`` as the input, so 'batchmean' divides by
  that input's first dimension, 1: its KL is summed over the batch too (``vae_model.py:203-206``);
  ``kl_reduction: sum`` reproduces that.

At evaluation (``model.eval()``) the codes are hard: the argmax of the logits, no noise, as MEM's
``evaluate`` (``decode(argmax)``) and :meth:`DiscreteVAE.get_codebook_indices` (the MIM targets) use them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...models.options import check_fields


@dataclass
class DVAEConfig:
    """Tokenizer options; defaults are MEM's (``configs/ncaltech.conf``, identical in ncars/nimagenet)."""

    channels: int = 3           # image channels: MEM's (pos, 0, neg) event image
    image_size: int = 224       # square input side (MEM's input_H = input_W = 224)
    num_layers: int = 4         # stride-2 convolutions: grid = image_size / 2**num_layers
    hidden_dim: int = 384
    num_resnet_blocks: int = 3
    num_tokens: int = 8192      # codebook size (the MIM vocabulary)
    code_dim: int = 32          # codebook vector size (MEM's emb_dim)
    kl_weight: float = 1e-10
    kl_reduction: str = "batchmean"  # batchmean | sum (MEM's effective reduction, see the module doc)
    straight_through: bool = False  # hard one-hot forward, soft gradient (MEM: vae_straight_through = 0)

    @classmethod
    def from_dict(cls, d: dict | None) -> "DVAEConfig":
        """From a plain dict (``cfg["task"]["model"]``); unknown keys are an error naming them."""
        d = dict(d or {})
        check_fields(cls, d, "task.model (tokenizer)")
        cfg = cls(**d)
        if cfg.num_layers < 1 or cfg.image_size % (2 ** cfg.num_layers):
            raise ValueError(f"task.model: image_size {cfg.image_size} is not divisible by "
                             f"2**num_layers = {2 ** cfg.num_layers}")
        if cfg.kl_reduction not in ("batchmean", "sum"):
            raise ValueError(f"task.model.kl_reduction: expected 'batchmean' or 'sum', got {cfg.kl_reduction!r}")
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def downsample(self) -> int:
        """Pixels per code cell along a side (= the ViT patch size it must match)."""
        return 2 ** self.num_layers

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample


class ResBlock(nn.Module):
    """conv3 - ReLU - conv3 - ReLU - conv1, plus the input (DALL-E pytorch / MEM)."""

    def __init__(self, chan: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(chan, chan, 3, padding=1), nn.ReLU(), nn.Conv2d(chan, chan, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(chan, chan, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + x


def gumbel_softmax(logits: torch.Tensor, tau: float, dim: int = 1, hard: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``F.gumbel_softmax`` with the noise drawn from ``generator`` (on ``logits``' device), so a step's codes
    are a function of its seed (exact resume) rather than of the global RNG's history."""
    noise = -torch.empty_like(logits).exponential_(generator=generator).log()  # Gumbel(0, 1)
    y = ((logits + noise) / tau).softmax(dim)
    if not hard:
        return y
    index = y.argmax(dim, keepdim=True)
    y_hard = torch.zeros_like(y).scatter_(dim, index, 1.0)
    return y_hard - y.detach() + y  # straight-through: forward hard, gradient of the soft sample


def code_usage(indices: torch.Tensor, num_tokens: int) -> tuple[float, float]:
    """(fraction of the ``num_tokens`` codes that occur in ``indices``, perplexity ``exp(H)`` of their
    histogram). MEM logs the first as ``codebook_usage`` (distinct indices over the val set / num_tokens)."""
    counts = torch.bincount(indices.reshape(-1).long(), minlength=num_tokens).double()
    p = counts / counts.sum().clamp(min=1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float((counts > 0).sum()) / num_tokens, float(entropy.exp())


class DiscreteVAE(nn.Module):
    """The tokenizer. ``forward(img, tau, generator) -> (loss, parts)``; :meth:`get_codebook_indices` for targets."""

    def __init__(self, cfg: DVAEConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or DVAEConfig()
        if overrides:
            cfg = DVAEConfig.from_dict({**cfg.to_dict(), **overrides})
        self.cfg = cfg
        h = cfg.hidden_dim
        self.codebook = nn.Embedding(cfg.num_tokens, cfg.code_dim)
        enc: list[nn.Module] = []
        dec: list[nn.Module] = []
        for i in range(cfg.num_layers):
            enc.append(nn.Sequential(nn.Conv2d(cfg.channels if i == 0 else h, h, 4, stride=2, padding=1), nn.ReLU()))
        enc += [ResBlock(h) for _ in range(cfg.num_resnet_blocks)]
        enc.append(nn.Conv2d(h, cfg.num_tokens, 1))
        if cfg.num_resnet_blocks > 0:  # MEM: a 1x1 conv lifts the codes to hidden_dim before the res-blocks
            dec.append(nn.Conv2d(cfg.code_dim, h, 1))
            dec += [ResBlock(h) for _ in range(cfg.num_resnet_blocks)]
        for i in range(cfg.num_layers):
            cin = cfg.code_dim if (i == 0 and cfg.num_resnet_blocks == 0) else h
            dec.append(nn.Sequential(nn.ConvTranspose2d(cin, h, 4, stride=2, padding=1), nn.ReLU()))
        dec.append(nn.Conv2d(h, cfg.channels, 1))
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)

    @property
    def num_tokens(self) -> int:
        return self.cfg.num_tokens

    def _check(self, img: torch.Tensor) -> None:
        c = self.cfg
        if img.dim() != 4 or img.shape[1] != c.channels or tuple(img.shape[-2:]) != (c.image_size, c.image_size):
            raise ValueError(f"the tokenizer takes (B, {c.channels}, {c.image_size}, {c.image_size}) images, "
                             f"got {tuple(img.shape)}")

    @property
    def logit_conv(self) -> nn.Conv2d:
        """The encoder's last layer: the 1x1 conv from the hidden features to the code logits."""
        return self.encoder[-1]

    def features(self, img: torch.Tensor) -> torch.Tensor:
        """The encoder's hidden features (B, hidden_dim, h, w), before the logit conv."""
        self._check(img)
        return self.encoder[:-1](img)

    def logits(self, img: torch.Tensor) -> torch.Tensor:
        """Code logits (B, num_tokens, h, w) of images (B, channels, image_size, image_size)."""
        return self.logit_conv(self.features(img))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Images from code indices (B, h*w) (or (B, h, w))."""
        g = self.cfg.grid
        emb = self.codebook(codes.reshape(codes.shape[0], g, g))  # (B, h, w, d)
        return self.decoder(emb.permute(0, 3, 1, 2))

    def kl_to_uniform(self, logits: torch.Tensor) -> torch.Tensor:
        """KL(q || uniform) summed over cells and codes, then averaged over the batch (``batchmean``) or summed
        over it (``sum``, MEM's effective reduction)."""
        log_q = logits.float().log_softmax(1)
        kl = (log_q.exp() * (log_q + math.log(self.cfg.num_tokens))).sum()
        return kl if self.cfg.kl_reduction == "sum" else kl / logits.shape[0]

    def forward(self, img: torch.Tensor, tau: float = 1.0, generator: torch.Generator | None = None,
                return_recon: bool = False, return_stats: bool = False):
        """Loss and parts (``recon_mse``, ``kl``) for images ``img``; training samples relaxed codes
        (Gumbel softmax at ``tau``, noise from ``generator``), eval decodes the argmax codes.

        ``return_stats`` appends a dict of detached per-cell statistics for dead-code restarts
        (:mod:`.restart`): ``codes`` (B, h, w) argmax codes, ``features`` (B, hidden, h, w), ``cell_error``
        (B, h, w) the squared reconstruction error summed over each cell's pixels and ``sampled`` (B, code_dim, h, w)
        the decoder's input (the relaxed code mixture in training)."""
        feats = self.features(img)
        logits = self.logit_conv(feats)
        sampled = None
        if self.training:
            soft = gumbel_softmax(logits, tau, dim=1, hard=self.cfg.straight_through, generator=generator)
            sampled = torch.einsum("bnhw,nd->bdhw", soft, self.codebook.weight)
            recon = self.decoder(sampled)
        else:
            recon = self.decode(logits.argmax(1))
        recon_mse = F.mse_loss(recon.float(), img.float())
        kl = self.kl_to_uniform(logits)
        loss = recon_mse + self.cfg.kl_weight * kl
        parts = {"recon_mse": recon_mse.detach(), "kl": kl.detach()}
        out = [loss, parts]
        if return_recon:
            out.append(recon)
        if return_stats:
            err = (recon.detach().float() - img.float()).pow(2).sum(1, keepdim=True)
            cell = F.avg_pool2d(err, self.cfg.downsample)[:, 0] * self.cfg.downsample ** 2
            codes = logits.detach().argmax(1)
            if sampled is None:  # eval: the decoder's input is the codes' embeddings
                sampled = self.codebook(codes).permute(0, 3, 1, 2)
            out.append({"codes": codes, "features": feats.detach(), "cell_error": cell, "sampled": sampled.detach()})
        return tuple(out)

    @torch.no_grad()
    def get_codebook_indices(self, img: torch.Tensor) -> torch.Tensor:
        """The code of every grid cell, (B, h*w) int64 in row-major order: the argmax of the logits (MEM's
        MIM targets), the same in train and eval mode."""
        return self.logits(img).argmax(1).flatten(1)
