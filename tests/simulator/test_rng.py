"""Counter-based random numbers (evforge.simulator.rng): distribution, independence, determinism, reference hash."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from evforge.simulator import rng
from evforge.simulator.rng import (
    bits_to_uniform,
    event_uniform,
    keys_per_slot,
    normal,
    random_bits,
    stream_key,
    uniform,
    uniform_scalar,
)

N = 1_000_000
M32 = 0xFFFFFFFF
IDX = torch.arange(N, dtype=torch.int64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run this module's element-wise hashing on one intra-op thread (restored afterwards): the results do not
    depend on it, and on a small, busy CPU OpenMP's barriers made these tests about 3x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------ pure-Python reference


def lowbias32(x: int) -> int:
    """Chris Wellons' lowbias32 on Python ints, every step masked to 32 bits."""
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    x ^= x >> 16
    return x & M32


def ref_stream_key(seed: int, purpose: str, step: int = 0) -> tuple[int, int]:
    k = lowbias32(seed & M32)
    k = lowbias32(k ^ ((seed >> 32) & M32))
    k = lowbias32(k ^ zlib.crc32(purpose.encode()))
    k1 = lowbias32(k ^ (step & M32))
    k2 = lowbias32(k1 ^ ((step >> 32) & M32) ^ 0x9E3779B9)
    return k1, k2


def ref_bits(key: tuple[int, int], i: int) -> int:
    k1, k2 = key
    return lowbias32(lowbias32((i + k1) & M32) ^ k2)


def ref_event_bits(k1: int, k2: int, i: int, t: int) -> int:
    lo, hi = t & M32, (t >> 32) & M32
    return lowbias32(lowbias32(lowbias32((i + k1) & M32) ^ lo) ^ hi ^ k2)


def _as_u32(x: torch.Tensor) -> list[int]:
    return (x.to(torch.int64) & M32).tolist()


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _chi2_upper_p(stat: float, dof: int) -> float:
    """P(chi2_dof > stat) by the Wilson-Hilferty normal approximation (good to a few % at dof 63)."""
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


# ----------------------------------------------------------------------------------------------- distributions


@pytest.fixture(scope="module")
def u_shot():
    return uniform([stream_key(1234, "shot", 7)], IDX)[0]


def test_uniform_in_open_interval(u_shot):
    assert u_shot.dtype == torch.float32 and u_shot.shape == (N,)
    assert u_shot.min().item() > 0.0 and u_shot.max().item() < 1.0


def test_uniform_mean_and_variance(u_shot):
    u = u_shot.double()
    # Standard errors over 1e6 draws: mean 2.9e-4, variance 7.5e-5; bounds at about 5 sigma.
    assert abs(u.mean().item() - 0.5) < 1.5e-3
    assert abs(u.var().item() - 1 / 12) < 4e-4


def test_uniform_chi_square_64_bins(u_shot):
    counts = torch.bincount((u_shot * 64).long().clamp_max(63), minlength=64).double()
    expected = N / 64
    stat = float(((counts - expected) ** 2 / expected).sum())
    p = _chi2_upper_p(stat, 63)
    assert 0.001 < p < 0.999, (stat, p)  # neither too uneven nor suspiciously even


def test_normal_moments_and_tail():
    z = normal([stream_key(99, "thres_pos", 3)], IDX)[0].double()
    assert torch.isfinite(z).all()
    assert abs(z.mean().item()) < 0.005
    assert abs(z.std().item() - 1) < 0.005
    tail = (z.abs() > 2).double().mean().item()
    assert abs(tail - 0.0455) < 1e-3  # P(|Z| > 2) = 4.55 %, standard error 2.1e-4
    assert z.abs().max().item() < 5.5


def test_table_normal_is_the_quantile_of_the_top_12_bits():
    from evforge.simulator.hashing import normal_quantiles

    key = stream_key(99, "leak_jitter", 7)
    z = rng.table_normal([key], IDX)[0].double()
    table = torch.from_numpy(normal_quantiles()).double()
    bits = torch.tensor([ref_bits(key, i) for i in range(1000)])
    assert torch.equal(z[:1000], table[bits >> 20])
    assert abs(z.mean().item()) < 0.005 and abs(z.std().item() - 1) < 0.005
    assert abs((z.abs() > 2).double().mean().item() - 0.0455) < 1.5e-3
    assert z.abs().max().item() < 3.7
    assert torch.equal(table, -table.flip(0))  # symmetric: no bias in the leak rate


# ------------------------------------------------------------------------------------------------ independence


@pytest.mark.parametrize(
    "key_a, key_b",
    [
        ((1, "shot", 0), (1, "leak", 0)),  # purposes
        ((1, "thres_pos", 0), (1, "thres_neg", 0)),
        ((1, "shot", 0), (1, "shot", 1)),  # consecutive steps
        ((1, "shot", 5), (1, "shot", 5 + (1 << 32))),  # steps differing only in the high word
        ((1, "shot", 0), (2, "shot", 0)),  # consecutive seeds
        ((0, "shot", 0), (1 << 32, "shot", 0)),  # seeds differing only in the high word
    ],
)
def test_streams_are_uncorrelated(key_a, key_b):
    ka, kb = stream_key(*key_a), stream_key(*key_b)
    assert ka != kb
    u = uniform([ka, kb], IDX)
    assert abs(_corr(u[0], u[1])) < 0.005  # standard error 1e-3
    assert (u[0] == u[1]).double().mean().item() < 1e-4


def test_neighbouring_indices_are_uncorrelated(u_shot):
    assert abs(_corr(u_shot[:-1], u_shot[1:])) < 0.005
    assert abs(_corr(u_shot[:-346], u_shot[346:])) < 0.005  # the pixel one row below on a 346-wide sensor


def test_batch_independence():
    keys = [stream_key(s, "shot", 4) for s in (3, 11, 42)]
    idx = torch.arange(5000)
    together = uniform(keys, idx)
    assert together.shape == (3, 5000)
    for i, k in enumerate(keys):
        assert torch.equal(together[i], uniform([k], idx)[0])
        others = [stream_key(1000 + j, "x", j) for j in range(5)]
        assert torch.equal(uniform(others[:2] + [k] + others[2:], idx)[2], together[i])
        assert torch.equal(normal([k, k], idx)[1], normal([k], idx)[0])


def test_element_depends_only_on_key_and_index():
    key = stream_key(7, "leak_phase")
    full = random_bits([key], torch.arange(10_000))[0]
    g = torch.Generator().manual_seed(0)
    sub = torch.randperm(10_000, generator=g)[:777]
    assert torch.equal(random_bits([key], sub)[0], full[sub])
    # Any index shape: (len(keys),) + index.shape, int32 or int64 index.
    grid = torch.arange(10_000, dtype=torch.int32).view(100, 100)
    bits = random_bits([key, key], grid)
    assert bits.shape == (2, 100, 100) and torch.equal(bits[1].flatten(), full)


def test_repeated_calls_are_bit_identical():
    keys = [stream_key(5, "shot", 2), stream_key(6, "leak", 0)]
    idx = torch.arange(20_000)
    assert torch.equal(random_bits(keys, idx), random_bits(keys, idx))
    assert torch.equal(uniform(keys, idx), uniform(keys, idx))
    assert torch.equal(normal(keys, idx), normal(keys, idx))
    assert stream_key(5, "shot", 2) == stream_key(5, "shot", 2)


# ------------------------------------------------------------------------------------------ reference hash


@pytest.mark.parametrize("seed, purpose, step",
                         [(0, "shot", 0), (1234, "thres_pos", 17), (2**40 + 5, "leak", 2**33 + 1), (-1, "noise", 3)])
def test_stream_key_matches_reference(seed, purpose, step):
    assert stream_key(seed, purpose, step) == ref_stream_key(seed, purpose, step)
    assert rng.purpose_id(purpose) == zlib.crc32(purpose.encode())


def test_lowbias32_known_values():
    # Pins the reference itself (values of the published constants 0x7feb352d / 0x846ca68b), and the
    # module's host-side copy against it.
    assert lowbias32(0) == 0
    words = (1, 2, 0xFFFFFFFF, 0xDEADBEEF)
    assert [lowbias32(v) for v in words] == [0x688990C0, 0xD1132181, 0x6768824A, 0xE628C683]
    assert [rng._mix_int(v) for v in words] == [lowbias32(v) for v in words]


def test_int32_hash_matches_pure_python_lowbias32():
    keys = [stream_key(0, "shot"), stream_key(31337, "thres_neg", 9), (0xFFFFFFFF, 0x80000000), (0, 0)]
    indices = list(range(300)) + [2**31 - 1, 2**31 - 2, 123456789, 346 * 260 - 1]
    bits = random_bits(keys, torch.tensor(indices, dtype=torch.int64))
    for row, key in zip(bits, keys):
        assert _as_u32(row) == [ref_bits(key, i) for i in indices]
    # The int32 tensor mix equals the Python-int mix on arbitrary 32-bit words, sign bit included.
    words = [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xDEADBEEF] + [lowbias32(i) for i in range(200)]
    signed = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)
    assert _as_u32(rng._mix(signed)) == [lowbias32(w) for w in words]


def test_uniform_is_top_23_bits_exactly():
    key = stream_key(3, "shot")
    idx = torch.arange(300)
    u = uniform([key], idx)[0].double().tolist()
    for i, v in zip(range(300), u):
        assert v == ((ref_bits(key, i) >> 9) + 0.5) / 8388608.0  # exact in float32 for every n < 2**23


# ------------------------------------------------------------------------------------------------ event_uniform


def test_event_uniform_matches_reference_and_varies_with_time():
    keys = [stream_key(1, "shot_on_gap"), stream_key(2, "shot_off_gap")]
    k1, k2 = keys_per_slot(keys, "cpu")
    times = [0, 1, 2, 1_000_000, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 3 * 2**32 + 17, 2**40 + 12345]
    t = torch.tensor(times, dtype=torch.int64)
    pix = torch.full_like(t, 4242)
    for s, (a, b) in enumerate(keys):
        u = event_uniform(k1[s].expand(len(times)), k2[s].expand(len(times)), pix, t)
        ref = bits_to_uniform(torch.tensor([ref_event_bits(a, b, 4242, x) for x in times], dtype=torch.int64)
                              .to(torch.int32))
        assert torch.equal(u, ref)
        assert len(set(u.tolist())) == len(times)  # every event time draws a different number
        assert ((u > 0) & (u < 1)).all()


def test_event_uniform_over_many_times_is_uniform_and_per_pixel():
    k1, k2 = keys_per_slot([stream_key(8, "shot_on_accept")], "cpu")
    t = torch.arange(200_000, dtype=torch.int64) * 37 + 10**12
    u0 = event_uniform(k1.expand(len(t)), k2.expand(len(t)), torch.zeros_like(t), t).double()
    u1 = event_uniform(k1.expand(len(t)), k2.expand(len(t)), torch.ones_like(t), t).double()
    assert abs(u0.mean().item() - 0.5) < 4e-3 and abs(u0.var().item() - 1 / 12) < 1e-3
    assert abs(_corr(u0, u1)) < 0.012  # standard error 2.2e-3
    assert abs(_corr(u0[:-1], u0[1:])) < 0.012


# ----------------------------------------------------------------------------------------------- uniform_scalar


def test_uniform_scalar_range_and_determinism():
    vals = [uniform_scalar(s, "shot_rate") for s in range(2000)]
    assert all(0.0 <= v < 1.0 for v in vals)
    assert vals == [uniform_scalar(s, "shot_rate") for s in range(2000)]
    assert len(set(vals)) == len(vals)
    assert abs(sum(vals) / len(vals) - 0.5) < 0.04
    assert uniform_scalar(0, "shot_rate") != uniform_scalar(0, "other")
    # It is element 0 of the (seed, purpose) stream, in double precision.
    k1, k2 = ref_stream_key(17, "shot_rate")
    assert uniform_scalar(17, "shot_rate") == ((lowbias32(lowbias32(k1) ^ k2) >> 9) + 0.5) / 8388608.0
    assert uniform_scalar(17, "shot_rate") == pytest.approx(float(uniform([stream_key(17, "shot_rate")],
                                                                          torch.tensor([0]))[0, 0]), abs=1e-7)


# ------------------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to compare CPU and CUDA results")
def test_cpu_and_cuda_are_bit_identical():
    keys = [stream_key(s, "shot", s * 3) for s in range(4)] + [(0xFFFFFFFF, 0x80000000)]
    idx = torch.arange(300_000)
    for fn in (random_bits, uniform, normal):
        assert torch.equal(fn(keys, idx), fn(keys, idx.cuda()).cpu()), fn.__name__
    k1, k2 = keys_per_slot(keys, "cpu")
    t = torch.arange(len(idx), dtype=torch.int64) * 977 + 2**33 - 5
    slot = idx % len(keys)
    cpu = event_uniform(k1[slot], k2[slot], idx, t)
    gpu = event_uniform(k1.cuda()[slot.cuda()], k2.cuda()[slot.cuda()], idx.cuda(), t.cuda()).cpu()
    assert torch.equal(cpu, gpu)


# ------------------------------------------------- regression: all-ones hashes must not give 1.0 (or +inf normals)


def test_bits_to_uniform_stays_below_one():
    # With 24 bits, (16777215 + 0.5) in float32 rounded to 16777216, so the "open interval" result was 1.0.
    u = bits_to_uniform(torch.tensor([-1, -256], dtype=torch.int32))
    assert (u < 1.0).all(), u


def test_normal_is_finite_where_the_hash_is_all_ones():
    # Found by scanning: element 6780413 of stream (seed 0, "thres_pos", step 0) has top 24 bits all ones
    # (about 1 index in 2**24 does, i.e. ~0.5 % of 346x260 frames' worth of draws).
    key, idx = stream_key(0, "thres_pos"), torch.tensor([6780413])
    assert ref_bits(key, 6780413) >> 8 == 2**24 - 1
    assert uniform([key], idx).item() < 1.0
    assert torch.isfinite(normal([key], idx)).all()


def test_threshold_mismatch_is_finite_for_every_pixel():
    from evforge.simulator.params import get_preset
    from evforge.simulator.pixel import EventSimulator

    sim = EventSimulator([get_preset("clean")], [458], 260, 346)
    sim.reset(0, torch.full((260, 346), 4.0), 0)
    assert torch.isfinite(sim.pos_thres).all(), torch.nonzero(~torch.isfinite(sim.pos_thres)).tolist()
