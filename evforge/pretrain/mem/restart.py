"""Dead-code restarts for MEM's tokenizer: every code the encoder stopped choosing is split off a used one.

Why: the DALL-E-style dVAE picks a cell's code as the argmax of a 1x1 conv over the encoder's hidden features.
On event images most cells are empty (identical features), and early in training a handful of codes win
everywhere; the others never win an argmax again, so the MIM targets use a few percent of the vocabulary and
the majority code is a large share of them (``mem_dvae_tiny``: 6-14 of 64 codes on the whole validation split).
MEM does nothing against it (KL weight 1e-10, ``vae_kl_loss_weight``); ``task.code_restart`` is evforge's
counter-measure (off in the reference recipe).

How (every ``every_n_steps`` optimizer steps, until ``until_step``): a code is dead when no training cell chose
it since the last check (counts summed over ranks). Each dead code ``k`` is restarted from an encoder output:
a training cell ``c`` of the last micro-batch, drawn with probability proportional to its squared
reconstruction error (empty, well reconstructed cells are never drawn), whose current code is ``a``. With
``h_c`` its hidden feature and ``m`` the mean feature of the batch cells coded ``a`` (of all cells when ``c``
is the only one), ``v = (h_c - m) / |h_c - m|``:

* logit weights ``W_k = W_a + s v`` and bias ``b_k = b_a - s v . m`` with ``s = margin / |h_c - m|``: ``k`` beats
  ``a`` exactly where ``v . (h - m) > 0``, i.e. it takes the part of ``a``'s cells on ``c``'s side of their mean,
  by ``margin`` (2 logits) at ``c`` itself, enough for the relaxed (Gumbel) assignments of the two codes to
  differ (a tiny split is wiped out by the next Adam steps);
* codebook vector ``e_k``: the mean decoder input of the batch cells ``k`` takes (``embedding: cells``, the
  relaxed code mixtures training decoded them from), or a copy of ``e_a`` (``embedding: source``: the argmax
  decoding is then unchanged at the restart).

Several dead codes split off the same ``a`` (different cells) share its cells by direction. The gradient of the
code-logit layer itself is what concentrates the assignments again (with that layer frozen, restarted codes
survive), so ``logit_lr_scale`` (0.1 in evforge's configs) slows it down relative to the rest of the network.
Measured on ``mem_dvae_tiny`` (40 steps, whole val split, seeds 0-5): 6-14 codes used without restarts, 29-41
with them, the reconstruction error no worse on average. Cells are drawn with a generator seeded by (seed, step),
counts are checkpointed with the task (exact resume), and with several processes rank 0 edits the three tensors
and broadcasts them, so replicas stay identical.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ...trainer.sampler import mix_seed

__all__ = ["CodeRestartConfig", "CodeRestarter"]


@dataclass
class CodeRestartConfig:
    """``task.code_restart`` options (off by default and in the reference recipe)."""

    enabled: bool = False
    every_n_steps: int = 10       # check (and restart) every N optimizer steps
    until_step: int | None = None  # no restarts after this step (null: the whole run)
    margin: float = 2.0           # logit margin of the new code over its source at the drawn cell
    max_per_check: int | None = None  # at most this many codes restarted per check (null: every dead one)
    embedding: str = "cells"      # the new code's vector: cells (its cells' mean decoder input) | source (a copy)
    logit_lr_scale: float = 1.0   # lr of the code-logit layer relative to the rest (the task's param groups);
    #                               applies with enabled false too (a knob of its own)

    @classmethod
    def from_dict(cls, d: dict | None) -> "CodeRestartConfig":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"task.code_restart: unknown options {sorted(unknown)} "
                             f"(known: {sorted(cls.__dataclass_fields__)})")
        cfg = cls(**d)
        if cfg.every_n_steps < 1 or cfg.margin <= 0 or cfg.logit_lr_scale < 0 or cfg.embedding not in ("cells",
                                                                                                         "source"):
            raise ValueError(f"task.code_restart: every_n_steps >= 1, margin > 0, logit_lr_scale >= 0 and embedding "
                             f"cells|source needed, got {asdict(cfg)}")
        return cfg


def _dist():
    d = torch.distributed
    return d if d.is_available() and d.is_initialized() and d.get_world_size() > 1 else None


class CodeRestarter:
    """Counts code usage over training steps and restarts dead codes (see the module docstring)."""

    def __init__(self, cfg: CodeRestartConfig, num_tokens: int, seed: int = 0):
        self.cfg, self.num_tokens, self.seed = cfg, int(num_tokens), int(seed)
        self.counts = torch.zeros(self.num_tokens, dtype=torch.float64)
        self._step_counts = torch.zeros(self.num_tokens, dtype=torch.float64)
        self._last: dict | None = None
        self.restarted = 0  # codes restarted at the last check

    def wants_stats(self, step: int) -> bool:
        """Whether the step about to run (``step`` steps done) must keep its cell statistics: restarts run
        after steps ``every_n_steps, 2 * every_n_steps, ...``."""
        nxt = step + 1
        return self.cfg.enabled and nxt % self.cfg.every_n_steps == 0 and (
            self.cfg.until_step is None or nxt <= self.cfg.until_step)

    def observe(self, stats: dict, keep: bool) -> None:
        """Add a micro-batch's argmax codes to this step's counts; ``keep`` its cells for a restart."""
        codes = stats["codes"].reshape(-1)
        self._step_counts += torch.bincount(codes.cpu(), minlength=self.num_tokens).double()
        if keep:
            C, D = stats["features"].shape[1], stats["sampled"].shape[1]
            self._last = {"codes": codes, "features": stats["features"].permute(0, 2, 3, 1).reshape(-1, C),
                          "sampled": stats["sampled"].permute(0, 2, 3, 1).reshape(-1, D),
                          "error": stats["cell_error"].reshape(-1)}

    @torch.no_grad()
    def after_step(self, model, step: int) -> int:
        """Fold this step's counts in (summed over ranks); after every ``every_n_steps``-th step restart the
        dead codes of ``model`` (a :class:`~.dvae.DiscreteVAE`). Returns how many were restarted."""
        dist = _dist()
        counts = self._step_counts
        if dist is not None:
            dev = model.codebook.weight.device
            counts = counts.to(dev)
            dist.all_reduce(counts)
            counts = counts.cpu()
        self.counts += counts
        self._step_counts = torch.zeros_like(self._step_counts)
        self.restarted = 0
        if not self.cfg.enabled or step % self.cfg.every_n_steps or (
                self.cfg.until_step is not None and step > self.cfg.until_step):
            return 0
        dead = (self.counts == 0).nonzero()[:, 0]
        if dist is None or dist.get_rank() == 0:
            self.restarted = self._restart(model, dead, step)
        if dist is not None:
            for p in (model.codebook.weight, model.logit_conv.weight, model.logit_conv.bias):
                dist.broadcast(p.data, src=0)
            n = torch.tensor([float(self.restarted)], device=model.codebook.weight.device)
            dist.broadcast(n, src=0)
            self.restarted = int(n.item())
        self.counts.zero_()
        self._last = None
        return self.restarted

    def _restart(self, model, dead: torch.Tensor, step: int) -> int:
        last = self._last
        if last is None or not len(dead):
            return 0
        err = last["error"].double().clamp(min=0)
        if float(err.sum()) <= 0:
            return 0
        g = torch.Generator().manual_seed(mix_seed(self.seed, 0xC0DE, step))
        n = min(len(dead), int((err > 0).sum()), self.cfg.max_per_check or len(dead))
        order = dead[torch.randperm(len(dead), generator=g)[:n]]
        cells = torch.multinomial(err.cpu(), n, replacement=False, generator=g).to(last["codes"].device)
        feats, codes = last["features"].float(), last["codes"]
        conv, book = model.logit_conv, model.codebook.weight
        w = conv.weight.data.view(conv.weight.shape[0], -1)  # (num_tokens, hidden)
        everyone = feats.mean(0)
        done = 0
        for k, c in zip(order.tolist(), cells.tolist()):
            a = int(codes[c])
            mine = codes == a
            m = feats[mine].mean(0) if int(mine.sum()) > 1 else everyone
            v = feats[c] - m
            if float(v.norm()) == 0:  # c is its code's only cell: split along c's offset from all cells
                m = everyone
                v = feats[c] - m
            if float(v.norm()) == 0:
                continue
            scale = self.cfg.margin / float(v.norm())  # k beats a by `margin` at c
            v = v / v.norm()
            w[k] = w[a] + scale * v
            conv.bias.data[k] = conv.bias.data[a] - scale * float(v @ m)
            if self.cfg.embedding == "source":
                book.data[k] = book.data[a]
            else:  # the mean decoder input of the cells k takes (what training decoded them from)
                side = mine & ((feats - m) @ v > 0)
                book.data[k] = last["sampled"][side].float().mean(0).to(book.dtype) if side.any() else book.data[a]
            done += 1
        return done

    def state_dict(self) -> dict:
        return {"counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        if "counts" in state:
            self.counts = state["counts"].to(torch.float64).clone()
