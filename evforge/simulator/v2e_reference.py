"""A straightforward per-frame implementation of v2e's ``EventEmulator.generate_events``.

One sequence at a time, a Python loop over "iterations" per frame, and all events of iteration ``i`` stamped
at the shared time ``t_prev + (i + 1) dt / n_iters`` (v2e's "pillars"). It exists as the oracle for the
ideal-mode event counts of :class:`~evforge.simulator.pixel.EventSimulator` and as the baseline that
``bench/simulator.py`` compares against; it is not used to make data.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .params import DVSParams
from .pixel import SHOT_NOISE_INTEN_FACTOR, intensity01
from .pixel import lin_log_torch as lin_log  # v2e's own formula (evforge's CPU lin_log is faster, same values)


class V2EReference:
    """v2e's pixel model, frame by frame, on one sequence (t in seconds, frames as float intensities)."""

    def __init__(self, params: DVSParams, seed: int = 0, device="cpu"):
        self.p = params
        self.device = torch.device(device)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.base = None

    def _randn(self, shape):
        return torch.randn(shape, generator=self.gen, device=self.device)

    def _init(self, frame: torch.Tensor, t: float) -> None:
        p = self.p
        self.base = lin_log(frame)
        self.lp = self.base.clone()
        self.pos_thres = torch.full_like(frame, p.pos_thres)
        self.neg_thres = torch.full_like(frame, p.neg_thres)
        if p.sigma_thres > 0:
            self.pos_thres = (p.pos_thres + p.sigma_thres * self._randn(frame.shape)).clamp_min(0.01)
            self.neg_thres = (p.neg_thres + p.sigma_thres * self._randn(frame.shape)).clamp_min(0.01)
        self.noise_rate = torch.exp(math.log(10) * p.noise_rate_cov_decades * self._randn(frame.shape))
        self.t_mem = torch.full_like(frame, -p.refractory_period_s)
        self.t_prev = t

    def generate_events(self, frame, t: float) -> np.ndarray:
        """Events (N, 4) float64 rows ``[t_s, x, y, p(+1/-1)]`` for the frame at time ``t`` seconds."""
        frame = torch.as_tensor(frame, dtype=torch.float32, device=self.device)
        if self.base is None:
            self._init(frame, t)
            return np.zeros((0, 4))
        p = self.p
        dt = t - self.t_prev
        if dt <= 0:
            raise ValueError(f"frame time {t} must be later than {self.t_prev}")
        log_new = lin_log(frame)
        inten01 = intensity01(frame)
        if p.cutoff_hz > 0:
            eps = torch.clamp(inten01 * dt * 2 * math.pi * p.cutoff_hz, max=1.0)
            self.lp = (1 - eps) * self.lp + eps * log_new
        else:
            self.lp = log_new
        if p.leak_rate_hz > 0:
            rate = p.leak_rate_hz * self.noise_rate * (1 - p.leak_jitter_fraction * self._randn(frame.shape))
            self.base = self.base - dt * rate * self.pos_thres
        diff = self.lp - self.base
        n_pos = torch.div(torch.relu(diff), self.pos_thres, rounding_mode="floor").to(torch.int32)
        n_neg = torch.div(torch.relu(-diff), self.neg_thres, rounding_mode="floor").to(torch.int32)
        n_iters = max(int(n_pos.max()), int(n_neg.max()), 1 if float(p.shot_noise_rate_hz) > 0 else 0)
        final_pos = torch.zeros_like(n_pos)
        final_neg = torch.zeros_like(n_neg)
        events = []
        if n_iters:
            ts = self.t_prev + dt * np.arange(1, n_iters + 1) / n_iters
            if float(p.shot_noise_rate_hz) > 0:
                factor = ((float(p.shot_noise_rate_hz) / 2) * dt / n_iters
                          * ((SHOT_NOISE_INTEN_FACTOR - 1) * inten01 + 1))
                on_prob = factor * (p.pos_thres / self.pos_thres)
                off_prob = factor * (p.neg_thres / self.neg_thres)
            for i in range(n_iters):
                pos = n_pos >= i + 1
                neg = n_neg >= i + 1
                if float(p.shot_noise_rate_hz) > 0:
                    u = torch.rand(frame.shape, generator=self.gen, device=self.device)
                    pos = pos | (u < on_prob)
                    neg = neg | (u > 1 - off_prob)
                if p.refractory_period_s > 0:
                    ok = (ts[i] - self.t_mem) > p.refractory_period_s
                    pos, neg = pos & ok, neg & ok
                    self.t_mem = torch.where(pos | neg, torch.full_like(self.t_mem, ts[i]), self.t_mem)
                final_pos += pos
                final_neg += neg
                for mask, pol in ((pos, 1.0), (neg, -1.0)):
                    yx = torch.nonzero(mask).cpu().numpy()
                    if len(yx):
                        rows = np.empty((len(yx), 4))
                        rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3] = ts[i], yx[:, 1], yx[:, 0], pol
                        events.append(rows)
        self.base = self.base + final_pos * self.pos_thres
        self.base = self.base - final_neg * self.neg_thres
        self.t_prev = t
        return np.concatenate(events) if events else np.zeros((0, 4))
