"""Shard files: many samples (or stream sequences) in one HDF5 file, read one sample at a time.

The names users import, from the modules that implement them: the layout and size policy
(:mod:`.shard_layout`, which documents the format), the writers (:mod:`.shard_writer`, with Blosc chunks
compressed in a thread pool by :mod:`.blosc`), the reader (:mod:`.shard_reader`) and its full integrity pass
(:mod:`.shard_check`).
"""

from __future__ import annotations

from evforge.streamfile import CHUNK_EVENTS

from .shard_layout import (
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
from .shard_reader import ShardReader
from .shard_writer import RollingShardWriter, ShardWriter

__all__ = [
    "FORMAT", "FORMAT_VERSION", "KINDS", "CHUNK_EVENTS", "RAW_EVENT_BYTES", "RAW_FRAME_BYTES", "RAW_INDEX_BYTES",
    "DEFAULT_TARGET_BYTES", "ShardWriter", "ShardReader", "RollingShardWriter", "estimate_sample_bytes",
    "sha256_file",
]
