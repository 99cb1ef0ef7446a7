"""The fast PNG decoder gives Pillow's pixels, for every row filter, and leaves other files to Pillow."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from evforge.simulator import png
from evforge.simulator.frame_files import read_image

pytestmark = pytest.mark.skipif(not png.AVAILABLE, reason="numba not available")


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def write_png(path, img: np.ndarray, colour: int, filters=(0, 1, 2, 3, 4), chunk=5000):
    """A PNG whose rows use ``filters`` in turn (Pillow picks one itself), its data split over IDAT chunks."""
    h, w = img.shape[:2]
    bpp = 1 if img.ndim == 2 else img.shape[2]
    raw = img.reshape(h, w * bpp).astype(np.int32)
    out = bytearray()
    for y in range(h):
        x = raw[y]
        b = raw[y - 1] if y else np.zeros_like(x)
        a = np.concatenate([np.zeros(bpp, np.int32), x[:-bpp]])
        c = np.concatenate([np.zeros(bpp, np.int32), b[:-bpp]])
        f = filters[y % len(filters)]
        pred = [0 * x, a, b, (a + b) >> 1, _paeth(a, b, c)][f]
        out += bytes([f]) + ((x - pred) % 256).astype(np.uint8).tobytes()

    def chunk_bytes(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    data = zlib.compress(bytes(out), 6)
    idats = b"".join(chunk_bytes(b"IDAT", data[i : i + chunk]) for i in range(0, len(data), chunk))
    header = chunk_bytes(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk_bytes(b"tEXt", b"k\x00v") + idats
                     + chunk_bytes(b"IEND", b""))


@pytest.mark.parametrize("colour, channels", [(0, 1), (2, 3), (4, 2), (6, 4)])
def test_every_filter_gives_pillows_pixels(tmp_path, colour, channels):
    rng = np.random.default_rng(colour)
    img = rng.integers(0, 256, (23, 37, channels) if channels > 1 else (23, 37), dtype=np.uint8)
    img[5:9] = img[4:5]  # flat rows and runs, where Up/Average/Paeth take other branches
    for filters in ((0,), (1,), (2,), (3,), (4,), (4, 3, 2, 1, 0)):
        path = tmp_path / f"f{''.join(map(str, filters))}.png"
        write_png(path, img, colour, filters)
        got = png.decode(str(path))
        with Image.open(path) as im:
            want = np.array(im.convert("L" if channels <= 2 else "RGB"))
        assert got is not None and got.dtype == np.uint8 and np.array_equal(got, want), filters
        assert np.array_equal(read_image(str(path)), want)


def test_pillow_written_frames(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    for level in (0, 1, 6, 9):
        path = tmp_path / f"c{level}.png"
        Image.fromarray(rgb).save(path, compress_level=level)
        assert np.array_equal(png.decode(str(path)), rgb)
        Image.fromarray(rgb[..., 0]).save(path, compress_level=level)
        assert np.array_equal(png.decode(str(path)), rgb[..., 0])


def test_other_files_are_left_to_pillow(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(tmp_path / "deep.png")
    write_png(tmp_path / "ok.png", rgb, 2)
    data = bytearray((tmp_path / "ok.png").read_bytes())
    data[60] ^= 0xFF  # inside the first IDAT: its CRC no longer matches
    (tmp_path / "crc.png").write_bytes(bytes(data))
    (tmp_path / "text.png").write_bytes(b"not a png")
    for name in ("palette.png", "deep.png", "crc.png", "text.png", "missing.png"):
        assert png.decode(str(tmp_path / name)) is None, name


@pytest.mark.parametrize("inflater", ["isal", "zlib"])
def test_both_inflaters_give_the_same_pixels_and_refuse_a_truncated_stream(tmp_path, monkeypatch, inflater):
    """ISA-L's inflate (the default when isal is installed) and zlib's (the fallback) decode the same
    frames, and both refuse a stream that ends early (a correct CRC over a cut IDAT)."""
    if inflater == "isal":
        isal_zlib = pytest.importorskip("isal.isal_zlib")
        monkeypatch.setattr(png, "_inflate_lib", isal_zlib)
    else:
        monkeypatch.setattr(png, "_inflate_lib", zlib)
    rgb = np.random.default_rng(3).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    rgb[10:20] = 7  # long runs: back-references in the DEFLATE stream
    write_png(tmp_path / "ok.png", rgb, 2, (4, 1, 0, 2, 3))
    with Image.open(tmp_path / "ok.png") as im:
        assert np.array_equal(png.decode(str(tmp_path / "ok.png")), np.array(im.convert("RGB")))
    data = zlib.compress(bytes(rgb.size + 40), 6)[:-20]  # a zlib stream cut short

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 56, 40, 8, 2, 0, 0, 0))
    (tmp_path / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    assert png.decode(str(tmp_path / "cut.png")) is None
