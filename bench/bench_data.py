"""The small datasets the training benchmarks run on, built once under a folder and reused (not timed).

Simulated streams (:func:`stream_dataset`: procedural scenes -> ``simulate_sequences`` -> the tartanair
converter), synthetic classification samples (:func:`samples_dataset`) and a synthetic DSEC-Semantic folder
(:func:`dsec_dataset`). Used by ``bench/train.py`` and ``bench/gpu_steps.py``.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import h5py
import harness  # noqa: F401  (puts the repository on sys.path)
import hdf5plugin
import numpy as np
from PIL import Image

from evforge import SimulateConfig, UpsampleConfig, build_dataset, discover_sequences, simulate_sequences
from evforge.dataset_builder.synthetic import make_synthetic_classification
from evforge.simulator.scenes import SceneSpec, make_dataset

FRAMES_PER_TRAJECTORY = 41  # 40 samples (frame intervals) per simulated trajectory
# stream sizes per preset: (W, H) of the simulated streams, and of the scenes rendered for them (then resized)
STREAMS = {"tiny": {"sensor": (160, 128), "render": (160, 128)},
           "paper": {"sensor": (640, 480), "render": (160, 120)}}
SAMPLES_SENSOR = (64, 48)  # (W, H) of the synthetic N-Caltech101-layout samples (as tests/pretrain/test_mem.py)
SAMPLES_CLASSES = 4        # make_synthetic_classification's default shapes
SAMPLES_TRAIN_FRACTION = 0.75 * 0.75  # val_fraction 0.25, then the classification holdout (0.25)


def built_once(root: Path, name: str, label: str, build, log=print) -> Path:
    """``root/name/dataset``, made by ``build(work, out) -> summary`` unless its manifest is already there
    (then reused); what ``build`` leaves in ``root/name`` besides the dataset is removed."""
    work = root / name
    out = work / "dataset"
    if (out / "manifest.json").exists():
        log(f"  {label}: reusing {out}")
        return out
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    summary = build(work, out)
    for child in work.iterdir():
        if child != out:
            shutil.rmtree(child, ignore_errors=True)
    log(f"  {label}: built {out} ({summary}, {time.perf_counter() - t0:.0f} s, not timed)")
    return out


def stream_dataset(root: Path, preset: str, items: int, sim_device: str, seed: int, log=print) -> Path:
    """A stream dataset of at least ``items`` samples (frame intervals) at the preset's sensor size, built once
    under ``root`` (reused when present): procedural scenes -> simulate (preset ``ecddp``) -> shards."""
    trajectories = max(1, math.ceil(items / (FRAMES_PER_TRAJECTORY - 1)))
    (sw, sh), (rw, rh) = STREAMS[preset]["sensor"], STREAMS[preset]["render"]

    def build(work: Path, out: Path) -> str:
        # speed 3 px per frame at the render size (12 px at 640x480 for the paper preset)
        make_dataset(work / "scenes", envs=("bench",), trajectories=trajectories,
                     spec=SceneSpec(width=rw, height=rh, frames=FRAMES_PER_TRAJECTORY, speed_px=3.0, seed=seed))
        cfg = SimulateConfig(preset="ecddp", resolution=f"{sw}x{sh}", upsample=UpsampleConfig(mode="none"),
                             seed=seed, device=sim_device, batch=8, save_frames=False)
        quiet = logging.getLogger("evforge")
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            results = simulate_sequences(discover_sequences(work / "scenes"), work / "streams", cfg, progress=False)
        finally:
            quiet.setLevel(level)
        failed = [r for r in results if r.status == "failed"]
        if failed:
            raise RuntimeError(f"simulation failed: {failed[0].error}")
        build_dataset("tartanair", work / "streams", out, test_envs=(), progress=False, command="bench/train.py")
        return f"{trajectories} trajectories"

    name = f"{preset}-{sw}x{sh}-r{rw}x{rh}-{trajectories}x{FRAMES_PER_TRAJECTORY}-seed{seed}"
    return built_once(root, name, "dataset", build, log)


def samples_dataset(root: Path, train_items: int, seed: int, log=print) -> Path:
    """A samples dataset (synthetic shapes -> ncaltech101 converter, 64x48, val 25 %) with at least
    ``train_items`` training samples after the classification holdout, built once under ``root`` (reused)."""
    per_class = max(8, math.ceil(train_items / SAMPLES_TRAIN_FRACTION / SAMPLES_CLASSES))
    w, h = SAMPLES_SENSOR

    def build(work: Path, out: Path) -> str:
        raw = make_synthetic_classification(work / "raw", per_class=per_class, size=SAMPLES_SENSOR, seed=seed)
        report = build_dataset("ncaltech101", raw, out, val_fraction=0.25, seed=seed, sensor_size=SAMPLES_SENSOR,
                               progress=False, command="bench/train.py")
        if report.num_errors:
            raise RuntimeError(f"samples dataset: {report.num_errors} conversion errors")
        return str(report.splits)

    return built_once(root, f"samples-{w}x{h}-{per_class}pc-seed{seed}", "samples dataset", build, log)


def dsec_dataset(root: Path, seed: int = 0) -> Path:
    """A DSEC-Semantic folder of 3 sequences (ESS layout: events.h5 with ms_to_idx and t_offset, 640x440
    label PNGs, timestamps.txt; classes in blocks, events denser on higher classes) -> evforge shards."""
    out = root / "dsec" / "dataset"
    if (out / "manifest.json").exists():
        return out
    labels_t = (100_000, 200_000, 300_000, 400_000)
    for k, (split, name) in enumerate([("train", "zurich_city_00_a"), ("train", "zurich_city_01_a"),
                                       ("test", "zurich_city_13_a")]):
        seq = root / "dsec" / "src" / split / name
        rng = np.random.default_rng(seed + k)
        yy, xx = np.mgrid[0:480, 0:640]
        classes = (((xx // 80) + 3 * (yy // 120) + k) % 11).astype(np.uint8)
        n = 600_000
        w = (1.0 + classes).ravel().astype(np.float64)
        pix = rng.choice(w.size, n, p=w / w.sum())
        y, x = np.divmod(pix, 640)
        t = np.sort(rng.integers(0, labels_t[-1] + 1000, n)).astype(np.uint32)
        (seq / "events" / "left").mkdir(parents=True)
        with h5py.File(seq / "events" / "left" / "events.h5", "w") as f:
            for col, v in {"x": x.astype(np.uint16), "y": y.astype(np.uint16), "t": t,
                           "p": rng.integers(0, 2, n).astype(np.uint8)}.items():
                f.create_dataset(f"events/{col}", data=v, chunks=(65536,), **hdf5plugin.Blosc(cname="lz4", clevel=1))
            ms = np.arange(0, math.ceil(int(t[-1]) / 1000) + 1, dtype=np.int64)
            f.create_dataset("ms_to_idx", data=np.searchsorted(t.astype(np.int64), ms * 1000).astype(np.uint64))
            f.create_dataset("t_offset", data=np.int64(5_000_000))
        with h5py.File(seq / "events" / "left" / "rectify_map.h5", "w") as f:  # a near-identity rectification
            f.create_dataset("rectify_map", data=np.stack([xx + 0.3, yy - 0.2], -1).astype(np.float32))
        labels = seq / "semantic" / "left" / "11classes" / "data"
        labels.mkdir(parents=True)
        for i in range(len(labels_t)):
            Image.fromarray(classes[:440], mode="L").save(labels / f"{i:06d}.png")
        (seq / "semantic" / "timestamps.txt").write_text("".join(f"{5_000_000 + lt}\n" for lt in labels_t))
    report = build_dataset("dsec", root / "dsec" / "src", out, progress=False, command="bench/gpu_steps.py")
    (out / "source").write_text(str(root / "dsec" / "src"))  # for configs that rectify when reading
    if report.num_errors:
        raise RuntimeError(f"DSEC dataset: {report.num_errors} conversion errors")
    return out
