"""E-TartanAir: the simulator's stream files (or TartanAir frames, simulated first) -> stream shards.

Source: a folder of stream files as ``evforge simulate`` writes them, ``<env>/<Easy|Hard>/<Pxxx>.h5`` (any folder
above them works too; ``*.tmp-*`` leftovers of interrupted runs are not ``*.h5`` and are never picked up). With
``simulate=True`` the source is a TartanAir frames root instead, streamed into shards: the scan lists the frame
sequences (one item each, keyed by the sequence name), and each work unit simulates its own sequences when it
runs (:func:`simulate_sequences`, batched, on ``devices``), writes its shard, then deletes their stream files
from ``<out>/_streams/`` (or ``streams_dir``) unless ``keep_streams``. Shards thus appear as sequences finish,
and the streams on disk are those of the units running, not the whole corpus. A unit's fingerprint covers its
frame folders, so a rerun redoes only unfinished or changed units; with ``--executor ray`` each unit is a Ray
task (with a GPU when the device is CUDA). A sequence that fails to simulate fails its item alone, listed in
``errors.jsonl`` with the simulator's one-line error.

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

import pickle
import re
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from evforge.errors import InputError
from evforge.formats.streamfile import StreamFile

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
             devices=None, keep_streams: bool = False,
             drop_first_interval: bool | None = None, drop_last_interval: bool | None = None,
             min_interval_bytes: int | None = None, min_interval_events: int | None = None,
             float32_time: bool | None = None) -> DatasetPlan:
        """List the stream files, check that their sensor sizes (and, with a recipe, their time base) agree, and
        split them by environment. With ``simulate=True`` list the frame sequences instead: each unit simulates
        its own when it runs (:meth:`prepare_unit`), on ``devices`` (one worker process per device, see
        :func:`~evforge.simulator.pipeline.parse_devices`; default ``device``), and drops the streams once its
        shard is written unless ``keep_streams`` (:meth:`finish_unit`)."""
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
            root, sequences, cfg = self._simulation(src, out, streams_dir, preset, overrides, resolution, device,
                                                    batch, seed, rec)
            config = {k: v for k, v in asdict(cfg).items() if k not in ("overwrite", "workers")}
            params.update(streams_dir=str(root), simulate_config=_jsonable(config))
            items, size = _simulation_items(sequences, cfg, root, test_set,
                                            {"devices": devices, "keep_streams": bool(keep_streams)})
            return DatasetPlan(name=self.name, kind=self.kind, sensor_size=size, classes=[], items=items,
                               params=params)
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
                if rec is not None:
                    _check_time_base(path, sf.frame_times, rec)
            rel = path.relative_to(root)
            env = environment(rel, root)
            split = "test" if env.lower() in test_set else "train"
            items.append(SourceItem(key=rel.with_suffix("").as_posix(), path=str(path), label=-1, split=split,
                                    extra=(env, rel.as_posix())))
        return DatasetPlan(name=self.name, kind=self.kind, sensor_size=size, classes=[], items=items, params=params)

    @staticmethod
    def _simulation(src, out, streams_dir, preset, overrides, resolution, device, batch, seed, recipe):
        """The streams folder, the frame sequences and the simulator settings of ``simulate=True``.

        With a recipe its settings (time base, preset, resolution, upsampling) are used; ``preset``,
        ``overrides`` and ``resolution`` given explicitly still replace them (e.g. a small resolution to try).
        The temp files of killed units are removed here (the build holds the lock).
        """
        from evforge.simulator.pipeline import SimulateConfig, remove_temp_files
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
        cfg.params()  # bad parameter values fail before any work
        if root.is_dir():
            remove_temp_files(root)
        return root, sequences, cfg

    def prepare_unit(self, items, plan: DatasetPlan) -> None:
        """``simulate=True``: simulate the unit's sequences whose stream is missing or made otherwise, batched
        on the devices; a sequence that fails is reported by :meth:`read` (its item fails alone)."""
        self._failed = {}
        if not plan.params.get("simulate"):
            return
        from evforge.formats.streamfile import is_complete_stream
        from evforge.simulator.pipeline import quiet_failures, simulate_sequences, stored_differences

        jobs = [pickle.loads(item.extra[2]) for item in items]
        todo = [seq for item, (seq, cfg, size, _) in zip(items, jobs)
                if not (is_complete_stream(item.path) and not stored_differences(item.path, cfg, seq, size)[0])]
        if not todo:
            return
        cfg, where = jobs[0][1], jobs[0][3]
        # several units may run at once (--workers, Ray) into the streams folder: the build's lock covers it;
        # a failed sequence is not logged: its item fails in read(), into errors.jsonl
        with quiet_failures():
            results = simulate_sequences(todo, plan.params["streams_dir"], replace(cfg, overwrite=True),
                                         devices=where["devices"], progress=False, lock=False, summary=False)
        self._failed = {r.name: r.error for r in results if r.status == "failed"}

    def finish_unit(self, items, plan: DatasetPlan) -> None:
        """``simulate=True``: the unit's shard is written, so its streams go (unless ``keep_streams``)."""
        if plan.params.get("simulate") and not pickle.loads(items[0].extra[2])[3]["keep_streams"]:
            for item in items:
                Path(item.path).unlink(missing_ok=True)

    def sources(self, item: SourceItem) -> list:
        """The files a unit's shard is made from: the frame folder (or video) with ``simulate=True``."""
        if len(item.extra) > 2:
            return [pickle.loads(item.extra[2])[0].source]
        return [item.path]

    def item_bytes(self, item: SourceItem) -> int | None:
        """An item's raw shard bytes before its stream exists: 1 event per 4 pixels per frame, 13 bytes each."""
        if len(item.extra) <= 2:
            return None
        seq, _, (w, h), _ = pickle.loads(item.extra[2])
        return len(seq) * w * h * 13 // 4

    @staticmethod
    def unit_resources(params: dict) -> dict:
        """Ray resources of a unit: a GPU when it simulates on CUDA."""
        device = str(params.get("simulate_config", {}).get("device", "")) if params.get("simulate") else ""
        return {"num_gpus": 1} if device.startswith("cuda") else {}

    def read(self, item: SourceItem, plan: DatasetPlan) -> list[Sample]:
        """All events and frame times of one stream file (the file is checked against the plan's sensor), or,
        with a recipe, its kept intervals."""
        env, rel = item.extra[:2]
        failed = getattr(self, "_failed", {}).get(item.key)
        if failed is not None:
            raise InputError(pickle.loads(item.extra[2])[0].source, f"simulation failed: {failed}")
        with StreamFile(item.path) as sf:
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


def _simulation_items(sequences, cfg, root: Path, test_set: set, where: dict) -> tuple[list, tuple]:
    """One item per frame sequence (its stream file to be), and the sensor size they share."""
    from evforge.simulator.params import parse_resolution

    size = parse_resolution(cfg.resolution)
    items, first = [], None
    for seq in sequences:
        out_size = tuple(size or seq.size)
        if first is None:
            first = (out_size, seq.source)
        elif out_size != first[0]:
            raise InputError(seq.source, f"frame size {out_size[0]}x{out_size[1]} differs from {first[0][0]}x"
                                         f"{first[0][1]} of {first[1]} (give --resolution)")
        rel = Path(seq.name + ".h5")
        env = environment(rel, root)
        split = "test" if env.lower() in test_set else "train"
        # what a unit needs to simulate it, pickled (hashable; never part of a record or fingerprint)
        job = pickle.dumps((seq, cfg, out_size, where))
        items.append(SourceItem(key=seq.name, path=str(root / rel), label=-1, split=split,
                                extra=(env, rel.as_posix(), job)))
    if first is None:
        raise InputError(root, "no frame sequences to simulate")
    return items, first[0]


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
