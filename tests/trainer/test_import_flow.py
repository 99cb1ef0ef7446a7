"""Imports run along the data flow (docs/ARCHITECTURE.md): no package imports one that comes after it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "evforge"

# package -> the evforge top-level names it must not import (anywhere in its files, lazy imports included)
_TOP = {"export", "cli", "commands", "demo", "preview"}
FORBIDDEN = {
    # file formats read and write bytes only
    "formats": {"simulator", "dataset_builder", "data", "realism", "models", "trainer", "pretrain", "finetune"} | _TOP,
    "simulator": {"dataset_builder", "data", "realism", "models", "trainer", "pretrain", "finetune"} | _TOP,
    "dataset_builder": {"data", "realism", "models", "trainer", "pretrain", "finetune"} | _TOP,
    # training-side reading: datasets of the formats, never the builders or the simulator
    "data": {"simulator", "dataset_builder", "realism", "models", "trainer", "pretrain", "finetune"} | _TOP,
    "models": {"dataset_builder", "simulator", "trainer", "pretrain", "finetune", "export", "cli"},
    "trainer": {"pretrain", "finetune", "export", "cli"},
    "pretrain": {"finetune", "export", "cli"},
    "finetune": {"export", "cli"},
}
# finetuning shares MEM's input pipeline on purpose (it must see exactly the pretraining images)
ALLOWED = {("finetune", "evforge.pretrain.mem.inputs")}


def _imports(path: Path) -> set[str]:
    """Absolute names of the evforge modules a file imports (relative imports resolved)."""
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("evforge"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts[: len(parts) - node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("evforge"):
                out.add(name)
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports(package):
    bad = []
    for path in sorted((PKG / package).rglob("*.py")):
        if path.name == "demo.py":  # demos run the whole chain, like the CLI
            continue
        for name in _imports(path):
            top = name.split(".")[1] if "." in name else ""
            if top in FORBIDDEN[package] and (package, name) not in ALLOWED:
                bad.append(f"{path.relative_to(PKG)} imports {name}")
    assert not bad, "\n".join(bad)


def test_finetuning_reads_backbone_files_without_pretraining_tasks():
    names = set().union(*(_imports(p) for p in (PKG / "finetune").rglob("*.py")))
    assert not {n for n in names if n.startswith("evforge.pretrain") and n.endswith((".task", ".export"))}
    assert "evforge.models.backbone_file" in names
