"""Decoding the frame files of a sequence: images (8-bit RGB or gray, 16-bit gray) and ``.npy`` flow arrays,
each failure an :class:`~evforge.errors.InputError` naming the file."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from evforge.errors import InputError

from . import png

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_GRAY16_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # 16-bit PNGs open as "I" in older Pillow
_GRAY_MODES = {"1", "L", "LA", "La"}
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def is_image(filename: str) -> bool:
    return filename.lower().endswith(IMAGE_EXTENSIONS) and not filename.startswith(".")


def why(exc: Exception, path: str) -> str:
    """The exception's message, or its type where the message would only repeat the path."""
    text = str(exc)
    return type(exc).__name__ if not text or os.path.basename(path) in text else text


def image_kind(mode: str) -> str:
    return "16-bit gray" if mode in _GRAY16_MODES else "gray" if mode in _GRAY_MODES else "RGB"


def describe(frame: np.ndarray) -> str:
    kind = "16-bit gray" if frame.dtype == np.float32 else "gray" if frame.ndim == 2 else "RGB"
    return f"{frame.shape[1]}x{frame.shape[0]} {kind}"


def probe_image(path: str) -> tuple[int, int, str]:
    """``(width, height, mode)`` from the image header, without decoding pixels."""
    try:
        with Image.open(path) as img:
            return img.width, img.height, img.mode
    except _IMAGE_ERRORS as exc:
        raise InputError(path, f"unreadable or corrupt image ({why(exc, path)})") from None


def read_image(path: str) -> np.ndarray:
    """Decode one image: HxWx3 uint8 RGB, HxW uint8 gray, or HxW float32 in [0, 255] for 16-bit gray.

    8-bit PNGs go through :func:`evforge.simulator.png.decode` (the same pixels, 2-3x faster); the rest,
    and any PNG it does not take, through Pillow."""
    if path[-4:].lower() == ".png":
        frame = png.decode(path)
        if frame is not None:
            return frame
    try:
        with Image.open(path) as img:
            kind = image_kind(img.mode)
            if kind == "16-bit gray":
                return np.asarray(img).astype(np.float32) * np.float32(255 / 65535)
            target = "L" if kind == "gray" else "RGB"
            return np.array(img if img.mode == target else img.convert(target))
    except _IMAGE_ERRORS as exc:
        raise InputError(path, f"unreadable or corrupt image ({why(exc, path)})") from None


def load_npy(path: str, what: str) -> np.ndarray:
    """A ``.npy`` array, never unpickling; a missing file is an error (other pairs of the sequence have one)."""
    if not os.path.isfile(path):
        raise InputError(path, f"missing {what} file (other frame pairs of this sequence have one)")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(path, f"not a readable .npy {what} array ({why(exc, path)})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise InputError(path, f"is an .npz archive, expected a .npy {what} array")
    return array
