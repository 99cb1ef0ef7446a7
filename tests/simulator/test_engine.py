"""BatchEngine: plugging in a user interpolator (the hook for learned frame interpolation)."""

import numpy as np
import torch

from evforge.simulator.engine import BatchEngine
from evforge.simulator.params import get_preset
from evforge.simulator.pixel import inverse_lin_log, lin_log
from evforge.simulator.resample import prepare_frames
from evforge.simulator.scenes import SceneSpec, build_scene, render_frame
from evforge.simulator.upsample import FrameInterpolator, UpsampleConfig


class RGBLogLinear:
    """What a learned interpolator looks like to evforge: RGB frames in, RGB frames out, no log-space hook."""

    channels = 3

    def __init__(self):
        self.calls = []

    def __call__(self, frame0, frame1, fractions, flow=None, flow_valid=None):
        self.calls.append((tuple(frame0.shape), tuple(fractions.shape)))
        s = fractions.T.reshape(fractions.shape[1], -1, 1, 1, 1)
        # gray-equal channels so its output converts back to exactly the gray log-linear frames
        return inverse_lin_log((1 - s) * lin_log(frame0) + s * lin_log(frame1))


def _run(interp, frames_rgb, gray_input):
    H, W = frames_rgb.shape[1:3]
    eng = BatchEngine(1, H, W, "cpu", UpsampleConfig(mode="linear", max_log_step=0.1), interpolator=interp)
    first = prepare_frames([frames_rgb[0]], None, "cpu", gray=gray_input)
    eng.start(0, first[0], 0, get_preset("ideal"), 0)
    out = []
    for i in range(1, len(frames_rgb)):
        ev = eng.advance(prepare_frames([frames_rgb[i]], None, "cpu", gray=gray_input), [i * 10_000], [True])
        out.append(torch.stack([ev.x, ev.y, ev.t, ev.p.long()], 1))
    return torch.cat(out), eng


def test_plugged_rgb_interpolator_is_used_and_matches_builtin():
    scene = build_scene(SceneSpec(width=40, height=30, frames=5, seed=2))
    gray = np.stack([render_frame(scene, i)[0].astype(np.float32) @ np.float32([0.299, 0.587, 0.114])
                     for i in range(5)])
    rgb = np.repeat(gray[..., None], 3, axis=-1)  # neutral colour: the RGB path sees the same luma
    plug = RGBLogLinear()
    assert isinstance(plug, FrameInterpolator)
    ev_plug, eng = _run(plug, rgb, gray_input=False)
    ev_builtin, _ = _run(None, gray, gray_input=True)
    assert eng.channels == 3 and plug.calls and plug.calls[0][0][1] == 3
    assert len(ev_builtin) > 100
    # same sub-steps, same events; exp/log round trips may move a timestamp by a microsecond
    assert len(ev_plug) == len(ev_builtin)

    def by_pixel(ev):
        order = np.lexsort((ev[:, 2].numpy(), ev[:, 3].numpy(), ev[:, 0].numpy(), ev[:, 1].numpy()))
        return ev.numpy()[order]

    a, b = by_pixel(ev_plug), by_pixel(ev_builtin)
    np.testing.assert_array_equal(a[:, [0, 1, 3]], b[:, [0, 1, 3]])
    assert np.abs(a[:, 2] - b[:, 2]).max() <= 2


def test_many_substeps_are_made_in_chunks_with_the_same_events(monkeypatch):
    """A recipe's hundreds of sub-steps per frame pair are interpolated a chunk at a time (bounded memory);
    the chunking must not change a single event, with flow-guided frames and the ECDDP pixel model."""
    from evforge.simulator import engine
    from evforge.simulator.engine import simulate_frames
    from evforge.simulator.scenes import flow_and_mask

    scene = build_scene(SceneSpec(width=32, height=24, frames=3, speed_px=40.0, seed=3))
    frames = np.stack([render_frame(scene, i)[0] for i in range(3)])
    flows = np.stack([flow_and_mask(scene, i)[0] for i in range(2)])
    up = UpsampleConfig(mode="flow", max_px_step=1.0, max_lowpass_eps=0.0, min_steps=60, step_multiple=30,
                        max_steps=600)
    params = get_preset("ecddp")

    def run():
        return simulate_frames(frames, np.arange(3) * 1_000_000, params, seed=5, upsample=up, flows=flows)

    assert engine.SUBSTEP_CHUNK < 60  # so the default run below is chunked
    chunked = run()
    monkeypatch.setattr(engine, "SUBSTEP_CHUNK", 10_000)
    whole = run()
    assert len(chunked) > 1000 and chunked.tobytes() == whole.tobytes()
