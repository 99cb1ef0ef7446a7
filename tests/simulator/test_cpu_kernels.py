"""The fused CPU kernels give exactly what the torch formulas give: lin-log, floor division, whole steps."""

import os

import numpy as np
import pytest
import torch

from evforge.simulator import cpu_kernels, cpu_step
from evforge.simulator.params import get_preset
from evforge.simulator.pixel import EventSimulator, StepEvents, lin_log, lin_log_torch, stable_argsort
from evforge.simulator.resample import rgb_to_gray
from evforge.simulator.scenes import SceneSpec, build_scene, render_frame

pytestmark = pytest.mark.skipif(not cpu_kernels.AVAILABLE, reason="numba kernels not available")


def _same_bits(x: np.ndarray) -> None:
    fast = lin_log(torch.from_numpy(x))
    ref = lin_log_torch(torch.from_numpy(x))
    bad = np.flatnonzero(fast.view(torch.int32).numpy() != ref.view(torch.int32).numpy())
    assert bad.size == 0, f"{bad.size} values differ, e.g. x={x[bad[:3]]}: {fast[bad[:3]]} != {ref[bad[:3]]}"


def _near_rounding_boundary(n: int, seed: int) -> np.ndarray:
    """float32 values whose ln(x) * 1e8 lies within 2e-5 of k + 1/2: where the kernel redoes the value."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(20, 70000, 10_000_000).astype(np.float32)
    u = np.log(x.astype(np.float64)) * 1e8
    return x[np.abs(u - np.floor(u) - 0.5) < 2e-5][:n]


def test_lin_log_equals_the_torch_formula_bit_for_bit():
    rng = np.random.default_rng(0)
    thr = np.float32(20.0)
    near = np.concatenate([np.nextafter(np.full(64, v, np.float32), np.float32(d)) for v in (20.0, 255.0, 1.0)
                           for d in (0.0, 1e9)])
    boundary = _near_rounding_boundary(200, seed=1)
    assert boundary.size > 100
    specials = np.array([0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFA00000, 0x00000001, 0x80000001,
                         0x7F7FFFFF, 0xFF7FFFFF], np.uint32).view(np.float32)  # inf, NaNs, denormals, max
    x = np.concatenate([
        np.arange(256, dtype=np.float32),  # every 8-bit value
        np.float32([0.0, thr, np.nextafter(thr, 0), np.nextafter(thr, 1e9), 1e-30, 65535.0, 70000.0, -5.0]),
        near,
        boundary,
        specials,
        rng.uniform(0, 300, 200_000).astype(np.float32),
        rng.uniform(0, 70000, 100_000).astype(np.float32),
        rng.uniform(-1e38, 1e38, 10_000).astype(np.float32),
        # a dense run of consecutive float32 values around a point, where rounding to 1e-8 is decided
        (np.float32(100.0).view(np.uint32) + np.arange(-50_000, 50_000, dtype=np.int64)).astype(np.uint32)
        .view(np.float32),
    ])
    _same_bits(x)
    as_u8 = torch.arange(256, dtype=torch.uint8).view(16, 16)
    assert torch.equal(lin_log(as_u8), lin_log_torch(as_u8))
    assert lin_log(torch.from_numpy(x[:10].reshape(2, 5))).shape == (2, 5)
    assert lin_log(torch.zeros(0)).shape == (0,)


def test_lin_log_does_not_depend_on_the_thread_count():
    x = np.random.default_rng(2).uniform(0, 300, 3 * cpu_kernels._MIN_PIXELS_PER_CHUNK + 17).astype(np.float32)
    x[::1000] = _near_rounding_boundary(x[::1000].size, seed=3)
    outs = []
    for threads in (1, 2, 3):
        out = np.empty_like(x)
        cpu_kernels._launch_parallel(cpu_kernels._lin_log, (x, x.view(np.int32), out, out.view(np.int32), 20.0,
                                                            np.log(20.0) / 20.0), threads)
        outs.append(out)
    ref = lin_log_torch(torch.from_numpy(x)).numpy()
    for out in outs:
        assert np.array_equal(out.view(np.int32), ref.view(np.int32))


@pytest.mark.slow
def test_lin_log_equals_the_torch_formula_for_every_non_negative_float32():
    """All 2**31 - 2**23 finite non-negative float32 values, +inf and a signalling NaN (about a minute)."""
    chunk = 1 << 24
    for start in range(0, 0x7F800002, chunk):
        bits = np.arange(start, min(start + chunk, 0x7F800002), dtype=np.int64).astype(np.int32)
        _same_bits(bits.view(np.float32))


def test_floor_div_equals_torch_floor_division():
    rng = np.random.default_rng(1)
    b = rng.uniform(0.01, 0.8, 50_000).astype(np.float32)
    n = rng.integers(0, 40, 50_000).astype(np.float32)
    exact = (n * b).astype(np.float32)  # near-multiples: the hard cases
    a = np.concatenate([exact, np.nextafter(exact, np.float32(0)), np.nextafter(exact, np.float32(1e9)),
                        rng.uniform(0, 10, 50_000).astype(np.float32)])
    b = np.concatenate([b, b, b, b[:50_000]])
    want = torch.div(torch.from_numpy(a), torch.from_numpy(b), rounding_mode="floor").numpy()
    got = np.array([cpu_step._floor_div(x, y) for x, y in zip(a[:20_000], b[:20_000])], np.float32)
    assert np.array_equal(got, want[:20_000])
    got_vec = _floor_div_many(a, b)
    assert np.array_equal(got_vec, want)


def _floor_div_many(a, b):
    from numba import njit

    @njit
    def run(a, b, out):
        for i in range(a.size):
            out[i] = cpu_step._floor_div(a[i], b[i])

    out = np.empty_like(a)
    run(a, b, out)
    return out


def _frames(batch, n, width=72, height=54, speed=1.5):
    out = []
    for s in range(batch):
        scene = build_scene(SceneSpec(width=width, height=height, frames=n, speed_px=speed, seed=10 + s))
        rgb = np.stack([render_frame(scene, i)[0] for i in range(n)])
        out.append(rgb_to_gray(torch.from_numpy(rgb).permute(0, 3, 1, 2).float())[:, 0])
    return torch.stack(out, 1)  # (n, batch, H, W)


@pytest.mark.parametrize("preset", ["ideal", "clean", "default", "noisy", "ecddp"])
def test_fused_step_equals_torch_step(preset):
    """Events and every state tensor bit for bit, with some slots idle on some steps and several steps per
    source interval, so slot selection, leak jitter and the refractory path are all exercised."""
    B, n = 3, 18
    frames = _frames(B, n)
    params = get_preset(preset, shot_noise_rate_hz=20.0) if preset == "noisy" else get_preset(preset)
    H, W = frames.shape[-2:]
    sims = [EventSimulator([params.resolve(b) for b in range(B)], list(range(B)), H, W, kernels=k)
            for k in ("auto", "torch")]
    assert sims[0].fused and not sims[1].fused
    for sim in sims:
        for b in range(B):
            sim.reset(b, lin_log(frames[0, b]), 0)
    total = 0
    for i in range(1, n):
        log = lin_log(frames[i])
        active = [True, i % 4 != 0, i % 3 != 0]
        t = [i * 2000 + 37 * b for b in range(B)]
        fused, ref = (sim.step(log, t, active, new_interval=[i % 2 == 1] * B) for sim in sims)
        for f in "bxytp":
            assert torch.equal(getattr(fused, f), getattr(ref, f)), (i, f)
        for name in ("base", "lp", "last_t", "next_shot", "t_prev"):
            assert torch.equal(getattr(sims[0], name), getattr(sims[1], name)), (i, name)
        total += len(fused)
    assert total > 1000


def test_fused_step_sorts_long_steps_too():
    """A 10 s step has more time buckets than events: the kernel falls back from counting sort."""
    frames = _frames(2, 3)
    H, W = frames.shape[-2:]
    sims = [EventSimulator([get_preset("ideal")] * 2, [0, 1], H, W, kernels=k) for k in ("auto", "torch")]
    for sim in sims:
        for b in range(2):
            sim.reset(b, lin_log(frames[0, b]), 0)
    for i in (1, 2):
        fused, ref = (sim.step(lin_log(frames[i]), [i * 10_000_000, i * 10_000_000 + 5]) for sim in sims)
        assert len(fused) > 100
        for f in "bxytp":
            assert torch.equal(getattr(fused, f), getattr(ref, f)), f


def test_fused_step_with_more_events_than_pixels():
    """A flash (dark to bright): a dozen events per pixel, more than the workspace's event rows."""
    H, W = 24, 32
    dark, bright = torch.full((1, H, W), 10.0), torch.full((1, H, W), 250.0)
    bright[0, :, ::2] = 200.0
    sims = [EventSimulator([get_preset("ideal")], [0], H, W, kernels=k) for k in ("auto", "torch")]
    for sim in sims:
        sim.reset(0, lin_log(dark[0]), 0)
    fused, ref = (sim.step(lin_log(bright), [1000]) for sim in sims)
    assert len(fused) > 10 * H * W
    for f in "bxytp":
        assert torch.equal(getattr(fused, f), getattr(ref, f)), f
    assert torch.equal(sims[0].base, sims[1].base)


def test_sort_events_is_a_stable_sort_by_slot_and_time():
    rng = np.random.default_rng(2)
    for n, span in ((5000, 200), (3000, 10**9)):  # counting sort, then the merge-sort fallback
        b = torch.from_numpy(rng.integers(0, 4, n))
        t = torch.from_numpy(rng.integers(0, span, n) + 10**6)
        x = torch.arange(n, dtype=torch.int64)  # generation order, to check stability
        ev = StepEvents(b, x, x.flip(0), t, torch.from_numpy(rng.choice([-1, 1], n).astype(np.int8)))
        got = ev.sorted()
        order = stable_argsort(b * (int(t.max() - t.min()) + 1) + (t - t.min()))
        for f in "bxytp":
            assert torch.equal(getattr(got, f), getattr(ev, f)[order]), f
        key = got.b * 10**10 + got.t
        assert bool((key[1:] >= key[:-1]).all())
        ties = (got.b[1:] == got.b[:-1]) & (got.t[1:] == got.t[:-1])
        assert bool((got.x[1:][ties] > got.x[:-1][ties]).all())


def test_kernels_option():
    with pytest.raises(ValueError, match="kernels"):
        EventSimulator([get_preset("ideal")], [0], 4, 4, kernels="fast")


def test_to_host_gives_the_columns():
    ev = StepEvents(torch.tensor([0, 0, 1]), torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8]),
                    torch.tensor([10, 11, 12]), torch.tensor([1, -1, 1], dtype=torch.int8))
    b, x, y, t, p = ev.to_host()
    assert [b.tolist(), x.tolist(), y.tolist(), t.tolist(), p.tolist()] == [
        [0, 0, 1], [3, 4, 5], [6, 7, 8], [10, 11, 12], [1, -1, 1]]
    assert p.dtype == np.int8 and t.dtype == np.int64
    # the packed copy a GPU uses (t 8 bytes, b, x, y as int16, p 1 byte per event) gives the same columns
    big = StepEvents(torch.tensor([0, 3, 31]), torch.tensor([0, 639, 1279]), torch.tensor([5, 479, 1023]),
                     torch.tensor([-7, 2**40, 10**15]), torch.tensor([1, -1, 1], dtype=torch.int8))
    for got, want in zip(big._packed_to_host(), big.to_host()):
        assert got.dtype == want.dtype and np.array_equal(got, want)


def _run_fused(frames, params, chunks_threads, monkeypatch):
    """Events and final state of a fused simulator whose steps are split into ``chunks_threads`` chunks."""
    monkeypatch.setattr(cpu_kernels, "_MIN_PIXELS_PER_CHUNK", 97)  # odd: chunks cut through rows and slots
    monkeypatch.setattr(cpu_kernels, "threads", lambda: chunks_threads)
    return _simulate(frames, params)


def _simulate(frames, params):
    """(events as a (5, N) tensor of b, x, y, t, p; final base; final lp), with slot 1 idle on some steps."""
    B = frames.shape[1]
    H, W = frames.shape[-2:]
    sim = EventSimulator([params.resolve(b) for b in range(B)], list(range(B)), H, W)
    for b in range(B):
        sim.reset(b, lin_log(frames[0, b]), 0)
    out = []
    for i in range(1, frames.shape[0]):
        ev = sim.step(lin_log(frames[i]), [i * 1000] * B, [True, i % 3 != 0, True][:B])
        out.append(torch.stack([ev.b, ev.x, ev.y, ev.t, ev.p.long()]))
    return torch.cat(out, 1), sim.base.clone(), sim.lp.clone()


@pytest.mark.parametrize("preset", ["ideal", "default"])
def test_events_do_not_depend_on_the_chunk_count(preset, monkeypatch):
    frames = _frames(3, 8)
    params = get_preset(preset)
    one = _run_fused(frames, params, 1, monkeypatch)
    for k in (2, 3, 5):
        other = _run_fused(frames, params, k, monkeypatch)
        assert all(torch.equal(a, b) for a, b in zip(one, other)), k
    assert one[0].shape[1] > 500


def test_parallel_kernels_from_two_python_threads(monkeypatch):
    """numba's default threading layer takes one parallel launch at a time: the wrapper serialises them."""
    import threading

    frames = _frames(2, 6)
    params = get_preset("ideal")
    want = _run_fused(frames, params, 2, monkeypatch)
    results, errors = [None, None], []

    def work(k):
        try:
            results[k] = _run_fused(frames, params, 2, monkeypatch)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got in results:
        assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_a_forked_child_steps_without_the_parents_thread_pool(monkeypatch):
    """After the parent used the parallel kernel, a forked child (a DataLoader worker, say) gets the same
    events from the thread-free build instead of hanging on a thread pool it does not have."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    frames = _frames(2, 5)
    params = get_preset("ideal")
    want = _run_fused(frames, params, 2, monkeypatch)  # starts the pool here
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_child_run, (frames, params)).get(timeout=120)
    assert cpu_kernels._launched_in == os.getpid()
    assert all(np.array_equal(a.numpy(), b) for a, b in zip(want, got))


def _child_run(frames, params):
    torch.set_num_threads(1)  # as a DataLoader worker does: torch's own OpenMP pool is not fork-safe either
    cpu_kernels._MIN_PIXELS_PER_CHUNK = 97
    cpu_kernels.threads = lambda: 2
    return tuple(a.numpy() for a in _simulate(frames, params))


def test_fused_step_equals_torch_step_with_dense_noise_and_mixed_slots():
    """Shot noise at 400 Hz over 5 ms steps (several candidates per pixel per step, merged with the signal
    crossings through a refractory period) in a batch where one slot has no refractory period and one no
    noise at all: events and state bit for bit."""
    B, n = 3, 10
    frames = _frames(B, n, speed=3.0)
    params = [get_preset("noisy", shot_noise_rate_hz=400.0, refractory_period_s=0.002),
              get_preset("noisy", shot_noise_rate_hz=400.0, refractory_period_s=0.0),
              get_preset("ideal", cutoff_hz=80.0)]
    H, W = frames.shape[-2:]
    sims = [EventSimulator(params, list(range(B)), H, W, kernels=k) for k in ("auto", "torch")]
    for sim in sims:
        for b in range(B):
            sim.reset(b, lin_log(frames[0, b]), 0)
    total = 0
    for i in range(1, n):
        fused, ref = (sim.step(lin_log(frames[i]), [i * 5000] * B, intensity=frames[i]) for sim in sims)
        for f in "bxytp":
            assert torch.equal(getattr(fused, f), getattr(ref, f)), (i, f)
        for name in ("base", "lp", "last_t", "next_shot", "t_prev"):
            assert torch.equal(getattr(sims[0], name), getattr(sims[1], name)), (i, name)
        total += len(fused)
    assert total > 5000
    # the slot with a refractory period spaces its events by more than 2 ms, the one without does not
    ev_t = {}
    sim = EventSimulator(params, list(range(B)), H, W)
    for b in range(B):
        sim.reset(b, lin_log(frames[0, b]), 0)
    for i in range(1, n):
        ev = sim.step(lin_log(frames[i]), [i * 5000] * B, intensity=frames[i])
        for b in range(2):
            m = ev.b == b
            pix = (ev.y[m] * W + ev.x[m]).numpy()
            ev_t.setdefault(b, []).append(np.stack([pix, ev.t[m].numpy()], 1))
    for b, min_gap in ((0, 2000), (1, 0)):
        pt = np.concatenate(ev_t[b])
        pt = pt[np.lexsort((pt[:, 1], pt[:, 0]))]
        same = pt[1:, 0] == pt[:-1, 0]
        gaps = (pt[1:, 1] - pt[:-1, 1])[same]
        assert (gaps > 2000).all() if min_gap else (gaps <= 2000).any()


def test_a_slot_without_refractory_period_gives_the_same_events_in_a_mixed_batch():
    """Batch independence holds when only some slots have a refractory period (the others are not filtered)."""
    frames = _frames(2, 6, speed=3.0)
    H, W = frames.shape[-2:]
    noisy = get_preset("noisy", refractory_period_s=0.0, shot_noise_rate_hz=50.0)
    mixed = [noisy, get_preset("noisy")]
    for kernels in ("auto", "torch"):
        alone = EventSimulator([noisy], [0], H, W, kernels=kernels)
        batch = EventSimulator(mixed, [0, 1], H, W, kernels=kernels)
        alone.reset(0, lin_log(frames[0, 0]), 0)
        for b in range(2):
            batch.reset(b, lin_log(frames[0, b]), 0)
        for i in range(1, 6):
            a = alone.step(lin_log(frames[i, :1]), [i * 1000], intensity=frames[i, :1])
            both = batch.step(lin_log(frames[i]), [i * 1000] * 2, intensity=frames[i])
            m = both.b == 0
            for f in "xytp":
                assert torch.equal(getattr(a, f), getattr(both, f)[m]), (kernels, i, f)
