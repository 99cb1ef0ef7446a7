"""``evforge demo``: the chain as far as it exists, on procedural data, on CPU in well under two minutes.

Today: procedural TartanAir-layout scenes -> simulated event streams (noisy preset, log-linear upsampling)
-> PNG previews. Later stages (shards, pretraining, finetuning) extend it.
"""

from __future__ import annotations

import time
from pathlib import Path

from .preview import render_stream_preview
from .simulator.pipeline import SimulateConfig, simulate_sequences
from .simulator.scenes import SceneSpec, make_dataset
from .simulator.sources import discover_sequences
from .simulator.upsample import UpsampleConfig

DEMO_SPEC = SceneSpec(width=160, height=120, frames=24, planes=3, speed_px=2.5, seed=0)


def run_demo(out="evforge_demo", *, device="auto", progress=True, log=print) -> dict:
    """Run the demo into ``out``; returns the paths it made (scenes, streams, previews)."""
    out = Path(out)
    t0 = time.perf_counter()
    scenes = out / "scenes"
    make_dataset(scenes, envs=("demo_office", "demo_garden"), trajectories=2, spec=DEMO_SPEC)
    log(f"[1/3] procedural scenes (TartanAir v1 layout, 10 Hz): {scenes}")

    streams = out / "streams"
    cfg = SimulateConfig(preset="noisy", resolution=None, upsample=UpsampleConfig(mode="linear", max_steps=8),
                         seed=0, device=device, batch=4, workers=2)
    results = simulate_sequences(discover_sequences(scenes), streams, cfg, progress=progress, log=log)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise RuntimeError(f"demo simulation failed: {failed[0].error}")
    n_events = sum(r.events for r in results)
    log(f"[2/3] event streams ({len(results)} sequences, {n_events:,} events, noisy preset): {streams}")

    previews = out / "previews"
    pngs = [render_stream_preview(r.path, previews / (r.name.replace("/", "__") + ".png")) for r in results]
    log(f"[3/3] previews: {previews}  (e.g. {pngs[0]})")
    log(f"demo finished in {time.perf_counter() - t0:.1f} s; outputs under {out.resolve()}")
    return {"scenes": scenes, "streams": [r.path for r in results], "previews": pngs}
