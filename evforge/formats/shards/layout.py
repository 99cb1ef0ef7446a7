"""The shard format's layout: names, dtypes, reserved attrs and the raw-size policy (one place for
the writer, the reader and the checker).

Shard files: many samples (or stream sequences) in one HDF5 file, read one sample at a time.

Layout (``format_version`` 1, full tables in ``docs/FORMAT.md``)::

    /events/x, /events/y   u2   pixel column / row, all samples concatenated (chunks of 65536 events)
    /events/p              u1   1 = ON, 0 = OFF (as DSEC)
    /events/t              u4   microseconds relative to the sample's index/t_offset
    /index/offset          u8   first event of sample i in /events/*
    /index/count           u8   its number of events
    /index/label           i4   class id (-1 = unlabelled)
    /index/key             str  unique sample key (utf-8), e.g. "airplanes/image_0001"
    /index/t_offset        i8   absolute us: the earliest of the sample's first event and first frame
    /index/t_start, t_end  i8   absolute us, half-open range [t_start, t_end) holding all its events and frames
    /index/attrs           str  per-sample JSON object ("{}" when none)
    streams only:
    /index/frame_offset    u8   first frame of sample i in /frames/*
    /index/frame_count     u8   its number of frames
    /frames/t              i8   absolute us of the source frames, all samples concatenated
    /frames/event_idx      u8   per frame, relative to its sample start: first event with t >= frame time
    optional, streams given ``frame_images`` (readers ignore them when absent):
    /frames/image          u1   (F, H_img, W_img) one image per frame (e.g. a label map), one frame per chunk
    /frames/has_image      u1   (F,) 1 where frame j has an image, 0 where its row is zero fill

    root attrs: evforge_format = "shard", format_version = 1, kind ("samples" | "streams"), width, height,
                num_samples, num_events, complete = True (written last), plus user attrs as in stream files.

Reading sample ``i`` is one slice ``offset:offset+count`` of each event column; the index is read once.
"""

from __future__ import annotations

import hashlib

import h5py

FORMAT = "shard"
FORMAT_VERSION = 1
KINDS = ("samples", "streams")
RAW_EVENT_BYTES = 9  # x u2 + y u2 + p u1 + t u4: one event's column bytes before compression
RAW_FRAME_BYTES = 16  # frames/t i8 + frames/event_idx u8
RAW_INDEX_BYTES = 48  # one index row (offset, count, label, t_offset, t_start, t_end, key/attrs pointers)
DEFAULT_TARGET_BYTES = 256 << 20

COLUMNS = {"x": "<u2", "y": "<u2", "p": "u1", "t": "<u4"}
INDEX_FIELDS = {"offset": "<u8", "count": "<u8", "label": "<i4", "t_offset": "<i8", "t_start": "<i8",
                "t_end": "<i8"}
STREAM_INDEX_FIELDS = {"frame_offset": "<u8", "frame_count": "<u8"}
RESERVED_ATTRS = {"evforge_format", "format_version", "kind", "width", "height", "num_samples", "num_events",
                  "complete", "evforge_json_attrs"}
STR_DTYPE = h5py.string_dtype("utf-8")


def estimate_sample_bytes(num_events: int, num_frames: int = 0, image_bytes: int = 0) -> int:
    """Uncompressed bytes a sample adds to a shard (event columns, frame index, frame images, index row):
    the size policy."""
    return (int(num_events) * RAW_EVENT_BYTES + int(num_frames) * RAW_FRAME_BYTES + int(image_bytes)
            + RAW_INDEX_BYTES)


def sha256_file(path, block_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def index_fields(kind: str) -> dict[str, str]:
    """The ``/index`` columns (name -> dtype) of a shard of ``kind``, key and attrs aside."""
    return dict(INDEX_FIELDS, **(STREAM_INDEX_FIELDS if kind == "streams" else {}))
