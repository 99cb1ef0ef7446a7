"""Sinkhorn-Knopp teacher targets (SwAV / DINOv2 style), as ECDDP uses for all three of its losses.

Public code: ``sinkhorn_knopp_teacher`` in model/network/loss.py (3 iterations, ``exp(logits / teacher_temp)``,
sums all-reduced across ranks). The result spreads the batch evenly over the prototypes while each row stays a
distribution: rows (samples) sum to 1 exactly, columns (prototypes) to about N/K (exactly at convergence).
Same iterations here, in the log domain, so that low temperatures cannot underflow a row or column to 0/0.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _logsumexp(x: torch.Tensor, dim: int, across_ranks: bool) -> torch.Tensor:
    """logsumexp along ``dim`` (keepdim), summed over all ranks' slices when ``across_ranks``."""
    if not (across_ranks and _dist()):
        return torch.logsumexp(x, dim, keepdim=True)
    m = x.amax(dim, keepdim=True)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m).sum(dim, keepdim=True)
    dist.all_reduce(s)
    return torch.log(s) + m


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, temp: float, iters: int = 3) -> torch.Tensor:
    """Doubly normalise ``exp(scores / temp)``.

    scores: (N, K) teacher logits of this rank's N samples over K prototypes. Returns Q (N, K) float32 with
    ``Q.sum(1) == 1`` and ``Q.sum(0) ~ N_total / K``, N_total counting the samples of all ranks (the
    prototype sums are all-reduced when torch.distributed is initialised). Each iteration first gives every
    prototype the mass 1/K (over all ranks), then every sample the mass 1/N_total; the last step is the
    sample one, so rows are exact and columns converge with the iterations.
    """
    logq = scores.detach().float() / temp
    n_total = torch.tensor([float(logq.shape[0])], device=logq.device)
    if _dist():
        dist.all_reduce(n_total)
    log_n, log_k = math.log(max(float(n_total), 1.0)), math.log(logq.shape[1])
    for _ in range(iters):
        logq = logq - _logsumexp(logq, 0, across_ranks=True) - log_k  # prototype masses -> 1/K
        logq = logq - _logsumexp(logq, 1, across_ranks=False) - log_n  # sample masses -> 1/N_total
    if iters == 0:
        logq = logq - _logsumexp(logq, 1, across_ranks=False) - log_n
    return torch.exp(logq + log_n)  # each row a distribution
