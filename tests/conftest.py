"""Data factories shared by the test modules: the small datasets several modules used to build each for itself.

* ``shapes_dataset``: the synthetic classification set (four shapes, 64 x 48 sensor, 100 clips per class, 300
  train / 100 val samples) that finetuning and MEM train on; built once per session (tests only read it).
* ``event_factory``: random event samples and packed batches of them (``sample``, ``batch``), with the defaults a
  test module declares in ``EVENT_DEFAULTS`` (sensor size, time layout, coordinates beyond the sensor).
* ``make_stream_dataset(root, frames=...)``: a tiny ECDDP stream set made by the real chain (scenes -> simulate
  -> ``convert tartanair``): an ``office`` training and a ``garden`` test sequence at 96 x 96.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHAPES_SENSOR = (64, 48)


def build_shapes_dataset(root: Path, *, per_class: int = 100, size=SHAPES_SENSOR, val_fraction: float = 0.25,
                         seed: int = 0) -> Path:
    """The synthetic shapes clips converted as an N-Caltech101-like ``samples`` dataset; returns its folder."""
    from evforge.dataset_builder.build import build_dataset
    from evforge.dataset_builder.synthetic import make_synthetic_classification

    raw = make_synthetic_classification(root / "raw", per_class=per_class, size=size, seed=seed)
    report = build_dataset("ncaltech101", raw, root / "ds", val_fraction=val_fraction, seed=seed, sensor_size=size,
                           progress=False)
    assert report.num_errors == 0
    return report.out


def build_stream_dataset(root: Path, *, frames: int = 14) -> Path:
    """Scenes (``office``, ``garden``; 96 x 96, ``frames`` frames) -> clean simulation -> a tartanair stream dataset
    with ``garden`` as the test split; returns its folder."""
    from evforge.dataset_builder.build import build_dataset
    from evforge.simulator.pipeline import SimulateConfig, simulate_sequences
    from evforge.simulator.scenes import SceneSpec, make_dataset
    from evforge.simulator.sources import discover_sequences

    make_dataset(root / "scenes", envs=("office", "garden"), trajectories=1,
                 spec=SceneSpec(width=96, height=96, frames=frames, speed_px=2.5, seed=4))
    simulate_sequences(discover_sequences(root / "scenes"), root / "streams",
                       SimulateConfig(preset="clean", device="cpu", batch=2), progress=False)
    report = build_dataset("tartanair", root / "streams", root / "ds", test_envs=("garden",), progress=False)
    assert report.num_errors == 0 and report.splits == {"train": 1, "test": 1}
    return report.out


class EventFactory:
    """Random events for representation and augmentation tests. Defaults (overridable per call): ``height``,
    ``width``, ``margin`` (coordinates up to this many pixels beyond the sensor), ``t_max`` (time span),
    ``t0`` + ``t_step * i`` (sample ``i``'s start), ``tie`` (the first two events share a timestamp),
    ``lengths`` (events per sample of :meth:`batch`)."""

    DEFAULTS = dict(height=12, width=16, margin=0, t_max=100_000, t0=1_000_000, t_step=0, tie=False,
                    lengths=(120, 0, 1, 45))

    def __init__(self, **defaults):
        self.defaults = {**self.DEFAULTS, **defaults}

    def sample(self, rng: np.random.Generator, n: int, *, start: int = 0, **kw) -> np.ndarray:
        """``n`` time-sorted events (x, y, t, p) drawn from ``rng``, starting after ``t0 + start``."""
        from evforge.formats.events import make_events

        o = {**self.defaults, **kw}
        t = np.sort(rng.integers(0, o["t_max"], n)) + o["t0"] + start
        if o["tie"] and n > 4:
            t[1] = t[0]
        return make_events(rng.integers(0, o["width"] + o["margin"], n), rng.integers(0, o["height"] + o["margin"], n),
                           t, rng.choice([1, -1], n))

    def batch(self, lengths=None, seed: int = 0, **kw) -> tuple[dict, list]:
        """(packed batch of ``collate_events``, the samples) with ``lengths`` events per sample."""
        from evforge.data.collate import collate_events

        o = {**self.defaults, **kw}
        rng = np.random.default_rng(seed)
        lengths = o.pop("lengths") if lengths is None else lengths
        o.pop("lengths", None)
        step = o.pop("t_step")
        items = [{"events": self.sample(rng, n, start=step * i, **o), "label": i, "key": f"s{i}"}
                 for i, n in enumerate(lengths)]
        return collate_events(items), [it["events"] for it in items]


@pytest.fixture
def event_factory(request) -> EventFactory:
    """An :class:`EventFactory` with the test module's ``EVENT_DEFAULTS``."""
    return EventFactory(**getattr(request.module, "EVENT_DEFAULTS", {}))


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory) -> Path:
    """:func:`build_shapes_dataset` with its defaults (300 train / 100 val), once per session."""
    return build_shapes_dataset(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def make_stream_dataset():
    """:func:`build_stream_dataset` as a fixture."""
    return build_stream_dataset


@pytest.fixture
def non_evforge_files(tmp_path) -> tuple[Path, Path, Path]:
    """Three paths no evforge reader may open: a missing file, a text file, and an HDF5 file of another format."""
    import h5py

    missing, text, other = tmp_path / "missing.h5", tmp_path / "notes.h5", tmp_path / "other.h5"
    text.write_text("not hdf5\n")
    with h5py.File(other, "w") as f:
        f["events/t"] = np.arange(3)
    return missing, text, other
