"""Readers of RGB frame sequences for the simulator: TartanAir v1/v2, image folders and video files.

:func:`discover_sequences` finds every sequence under a path. Each is a :class:`FrameSequence` that yields
frames in order, one int64 microsecond timestamp per frame, and ground-truth optical flow where the dataset
has it. Bad input raises :class:`~evforge.errors.InputError` naming the offending file.

Frame times are checked when a sequence is found (:mod:`evforge.simulator.timebase`); frame files are
decoded by :mod:`evforge.simulator.frame_files`.
"""

from __future__ import annotations

import abc
import os
import re
from functools import cached_property
from typing import Iterator

import numpy as np

from evforge.errors import InputError

from .frame_files import (
    IMAGE_EXTENSIONS,  # noqa: F401  (re-exported)
    describe,
    image_kind,
    is_image,
    load_npy,
    probe_image,
    read_image,
    why,
)
from .timebase import (  # noqa: F401  (re-exported)
    MAX_INTERVAL_US,
    MAX_MEDIAN_INTERVAL_US,
    MAX_SPAN_US,
    TIMESTAMP_UNITS,
    TIMESTAMPS_FILE,
    check_time_base,
    rate_timestamps,
    read_timestamps,
)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
TARTANAIR_FPS = 10.0
_TRAJECTORY = re.compile(r"p\d+", re.IGNORECASE)
_V1_LEVEL = re.compile(r"easy|hard", re.IGNORECASE)
_V2_LEVEL = re.compile(r"data_(easy|hard)", re.IGNORECASE)


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers by value, so ``frame2`` sorts before ``frame10``."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), name


class FrameSequence(abc.ABC):
    """One sequence of RGB frames with a timestamp per frame, read lazily from disk."""

    name: str  # stable relative id, used for output file names
    source: str  # the sequence's folder or video file
    timestamps_us: np.ndarray  # int64, strictly increasing, one per frame
    frame_files: list[str] | None = None  # image paths, None for video

    def __len__(self) -> int:
        return len(self.timestamps_us)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, source={self.source!r})"

    @property
    @abc.abstractmethod
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the native frames, read cheaply from the first frame."""

    @abc.abstractmethod
    def read_frame(self, i: int) -> np.ndarray:
        """Frame ``i``: HxWx3 uint8 RGB, HxW uint8 for gray files, HxW float32 in [0, 255] for 16-bit ones."""

    def iter_frames(self, start: int = 0) -> Iterator[np.ndarray]:
        """Frames ``start, start + 1, ...`` in order."""
        for i in range(start, len(self)):
            yield self.read_frame(i)

    @property
    def has_flow(self) -> bool:
        return False

    def read_flow(self, i: int) -> np.ndarray | None:
        """``(H, W, 2)`` float32 flow ``(dx, dy)`` in native pixels from frame ``i`` to ``i + 1``, or None."""
        return None

    def read_flow_mask(self, i: int) -> np.ndarray | None:
        """``(H, W)`` bool, True where the flow of pair ``i`` is valid; None without masks."""
        return None

    def _check_index(self, i: int, n: int | None = None) -> None:
        n = len(self) if n is None else n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} items of {self.name}")


class _ImageFilesSequence(FrameSequence):
    """A sequence stored as one image file per frame."""

    def __init__(self, name: str, source: str, frame_files: list[str], timestamps_us: np.ndarray):
        self.name, self.source, self.frame_files, self.timestamps_us = name, source, frame_files, timestamps_us

    @cached_property
    def _first(self) -> tuple[int, int, str]:
        return probe_image(self.frame_files[0])

    @property
    def size(self) -> tuple[int, int]:
        width, height, _ = self._first
        return width, height

    def read_frame(self, i: int) -> np.ndarray:
        self._check_index(i)
        path = self.frame_files[i]
        frame = read_image(path)
        width, height, mode = self._first
        got, want = describe(frame), f"{width}x{height} {image_kind(mode)}"
        if got != want:
            raise InputError(path, f"frame is {got} but the first frame ({self.frame_files[0]}) is {want}")
        return frame


class TartanAirV1Sequence(_ImageFilesSequence):
    """A TartanAir v1 trajectory ``ENV/{Easy,Hard}/Pxxx`` with ``image_left/`` and optional ``flow/``.

    Flow masks use TartanAir's convention (0 valid; 1, 10, 100 for occlusions and out of view); any non-zero
    value is read as invalid.
    """

    def __init__(self, trajectory: str, name: str, fps: float | None = None):
        files = _list_tartanair_frames(os.path.join(trajectory, "image_left"), "left")
        super().__init__(name, trajectory, files, rate_timestamps(len(files), TARTANAIR_FPS if fps is None else fps))
        self.flow_dir = os.path.join(trajectory, "flow")
        self._frame_ids = [os.path.basename(f).split("_")[0] for f in files]

    @cached_property
    def _flow_listing(self) -> list[str]:
        try:
            return os.listdir(self.flow_dir)
        except (FileNotFoundError, NotADirectoryError):
            return []

    @cached_property
    def has_flow(self) -> bool:
        return any(f.endswith("_flow.npy") for f in self._flow_listing)

    @cached_property
    def _has_masks(self) -> bool:
        return any(f.endswith("_mask.npy") for f in self._flow_listing)

    def _pair_file(self, i: int, kind: str) -> str:
        self._check_index(i, len(self) - 1)
        return os.path.join(self.flow_dir, f"{self._frame_ids[i]}_{self._frame_ids[i + 1]}_{kind}.npy")

    def read_flow(self, i: int) -> np.ndarray | None:
        if not self.has_flow:
            return None
        path = self._pair_file(i, "flow")
        flow = load_npy(path, "flow")
        width, height = self.size
        if flow.dtype.kind != "f":
            raise InputError(path, f"flow must be float, got {flow.dtype}")
        if flow.shape != (height, width, 2):
            raise InputError(path, f"flow has shape {flow.shape}, expected {(height, width, 2)} for the frames")
        flow = flow.astype(np.float32, copy=False)
        if not np.isfinite(flow).all():
            raise InputError(path, "flow has non-finite values")
        return flow

    def read_flow_mask(self, i: int) -> np.ndarray | None:
        if not self._has_masks:
            return None
        path = self._pair_file(i, "mask")
        mask = load_npy(path, "mask")
        width, height = self.size
        if mask.dtype.kind not in "biu" or mask.shape != (height, width):
            raise InputError(path, f"mask must be an integer {(height, width)} array, got {mask.dtype} {mask.shape}")
        return mask == 0


class TartanAirV2Sequence(_ImageFilesSequence):
    """A TartanAir v2 trajectory ``Env/Data_{easy,hard}/Pxxx`` read from one camera's ``image_<camera>/``."""

    def __init__(self, trajectory: str, name: str, camera: str = "lcam_front", fps: float | None = None):
        image_dir = os.path.join(trajectory, f"image_{camera}")
        if not os.path.isdir(image_dir):
            cameras = sorted(d[len("image_") :] for d in os.listdir(trajectory) if d.startswith("image_"))
            found = ", ".join(cameras) or "none"
            raise InputError(trajectory, f"no image_{camera} folder (cameras here: {found})")
        files = _list_tartanair_frames(image_dir, camera)
        super().__init__(name, trajectory, files, rate_timestamps(len(files), TARTANAIR_FPS if fps is None else fps))
        self.camera = camera


class ImageFolderSequence(_ImageFilesSequence):
    """A folder of image files in natural name order, timed by a frame rate or a timestamps file."""

    def __init__(self, folder: str, name: str, *, fps: float | None = None, timestamps: str | None = None,
                 timestamps_unit: str = "s"):
        files = sorted((f for f in os.listdir(folder) if is_image(f)), key=natural_key)
        if not files:
            raise InputError(folder, "no frames found (no image files)")
        files = [os.path.join(folder, f) for f in files]
        if timestamps is None and fps is None and os.path.isfile(os.path.join(folder, TIMESTAMPS_FILE)):
            timestamps = os.path.join(folder, TIMESTAMPS_FILE)
        if timestamps is not None:
            stamps = read_timestamps(timestamps, len(files), timestamps_unit)
        elif fps is not None:
            stamps = rate_timestamps(len(files), fps)
        else:
            raise InputError(folder, "frame rate unknown: pass fps= (--fps) or a timestamps file")
        super().__init__(name, folder, files, stamps)
        self.timestamps_file = timestamps


class VideoSequence(FrameSequence):
    """A video file decoded with PyAV (first video stream), frames as HxWx3 uint8 RGB.

    Timestamps are the frames' ``pts * time_base`` (or ``i / fps`` when ``fps`` is given). Counting frames
    takes one decode pass, done once and cached, since containers do not report the count reliably.
    Random access with :meth:`read_frame` decodes from the start: use :meth:`iter_frames`.
    """

    def __init__(self, path: str, name: str, fps: float | None = None):
        self.source, self.name, self.fps = path, name, fps

    def _open(self):
        import av

        try:
            container = av.open(self.source)
        except av.FFmpegError as exc:
            raise InputError(self.source, f"cannot open video: {why(exc, self.source)}") from None
        if not container.streams.video:
            container.close()
            raise InputError(self.source, "has no video stream")
        return container

    def _decode(self) -> Iterator:
        """Decoded ``av.VideoFrame`` objects in presentation order."""
        import av

        with self._open() as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            try:
                yield from container.decode(stream)
            except av.FFmpegError as exc:
                raise InputError(self.source, f"corrupt video: {why(exc, self.source)}") from None

    @cached_property
    def timestamps_us(self) -> np.ndarray:
        stamps = [None if f.pts is None else f.pts * f.time_base for f in self._decode()]
        if not stamps:
            raise InputError(self.source, "no frames found")
        if self.fps is not None:
            return rate_timestamps(len(stamps), self.fps)
        if any(s is None for s in stamps):
            raise InputError(self.source, "frames carry no timestamps: pass fps= (--fps)")
        t = np.array([round(s * 1_000_000) for s in stamps], dtype=np.int64)  # exact: pts * Fraction
        bad = np.flatnonzero(np.diff(t) <= 0)
        if bad.size:
            i = int(bad[0]) + 1
            raise InputError(self.source, f"frame timestamps not strictly increasing at frame {i}: pass fps= (--fps)")
        check_time_base(t, self.source, "pass --fps to set the frame rate")
        return t

    @cached_property
    def size(self) -> tuple[int, int]:
        with self._open() as container:
            codec = container.streams.video[0].codec_context
            if codec.width and codec.height:
                return codec.width, codec.height
        for frame in self._decode():
            return frame.width, frame.height
        raise InputError(self.source, "no frames found")

    def read_frame(self, i: int) -> np.ndarray:
        self._check_index(i)
        frames = self.iter_frames(i)
        try:
            return next(frames)
        finally:
            frames.close()

    def iter_frames(self, start: int = 0) -> Iterator[np.ndarray]:
        n, (width, height) = len(self), self.size
        for i, frame in enumerate(self._decode()):
            if i >= n:
                break
            if i < start:
                continue
            if (frame.width, frame.height) != (width, height):
                got = f"{frame.width}x{frame.height}"
                raise InputError(self.source, f"frame {i} is {got}, the first frame is {width}x{height}")
            yield frame.to_ndarray(format="rgb24")


def discover_sequences(
    path: str | os.PathLike,
    *,
    fps: float | None = None,
    timestamps: str | os.PathLike | None = None,
    timestamps_unit: str = "s",
    camera: str = "lcam_front",
) -> list[FrameSequence]:
    """All frame sequences under ``path`` (TartanAir v1/v2, image folders, videos), sorted by name.

    ``path`` may be a video, a sequence folder, or any folder above them. ``fps`` overrides every sequence's
    frame rate; ``timestamps`` names a timestamps file for a single image folder (``timestamps_unit`` in
    s/ms/us/ns); ``camera`` picks the TartanAir v2 camera.
    """
    path = os.fspath(path)
    timestamps = None if timestamps is None else os.fspath(timestamps)
    if fps is not None and not 0 < fps <= 1e6:
        raise ValueError(f"fps must be in (0, 1e6], got {fps}")
    if fps is not None and 1e6 / fps > MAX_MEDIAN_INTERVAL_US:
        raise ValueError(f"fps {fps:g} is one frame per {1 / fps:g} s; evforge refuses frame intervals over "
                         f"{MAX_MEDIAN_INTERVAL_US / 1e6:g} s (the noise of one interval is simulated in memory)")
    if timestamps_unit not in TIMESTAMP_UNITS:
        raise ValueError(f"timestamps_unit must be one of {list(TIMESTAMP_UNITS)}, got {timestamps_unit!r}")
    if fps is not None and timestamps is not None:
        raise ValueError("pass fps or timestamps, not both")
    if not os.path.exists(path):
        raise InputError(path, "does not exist")
    if timestamps is not None and not os.path.isfile(timestamps):
        raise InputError(timestamps, "does not exist")

    found = list(_find(path))
    if not found:
        raise InputError(path, "no frame sequences found (TartanAir trajectories, image folders or videos)")
    if timestamps is not None and [kind for kind, _, _ in found] != ["folder"]:
        raise InputError(timestamps, f"needs a single image folder, but {path} holds {len(found)} sequences")

    sequences: list[FrameSequence] = []
    for kind, where, name in found:
        if kind == "v1":
            sequences.append(TartanAirV1Sequence(where, name, fps))
        elif kind == "v2":
            sequences.append(TartanAirV2Sequence(where, name, camera, fps))
        elif kind == "folder":
            sequences.append(ImageFolderSequence(where, name, fps=fps, timestamps=timestamps,
                                                 timestamps_unit=timestamps_unit))
        else:
            sequences.append(VideoSequence(where, name, fps))

    by_name: dict[str, str] = {}
    for seq in sequences:
        if seq.name in by_name:
            raise InputError(seq.source, f"has the same sequence name {seq.name!r} as {by_name[seq.name]}")
        by_name[seq.name] = seq.source
    return sorted(sequences, key=lambda s: natural_key(s.name))


def _find(root: str) -> Iterator[tuple[str, str, str]]:
    """``(kind, path, name)`` of every sequence under ``root``; kind is v1, v2, folder or video."""
    if os.path.isfile(root):
        if not root.lower().endswith(VIDEO_EXTENSIONS):
            raise InputError(root, f"not a folder or a video file ({', '.join(VIDEO_EXTENSIONS)})")
        yield "video", root, os.path.splitext(os.path.basename(root))[0]
        return

    def fail(exc: OSError):
        raise InputError(exc.filename or root, f"cannot read folder: {exc.strerror or exc}")

    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, onerror=fail, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop, or a second link to a folder already read
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        version = _tartanair_version(folder)
        if version:
            dirs[:] = []  # a trajectory's other folders (image_right, depth_left, ...) are not sequences
            yield version, folder, "/".join(os.path.abspath(folder).split(os.sep)[-3:])
            continue
        rel = os.path.relpath(folder, root)
        if any(is_image(f) for f in files):
            yield "folder", folder, os.path.basename(os.path.abspath(root)) if rel == "." else _posix(rel)
        for f in sorted(files):
            if f.lower().endswith(VIDEO_EXTENSIONS) and not f.startswith("."):
                name = os.path.splitext(os.path.normpath(os.path.join(rel, f)))[0]
                yield "video", os.path.join(folder, f), _posix(name)


def _tartanair_version(folder: str) -> str | None:
    """"v1" for ``ENV/{Easy,Hard}/Pxxx``, "v2" for ``Env/Data_{easy,hard}/Pxxx``, else None."""
    folder = os.path.abspath(folder)
    if not _TRAJECTORY.fullmatch(os.path.basename(folder)):
        return None
    level = os.path.basename(os.path.dirname(folder))
    if _V1_LEVEL.fullmatch(level):
        return "v1"
    if _V2_LEVEL.fullmatch(level):
        return "v2"
    return None


def _list_tartanair_frames(image_dir: str, suffix: str) -> list[str]:
    """``NNNNNN_<suffix>.png`` files of a TartanAir image folder, in frame order."""
    if not os.path.isdir(image_dir):
        raise InputError(image_dir, "does not exist (TartanAir trajectory without images)")
    pattern = re.compile(rf"\d+_{re.escape(suffix)}\.png")
    files = sorted((f for f in os.listdir(image_dir) if pattern.fullmatch(f)), key=natural_key)
    if not files:
        raise InputError(image_dir, f"no frames found (expected files like 000000_{suffix}.png)")
    return [os.path.join(image_dir, f) for f in files]


def _posix(relpath: str) -> str:
    return relpath.replace(os.sep, "/")
