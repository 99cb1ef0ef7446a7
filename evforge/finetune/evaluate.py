"""``evforge eval``: score a finetuning checkpoint on a split and write the reports; pick a run's best checkpoint.

:func:`evaluate` loads a trainer checkpoint (``weights_only=True``) and the config inside it, rebuilds the task
and its network from the checkpointed task state (no backbone file or download needed), runs the split
deterministically through the task's ``evaluate_split`` and writes into ``out_dir``:

* ``metrics.json``: checkpoint, step, split, sample count, metrics, per-class rows and the confusion matrix;
* ``metrics.md``: the same as Markdown tables;
* ``confusion.png``: the confusion matrix, rows normalised (class names on the axes up to 50 classes);
* whatever the task's optional ``write_reports(out, out_dir, split=)`` adds.

A task (:class:`~evforge.trainer.task.Task`) is evaluable when it has ``evaluate_split(model, cfg, split,
device=, batch_size=)`` returning ``{"metrics", "num_samples"}`` and optionally ``"confusion"``,
``"class_names"``, ``"per_class"``; its ``load_state_dict`` (the checkpointed state, read before
``build_model``), ``test_split``, ``default_metric`` and ``write_reports`` are the base's or its own.

Model selection (:func:`select_best`) uses only what the trainer leaves in a run folder: the ``val`` records
of ``log.jsonl`` and the kept checkpoints (``checkpoints/step-<N>.ckpt`` and ``last.ckpt``); a checkpoint
qualifies when a validation ran at its step, so configs validate and keep checkpoints at the same steps
(``trainer.val_every_n_steps`` = ``checkpoint.keep_every_n_steps``). The validation split is the task's
``val_split`` (never the reported ``test_split``; see :mod:`evforge.finetune.classification`). Giving
:func:`evaluate` a run folder evaluates its best checkpoint on the test split.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ..errors import InputError
from ..trainer.checkpoint import TRAINER_FORMAT, CheckpointManager, load_checkpoint, read_trainer_checkpoint

__all__ = ["evaluate", "select_best", "checkpoint_scores", "load_for_eval", "load_checkpoint_config",
           "write_reports", "plot_confusion", "markdown_report", "run_dir_of"]

FORMAT = TRAINER_FORMAT
MAX_NAMED_CLASSES = 50  # class names on the confusion matrix axes up to this many classes
MAX_ANNOTATED_CLASSES = 20  # counts written in the cells up to this many


def run_dir_of(ckpt) -> Path:
    """The run folder of a checkpoint (``<run>/checkpoints/x.ckpt`` -> ``<run>``)."""
    ckpt = Path(ckpt)
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def _task_of(cfg: dict):
    from . import TASKS, get_task

    name = cfg.get("task", {}).get("name")
    if name not in TASKS:
        raise ValueError(f"task.name {name!r} of the checkpoint is not a finetuning task ({sorted(TASKS)})")
    return get_task(name)


def load_for_eval(ckpt) -> tuple:
    """``(task, model, cfg, checkpoint dict)`` of a trainer checkpoint, the model with the checkpoint's weights."""
    ck, cfg = read_trainer_checkpoint(ckpt)
    task = _task_of(cfg)
    if ck.get("task"):
        task.load_state_dict(ck["task"])  # the resolved network spec: build_model reads no backbone file
    model = task.build_model(cfg)
    model.load_state_dict(ck["model"])
    model.eval()
    return task, model, cfg, ck


def _load_step(path: Path) -> int:
    return int(load_checkpoint(path, mmap=True)["progress"]["step"])


def _val_records(run_dir: Path, metric: str) -> dict[int, float]:
    log = run_dir / "log.jsonl"
    if not log.is_file():
        raise InputError(log, "no training log (log.jsonl) in the run folder")
    out = {}
    for line in log.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        v = rec.get(metric)
        if rec.get("split") == "val" and isinstance(v, (int, float)) and not math.isnan(v):
            out[int(rec["step"])] = float(v)  # a later record of the same step (a resumed run) wins
    return out


def checkpoint_scores(run_dir, metric: str = "top1") -> list[dict]:
    """``[{"step", "path", "value"}]`` for every kept checkpoint of ``run_dir`` validated at its step, by step."""
    run_dir = Path(run_dir)
    values = _val_records(run_dir, metric)
    manager = CheckpointManager(run_dir / "checkpoints")
    found: dict[int, Path] = {}
    if manager.last.is_file():
        found[_load_step(manager.last)] = manager.last
    for p in manager.step_checkpoints():  # step-<N>.ckpt wins over last.ckpt at the same step (stable name)
        found[int(p.stem.split("-")[1])] = p
    return [{"step": s, "path": p, "value": values[s]} for s, p in sorted(found.items()) if s in values]


def select_best(run_dir, metric: str = "top1", mode: str = "auto") -> Path:
    """The kept checkpoint of ``run_dir`` with the best validation ``metric`` (``mode`` max / min; auto: min for
    names containing "loss" or "nll", else max); ties go to the earliest step."""
    if mode == "auto":
        mode = "min" if ("loss" in metric or "nll" in metric) else "max"
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be max, min or auto, got {mode!r}")
    scores = checkpoint_scores(run_dir, metric)
    if not scores:
        raise InputError(run_dir, f"no kept checkpoint has a validation {metric!r} at its step (validate and keep "
                                  "checkpoints at the same steps: trainer.val_every_n_steps = "
                                  "checkpoint.keep_every_n_steps)")
    sign = 1.0 if mode == "max" else -1.0
    best = max(scores, key=lambda s: (sign * s["value"], -s["step"]))
    return best["path"]


def evaluate(ckpt, *, split: str | None = None, out_dir=None, device=None, batch_size: int | None = None,
             metric: str | None = None) -> dict:
    """Evaluate ``ckpt`` on ``split`` (default: the task's test split) and write the reports to ``out_dir``
    (default ``<run>/eval/<checkpoint name>-<split>``); returns what ``metrics.json`` holds plus ``files``.

    ``ckpt`` may be a run folder: its best checkpoint by the validation ``metric`` (default: the task's, top-1
    accuracy for classification) is evaluated, and the choice is recorded under ``selected``.
    """
    selected = None
    ckpt = Path(ckpt)
    if ckpt.is_dir():
        task = _task_of(json.loads(load_checkpoint_config(ckpt)))
        metric = metric or task.default_metric
        best = select_best(ckpt, metric)
        value = next(s["value"] for s in checkpoint_scores(ckpt, metric) if s["path"] == best)
        selected = {"metric": metric, "value": value, "run_dir": str(ckpt)}
        ckpt = best
    task, model, cfg, ck = load_for_eval(ckpt)
    if split is None:
        split = task.test_split(cfg)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = task.evaluate_split(model, cfg, split, device=device, batch_size=batch_size)
    step = int(ck.get("progress", {}).get("step", -1))
    result = {
        "checkpoint": str(ckpt.resolve()), "step": step, "task": cfg["task"]["name"], "split": split,
        "dataset": str(cfg.get("data", {}).get("path")), "num_samples": int(out["num_samples"]),
        "metrics": {k: float(v) for k, v in out["metrics"].items()},
        "per_class": out.get("per_class", []), "class_names": out.get("class_names", []),
        "confusion": out["confusion"].tolist() if out.get("confusion") is not None else None,
        "config_hash": ck.get("config_hash"),
    }
    if selected is not None:
        selected["step"] = step
        result["selected"] = selected
    out_dir = Path(out_dir) if out_dir is not None else run_dir_of(ckpt) / "eval" / f"{ckpt.stem}-{split}"
    result["files"] = write_reports(result, out_dir)
    extra = task.write_reports(out, out_dir, split=split) or []  # the task's own (e.g. segmentation figures)
    if extra:
        result["files"]["task"] = [str(p) for p in extra]
    return result


def load_checkpoint_config(run_dir) -> str:
    """The config (JSON text) of a run folder, from its newest checkpoint."""
    manager = CheckpointManager(Path(run_dir) / "checkpoints")
    path = manager.latest()
    if path is None:
        raise InputError(run_dir, "no checkpoints in the run folder")
    return load_checkpoint(path, mmap=True)["config"]


# -------------------------------------------------------------------------------------------------- reports
def _fmt(v) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def markdown_report(result: dict) -> str:
    """The metrics (and per-class accuracies) of an :func:`evaluate` result as Markdown tables."""
    lines = [f"# Evaluation of `{Path(result['checkpoint']).name}` (step {result['step']})", "",
             f"- task: {result['task']}", f"- dataset: `{result['dataset']}`",
             f"- split: `{result['split']}` ({result['num_samples']} samples)",
             f"- checkpoint: `{result['checkpoint']}`"]
    if result.get("selected"):
        s = result["selected"]
        lines.append(f"- selected as the best validation {s['metric']} ({_fmt(s['value'])}) of `{s['run_dir']}`")
    lines += ["", "| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in result["metrics"].items()]
    if result.get("per_class"):
        keys = [k for k in result["per_class"][0] if k != "class"]
        lines += ["", "## Per class", "", "| class | " + " | ".join(keys) + " |",
                  "|---|" + "---:|" * len(keys)]
        for row in result["per_class"]:
            cells = [str(row[k]) if isinstance(row[k], int) else _fmt(row[k]) for k in keys]
            lines.append(f"| {row['class']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_confusion(cm, class_names, path, *, title: str = "", dpi: int = 120) -> Path:
    """Write the confusion matrix ``[true, predicted]`` as a PNG: rows normalised to recall (colour), counts in
    the cells up to 20 classes, class names on the axes up to 50 classes."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(cm, dtype=np.int64)
    k = cm.shape[0]
    support = cm.sum(1, keepdims=True)
    rates = cm / np.maximum(support, 1)
    side = min(4.0 + 0.28 * k, 30.0)
    fig = Figure(figsize=(side + 1.2, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= MAX_NAMED_CLASSES:
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        ax.set_xticklabels(class_names, rotation=90 if k > 8 else 45, ha="right" if k <= 8 else "center",
                           fontsize=8)
        ax.set_yticklabels(class_names, fontsize=8)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if k <= MAX_ANNOTATED_CLASSES:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_reports(result: dict, out_dir) -> dict:
    """``metrics.json``, ``metrics.md`` and (with a confusion matrix) ``confusion.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out_dir / "metrics.json"), "markdown": str(out_dir / "metrics.md")}
    if result.get("confusion") is not None:
        top1 = result["metrics"].get("top1")
        title = f"{result['split']} (step {result['step']})" + (f", top-1 {_fmt(top1)}" if top1 is not None else "")
        files["confusion"] = str(plot_confusion(result["confusion"], result["class_names"],
                                                out_dir / "confusion.png", title=title))
    body = {k: v for k, v in result.items() if k != "files"}
    _write_text(out_dir / "metrics.json", json.dumps({**body, "files": files}, indent=1, allow_nan=True) + "\n")
    _write_text(out_dir / "metrics.md", markdown_report(result))
    return files
