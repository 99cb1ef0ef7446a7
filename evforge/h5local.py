"""HDF5 files that hold their own data: no external links, external storage or virtual datasets.

HDF5 lets a dataset's bytes live in another file: an external link (``f["x"] = h5py.ExternalLink(...)``), raw
external storage (``create_dataset(..., external=[("/etc/passwd", 0, n)])``) or a virtual dataset mapping
other files. A shard or stream file using any of them would be read from outside the dataset root, and its
sha256 (what ``verify`` checks) would not cover those bytes. evforge never writes them, so every evforge
reader refuses them: :func:`foreign_storage_problem` walks the file's links (a shard has about twenty objects)
and names the first such object. Soft links are refused too (evforge writes none; they could alias a column).

``ShardReader`` and ``StreamFile`` call :func:`check_local` after opening (so the ``tartanair`` converter,
``preview`` and ``verify`` of stream files refuse them too), and ``inspect`` and ``verify`` before reading.
"""

from __future__ import annotations

import h5py

from .errors import InputError

__all__ = ["foreign_storage_problem", "check_local"]


def foreign_storage_problem(f: h5py.File) -> str | None:
    """The first object of ``f`` whose data is not stored in ``f`` itself (or a soft link), in words, or None."""
    stack = [("", f)]
    while stack:
        prefix, group = stack.pop()
        for name in group:
            path = f"{prefix}/{name}"
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                return f"{path} is an external link to {link.filename}:{link.path} (data outside this file)"
            if isinstance(link, h5py.SoftLink):
                return f"{path} is a soft link to {link.path} (evforge files have none)"
            obj = group.get(name)
            if isinstance(obj, h5py.Group):
                stack.append((path, obj))
            elif isinstance(obj, h5py.Dataset):
                if obj.is_virtual:
                    sources = sorted({s.file_name for s in obj.virtual_sources()})
                    return f"{path} is a virtual dataset over {', '.join(sources)} (data outside this file)"
                if obj.external:
                    return (f"{path} has external storage in {', '.join(str(e[0]) for e in obj.external)} "
                            f"(data outside this file)")
    return None


def check_local(f: h5py.File, path) -> None:
    """:class:`InputError` naming ``path`` when ``f`` keeps data outside itself (see the module docstring)."""
    problem = foreign_storage_problem(f)
    if problem:
        raise InputError(path, f"refused: {problem}")
