"""Root attrs of evforge's HDF5 files, one implementation for stream files and shards: the header check
(format, version, completeness) and the user attrs' encoding, so both formats store and return the same values.

Scalars, strings and arrays are HDF5 attrs; str subclasses (``enum.StrEnum`` members, ``torch.__version__``)
are stored as plain ``str``, since h5py would make them fixed-width numpy strings (or refuse them). Dicts,
lists, tuples and None are JSON strings whose names are listed in the ``evforge_json_attrs`` attr and are
decoded back on read (a tuple comes back as a list). numpy scalars come back as Python scalars.
"""

from __future__ import annotations

import json

import numpy as np

__all__ = ["JSON_NAMES_ATTR", "encode_attrs", "decode_attr", "decode_attrs", "header_problem"]

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
