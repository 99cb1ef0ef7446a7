"""The HDF5 core shared by stream files and shards.

Root attrs, one implementation for both formats: the header check (format, version, completeness) and the
user attrs' encoding, so both formats store and return the same values.

Scalars, strings and arrays are HDF5 attrs; str subclasses (``enum.StrEnum`` members, ``torch.__version__``)
are stored as plain ``str``, since h5py would make them fixed-width numpy strings (or refuse them). Dicts,
lists, tuples and None are JSON strings whose names are listed in the ``evforge_json_attrs`` attr and are
decoded back on read (a tuple comes back as a list). numpy scalars come back as Python scalars.

Files hold their own data: no external links, external storage or virtual datasets.

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

import json

import h5py
import numpy as np

from evforge.errors import InputError

__all__ = ["JSON_NAMES_ATTR", "encode_attrs", "decode_attr", "decode_attrs", "header_problem",
           "foreign_storage_problem", "check_local"]

JSON_NAMES_ATTR = "evforge_json_attrs"


def encode_attrs(attrs: dict, *, reserved: set[str], fmt: str) -> dict:
    """``attrs`` as HDF5-storable values, ready for ``h5py.File.attrs.update``: containers JSON-encoded and
    listed under :data:`JSON_NAMES_ATTR`. A name in ``reserved`` (the ``fmt`` format's own attrs) is refused."""
    out, json_names = {}, []
    for key, value in attrs.items():
        if key in reserved or key == JSON_NAMES_ATTR:
            raise ValueError(f"attr name {key!r} is reserved by the {fmt} format")
        if value is None or isinstance(value, (dict, list, tuple)):
            out[key] = json.dumps(value)
            json_names.append(key)
        elif isinstance(value, str):
            out[key] = str(value)  # a str subclass would become a fixed-width numpy string
        else:
            out[key] = value
    if json_names:
        out[JSON_NAMES_ATTR] = json.dumps(json_names)
    return out


def decode_attr(value):
    """One attr as a Python value: bytes as str, numpy scalars as Python scalars, anything else unchanged."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def header_problem(h5_attrs, *, fmt: str, version: int, what: str) -> str | None:
    """Why root attrs do not describe a complete ``fmt`` file of format ``version`` (``what``: its name in the
    message, e.g. "shard"), or None. A newer version asks for a newer evforge."""
    if decode_attr(h5_attrs.get("evforge_format")) != fmt:
        return f"not an evforge {what} (missing evforge_format={fmt!r})"
    found = decode_attr(h5_attrs.get("format_version"))
    if isinstance(found, int) and found > version:
        return f"{what} format_version {found} is newer than this evforge reads ({version}): upgrade evforge"
    if found != version:
        return f"unsupported {what} format_version {found!r}"
    if decode_attr(h5_attrs.get("complete")) is not True:
        return f"incomplete {what} (interrupted write?)"
    return None


def decode_attrs(h5_attrs, *, reserved: set[str]) -> dict:
    """The user attrs of an HDF5 object's ``attrs`` (every name not in ``reserved``), as :func:`encode_attrs`
    was given them (tuples as lists)."""
    json_names = set(json.loads(decode_attr(h5_attrs.get(JSON_NAMES_ATTR, "[]"))))
    return {k: json.loads(decode_attr(v)) if k in json_names else decode_attr(v)
            for k, v in h5_attrs.items() if k not in reserved and k != JSON_NAMES_ATTR}



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
