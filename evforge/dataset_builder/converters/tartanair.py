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

With ``recipe`` (``"ecddp"``, see :mod:`evforge.simulator.recipes`) the samples are the recipe's instead: one
per source-frame interval (``frame_times`` = the interval's two frame times, the events in ``[t_i, t_{i+1})``),
key ``<trajectory>/<i:06d>_<i+1:06d>`` as the public code's file names, kept or dropped by the recipe's rule
(:mod:`.etartanair_intervals`: interval 0, the last interval, and intervals whose own or previous
reference-layout file is under 100 KiB), attrs = env, trajectory, interval, the trajectory's interval count,
the reference file sizes, seed and shot-noise rate. The stream files must have the recipe's time base (frames
exactly ``interval_s`` apart), else the scan fails naming the file; ``simulate=True`` simulates with it. The
selection options (``drop_first_interval``, ``drop_last_interval``, ``min_interval_bytes``,
``min_interval_events``, ``float32_time``) replace the recipe's.

Memory: a sequence is read whole (one Sample holds one array); TartanAir trajectories are tens of millions of
events at most (a few hundred MB as EVENT_DTYPE), which a conversion worker can hold.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import numpy as np

from evforge.errors import InputError
from evforge.h5local import check_local
from evforge.streamfile import StreamFile

from .base import DatasetPlan, Sample, SourceItem
from .etartanair_intervals import interval_bounds, reference_file_bytes, reference_times, select_intervals

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

    def scan(self, src, *, test_envs=None, simulate: bool = False, out=None, streams_dir=None,
             preset: str | None = None, overrides: dict | None = None, resolution=None, device: str = "auto",
             batch: int = 4, seed: int = 0, progress: bool = False, recipe: str | None = None,
             devices=None, executor: str = "local", address: str | None = None,
             drop_first_interval: bool | None = None, drop_last_interval: bool | None = None,
             min_interval_bytes: int | None = None, min_interval_events: int | None = None,
             float32_time: bool | None = None) -> DatasetPlan:
        """List the stream files (simulating them first with ``simulate=True``), check that their sensor sizes
        (and, with a recipe, their time base) agree, and split them by environment. ``devices``, ``executor`` and
        ``address`` say where the simulation runs (:func:`~evforge.simulator.pipeline.simulate_sequences`; the
        build passes its own executor and address); they do not change the streams."""
        rec = None
        if recipe is not None:
            from evforge.simulator.recipes import get_recipe

            rec = get_recipe(recipe, drop_first_interval=drop_first_interval, drop_last_interval=drop_last_interval,
                             min_interval_bytes=min_interval_bytes, min_interval_events=min_interval_events,
                             float32_time=float32_time)
        elif any(v is not None for v in (drop_first_interval, drop_last_interval, min_interval_bytes,
                                         min_interval_events, float32_time)):
            raise ValueError("tartanair: the interval options (drop_*_interval, min_interval_*, float32_time) "
                             "belong to a recipe: pass recipe='ecddp'")
        if test_envs is None:
            test_envs = rec.test_envs if rec is not None else DEFAULT_TEST_ENVS
        if isinstance(test_envs, str):
            test_envs = [e for e in test_envs.split(",") if e.strip()]
        test_set = {str(e).strip().lower() for e in test_envs}
        src = Path(src)
        params = {"test_envs": sorted(test_set), "simulate": bool(simulate),
                  "sample_definition": "ECDDP: events between consecutive source frames (frame_window)"}
        if rec is not None:
            params.update(recipe=rec.to_dict(), allow_empty=True,
                          sample_definition=f"recipe {rec.name}: one sample per source-frame interval "
                                            f"({rec.interval_s:g} s), selected by the recipe's rule")
        if simulate:
            root, files, sim = self._simulate(src, out, streams_dir, preset, overrides, resolution, device, batch,
                                              seed, progress, rec, dict(devices=devices, executor=executor,
                                                                        address=address))
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
                check_local(sf._file, path)  # no data from outside the file (until StreamFile checks it)
                if size is None:
                    size, first = (sf.width, sf.height), path
                elif (sf.width, sf.height) != size:
                    raise InputError(path, f"sensor size {sf.width}x{sf.height} differs from {size[0]}x{size[1]} "
                                           f"of {first}")
                if rec is not None:
                    _check_time_base(path, sf.frame_times, rec)
            rel = path.relative_to(root)
            env = environment(rel, root)
            split = "test" if env.lower() in test_set else "train"
            items.append(SourceItem(key=rel.with_suffix("").as_posix(), path=str(path), label=-1, split=split,
                                    extra=(env, rel.as_posix())))
        return DatasetPlan(name=self.name, kind=self.kind, sensor_size=size, classes=[], items=items, params=params)

    @staticmethod
    def _simulate(src, out, streams_dir, preset, overrides, resolution, device, batch, seed, progress, recipe,
                  where: dict):
        """Run the simulator into the streams folder; returns (folder, stream files, config as a dict).

        With a recipe its settings (time base, preset, resolution, upsampling) are used; ``preset``,
        ``overrides`` and ``resolution`` given explicitly still replace them (e.g. a small resolution to try).
        """
        from evforge.simulator.pipeline import SimulateConfig, simulate_sequences
        from evforge.simulator.sources import discover_sequences

        if streams_dir is None and out is None:
            raise ValueError("tartanair: simulate=True needs out= (streams go to <out>/_streams) or streams_dir=")
        root = Path(streams_dir) if streams_dir is not None else Path(out) / "_streams"
        run = dict(overrides=dict(overrides or {}), device=device, batch=batch, seed=seed, save_frames=False)
        if recipe is not None:
            cfg = recipe.simulate_config(preset=preset, resolution=resolution, **run)
            sequences = discover_sequences(src, fps=recipe.fps)
        else:
            cfg = SimulateConfig(preset=preset or "default", resolution=resolution, **run)
            sequences = discover_sequences(src)
        results = simulate_sequences(sequences, root, cfg, progress=progress, log=lambda message: None, **where)
        for seq, r in zip(sequences, results):
            if r.status == "failed":
                raise InputError(seq.source, f"simulation failed: {r.error}")
        config = {k: v for k, v in asdict(cfg).items() if k not in ("overwrite", "workers")}
        return root, [r.path for r in results], _jsonable(config)

    def read(self, item: SourceItem, plan: DatasetPlan) -> list[Sample]:
        """All events and frame times of one stream file (the file is checked against the plan's sensor), or,
        with a recipe, its kept intervals."""
        env, rel = item.extra
        with StreamFile(item.path) as sf:
            check_local(sf._file, item.path)
            if (sf.width, sf.height) != tuple(plan.sensor_size):
                raise InputError(item.path, f"sensor size {sf.width}x{sf.height} differs from the dataset's "
                                            f"{plan.sensor_size[0]}x{plan.sensor_size[1]}")
            if sf.num_events == 0 and "recipe" not in plan.params:
                return []
            try:
                events = sf.events()
            except OSError as err:
                raise InputError(item.path, f"cannot read events ({err})") from None
            attrs = _jsonable(dict(sf.attrs))
            frame_times = sf.frame_times.copy()
        if "recipe" in plan.params:
            return _interval_samples(item, env, rel, events, frame_times, attrs, plan.params["recipe"])
        attrs.update(env=env, stream_file=rel)
        return [Sample(key=item.key, events=events, label=-1, frame_times=frame_times, attrs=attrs)]


def _check_time_base(path, frame_times: np.ndarray, recipe) -> None:
    """A recipe's stream files have a frame every ``interval_s`` exactly (else they were simulated otherwise)."""
    gaps = np.diff(frame_times)
    if len(frame_times) < 2:
        raise InputError(path, f"{len(frame_times)} frame(s): recipe {recipe.name!r} needs at least one interval")
    bad = np.flatnonzero(gaps != recipe.interval_us)
    if bad.size:
        i = int(bad[0])
        raise InputError(path, f"frames {i} and {i + 1} are {int(gaps[i])} us apart; recipe {recipe.name!r} has "
                               f"{recipe.interval_us} us per interval (simulate with --recipe {recipe.name})")


def _interval_samples(item: SourceItem, env: str, rel: str, events: np.ndarray, frame_times: np.ndarray,
                      attrs: dict, recipe: dict) -> list[Sample]:
    """The kept intervals of one trajectory as samples (see the module docstring)."""
    t0 = int(frame_times[0])
    t_rel = reference_times(events["t"], t0, recipe["float32_time"])
    if recipe["float32_time"]:  # the samples carry the public code's rounded times
        events = events.copy()
        events["t"] = t_rel + t0
    bounds = interval_bounds(t_rel, frame_times - t0)
    counts = np.diff(bounds)
    n = len(counts)
    sizes = None
    if recipe["min_interval_events"] is None and recipe["min_interval_bytes"] > 0:
        # the last interval's size matters to no sample when it is dropped (it is nobody's previous interval)
        sized = n - 1 if recipe["drop_last_interval"] else n
        sizes = np.zeros(n, dtype=np.int64)
        for i in range(sized):
            a, b = bounds[i], bounds[i + 1]
            sizes[i] = reference_file_bytes(events["x"][a:b], events["y"][a:b], events["p"][a:b], t_rel[a:b])
    sel = select_intervals(counts, sizes, drop_first=recipe["drop_first_interval"],
                           drop_last=recipe["drop_last_interval"], min_bytes=recipe["min_interval_bytes"],
                           min_events=recipe["min_interval_events"])
    common = {"env": env, "trajectory": item.key, "stream_file": rel, "intervals": n, "seed": attrs.get("seed"),
              "shot_noise_rate_hz": attrs.get("shot_noise_rate_hz")}
    samples = []
    for i in sel.kept:
        a, b = bounds[i], bounds[i + 1]
        sample_attrs = dict(common, interval=int(i))
        if sizes is not None:
            sample_attrs.update(bytes=int(sizes[i]), previous_bytes=int(sizes[i - 1]) if i > 0 else None)
        samples.append(Sample(key=f"{item.key}/{i:06d}_{i + 1:06d}", events=events[a:b], label=-1,
                              frame_times=frame_times[i : i + 2].copy(), attrs=sample_attrs))
    return samples
