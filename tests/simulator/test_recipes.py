"""Data recipes (evforge.simulator.recipes): the ECDDP recipe's time base, pixel model, steps and seeding."""

from __future__ import annotations

import pytest

from evforge.formats.streamfile import StreamFile
from evforge.simulator.params import get_preset
from evforge.simulator.pipeline import sequence_seed, simulate_sequences
from evforge.simulator.recipes import RECIPES, get_recipe
from evforge.simulator.scenes import SceneSpec, make_dataset
from evforge.simulator.sources import discover_sequences


def test_ecddp_recipe_values_are_the_public_codes():
    r = get_recipe("ecddp")
    assert r.interval_s == 1.0 and r.fps == 1.0 and r.interval_us == 1_000_000
    assert r.resolution == "dvs640" and r.preset == "ecddp"
    p = get_preset(r.preset)
    assert (p.pos_thres, p.neg_thres, p.sigma_thres, p.cutoff_hz, p.leak_rate_hz, p.shot_noise_rate_hz) == (
        0.2, 0.2, 0.03, 30.0, 0.1, (0.0, 0.25))
    u = r.upsample
    assert (u.mode, u.min_steps, u.step_multiple, u.max_px_step, u.max_lowpass_eps) == ("flow", 60, 30, 1.0, 0.0)
    assert r.drop_first_interval and r.drop_last_interval and r.min_interval_bytes == 100 * 1024
    assert r.min_interval_events is None and not r.float32_time
    assert r.test_envs == ("hospital", "gascola", "neighborhood")
    cfg = r.simulate_config(seed=3, resolution="32x24", device=None)
    assert (cfg.preset, cfg.resolution, cfg.seed, cfg.recipe, cfg.upsample) == ("ecddp", "32x24", 3, "ecddp", u)
    assert get_recipe("ecddp", float32_time=True, min_interval_bytes=None).float32_time
    with pytest.raises(ValueError, match="no option"):
        get_recipe("ecddp", interval=2)
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("e-tartanair")
    assert set(RECIPES) == {"ecddp"}


def test_ecddp_recipe_simulates_one_second_per_interval_with_seeded_shot_noise(tmp_path):
    make_dataset(tmp_path / "frames", envs=("hospital", "office"), trajectories=1,
                 spec=SceneSpec(width=32, height=24, frames=4, speed_px=2.0, seed=1))
    recipe = get_recipe("ecddp")
    cfg = recipe.simulate_config(resolution="native", device="cpu", seed=11, save_frames=False)
    seqs = discover_sequences(tmp_path / "frames", fps=recipe.fps)
    results = simulate_sequences(seqs, tmp_path / "a", cfg, progress=False)
    rates = set()
    for seq, res in zip(seqs, results):
        assert res.status == "done" and res.frames == 4
        # 2 px per interval is under 60 px: the minimum, 30 frames x a factor of 2, per interval
        assert res.steps == 3 * 60
        with StreamFile(res.path) as sf:
            assert sf.frame_times.tolist() == [0, 1_000_000, 2_000_000, 3_000_000]  # exactly 1 s per interval
            assert sf.attrs["recipe"] == "ecddp" and sf.attrs["preset"] == "ecddp"
            seed = sequence_seed(11, seq.name)
            assert sf.attrs["seed"] == seed
            rate = sf.attrs["shot_noise_rate_hz"]
            assert 0 <= rate < 0.25 and rate == get_preset("ecddp").resolve(seed).shot_noise_rate_hz
            rates.add(rate)
            first = sf.events()
        assert len(first) > 0 and first["t"].max() <= 3_000_000
    assert len(rates) == 2  # drawn per trajectory
    # reproducible: the same run elsewhere gives the same events
    again = simulate_sequences(seqs[:1], tmp_path / "b", cfg, progress=False)[0]
    with StreamFile(results[0].path) as a, StreamFile(again.path) as b:
        assert a.events().tobytes() == b.events().tobytes()
