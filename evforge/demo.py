"""``evforge demo``: the chain as far as it exists, on procedural data, on CPU in well under two minutes.

Today: procedural TartanAir-layout scenes -> simulated event streams (noisy preset, log-linear upsampling)
-> stream previews -> stream shards (TartanAir converter, one environment held out as test) and a synthetic
classification set in N-Caltech101's format converted by the real converter -> verify, inspect, shard
previews, and one batch through the training loader -> a short ECDDP pretraining run (tiny config) on the
stream shards -> the backbone exported as timm-compatible safetensors -> a short finetune of that backbone
on the classification set, evaluated on a split it was not selected on (reports: JSON, Markdown, PNG).

Each step's line is logged at INFO under ``evforge.demo`` (``evforge demo`` prints them; from Python, turn on
``logging`` to see them).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from evforge.data.dataset import EventDataset, make_loader

from .dataset_builder.build import build_dataset
from .dataset_builder.inspect import format_report, inspect_path, verify_dataset
from .dataset_builder.synthetic import make_synthetic_classification
from .export import export_backbone
from .preview.shards import render_shard_preview
from .preview.streams import render_stream_preview
from .simulator.pipeline import SimulateConfig, simulate_sequences
from .simulator.scenes import SceneSpec, make_dataset
from .simulator.sources import discover_sequences
from .simulator.upsample import UpsampleConfig

DEMO_SPEC = SceneSpec(width=160, height=120, frames=24, planes=3, speed_px=2.5, seed=0)
SYNTHETIC_SIZE = (64, 48)  # the synthetic classification set's sensor, (W, H)
SYNTHETIC_PER_CLASS = 100
DEMO_FINETUNE_STEPS = 400
DEMO_PRETRAIN_STEPS = 20
TINY_ECDDP_CONFIG = Path(__file__).resolve().parent / "configs" / "pretrain" / "ecddp_tiny.yaml"  # packaged
FINETUNE_CONFIG = Path(__file__).resolve().parent / "configs" / "finetune" / "classification_tiny.yaml"

logger = logging.getLogger(__name__)


def run_demo(out="evforge_demo", *, device="auto", method: str = "ecddp", progress=True) -> dict:
    """Run the demo into ``out``; returns the paths it made (scenes, streams, previews)."""
    out = Path(out)
    t0 = time.perf_counter()
    scenes = out / "scenes"
    make_dataset(scenes, envs=("demo_office", "demo_garden"), trajectories=2, spec=DEMO_SPEC)
    logger.info(f"[1/7] procedural scenes (TartanAir v1 layout, 10 Hz): {scenes}")

    streams = out / "streams"
    cfg = SimulateConfig(preset="noisy", resolution=None, upsample=UpsampleConfig(mode="linear", max_steps=8),
                         seed=0, device=device, batch=4, workers=2)
    results = simulate_sequences(discover_sequences(scenes), streams, cfg, progress=progress)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise RuntimeError(f"demo simulation failed: {failed[0].error}")
    n_events = sum(r.events for r in results)
    logger.info(f"[2/7] event streams ({len(results)} sequences, {n_events:,} events, noisy preset): {streams}")

    previews = out / "previews"
    pngs = [render_stream_preview(r.path, previews / (r.name.replace("/", "__") + ".png")) for r in results]
    logger.info(f"[3/7] stream previews: {previews}  (e.g. {pngs[0]})")

    datasets = out / "datasets"
    stream_ds = build_dataset("tartanair", streams, datasets / "streams", test_envs=("demo_garden",),
                              progress=progress, command="evforge demo")
    raw = make_synthetic_classification(out / "synthetic_raw", per_class=SYNTHETIC_PER_CLASS, size=SYNTHETIC_SIZE,
                                        seed=0)
    class_ds = build_dataset("ncaltech101", raw, datasets / "synthetic", val_fraction=0.25, seed=0,
                             sensor_size=SYNTHETIC_SIZE, progress=progress, command="evforge demo")
    for report in (stream_ds, class_ds):
        faults = verify_dataset(report.out)
        if faults or report.num_errors:
            raise RuntimeError(f"demo dataset {report.out} is faulty: {(faults or [report.errors_path])[0]}")
        logger.info(format_report(inspect_path(report.out)))
        pngs.append(render_shard_preview(report.out, previews / f"{report.out.name}_shards.png", samples=8))
    logger.info(f"[4/7] shards + manifests (verified): {stream_ds.out}, {class_ds.out}")

    loader = make_loader(EventDataset(class_ds.out, "train"), batch_size=8, shuffle=True, seed=0)
    batch = next(iter(loader))
    logger.info(f"[5/7] training loader: a batch of {len(batch['key'])} samples, "
                f"{int(batch['offsets'][-1]):,} events packed, labels {batch['label'].tolist()}")
    if method == "mem":
        from .pretrain.mem.demo import pretrain_mem

        backbone = pretrain_mem(class_ds.out, out / "runs" / "mem_tiny", device=device, progress=progress)
        logger.info(f"[6/7] MEM pretraining on the classification shards; backbone: {backbone}")
    elif method == "ecddp":
        backbone = pretrain_ecddp(stream_ds.out, out / "runs" / "ecddp_tiny", device=device, progress=progress)
    else:
        raise ValueError(f"unknown demo method {method!r}: ecddp or mem")
    report = finetune_and_evaluate(class_ds.out, backbone, out / "runs" / "classification_tiny", device=device,
                                   progress=progress)
    logger.info(f"demo finished in {time.perf_counter() - t0:.1f} s; outputs under {out.resolve()}")
    return {"scenes": scenes, "streams": [r.path for r in results], "previews": pngs,
            "datasets": [stream_ds.out, class_ds.out], "backbone": backbone, "report": report}


def finetune_and_evaluate(dataset, backbone, run_dir, *, steps: int = DEMO_FINETUNE_STEPS, device="auto",
                          progress=True) -> dict:
    """Finetune ``backbone`` on a classification dataset with the tiny classification config, then evaluate
    the best validation checkpoint on the reported split; returns :func:`evforge.finetune.evaluate.evaluate`'s
    result."""
    from .finetune import get_task as get_finetune_task
    from .finetune.evaluate import evaluate
    from .trainer.config import load_config
    from .trainer.trainer import Trainer

    overrides = [f"data.path={dataset}", f"trainer.max_steps={steps}", "trainer.val_every_n_steps=50",
                 "checkpoint.keep_every_n_steps=50", f"trainer.accelerator={'cpu' if device == 'cpu' else 'auto'}",
                 f"log.progress={'true' if progress else 'false'}"]
    cfg = load_config(FINETUNE_CONFIG, overrides)
    cfg["task"]["init"] = str(backbone)
    with Trainer(cfg, get_finetune_task("classification"), out_dir=run_dir, resume=None) as trainer:
        summary = trainer.fit()
    res = evaluate(run_dir, out_dir=Path(run_dir) / "eval")
    logger.info(f"[7/7] finetune, {summary['step']} steps from the pretrained backbone; {res['split']} top-1 "
                f"{res['metrics']['top1']:.2f} (chance {1 / max(1, len(res.get('class_names') or [])):.2f}): "
                f"{res['files']['markdown']}")
    return res


def pretrain_ecddp(dataset, run_dir, *, steps: int = DEMO_PRETRAIN_STEPS, device="auto", progress=True):
    """A short ECDDP run with ``configs/pretrain/ecddp_tiny.yaml``'s settings on ``dataset``; exports the
    backbone next to the run and returns its path."""
    from .pretrain import get_task
    from .trainer.config import load_config
    from .trainer.trainer import Trainer

    overrides = [f"data.path={dataset}", f"trainer.max_steps={steps}", "checkpoint.every_n_steps=null",
                 f"trainer.accelerator={'cpu' if device == 'cpu' else 'auto'}",
                 f"log.progress={'true' if progress else 'false'}"]
    cfg = load_config(TINY_ECDDP_CONFIG, overrides)
    with Trainer(cfg, get_task("ecddp"), out_dir=run_dir, resume=None) as trainer:
        summary = trainer.fit()
    backbone = export_backbone(summary["checkpoint"], Path(run_dir) / "backbone.safetensors")
    logger.info(f"[6/7] ECDDP pretraining, {summary['step']} steps (loss {summary['train']['loss']:.2f}): "
                f"{run_dir}; backbone: {backbone}")
    return backbone
