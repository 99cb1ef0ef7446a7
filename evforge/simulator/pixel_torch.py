"""The pixel model's step as torch ops (any device): the reference path, and the one CUDA takes without Triton.

:class:`TorchStep` holds the methods; :class:`~evforge.simulator.pixel.EventSimulator` inherits them and owns the
state they read and write. The numbers in comments are the steps of :mod:`evforge.simulator.pixel`'s docstring;
the fused kernels (:mod:`~evforge.simulator.cpu_step`, :mod:`~evforge.simulator.triton_kernels`) follow the same
float operation order, so every path gives the same events.
"""

from __future__ import annotations

import math

import torch

from . import rng
from .linlog import intensity01
from .params import SHOT_NOISE_INTEN_FACTOR
from .stepevents import StepEvents, stable_argsort
from .stepevents import take as _take


class TorchStep:
    """Shot-noise timing (shared with :meth:`EventSimulator.reset`) and the torch-ops step."""

    def _shot_rates(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate (dark) shot-noise rates per pixel (flat state index), Hz: (ON, ON + OFF), where each
        polarity's is rate/2 * nominal / actual threshold."""
        b = torch.div(flat, self.H * self.W, rounding_mode="floor")
        half = self.shot_half[b]
        r_on = half * self.pos_nominal.view(-1)[b].double() / self.pos_thres.view(-1)[flat].double()
        r_off = half * self.neg_nominal.view(-1)[b].double() / self.neg_thres.view(-1)[flat].double()
        return r_on, r_on + r_off

    def _next_shot_time(self, flat: torch.Tensor, t_from: torch.Tensor, rate: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """Exponential gap after ``t_from`` (us) at the candidate rate, drawn from (pixel, t_from)."""
        hw = self.H * self.W
        b = torch.div(flat, hw, rounding_mode="floor")
        if rate is None:
            rate = self._shot_rates(flat)[1]
        k1, k2 = self._keys_shot[1]
        u = rng.event_uniform(k1[b], k2[b], flat % hw, t_from).double()
        gap = -torch.log(u) / rate * 1e6
        return t_from + torch.clamp(torch.ceil(gap), min=1, max=float(2**61)).long()

    # -- the torch path -----------------------------------------------------------------------------------

    def _draw_leak(self, slots: list[int]) -> None:
        """Leak drift speed (log units per second) for a new source interval, with v2e's per-frame jitter."""
        z = rng.table_normal([self._jitter_key(b) for b in slots], self._pixel_index)
        for i, b in enumerate(slots):
            self.leak_speed[b] = self.leak_k[b] * (1 - self.jitter[b] * z[i])

    def _step_torch(self, slots, L1, I1, t1) -> StepEvents:
        all_slots = len(slots) == self.B
        sel = None if all_slots else torch.tensor(slots, device=self.device)
        pick = (lambda x: x) if all_slots else (lambda x: x.index_select(0, sel))  # noqa: E731

        # 2.-5. (and 8. when nothing can be dropped) for the signal events; lp and base are stored
        update_base = not self.any_refractory
        cols, ev_gflat = self._signal_torch(slots, sel, pick, L1, I1, t1, update_base)
        n_signal = cols[0].numel()

        # 6. shot noise (sparse: only pixels whose next candidate falls in this step)
        n_shot = 0
        if self.any_shot:
            shot = self._shot_events(slots, pick, t1, I1)
            n_shot = shot[0].numel()
            if n_shot:
                cols = [torch.cat([a, b]) for a, b in zip(cols, shot)]

        # 7. refractory period: drop (defer) events too close to the pixel's previous one, then
        # 8. memorise what was emitted: base += n_on * pos_thres - n_off * neg_thres (signal events only)
        if self.any_refractory and cols[0].numel():
            keep = self._refractory(slots, *cols[:4])
            emitted = keep[:n_signal]
            on = cols[4][:n_signal] > 0
            n_on = torch.zeros(self.base.numel(), dtype=torch.float32, device=self.device)
            n_off = torch.zeros_like(n_on)
            n_on.index_add_(0, ev_gflat, (emitted & on).float())
            n_off.index_add_(0, ev_gflat, (emitted & ~on).float())
            self.base.add_(n_on.view_as(self.base) * self.pos_thres)
            self.base.sub_(n_off.view_as(self.base) * self.neg_thres)
            idx = torch.nonzero(keep).squeeze(1)
            cols = [_take(c, idx) for c in cols]
        self._store(slots, sel, t_prev=t1)

        ev_sb, y, x, t_ev, p_ev = cols
        slot_ids = ev_sb if all_slots else _take(sel, ev_sb)
        events = StepEvents(slot_ids, x, y, t_ev, p_ev)
        if not n_shot or not len(events):
            return events.sorted()  # generation order is pixel order already
        # noise events were appended: sort by (slot, t, pixel), stably (a crossing before noise at equal times)
        t_rel = t_ev - t_ev.min()
        key = (ev_sb * (int(t_rel.max()) + 1) + t_rel) * (self.H * self.W) + y * self.W + x
        order = stable_argsort(key)
        return StepEvents(*(getattr(events, f).index_select(0, order) for f in "bxytp"))

    def _signal_torch(self, slots, sel, pick, L1, I1, t1, update_base):
        """Steps 2-5 (+8) as torch ops (any device): the signal events as (slot among the selected, y, x, t,
        p) and each event's index into the full state; stores lp and base."""
        base0, lp0 = pick(self.base), pick(self.lp)
        pos_thr, neg_thr = pick(self.pos_thres), pick(self.neg_thres)
        t0 = pick(self.t_prev)
        dt_us = t1 - t0
        dt = (dt_us.double() * 1e-6).float().view(-1, 1, 1)

        # 2. intensity-dependent first-order low-pass (v2e's form)
        lp1 = L1
        if self.any_lowpass:
            cutoff = pick(self.cutoff)
            eps = torch.clamp(intensity01(I1) * dt * (2 * math.pi) * cutoff, max=1.0)
            lp1 = torch.where(cutoff > 0, (1 - eps) * lp0 + eps * L1, L1)

        # 3. leak: base drifts linearly down over the step
        base1 = base0 - dt * pick(self.leak_speed) if self.any_leak else base0
        diff1 = lp1 - base1

        # 4. counts as v2e (floor of |diff| / threshold), computed only where a threshold may be crossed
        maybe = (diff1 >= pick(self.on_candidate)) | (diff1 <= pick(self.off_candidate))
        sb, y, x = torch.nonzero(maybe).unbind(1)  # slot among the selected, row, column (no divisions)
        flat = (sb * self.H + y) * self.W + x
        d1 = _take(diff1, flat)
        is_on_px = d1 > 0
        thr_px = torch.where(is_on_px, _take(pos_thr, flat), _take(neg_thr, flat))
        cnt = torch.div(d1.abs(), thr_px, rounding_mode="floor").to(torch.int64)
        hit = torch.nonzero(cnt > 0).squeeze(1)
        flat, sb, y, x, cnt, d1, is_on_px, thr_px = (_take(v, hit) for v in (flat, sb, y, x, cnt, d1, is_on_px,
                                                                             thr_px))
        d0 = _take(lp0, flat) - _take(base0, flat)

        # 5. per-pixel interpolated timestamps: diff(t) is linear, the k-th level is crossed at t_k
        owner = torch.repeat_interleave(torch.arange(flat.numel(), device=flat.device), cnt)
        start = torch.cumsum(cnt, 0) - cnt
        k = (torch.arange(owner.numel(), device=flat.device) - _take(start, owner) + 1).float()
        sign = _take(torch.where(is_on_px, 1.0, -1.0), owner)
        level = sign * k * _take(thr_px, owner)
        e0, e1 = _take(d0, owner), _take(d1, owner)
        crossed = sign * e0 >= sign * level
        frac = torch.where(crossed, torch.zeros_like(e0), (level - e0) / (e1 - e0)).clamp(0.0, 1.0)
        ev_sb = _take(sb, owner)
        t_ev = _take(t0, ev_sb) + torch.round(frac.double() * _take(dt_us, ev_sb).double()).long()
        p_ev = _take(torch.where(is_on_px, 1, -1).to(torch.int8), owner)
        ev_y, ev_x = _take(y, owner), _take(x, owner)
        hw = self.H * self.W
        gslot = ev_sb if sel is None else _take(sel, ev_sb)
        ev_gflat = gslot * hw + ev_y * self.W + ev_x

        # 8. without a refractory period every event is emitted: base += n_on * pos_thres - n_off * neg_thres
        if update_base:
            # in place when base1 is the state itself (no leak, all slots): d0 was read above
            base_flat = base1.reshape(-1)
            old = _take(base_flat, flat)
            base_flat.index_copy_(0, flat, torch.where(is_on_px, old + cnt * thr_px, old - cnt * thr_px))
            base1 = base_flat.view_as(base0)
        self._store(slots, sel, base=base1, lp=lp1)
        return [ev_sb, ev_y, ev_x, t_ev, p_ev], ev_gflat

    def _shot_events(self, slots, pick, t1, I1):
        """Shot-noise events of this step for the selected slots: (slot among them, y, x, t, p).

        Each due pixel's candidate at ``t_c`` draws one uniform u: kept if u < f(I), ON if u < f(I) p_on
        (so kept candidates are ON with probability p_on); then the next candidate after an exponential gap.
        """
        hw = self.H * self.W
        slot_t = torch.tensor(slots, device=self.device)
        nxt = pick(self.next_shot)
        due = torch.nonzero(nxt <= t1.view(-1, 1, 1))
        k1, k2 = self._keys_shot[0]
        out = []
        while due.numel():
            sb, y, x = due.unbind(1)
            pix = y * self.W + x
            flat = sb * hw + pix  # among the selected slots
            gb = _take(slot_t, sb)
            gflat = gb * hw + pix  # in the full state
            t_c = _take(nxt, flat)
            u = rng.event_uniform(_take(k1, gb), _take(k2, gb), pix, t_c)
            f = (SHOT_NOISE_INTEN_FACTOR - 1) * intensity01(_take(I1, flat)) + 1
            r_on, rate = self._shot_rates(gflat)
            a = torch.nonzero(u < f).squeeze(1)
            on = u.double() < f.double() * (r_on / rate)
            out.append([_take(v, a) for v in (sb, y, x, t_c)]
                       + [_take(torch.where(on, 1, -1).to(torch.int8), a)])
            new_t = self._next_shot_time(gflat, t_c, rate)
            nxt.view(-1).index_copy_(0, flat, new_t)
            if nxt.data_ptr() != self.next_shot.data_ptr():
                self.next_shot.view(-1).index_copy_(0, gflat, new_t)
            again = torch.nonzero(new_t <= _take(t1, sb)).squeeze(1)
            due = due.index_select(0, again)
        if not out:
            e = torch.zeros(0, dtype=torch.int64, device=self.device)
            return [e, e, e, e, e.to(torch.int8)]
        return [torch.cat(c) for c in zip(*out)]

    def _refractory(self, slots, sb, y, x, t_ev) -> torch.Tensor:
        """Greedy per-pixel refractory filter: which candidate events are emitted (bool per candidate).

        Slots without a refractory period emit everything. For the others, in rounds: each round emits, for
        every pixel, its earliest remaining candidate later than ``last + refractory`` and moves ``last``
        there. A candidate that fails the test now can never pass later (``last`` only grows), so it is
        dropped; the loop runs as many rounds as the most events any pixel emits in this step (one, when the
        refractory period is longer than the step). Candidates are taken in (pixel, t) order, ties in the
        order given (signal before noise).
        """
        hw = self.H * self.W
        sel = torch.tensor(slots, device=sb.device)
        gslot = _take(sel, sb)
        gpix = gslot * hw + y * self.W + x  # index into the full state
        filtered = _take(self.refractory_us, gslot) > 0
        keep = ~filtered
        cand = torch.nonzero(filtered).squeeze(1)
        if not cand.numel():
            return keep
        t_min = t_ev.min()
        cand = _take(cand, stable_argsort(_take(gpix, cand) * (int(t_ev.max() - t_min) + 1)
                                          + (_take(t_ev, cand) - t_min)))  # by (pixel, t)
        last_flat = self.last_t.view(-1)
        while cand.numel():
            gp, tt = _take(gpix, cand), _take(t_ev, cand)
            ref = _take(self.refractory_us, torch.div(gp, hw, rounding_mode="floor"))
            ok = torch.nonzero((tt - _take(last_flat, gp)).double() > ref).squeeze(1)
            cand, gp, tt = _take(cand, ok), _take(gp, ok), _take(tt, ok)
            first = torch.ones_like(gp, dtype=torch.bool)
            first[1:] = gp[1:] != gp[:-1]
            emit = torch.nonzero(first).squeeze(1)
            keep[_take(cand, emit)] = True
            last_flat.index_copy_(0, _take(gp, emit), _take(tt, emit))
            cand = _take(cand, torch.nonzero(~first).squeeze(1))
        return keep

    def _store(self, slots, sel, **state) -> None:
        """Write the new state of the selected slots into the state tensors (copying, never aliasing inputs)."""
        for name, value in state.items():
            target = getattr(self, name)
            if sel is None:
                if value.data_ptr() != target.data_ptr():
                    target.copy_(value)
            else:
                target.index_copy_(0, sel, value)
