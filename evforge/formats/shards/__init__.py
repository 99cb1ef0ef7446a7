"""Shard files: many samples (or stream sequences) in one HDF5 file, read one sample at a time.

The names users import, from the modules that implement them: the layout and size policy
(:mod:`.layout`, which documents the format), the writers (:mod:`.writer`, with Blosc chunks compressed in a
thread pool by :mod:`.blosc`), the reader (:mod:`.reader`) and its full integrity pass (:mod:`.check`).
"""

from __future__ import annotations

from evforge.formats.shards.layout import (
    DEFAULT_TARGET_BYTES,
    FORMAT,
    FORMAT_VERSION,
    KINDS,
    RAW_EVENT_BYTES,
    RAW_FRAME_BYTES,
    RAW_INDEX_BYTES,
    estimate_sample_bytes,
    sha256_file,
)
from evforge.formats.shards.reader import ShardReader
from evforge.formats.shards.writer import RollingShardWriter, ShardWriter
from evforge.formats.streamfile import CHUNK_EVENTS

__all__ = [
    "FORMAT", "FORMAT_VERSION", "KINDS", "CHUNK_EVENTS", "RAW_EVENT_BYTES", "RAW_FRAME_BYTES", "RAW_INDEX_BYTES",
    "DEFAULT_TARGET_BYTES", "ShardWriter", "ShardReader", "RollingShardWriter", "estimate_sample_bytes",
    "sha256_file",
]
