"""ECDDP heads: DINO projection heads with weight-normed prototypes, and the AttPool token pooler.

Public code (model/network/layers.py): ``DINOHead`` = MLP 768-2048-2048-256 (GELU, trunc-normal 0.02 init)
-> L2 normalise -> weight-normed Linear 256 -> 32768 (no bias, g filled with 1). Three heads per network: the
image head and the context ("cluster") head carry an ``AttPool`` (learnable query, 2 timm-style blocks,
``dim // 32`` = 24 heads, q/k/v without bias, 6x6 bicubic-resized position embedding added to the tokens, final
LayerNorm eps 1e-6); the iBOT patch head is a separate DINOHead applied per token (config
``ibot.separate_head: true``).
Differences: ``norm_last_layer=True`` (default) freezes g at 1 as in DINO; the public (DINOv2-style) head
fills g with 1 but leaves it trainable, which ``norm_last_layer=False`` reproduces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import trunc_normal_
from torch.nn.utils.parametrizations import weight_norm


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class AttPoolBlock(nn.Module):
    """Pre-norm block that updates only the Q query tokens: attention from the queries over
    [queries, tokens] (each query also sees itself, so a query whose context is empty stays defined), then MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim, bias=False)  # public AttentionPool: qkv_bias=False
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        # queries (B, Q, D), tokens (B, N, D); allowed (B, Q, Q + N) bool: which keys each query may attend.
        b, nq, d = queries.shape
        x = self.norm1(torch.cat((queries, tokens), 1))
        h = self.num_heads

        def split(t):  # (B, L, D) -> (B, h, L, D/h)
            return t.view(b, t.shape[1], h, d // h).transpose(1, 2)

        mask = allowed.unsqueeze(1) if allowed is not None else None  # broadcast over heads
        q, k, v = split(self.q(x[:, :nq])), split(self.k(x)), split(self.v(x))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale head_dim ** -0.5
        queries = queries + self.proj(att.transpose(1, 2).reshape(b, nq, d))
        return queries + self.mlp(self.norm2(queries))


class AttPool(nn.Module):
    """Attention pooling of a token grid into Q vectors; with a context mask each query sees only the tokens of
    its context (the others get -inf attention), which is how ECDDP pools a mined context into one vector.

    num_heads defaults to ``dim // 32`` (24 for 768, as the public code); pos_grid is the side of the learned
    position embedding that is bicubic-resized to the token grid (6 in the public code).
    """

    def __init__(
        self, dim: int, num_blocks: int = 2, num_heads: int | None = None, mlp_ratio: float = 4.0, pos_grid: int = 6
    ):
        super().__init__()
        num_heads = num_heads or max(dim // 32, 1)
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, pos_grid, pos_grid))
        self.blocks = nn.ModuleList([AttPoolBlock(dim, num_heads, mlp_ratio) for _ in range(num_blocks)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.apply(_init_linear)
        trunc_normal_(self.query, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)

    def forward(
        self,
        tokens: torch.Tensor,
        hw: tuple[int, int],
        num_queries: int = 1,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, N, D) on an (h, w) grid; mask (B, Q, N) bool (True = token in query q's context) or None
        (all tokens). Returns (B, Q, D)."""
        b, n, d = tokens.shape
        pos = F.interpolate(self.pos_embed, size=tuple(hw), mode="bicubic", align_corners=False)
        tokens = tokens + pos.flatten(2).transpose(1, 2)
        queries = self.query.expand(b, num_queries, d)
        allowed = None
        if mask is not None:
            eye = torch.eye(num_queries, dtype=torch.bool, device=tokens.device).expand(b, -1, -1)
            allowed = torch.cat((eye, mask.bool()), dim=-1)
        for blk in self.blocks:
            queries = blk(queries, tokens, allowed)
        return self.norm(queries)


class DINOHead(nn.Module):
    """MLP -> L2 normalise -> weight-normed prototype layer; optional AttPool in front (``pool=True``).

    ``forward(x)`` maps features (..., in_dim) to prototype logits (..., out_dim) (cosines, since inputs are
    unit vectors and prototype norms g are 1); ``forward_tokens`` pools a token grid first.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int = 2048,
        bottleneck: int = 256,
        out_dim: int = 32768,
        nlayers: int = 3,
        norm_last_layer: bool = True,
        pool: bool = False,
        pool_blocks: int = 2,
        pool_heads: int | None = None,
    ):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden, hidden), nn.GELU()]
            layers.append(nn.Linear(hidden, bottleneck))
            self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_init_linear)
        self.last_layer = weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0  # weight = g * v / |v|, one g per prototype
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)
        self.att = AttPool(in_dim, pool_blocks, pool_heads) if pool else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        return self.last_layer(F.normalize(x, dim=-1, eps=eps))

    def forward_tokens(self, tokens, hw, num_queries: int = 1, mask=None) -> torch.Tensor:
        """Pool (B, N, in_dim) tokens with the AttPool, then project: (B, Q, out_dim)."""
        if self.att is None:
            raise RuntimeError("this DINOHead was built without an AttPool (pool=False)")
        return self.forward(self.att(tokens, hw, num_queries, mask))
