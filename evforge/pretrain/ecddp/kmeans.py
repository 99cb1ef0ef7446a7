"""Batched cosine k-means: ECDDP's context mining on the teacher's tokens of the 224 view.

The public code (``batch_cosine_KMeans`` in model/pretrain_model.py of Yan98/Event-Camera-Data-Dense-Pre-training)
normalises the tokens, seeds K centroids with K random tokens per sample, and runs 10 rounds of
"assign by cosine distance, centroid = mean of its tokens" (``torch_scatter.scatter_mean``), K = 8. Here the
mean is a plain ``scatter_reduce_`` (no torch_scatter). Two named differences (``reseed_empty``, ``init``):

* evforge (``reseed_empty=True``): an empty cluster is re-seeded with the worst-fitting token, and the returned
  assignment is the one of the returned centroids.
* public (``reseed_empty=False``): an empty cluster's centroid is the zero vector (cosine 0 to every token, so
  it wins only tokens whose cosine to every other centroid is negative), and ``scatter_mean`` sizes its output
  by the largest cluster index used anywhere in the batch, so clusters above it vanish for the rest of the run;
  the returned assignment is the last round's (made with the centroids *before* the last update).
* seeding: k-means++ (evforge) or K distinct random tokens (``init="random"``, public); ``seeds`` gives the
  seed tokens explicitly (the reference fixtures replay the public code's draws with it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rand(shape, generator, device) -> torch.Tensor:
    # Random numbers come from ``generator`` (a CPU generator keeps runs reproducible on any device).
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _init_random(x: torch.Tensor, k: int, generator) -> torch.Tensor:
    """K distinct random tokens per sample (the public code's seeding)."""
    b, n, d = x.shape
    order = torch.argsort(_rand((b, n), generator, x.device), dim=1)[:, :k]
    return torch.gather(x, 1, order.unsqueeze(-1).expand(-1, -1, d))


def _init_plusplus(x: torch.Tensor, k: int, generator) -> torch.Tensor:
    """Greedy k-means++ with cosine distance 1 - cos: each next seed is the best (lowest total squared distance
    to the nearest seed) of 2 + ln(k) candidates drawn with probability ~ distance^2 (as scikit-learn)."""
    b, n, d = x.shape
    rows = torch.arange(b, device=x.device)
    n_cand = 2 + int(math.log(k))
    first = (_rand((b,), generator, x.device) * n).long().clamp_(max=n - 1)
    cents = [x[rows, first]]
    best = (1.0 - torch.einsum("bnd,bd->bn", x, cents[0])).clamp(min=0)  # distance to the nearest seed so far
    for _ in range(1, k):
        w = best**2
        # A sample whose tokens all coincide with seeds gets uniform weights (duplicates are then harmless).
        w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
        cdf = torch.cumsum(w, 1)
        u = _rand((b, n_cand), generator, x.device) * cdf[:, -1:]
        cand = torch.searchsorted(cdf, u).clamp_(max=n - 1)  # (B, L) token indices
        cx = x[rows[:, None], cand]  # (B, L, D)
        dist = torch.minimum(best[:, None, :], (1.0 - torch.einsum("bnd,bld->bln", x, cx)).clamp(min=0))
        pick = (dist**2).sum(-1).argmin(1)  # (B,) best candidate
        cents.append(cx[rows, pick])
        best = dist[rows, pick]
    return torch.stack(cents, 1)


KMEANS_INITS = ("kmeans++", "random")


@torch.no_grad()
def cosine_kmeans(
    tokens: torch.Tensor,
    k: int = 8,
    iters: int = 10,
    generator: torch.Generator | None = None,
    init: str = "kmeans++",
    reseed_empty: bool = True,
    seeds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster each sample's tokens by direction.

    tokens: (B, N, D). Returns ``assignments`` (B, N) long in [0, k) and ``centroids`` (B, k', D).
    With ``reseed_empty`` (evforge) k' = k, the centroids are unit vectors and ``assignments`` is the nearest (max
    cosine) centroid of each token for them; without (public code) see the module doc. init: ``"kmeans++"`` or
    ``"random"`` (K random tokens, as the public code); ``seeds`` (B, k) token indices overrides it. Needs N >= k.
    """
    if init not in KMEANS_INITS:
        raise ValueError(f"init must be one of {KMEANS_INITS}, not {init!r}")
    b, n, d = tokens.shape
    if n < k:
        raise ValueError(f"need at least k={k} tokens per sample, got {n}")
    with torch.autocast(tokens.device.type, enabled=False):  # cosines in float32 even under mixed precision
        x = F.normalize(tokens.detach().float(), dim=-1)
        if seeds is not None:
            cents = torch.gather(x, 1, seeds.to(x.device, torch.long).unsqueeze(-1).expand(-1, -1, d))
        elif init == "kmeans++":
            cents = _init_plusplus(x, k, generator)
        else:
            cents = _init_random(x, k, generator)
        if not reseed_empty:
            return _lloyd_public(x, cents, iters)
        return _lloyd(x, cents, iters)


def _lloyd_public(x: torch.Tensor, cents: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The public code's rounds (assign by argmin of 1 - cos, then per-cluster means; empty clusters zero,
    clusters above the largest used index dropped), written without torch_scatter."""
    b, n, d = x.shape
    assign = torch.zeros(b, n, dtype=torch.long, device=x.device)
    for _ in range(iters):
        cents = F.normalize(cents, dim=2)
        dis = 1 - torch.einsum("bij,bkj->bik", x, cents)  # the public formula: its ties break the same way
        assign = torch.argmin(dis, dim=2)
        size = int(assign.max()) + 1  # torch_scatter sizes the output by the largest index in the batch
        idx = assign.unsqueeze(-1).expand(-1, -1, d)
        sums = torch.zeros(b, size, d, device=x.device, dtype=x.dtype).scatter_add_(1, idx, x)
        counts = torch.zeros(b, size, d, device=x.device, dtype=x.dtype).scatter_add_(1, idx, torch.ones_like(x))
        cents = sums / counts.clamp(min=1)
    return assign, cents


def _lloyd(x: torch.Tensor, cents: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, d = x.shape
    k = cents.shape[1]
    cents = F.normalize(cents, dim=-1)
    batch = torch.arange(b, device=x.device)

    for _ in range(iters):
        sim = torch.einsum("bnd,bkd->bnk", x, cents)  # cosine similarity (B, N, K)
        best, assign = sim.max(-1)
        # Centroid update: mean of the assigned unit tokens (sum via scatter_reduce_, then / count), renormalised.
        sums = torch.zeros(b, k, d, device=x.device, dtype=x.dtype)
        sums.scatter_reduce_(1, assign.unsqueeze(-1).expand(-1, -1, d), x, reduce="sum", include_self=True)
        counts = torch.zeros(b, k, device=x.device, dtype=x.dtype)
        counts.scatter_reduce_(1, assign, torch.ones_like(best), reduce="sum", include_self=True)
        new = F.normalize(sums / counts.clamp(min=1).unsqueeze(-1), dim=-1)
        # Empty clusters: the e-th empty cluster of a sample takes its e-th worst-fitting token
        # (lowest similarity to its own centroid), so no centroid dies and no two take the same token.
        # (Branch-free, so no device sync.)
        empty = counts == 0
        worst = torch.argsort(best, dim=1)  # (B, N) ascending similarity
        rank = (torch.cumsum(empty.long(), 1) - 1).clamp(min=0, max=n - 1)  # (B, K)
        reseed = x[batch.unsqueeze(1), torch.gather(worst, 1, rank)]  # (B, K, D)
        cents = torch.where(empty.unsqueeze(-1), reseed, new)

    assign = torch.einsum("bnd,bkd->bnk", x, cents).argmax(-1)
    return assign, cents
