"""Fingerprints of work: what a finished output was made from, so that a rerun redoes exactly what changed.

A rerun may skip a finished output only when everything that shapes it is unchanged: the options (converter
options, simulator parameters, format version) and the source files. Sources are identified by size and
modification time (``st_mtime_ns``), not by content: hashing terabytes of event files on every rerun would cost
more than the conversion. A repaired or replaced file changes at least one of the two; a copy with ``cp -p`` or
``rsync -t`` keeps both (and is skipped, correctly, since the content is the same).

* :func:`source_signature` -- ``{"size", "mtime_ns"}`` of a file, or of every file under a folder;
* :func:`digest` -- sha256 of any JSON-able value, independent of key order;
* :func:`differences` -- which keys of two parameter dicts differ, in words (for a refusal such as
  "made with preset 'noisy', asked for 'ecddp'").

``convert`` stores ``digest({options, sources})`` in each unit's record; ``simulate`` stores its parameters in
the stream file and compares them with :func:`differences` before skipping a finished sequence
(:func:`evforge.simulator.pipeline.stored_differences`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

__all__ = ["source_signature", "sources_signature", "digest", "differences"]


def _stat(path: Path) -> dict:
    try:
        st = path.stat()
    except OSError:
        return {"missing": True}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def source_signature(path) -> dict:
    """Size and mtime of a file; of a folder, those of every file below it (sorted relative paths).

    A missing path gives ``{"missing": True}`` (so a file that appears later changes the signature).
    """
    path = Path(path)
    if not path.is_dir():
        return _stat(path)
    files = {}
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            p = Path(root) / name
            files[p.relative_to(path).as_posix()] = _stat(p)
    return {"files": files}


def sources_signature(paths: Iterable) -> list:
    """:func:`source_signature` of each path in order (paths themselves left out: moving a tree keeps it)."""
    return [source_signature(p) for p in paths]


def digest(value) -> str:
    """Hex sha256 of ``value`` as canonical JSON (sorted keys; paths and other objects as strings)."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=lambda v: os.fspath(v)
                      if isinstance(v, os.PathLike) else str(v))
    return hashlib.sha256(blob.encode()).hexdigest()


def differences(stored: dict, requested: dict, limit: int = 4) -> list[str]:
    """``"key: stored X, requested Y"`` for each differing top-level key (at most ``limit``, then ``"..."``)."""
    out = []
    for key in sorted(set(stored) | set(requested), key=str):
        a, b = stored.get(key, "<absent>"), requested.get(key, "<absent>")
        if a != b:
            out.append(f"{key}: stored {a!r}, requested {b!r}")
    return out[:limit] + (["..."] if len(out) > limit else [])
