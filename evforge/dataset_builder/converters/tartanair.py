"""E-TartanAir: the simulator's stream files (or TartanAir frames, simulated first) -> stream shards.

Source: a folder of stream files as ``evforge simulate`` writes them, ``<env>/<Easy|Hard>/<Pxxx>.h5`` (any folder
above them works too; ``*.tmp-*`` leftovers of interrupted runs are not ``*.h5`` and are never picked up). With
``simulate=True`` the source is a TartanAir frames root instead: :func:`simulate_sequences` first writes the
stream files into ``<out>/_streams/`` (or ``streams_dir``), resuming where a previous run stopped, and those are
converted. A failed sequence fails the scan with its error (the finished ones stay and are skipped on rerun).

One sample per stream file: all its events, ``frame_times`` = the source frame times, so ECDDP's sample (the
events between two consecutive source frames) is ``ShardReader.frame_window(i, j)``; attrs = the simulator
parameters stored in the stream file plus ``env`` and ``stream_file``; label -1; key = the file's path below the
source without ``.h5`` (``hospital/Easy/P000``). A stream file without events yields no sample.

Split by environment, as ECDDP holds out whole scenes: ``test`` for environments named in ``test_envs`` (default
hospital, gascola, neighborhood; case-insensitive), ``train`` for the rest. The environment is the folder above
``Easy``/``Hard`` (else the first folder below the source, else the source folder's own name).

Memory: a sequence is read whole (one Sample holds one array); TartanAir trajectories are tens of millions of
events at most (a few hundred MB as EVENT_DTYPE), which a conversion worker can hold.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import numpy as np

from evforge.errors import InputError
from evforge.streamfile import StreamFile

from .base import DatasetPlan, Sample, SourceItem

__all__ = ["TartanAirConverter", "DEFAULT_TEST_ENVS"]

DEFAULT_TEST_ENVS = ("hospital", "gascola", "neighborhood")  # ECDDP's held-out scenes
_LEVEL = re.compile(r"(data_)?(easy|hard)", re.IGNORECASE)


def environment(rel: Path, root: Path) -> str:
    """The TartanAir environment of a stream file at ``rel`` (relative to ``root``)."""
    parts = rel.parts[:-1]
    if parts and _LEVEL.fullmatch(parts[-1]):
        return parts[-2] if len(parts) >= 2 else root.resolve().name
    return parts[0] if parts else root.resolve().name


def _jsonable(value):
    """Stream-file attrs as JSON values (numpy scalars and arrays become Python ones)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class TartanAirConverter:
    """Simulated TartanAir stream files -> one stream sample per trajectory (see the module docstring)."""

    name = "tartanair"
    kind = "streams"

    def scan(self, src, *, test_envs=DEFAULT_TEST_ENVS, simulate: bool = False, out=None, streams_dir=None,
             preset: str = "default", overrides: dict | None = None, resolution=None, device: str = "auto",
             batch: int = 4, seed: int = 0, progress: bool = False) -> DatasetPlan:
        """List the stream files (simulating them first with ``simulate=True``), check that their sensor sizes
        agree, and split them by environment."""
        if isinstance(test_envs, str):
            test_envs = [e for e in test_envs.split(",") if e.strip()]
        test_set = {str(e).strip().lower() for e in test_envs}
        src = Path(src)
        params = {"test_envs": sorted(test_set), "simulate": bool(simulate),
                  "sample_definition": "ECDDP: events between consecutive source frames (frame_window)"}
        if simulate:
            root, files, sim = self._simulate(src, out, streams_dir, preset, overrides, resolution, device, batch,
                                              seed, progress)
            params.update(streams_dir=str(root), simulate_config=sim)
        else:
            if not src.is_dir():
                raise InputError(src, "not a folder of stream files (<env>/<Easy|Hard>/<Pxxx>.h5)")
            root = src
            files = sorted(src.rglob("*.h5"))
            if not files:
                raise InputError(src, "no stream files (*.h5) found")
        items, size, first = [], None, None
        for path in files:
            with StreamFile(path) as sf:
                if size is None:
                    size, first = (sf.width, sf.height), path
                elif (sf.width, sf.height) != size:
                    raise InputError(path, f"sensor size {sf.width}x{sf.height} differs from {size[0]}x{size[1]} "
                                           f"of {first}")
            rel = path.relative_to(root)
            env = environment(rel, root)
            split = "test" if env.lower() in test_set else "train"
            items.append(SourceItem(key=rel.with_suffix("").as_posix(), path=str(path), label=-1, split=split,
                                    extra=(env, rel.as_posix())))
        return DatasetPlan(name=self.name, kind=self.kind, sensor_size=size, classes=[], items=items, params=params)

    @staticmethod
    def _simulate(src, out, streams_dir, preset, overrides, resolution, device, batch, seed, progress):
        """Run the simulator into the streams folder; returns (folder, stream files, config as a dict)."""
        from evforge.simulator.pipeline import SimulateConfig, simulate_sequences
        from evforge.simulator.sources import discover_sequences

        if streams_dir is None and out is None:
            raise ValueError("tartanair: simulate=True needs out= (streams go to <out>/_streams) or streams_dir=")
        root = Path(streams_dir) if streams_dir is not None else Path(out) / "_streams"
        cfg = SimulateConfig(preset=preset, overrides=dict(overrides or {}), resolution=resolution, device=device,
                             batch=batch, seed=seed, save_frames=False)
        sequences = discover_sequences(src)
        results = simulate_sequences(sequences, root, cfg, progress=progress, log=lambda message: None)
        for seq, r in zip(sequences, results):
            if r.status == "failed":
                raise InputError(seq.source, f"simulation failed: {r.error}")
        config = {k: v for k, v in asdict(cfg).items() if k not in ("overwrite", "workers")}
        return root, [r.path for r in results], _jsonable(config)

    def read(self, item: SourceItem, plan: DatasetPlan) -> list[Sample]:
        """All events and frame times of one stream file (the file is checked against the plan's sensor)."""
        env, rel = item.extra
        with StreamFile(item.path) as sf:
            if (sf.width, sf.height) != tuple(plan.sensor_size):
                raise InputError(item.path, f"sensor size {sf.width}x{sf.height} differs from the dataset's "
                                            f"{plan.sensor_size[0]}x{plan.sensor_size[1]}")
            if sf.num_events == 0:
                return []
            try:
                events = sf.events()
            except OSError as err:
                raise InputError(item.path, f"cannot read events ({err})") from None
            attrs = _jsonable(dict(sf.attrs))
            attrs.update(env=env, stream_file=rel)
            return [Sample(key=item.key, events=events, label=-1, frame_times=sf.frame_times.copy(), attrs=attrs)]
