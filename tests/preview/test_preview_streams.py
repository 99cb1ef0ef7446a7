"""Preview images: exact event-frame colours and PNGs that render for every kind of stream file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from evforge.formats.events import make_events
from evforge.formats.streamfile import write_stream
from evforge.preview.streams import event_frame, render_stream_preview

W, H = 80, 60
T0 = 5_000_000

WHITE, RED, BLUE = (255, 255, 255), (255, 0, 0), (0, 0, 255)


def test_event_frame_colours():
    # (1,1) ON only, (2,1) OFF only, (3,1) one ON and one OFF (net 0), (4,1) net ON; everything else untouched
    ev = make_events(x=[1, 2, 3, 3, 4, 4, 4], y=[1, 1, 1, 1, 1, 1, 1],
                     t=[0, 1, 2, 3, 4, 5, 6], p=[1, -1, 1, -1, 1, 1, -1])
    img = event_frame(ev, 6, 3)
    assert img.shape == (3, 6, 3) and img.dtype == np.uint8
    assert tuple(img[1, 1]) == RED
    assert tuple(img[1, 2]) == BLUE
    assert tuple(img[1, 3]) == WHITE
    assert tuple(img[1, 4]) == RED
    untouched = np.ones((3, 6), bool)
    untouched[1, 1:5] = False
    untouched[1, 3] = True
    assert (img[untouched] == 255).all()


def test_event_frame_intensity_saturates_at_percentile():
    # 200 pixels with one ON event, one hot pixel with 1000: the hot pixel must not fade the others
    x = np.concatenate([np.arange(200) % W, np.zeros(1000, int)])
    y = np.concatenate([1 + np.arange(200) // W, np.zeros(1000, int)])
    ev = make_events(x, y, np.arange(len(x)), np.ones(len(x)))
    img = event_frame(ev, W, H)
    assert tuple(img[0, 0]) == RED
    assert (img[1, :W] == RED).all()
    assert tuple(img[0, 1]) == WHITE
    assert tuple(event_frame(make_events([], [], [], []), W, H)[5, 5]) == WHITE


def _stream(tmp_path, name, *, n=20_000, gray=False):
    rng = np.random.default_rng(0)
    ft = np.arange(T0, T0 + 300_001, 25_000, dtype=np.int64)
    t = np.sort(rng.integers(T0, T0 + 300_000, n))
    ev = make_events(rng.integers(0, W, n), rng.integers(0, H, n), t, rng.choice([1, -1], n))
    frames = None
    if gray:
        ramp = np.linspace(0, 255, W, dtype=np.uint8)[None, :].repeat(H, 0)
        frames = np.stack([np.roll(ramp, i, axis=1) for i in range(len(ft))])
    return write_stream(tmp_path / name, ev, ft, width=W, height=H, frames=frames)


def _check_png(path, min_size=(300, 300)):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]


@pytest.mark.parametrize("gray", [True, False])
def test_render_preview(tmp_path, gray):
    stream = _stream(tmp_path, "s.h5", gray=gray)
    out = render_stream_preview(stream, tmp_path / "previews" / "s.png", windows=3)
    assert out == tmp_path / "previews" / "s.png"
    _check_png(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["s.png"]  # no temp file left behind


def test_render_preview_empty_stream(tmp_path, monkeypatch):
    stream = _stream(tmp_path, "empty.h5", n=0)
    titles = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda self, label, *a, **k: titles.append(label) or original(self, label, *a, **k))
    out = render_stream_preview(stream, tmp_path / "empty.png")
    _check_png(out)
    assert any("0 events" in t for t in titles)


def test_render_preview_without_frame_times(tmp_path):
    ev = make_events([1, 2, 3], [4, 5, 6], [T0, T0 + 40_000, T0 + 90_000], [1, -1, 1])
    stream = write_stream(tmp_path / "noframes.h5", ev, [], width=W, height=H)
    _check_png(render_stream_preview(stream, tmp_path / "noframes.png", windows=2))
