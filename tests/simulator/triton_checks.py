"""Checks of the Triton kernels against the CPU path, run by test_triton_kernels.py.

Kept apart from the tests because Triton's interpreter has to be switched on (``TRITON_INTERPRET=1``) before
Triton is first imported: the tests run these functions in a fresh Python with it set (``device="cpu"``),
and in process on a CUDA device (``device="cuda"``, compiled kernels). Each raises AssertionError on a
difference.
"""

from __future__ import annotations

import numpy as np
import torch

from evforge.simulator.engine import BatchEngine
from evforge.simulator.params import get_preset
from evforge.simulator.pixel import EventSimulator, lin_log_torch
from evforge.simulator.resample import rgb_to_gray
from evforge.simulator.scenes import SceneSpec, build_scene, render_frame
from evforge.simulator.upsample import UpsampleConfig


def _frames(batch, n, width=20, height=14, speed=2.5, seed=10):
    out = []
    for s in range(batch):
        scene = build_scene(SceneSpec(width=width, height=height, frames=n, speed_px=speed, seed=seed + s))
        rgb = np.stack([render_frame(scene, i)[0] for i in range(n)])
        out.append(rgb_to_gray(torch.from_numpy(rgb).permute(0, 3, 1, 2).float())[:, 0].round())
    return torch.stack(out, 1)  # (n, batch, H, W)


def check_lin_log(device="cpu"):
    from evforge.simulator import triton_kernels

    rng = np.random.default_rng(0)
    exact = np.concatenate([np.arange(256, dtype=np.float32), np.float32([0.0, 20.0, 19.999998, 20.000002, 65535.0])])
    rand = rng.uniform(0, 300, 3000).astype(np.float32)
    for x, tolerated in ((exact, 0), (rand, 0 if device == "cpu" else 3)):
        got = triton_kernels.lin_log(torch.from_numpy(x).to(device), 20.0).cpu()
        want = lin_log_torch(torch.from_numpy(x))
        differ = got.view(torch.int32) != want.view(torch.int32)
        # CUDA's float64 log may move a value lying within a bit of a rounding boundary by 1e-8
        assert int(differ.sum()) <= tolerated, (x[differ.numpy()][:5], got[differ][:5], want[differ][:5])
        assert float((got - want).abs().max()) <= 1.5e-8


def _run_pair(params, frames, steps, device, intensity=True, new_interval=None):
    """The same steps on the Triton kernels (on ``device``) and the numba kernels: events and every state
    tensor equal. Returns the event count."""
    n, B, H, W = frames.shape
    sims = [EventSimulator(params, list(range(B)), H, W, device=device, kernels="triton"),
            EventSimulator(params, list(range(B)), H, W, kernels="auto")]
    assert sims[0].backend == "triton" and sims[1].backend == "numba"
    for sim in sims:
        for b in range(B):
            sim.reset(b, sims[1].lin_log(frames[0, b]), 0)
    total = 0
    for i, (t, active) in enumerate(steps, start=1):
        log = sims[1].lin_log(frames[i])
        kw = [dict(intensity=frames[i].to(dev) if intensity else None,
                   new_interval=None if new_interval is None else new_interval(i)) for dev in (device, "cpu")]
        got = sims[0].step(log.to(device), t, active, **kw[0])
        want = sims[1].step(log, t, active, **kw[1])
        for f in "bxytp":
            assert torch.equal(getattr(got, f).cpu(), getattr(want, f)), (i, f)
        for name in ("base", "lp", "last_t", "next_shot", "t_prev"):
            assert torch.equal(getattr(sims[0], name).cpu(), getattr(sims[1], name)), (i, name)
        total += len(got)
    return total


def check_ideal(device="cpu"):
    frames = _frames(2, 5)
    steps = [([i * 1000, i * 1000 + 7], [True, i != 2]) for i in range(1, 5)]
    assert _run_pair([get_preset("ideal")] * 2, frames, steps, device) > 100


def check_noisy(device="cpu"):
    """Low-pass, leak with jitter (two steps per interval), shot noise at 400 Hz over 5 ms steps (chains of
    candidates) merged with the crossings through a refractory period; a slot without a refractory period,
    and an idle step."""
    frames = _frames(2, 5, speed=4.0)
    params = [get_preset("noisy", shot_noise_rate_hz=400.0, refractory_period_s=0.002),
              get_preset("noisy", shot_noise_rate_hz=400.0, refractory_period_s=0.0, leak_rate_hz=3.0)]
    steps = [([i * 5000, i * 5000 + 3], [True, i != 3]) for i in range(1, 5)]
    assert _run_pair(params, frames, steps, device, new_interval=lambda i: [i % 2 == 1] * 2) > 300


def check_presets(device="cpu", presets=("clean", "default", "ecddp")):
    frames = _frames(3, 6, width=28, height=20)
    for preset in presets:
        params = [get_preset(preset).resolve(b) for b in range(3)]
        steps = [([i * 2000 + 37 * b for b in range(3)], [True, i % 4 != 0, i % 3 != 0]) for i in range(1, 6)]
        assert _run_pair(params, frames, steps, device, intensity=False) > 50, preset


def check_engine(device="cpu"):
    """A BatchEngine run (lin-log on the backend, upsampled sub-steps) gives the same events."""
    frames = _frames(2, 4, speed=3.0)[:, :, None]  # (n, B, 1, H, W)
    n, B, _, H, W = frames.shape
    params = get_preset("noisy", shot_noise_rate_hz=50.0)
    out = []
    for kernels, dev in (("triton", device), ("auto", "cpu")):
        eng = BatchEngine(B, H, W, dev, UpsampleConfig(max_log_step=0.2), kernels=kernels)
        for b in range(B):
            eng.start(b, frames[0, b].to(dev), 0, params, seed=b)
        evs = [eng.advance(frames[i].to(dev), [i * 20_000] * B, [True] * B) for i in range(1, n)]
        out.append([torch.stack([e.b, e.x, e.y, e.t, e.p.long()]).cpu() for e in evs])
        assert max(eng.substeps) > n
    for a, b in zip(*out):
        assert torch.equal(a, b)


def check_compiles(capabilities=(80, 90)):
    """Every variant of the kernels compiles for CUDA (to PTX and cubin, no GPU needed), with IEEE float32
    division and no fused multiply-adds, which would make the GPU's rounding differ from the CPU's."""
    import itertools

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from evforge.simulator import triton_kernels as tk

    pointers = dict(L1_ptr="*fp32", I1_ptr="*fp32", lp_ptr="*fp32", base_ptr="*fp32",
                    pt_ptr="*fp32", nt_ptr="*fp32", onc_ptr="*fp32", offc_ptr="*fp32", lk_ptr="*fp32",
                    last_ptr="*i64", next_ptr="*i64", step_ptr="*i64", slot_f32_ptr="*fp32", slot_f64_ptr="*fp64",
                    keys_ptr="*i64", table_ptr="*fp32", count_ptr="*i32", incl_ptr="*i64", ev_ptr="*i64",
                    key_ptr="*i64", N="i32", HW="i32", W="i32")
    flags = ("GENERAL", "USE_LOWPASS", "USE_LEAK", "USE_SHOT", "WRITE", "BLOCK")
    signature = {**pointers, **{name: "constexpr" for name in flags}}
    kernels = [(tk._lin_log_kernel, dict(x_ptr="*fp32", out_ptr="*fp32", n="i32", param_ptr="*fp64",
                                         BLOCK="constexpr"), dict(BLOCK=1024)),
               (tk._gather_kernel, dict(ev_ptr="*i64", order_ptr="*i64", b_ptr="*i64", x_ptr="*i64", y_ptr="*i64",
                                        t_ptr="*i64", p_ptr="*i8", n="i32", BLOCK="constexpr"), dict(BLOCK=1024))]
    for lowpass, leak, shot, write in itertools.product((False, True), repeat=4):
        flags = dict(GENERAL=lowpass or leak or shot, USE_LOWPASS=lowpass, USE_LEAK=leak, USE_SHOT=shot, WRITE=write,
                     BLOCK=tk.BLOCK)
        for key_type in ("*i64", "*i32") if write else ("*i64",):  # sort keys narrow when the buckets fit
            kernels.append((tk._step_kernel, {**signature, "key_ptr": key_type}, flags))
    for cap in capabilities:
        for fn, sig, constexprs in kernels:
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                                      target=GPUTarget("cuda", cap, 32), options=dict(tk._OPTS))
            ptx = compiled.asm["ptx"]
            assert "fma.rn.f32" not in ptx and "div.full.f32" not in ptx and "div.approx.f32" not in ptx, (
                fn.__name__, constexprs)
