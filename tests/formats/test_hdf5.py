"""One HDF5 attr encoding (evforge.formats.hdf5) for stream files and shards: the same user attrs come back the same
from both, str subclasses included (shards once refused them)."""

import enum
import pathlib

import numpy as np
import pytest

from evforge.formats.events import make_events
from evforge.formats.hdf5 import JSON_NAMES_ATTR
from evforge.formats.shards import ShardReader, ShardWriter
from evforge.formats.streamfile import StreamFile, write_stream


class Mode(enum.StrEnum):
    FAST = "fast"


class Version(str):
    """A str subclass as ``torch.__version__`` is."""


def _attrs():
    return {
        "mode": Mode.FAST, "version": Version("2.5.1+cu124"), "path_str": str(pathlib.PurePosixPath("/a/b")),
        "f32": np.float32(1.5), "i64": np.int64(-7), "u8": np.uint8(200), "flag": np.bool_(True),
        "plain_int": 3, "plain_float": 0.25, "text": "héllo",
        "nested": {"a": [1, 2, {"b": None, "c": "d"}], "mode": Mode.FAST}, "listed": [1, "x", [2.5]],
        "pair": (4, 5), "nothing": None, "array": np.arange(3, dtype=np.int32),
    }


def _write_both(tmp_path, attrs):
    ev = make_events([1, 2], [1, 2], [1_000, 2_000], [1, -1])
    with ShardWriter(tmp_path / "s.h5", sensor_size=(8, 8), attrs=attrs) as w:
        w.add_sample(ev, key="k")
    write_stream(tmp_path / "f.h5", ev, [0, 3_000], width=8, height=8, attrs=attrs)
    with StreamFile(tmp_path / "f.h5") as f:
        stream = f.attrs
    return ShardReader(tmp_path / "s.h5").attrs, stream


def test_user_attrs_round_trip_identically_through_a_shard_and_a_stream_file(tmp_path):
    attrs = _attrs()
    shard, stream = _write_both(tmp_path, attrs)
    expected = {
        "mode": "fast", "version": "2.5.1+cu124", "path_str": "/a/b", "f32": 1.5, "i64": -7, "u8": 200,
        "flag": True, "plain_int": 3, "plain_float": 0.25, "text": "héllo",
        "nested": {"a": [1, 2, {"b": None, "c": "d"}], "mode": "fast"}, "listed": [1, "x", [2.5]],
        "pair": [4, 5], "nothing": None,
    }
    for got in (shard, stream):
        array = got.pop("array")
        assert isinstance(array, np.ndarray) and array.tolist() == [0, 1, 2]
        assert got == expected
        # plain Python types back (no numpy scalars, no str subclasses), so the two files compare equal
        assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in expected.items()}
        assert JSON_NAMES_ATTR not in got
    assert shard == stream


@pytest.mark.parametrize("name", ["width", "complete", JSON_NAMES_ATTR])
def test_reserved_attr_names_are_refused_by_both_formats(tmp_path, name):
    ev = make_events([1], [1], [1_000], [1])
    with pytest.raises(ValueError, match=f"{name!r} is reserved by the shard format"):
        ShardWriter(tmp_path / "s.h5", sensor_size=(8, 8), attrs={name: 1})
    with pytest.raises(ValueError, match=f"{name!r} is reserved by the stream format"):
        write_stream(tmp_path / "f.h5", ev, [0], width=8, height=8, attrs={name: 1})
    assert not list(tmp_path.iterdir())  # nothing written, no temp file left
