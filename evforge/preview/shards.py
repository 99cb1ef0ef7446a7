"""``evforge preview`` for shards: a PNG grid of event frames of random samples (or stream windows).

A quick look at what a converter produced: each panel is one item of :class:`EventDataset` rendered with
:func:`evforge.preview.streams.event_frame`, titled with its key, class name and event count.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from evforge.data.dataset import EventDataset
from evforge.dataset_builder.inspect import file_format
from evforge.errors import InputError
from evforge.formats.atomic import atomic_output
from evforge.formats.manifest import MANIFEST_NAME, Manifest
from evforge.preview.streams import event_frame

__all__ = ["render_shard_preview", "open_items"]

_COLS = 4


def open_items(path, split: str | None = None) -> list[EventDataset]:
    """The datasets to draw from: one per split of a dataset folder / manifest (or just ``split``), or a
    single shard file (``split`` ignored). Stream datasets yield frame-interval windows."""
    path = Path(path)
    fmt = file_format(path)
    if fmt == "dataset":
        manifest = path / MANIFEST_NAME if path.is_dir() else path
        splits = list(Manifest.load(manifest).splits)
        if split is not None:
            if split not in splits:
                raise ValueError(f"{manifest}: no split {split!r} (splits: {', '.join(splits)})")
            splits = [split]
        return [EventDataset(manifest, s) for s in splits]
    if fmt == "shard":
        ds = EventDataset.from_shards([path])
        names = ds.readers[0].attrs.get("classes")  # class names, if the writer recorded them
        if isinstance(names, list):
            ds.classes = [str(c) for c in names]
        return [ds]
    raise InputError(path, "not an evforge dataset folder, manifest or shard file")


def render_shard_preview(path, out_png, *, samples: int = 8, split: str | None = None, seed: int = 0,
                         dpi: int = 100) -> Path:
    """Write a PNG grid of ``samples`` random items of a dataset / shard (atomically) and return its path."""
    out_png = Path(out_png)
    datasets = [d for d in open_items(path, split) if len(d)]
    if not datasets:
        raise ValueError(f"{path}: no samples to preview")
    sizes = np.array([len(d) for d in datasets])
    rng = np.random.default_rng(seed)
    n = int(min(max(1, samples), sizes.sum()))
    picks = np.sort(rng.choice(int(sizes.sum()), n, replace=False))  # uniform over all items
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    width, height = datasets[0].sensor_size
    cols = min(_COLS, n)
    rows = math.ceil(n / cols)
    panel_w = 3.2
    panel_h = float(np.clip(panel_w * height / width, 1.0, 6.0))
    fig = Figure(figsize=(cols * panel_w, rows * (panel_h + 0.6) + 0.6))
    FigureCanvasAgg(fig)
    first = datasets[0]
    what = f"{first.name} ({first.kind}, {width}x{height})" if first.name else f"{Path(path).name} ({first.kind}, " \
                                                                                f"{width}x{height})"
    fig.suptitle(f"{what}: {n} random item(s) of {int(sizes.sum())}, seed {seed}")
    for k, g in enumerate(picks):
        d = int(np.searchsorted(bounds, g, "right") - 1)
        ds = datasets[d]
        item = ds[int(g - bounds[d])]
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(event_frame(item["events"], width, height), interpolation="nearest")
        split_tag = f"{ds.split}: " if ds.split and len(datasets) > 1 else ""
        ax.set_title(f"{split_tag}{item['key']}\n{ds.label_name(item['label'])}, {len(item['events']):,} events",
                     fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    for ds in datasets:
        ds.close()

    with atomic_output(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return out_png
