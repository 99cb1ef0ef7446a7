"""evforge: event-camera pretraining data, from RGB video to pretrained backbones.

The public API, importable from here (``from evforge import simulate_frames, EventDataset``). Names are
loaded on first use, so ``import evforge`` stays cheap (no torch) and the command line starts fast.
"""

from __future__ import annotations

from .registry import lazy_exports

__version__ = "0.1.0"

# public name -> the module that defines it, in data-flow order
_EXPORTS = {
    # events as structured numpy arrays
    "EVENT_DTYPE": "evforge.formats.events",
    "make_events": "evforge.formats.events",
    "slice_by_time": "evforge.formats.events",
    "slice_by_count": "evforge.formats.events",
    "validate_events": "evforge.formats.events",
    # stream files (one simulated or recorded sequence)
    "StreamFile": "evforge.formats.streamfile",
    "StreamWriter": "evforge.formats.streamfile",
    "write_stream": "evforge.formats.streamfile",
    # the simulator
    "DVSParams": "evforge.simulator.params",
    "get_preset": "evforge.simulator.params",
    "UpsampleConfig": "evforge.simulator.settings",
    "SimulateConfig": "evforge.simulator.settings",
    "BatchEngine": "evforge.simulator.engine",
    "simulate_frames": "evforge.simulator.engine",
    "discover_sequences": "evforge.simulator.sources",
    "simulate_sequences": "evforge.simulator.pipeline",
    # datasets: build, verify, read
    "build_dataset": "evforge.dataset_builder.build",
    "verify_dataset": "evforge.dataset_builder.inspect",
    "EventDataset": "evforge.data.dataset",
    "make_loader": "evforge.data.dataset",
    "EventBatch": "evforge.data.collate",
    "collate_events": "evforge.data.collate",
    # representations of a packed batch
    "voxel_grid": "evforge.data.representations",
    "histogram": "evforge.data.representations",
    "stacked_histograms": "evforge.data.representations",
    "mem_image": "evforge.data.representations",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports("evforge", _EXPORTS, globals())
