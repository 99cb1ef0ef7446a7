"""Segmentation reports: metrics JSON, a Markdown table, a per-class IoU bar chart and colourised predictions.

DSEC-Semantic's 11 classes and colours are ESS's (``uzh-rpg/ess``, ``config/settings.py``, 11-class
``semseg_color_map``; Cityscapes colours of the merged classes)::

    0 background    (0, 0, 0)        4 pole        (153, 153, 153)   8 car           (0, 0, 142)
    1 building      (70, 70, 70)     5 road        (128, 64, 128)    9 wall          (102, 102, 156)
    2 fence         (190, 153, 153)  6 sidewalk    (244, 35, 232)   10 traffic sign  (220, 220, 0)
    3 person        (220, 20, 60)    7 vegetation  (107, 142, 35)

Ignored pixels (255) are drawn white (:data:`IGNORE_COLOR`; background is already black). Metrics are
fractions in the JSON and percentages in the Markdown and the chart.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["DSEC_PALETTE", "IGNORE_COLOR", "palette_for", "colorize", "event_image", "plot_class_iou",
           "plot_predictions", "metrics_markdown", "write_segmentation_report"]

DSEC_PALETTE = np.array([(0, 0, 0), (70, 70, 70), (190, 153, 153), (220, 20, 60), (153, 153, 153),
                         (128, 64, 128), (244, 35, 232), (107, 142, 35), (0, 0, 142), (102, 102, 156),
                         (220, 220, 0)], dtype=np.uint8)
IGNORE_COLOR = (255, 255, 255)


def palette_for(num_classes: int) -> np.ndarray:
    """DSEC's palette for 11 classes; otherwise a fixed (seeded) random palette."""
    if num_classes <= len(DSEC_PALETTE):
        return DSEC_PALETTE[:num_classes]
    rng = np.random.default_rng(0)
    return np.concatenate([DSEC_PALETTE, rng.integers(0, 256, (num_classes - len(DSEC_PALETTE), 3))]).astype(np.uint8)


def _np(a) -> np.ndarray:
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


def colorize(mask, palette: np.ndarray | None = None, ignore_index: int = 255) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours; ``ignore_index`` (and ids without a colour) -> white."""
    m = _np(mask).astype(np.int64)
    pal = DSEC_PALETTE if palette is None else np.asarray(palette, dtype=np.uint8)
    out = np.empty((*m.shape, 3), dtype=np.uint8)
    out[:] = IGNORE_COLOR
    ok = (m >= 0) & (m < len(pal)) & (m != ignore_index)
    out[ok] = pal[m[ok]]
    return out


def event_image(x) -> np.ndarray:
    """(C, H, W) stacked 2-channel histograms -> (H, W, 3) uint8: the sum of the even channels in red, of the
    odd ones in blue (OFF / ON with ECDDP's order), each scaled to its 99th percentile of non-zero pixels."""
    a = _np(x).astype(np.float64)
    if a.ndim != 3:
        raise ValueError(f"expected a (C, H, W) input, got shape {a.shape}")
    img = np.zeros((*a.shape[1:], 3), dtype=np.float64)
    for ch, colour in ((a[0::2].sum(0), 0), (a[1::2].sum(0), 2)):
        nz = ch[ch > 0]
        if nz.size:
            img[..., colour] = np.clip(ch / np.percentile(nz, 99), 0, 1)
    return (img * 255).round().astype(np.uint8)


def _figure(size):
    """A matplotlib Figure on the Agg canvas (no pyplot: no global state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _pct(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * float(v):.2f}"


def _per_class(metrics: dict, key: str, class_names: Sequence[str]) -> list[float]:
    v = metrics.get(key, {})
    if isinstance(v, dict):
        return [float("nan") if v.get(n) is None else float(v.get(n)) for n in class_names]
    return [float("nan") if x is None else float(x) for x in v]


def plot_class_iou(metrics: dict, class_names: Sequence[str], path, palette: np.ndarray | None = None,
                   title: str = "Per-class IoU") -> Path:
    """Bar chart of per-class IoU (%) in the class colours, with the mIoU as a dashed line."""
    iou = np.array(_per_class(metrics, "iou", class_names)) * 100
    pal = palette_for(len(class_names)) if palette is None else np.asarray(palette)
    fig = _figure((max(6.0, 0.7 * len(class_names) + 2), 4.0))
    ax = fig.add_subplot(1, 1, 1)
    xs = np.arange(len(class_names))
    ax.bar(xs, np.nan_to_num(iou), color=pal[: len(class_names)] / 255.0, edgecolor="black", linewidth=0.6)
    for x, v in zip(xs, iou):
        ax.text(x, (0 if math.isnan(v) else v) + 1, "n/a" if math.isnan(v) else f"{v:.1f}", ha="center",
                va="bottom", fontsize=8)
    miou = metrics.get("mIoU")
    if miou is not None and not math.isnan(float(miou)):
        ax.axhline(100 * float(miou), color="tab:red", linestyle="--", linewidth=1,
                   label=f"mIoU {100 * float(miou):.2f}")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xticks(xs, list(class_names), rotation=40, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("IoU (%)")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def plot_predictions(examples: Sequence, class_names: Sequence[str], path, palette: np.ndarray | None = None,
                     ignore_index: int = 255) -> Path:
    """One row per ``(input, prediction, label)`` example: the events, the colourised prediction and label,
    with a colour legend of the classes."""
    from matplotlib.patches import Patch

    pal = palette_for(len(class_names)) if palette is None else np.asarray(palette)
    n = max(1, len(examples))
    h, w = _np(examples[0][1]).shape if examples else (1, 1)
    fig = _figure((9.0, 3.0 * n * h / w + 1.0))
    axes = fig.subplots(n, 3, squeeze=False)
    for row, (x, pred, target) in zip(axes, examples):
        for ax, img, title in zip(row, (event_image(x), colorize(pred, pal, ignore_index),
                                        colorize(target, pal, ignore_index)), ("events", "prediction", "label")):
            ax.imshow(img, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    handles = [Patch(facecolor=pal[k] / 255.0, edgecolor="black", label=name) for k, name in enumerate(class_names)]
    handles.append(Patch(facecolor=np.array(IGNORE_COLOR) / 255.0, edgecolor="black", label="ignore"))
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def metrics_markdown(metrics: dict, class_names: Sequence[str], title: str = "Segmentation") -> str:
    """A Markdown summary (mIoU, mAcc, aAcc) and a per-class table (IoU, accuracy), in percent."""
    iou, acc = _per_class(metrics, "iou", class_names), _per_class(metrics, "acc", class_names)
    lines = [f"## {title}", "", "| metric | value (%) |", "|---|---:|"]
    for key, label in (("mIoU", "mIoU"), ("mAcc", "mean class accuracy"), ("aAcc", "pixel accuracy")):
        lines.append(f"| {label} | {_pct(metrics.get(key))} |")
    extra = [f"{k}: {metrics[k]}" for k in ("split", "checkpoint", "num_pixels", "tta") if metrics.get(k) is not None]
    if extra:
        lines += ["", "; ".join(extra)]
    lines += ["", "| class | IoU (%) | accuracy (%) |", "|---|---:|---:|"]
    lines += [f"| {name} | {_pct(i)} | {_pct(a)} |" for name, i, a in zip(class_names, iou, acc)]
    return "\n".join(lines) + "\n"


def _jsonable(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return _jsonable(v.item())
    return v


def write_segmentation_report(metrics: dict, out_dir, class_names: Sequence[str], examples: Sequence = (),
                              *, prefix: str = "segmentation", palette: np.ndarray | None = None,
                              ignore_index: int = 255) -> list[Path]:
    """Write ``<prefix>_metrics.json`` (nan -> null), ``<prefix>_report.md``, ``<prefix>_class_iou.png`` and,
    with ``examples`` (``(input (C, H, W), prediction (H, W), label (H, W))``), ``<prefix>_predictions.png``
    into ``out_dir``. ``metrics``: ``mIoU``, ``mAcc``, ``aAcc`` and per-class ``iou`` / ``acc`` (dicts by
    class name or lists), as :func:`evforge.finetune.segmentation.segmentation_metrics` returns."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(class_names)
    paths = []
    js = out / f"{prefix}_metrics.json"
    js.write_text(json.dumps(_jsonable({**metrics, "class_names": names}), indent=2) + "\n")
    paths.append(js)
    md = out / f"{prefix}_report.md"
    md.write_text(metrics_markdown(metrics, names))
    paths.append(md)
    paths.append(plot_class_iou(metrics, names, out / f"{prefix}_class_iou.png", palette))
    if examples:
        paths.append(plot_predictions(list(examples), names, out / f"{prefix}_predictions.png", palette,
                                      ignore_index))
    return paths
