"""Tests for evforge.simulator.sources: layout discovery, timestamps, frames, flow and bad input."""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from evforge.errors import InputError
from evforge.simulator.sources import (
    ImageFolderSequence,
    TartanAirV1Sequence,
    TartanAirV2Sequence,
    VideoSequence,
    discover_sequences,
    natural_key,
)

W, H = 8, 6


def _frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _png(path, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def _v1(traj, n: int = 3, flow: bool = True) -> dict:
    """A TartanAir v1 trajectory with ``n`` frames and (optionally) flow + masks; returns what was written."""
    frames = [_frame(i) for i in range(n)]
    for i, f in enumerate(frames):
        _png(os.path.join(traj, "image_left", f"{i:06d}_left.png"), f)
        _png(os.path.join(traj, "image_right", f"{i:06d}_right.png"), f)  # must not become a sequence
    flows, masks = [], []
    if flow:
        os.makedirs(os.path.join(traj, "flow"))
        rng = np.random.default_rng(7)
        for i in range(n - 1):
            flows.append(rng.normal(size=(H, W, 2)).astype(np.float32))
            masks.append(rng.choice(np.array([0, 1, 10, 100], np.uint8), size=(H, W)))
            np.save(os.path.join(traj, "flow", f"{i:06d}_{i + 1:06d}_flow.npy"), flows[-1])
            np.save(os.path.join(traj, "flow", f"{i:06d}_{i + 1:06d}_mask.npy"), masks[-1])
    with open(os.path.join(traj, "pose_left.txt"), "w") as f:
        f.write("0 0 0 0 0 0 1\n" * n)
    return {"frames": frames, "flows": flows, "masks": masks}


def _folder(folder, names) -> list[np.ndarray]:
    frames = [_frame(100 + i) for i in range(len(names))]
    for name, f in zip(names, frames):
        _png(os.path.join(folder, name), f)
    return frames


def _video(path, n: int = 5, fps: int = 10, size: int = 32) -> list[int]:
    """Encode ``n`` flat gray frames; returns their levels (lossy codec: compare means only)."""
    av = pytest.importorskip("av")
    codec = next((c for c in ("mpeg4", "libx264", "mjpeg") if c in av.codecs_available), None)
    if codec is None:
        pytest.skip("this PyAV build has no mpeg4/libx264/mjpeg encoder")
    levels = [20 + 40 * i for i in range(n)]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for i, level in enumerate(levels):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), level, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return levels


def _raises(path, fn, *args, match: str = "", **kwargs) -> InputError:
    """Call ``fn``; assert it raises a one-line InputError that starts with ``path``."""
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    text = str(info.value)
    assert text.startswith(f"{path}: "), text
    assert "\n" not in text and match in text, text
    return info.value


# --- TartanAir v1 ---------------------------------------------------------------------------------------


def test_v1_discovery_from_every_level(tmp_path):
    _v1(tmp_path / "EnvA" / "Easy" / "P000", n=3)
    _v1(tmp_path / "EnvA" / "Hard" / "P001", n=2)
    _v1(tmp_path / "EnvB" / "easy" / "P10", n=4)
    _v1(tmp_path / "EnvB" / "easy" / "P2", n=2)

    seqs = discover_sequences(tmp_path)
    assert [s.name for s in seqs] == ["EnvA/Easy/P000", "EnvA/Hard/P001", "EnvB/easy/P2", "EnvB/easy/P10"]
    assert [len(s) for s in seqs] == [3, 2, 2, 4]
    assert all(isinstance(s, TartanAirV1Sequence) for s in seqs)
    assert [s.name for s in discover_sequences(tmp_path / "EnvA")] == ["EnvA/Easy/P000", "EnvA/Hard/P001"]
    assert [s.name for s in discover_sequences(tmp_path / "EnvA" / "Easy")] == ["EnvA/Easy/P000"]
    (seq,) = discover_sequences(tmp_path / "EnvA" / "Easy" / "P000")
    assert seq.name == "EnvA/Easy/P000" and seq.source == str(tmp_path / "EnvA" / "Easy" / "P000")
    assert [os.path.basename(f) for f in seq.frame_files] == [f"00000{i}_left.png" for i in range(3)]


def test_v1_timestamps_default_10hz_and_fps_override(tmp_path):
    _v1(tmp_path / "E" / "Easy" / "P000", n=4, flow=False)
    (seq,) = discover_sequences(tmp_path)
    assert seq.timestamps_us.dtype == np.int64
    assert seq.timestamps_us.tolist() == [0, 100_000, 200_000, 300_000]
    (seq,) = discover_sequences(tmp_path, fps=30)
    assert seq.timestamps_us.tolist() == [round(i * 1e6 / 30) for i in range(4)] == [0, 33333, 66667, 100000]


def test_v1_frames_round_trip(tmp_path):
    written = _v1(tmp_path / "E" / "Easy" / "P000", n=3)
    (seq,) = discover_sequences(tmp_path)
    assert seq.size == (W, H)
    for i, expected in enumerate(written["frames"]):
        frame = seq.read_frame(i)
        assert frame.dtype == np.uint8 and frame.shape == (H, W, 3)
        np.testing.assert_array_equal(frame, expected)
    tail = list(seq.iter_frames(start=1))
    assert len(tail) == 2
    np.testing.assert_array_equal(tail[1], written["frames"][2])
    with pytest.raises(IndexError):
        seq.read_frame(3)


def test_v1_flow_and_mask(tmp_path):
    written = _v1(tmp_path / "E" / "Hard" / "P003", n=3)
    (seq,) = discover_sequences(tmp_path)
    assert seq.has_flow
    for i in range(2):
        flow = seq.read_flow(i)
        assert flow.dtype == np.float32 and flow.shape == (H, W, 2)
        np.testing.assert_array_equal(flow, written["flows"][i])
        mask = seq.read_flow_mask(i)
        assert mask.dtype == bool
        np.testing.assert_array_equal(mask, written["masks"][i] == 0)  # 0 valid; 1, 10, 100 invalid
    with pytest.raises(IndexError):
        seq.read_flow(2)  # no frame 3 to flow to


def test_v1_without_flow(tmp_path):
    _v1(tmp_path / "E" / "Easy" / "P000", n=2, flow=False)
    (seq,) = discover_sequences(tmp_path)
    assert not seq.has_flow and seq.read_flow(0) is None and seq.read_flow_mask(0) is None


# --- TartanAir v2 ---------------------------------------------------------------------------------------


def test_v2_discovery_and_camera(tmp_path):
    traj = tmp_path / "Forest" / "Data_easy" / "P000"
    front = [_frame(i) for i in range(3)]
    for i, f in enumerate(front):
        _png(os.path.join(traj, "image_lcam_front", f"{i:06d}_lcam_front.png"), f)
        _png(os.path.join(traj, "image_lcam_back", f"{i:06d}_lcam_back.png"), 255 - f)
    hard = tmp_path / "Forest" / "Data_hard" / "P001"
    _png(os.path.join(hard, "image_lcam_front", "000000_lcam_front.png"), front[0])

    seqs = discover_sequences(tmp_path / "Forest")
    assert [s.name for s in seqs] == ["Forest/Data_easy/P000", "Forest/Data_hard/P001"]
    assert all(isinstance(s, TartanAirV2Sequence) for s in seqs)
    assert len(seqs[0]) == 3 and seqs[0].timestamps_us.tolist() == [0, 100_000, 200_000]
    np.testing.assert_array_equal(seqs[0].read_frame(1), front[1])
    assert not seqs[0].has_flow and seqs[0].read_flow(0) is None

    (back,) = discover_sequences(traj, camera="lcam_back")
    np.testing.assert_array_equal(back.read_frame(2), 255 - front[2])
    _raises(str(hard), discover_sequences, tmp_path / "Forest", camera="lcam_back", match="no image_lcam_back folder")


# --- image folders --------------------------------------------------------------------------------------


def test_image_folder_natural_sort_and_fps(tmp_path):
    names = ["frame10.png", "frame2.png", "frame1.png"]
    frames = _folder(tmp_path / "clip", names)
    (seq,) = discover_sequences(tmp_path / "clip", fps=20)
    assert isinstance(seq, ImageFolderSequence) and seq.name == "clip"
    assert [os.path.basename(f) for f in seq.frame_files] == ["frame1.png", "frame2.png", "frame10.png"]
    assert seq.timestamps_us.tolist() == [0, 50_000, 100_000]
    np.testing.assert_array_equal(seq.read_frame(2), frames[0])  # frame10.png
    assert sorted(["b10", "b9", "a", "B1"], key=natural_key) == ["a", "B1", "b9", "b10"]


@pytest.mark.parametrize(
    "unit, text, expected",
    [
        ("s", "# t [s]\n0.0\n\n0.05\n0.1\n", [0, 50_000, 100_000]),
        ("ms", "a.png 0\nb.png, 33.5\nc.png 66\n", [0, 33_500, 66_000]),  # last column
        ("us", "10\n20  # comment\n30\n", [10, 20, 30]),
        ("ns", "1700000000000000000\n1700000000033333333\n1700000000066666667\n",
         [1700000000000000, 1700000000033333, 1700000000066667]),
    ],
)
def test_image_folder_timestamps_file_units(tmp_path, unit, text, expected):
    _folder(tmp_path, ["a.png", "b.png", "c.png"])
    (tmp_path / "timestamps.txt").write_text(text)
    (seq,) = discover_sequences(tmp_path, timestamps_unit=unit)
    assert seq.timestamps_us.dtype == np.int64 and seq.timestamps_us.tolist() == expected


def test_image_folder_explicit_timestamps_argument(tmp_path):
    _folder(tmp_path / "seq", ["0.png", "1.png"])
    (tmp_path / "seq" / "timestamps.txt").write_text("0\n1\n")
    (tmp_path / "times.txt").write_text("5\n7\n")
    (seq,) = discover_sequences(tmp_path / "seq", timestamps=tmp_path / "times.txt", timestamps_unit="ms")
    assert seq.timestamps_us.tolist() == [5000, 7000]


def test_image_folder_timing_errors(tmp_path):
    folder = tmp_path / "seq"
    _folder(folder, ["0.png", "1.png", "2.png"])
    _raises(str(folder), discover_sequences, folder,
            match="frame rate unknown: pass fps= (--fps) or a timestamps file")
    ts = folder / "timestamps.txt"
    ts.write_text("0\n1\n")
    _raises(str(ts), discover_sequences, folder, match="has 2 timestamps for 3 frames")
    ts.write_text("0\n2\n2\n")
    _raises(str(ts), discover_sequences, folder, match="strictly increase")
    ts.write_text("0\n1\nabc\n")
    _raises(str(ts), discover_sequences, folder, match="line 3")


def test_gray_and_16bit_images(tmp_path):
    gray = np.arange(H * W, dtype=np.uint8).reshape(H, W)
    deep = (np.arange(H * W, dtype=np.uint16) * 1000).reshape(H, W)
    deep[0, 0] = 65535
    Image.fromarray(gray).save(tmp_path / "g.png")
    (tmp_path / "deep").mkdir()
    Image.fromarray(deep).save(tmp_path / "deep" / "d.png")
    (seq, deep_seq) = sorted(discover_sequences(tmp_path, fps=10), key=lambda s: s.name != tmp_path.name)
    frame = seq.read_frame(0)
    assert frame.dtype == np.uint8 and frame.shape == (H, W)
    np.testing.assert_array_equal(frame, gray)
    frame = deep_seq.read_frame(0)
    assert frame.dtype == np.float32 and frame.shape == (H, W)
    np.testing.assert_allclose(frame, deep * (255 / 65535), rtol=1e-6)
    assert frame.max() == pytest.approx(255.0)


def test_mixed_root(tmp_path):
    _v1(tmp_path / "Env" / "Easy" / "P000", n=2, flow=False)
    _folder(tmp_path / "clips" / "walk", ["1.jpg", "2.jpg"])
    _video(tmp_path / "clips" / "drive.mp4")
    seqs = discover_sequences(tmp_path, fps=10)
    assert [(type(s).__name__, s.name) for s in seqs] == [
        ("VideoSequence", "clips/drive"),
        ("ImageFolderSequence", "clips/walk"),
        ("TartanAirV1Sequence", "Env/Easy/P000"),
    ]


# --- bad input ------------------------------------------------------------------------------------------


def test_missing_and_empty_paths(tmp_path):
    _raises(str(tmp_path / "nope"), discover_sequences, tmp_path / "nope", match="does not exist")
    (tmp_path / "empty").mkdir()
    _raises(str(tmp_path / "empty"), discover_sequences, tmp_path / "empty", match="no frame sequences found")
    traj = tmp_path / "E" / "Easy" / "P000"
    (traj / "image_left").mkdir(parents=True)
    _raises(str(traj / "image_left"), discover_sequences, tmp_path / "E", match="no frames found")
    (tmp_path / "notes.txt").write_text("hi")
    _raises(str(tmp_path / "notes.txt"), discover_sequences, tmp_path / "notes.txt")


def test_corrupt_and_mismatched_frames(tmp_path):
    frames = _folder(tmp_path, ["0.png", "1.png", "2.png", "3.png"])
    (tmp_path / "1.png").write_bytes(b"not a png at all")
    _png(str(tmp_path / "2.png"), np.zeros((H + 1, W, 3), np.uint8))
    _png(str(tmp_path / "3.png"), frames[3][..., 0])  # gray among RGB frames
    (seq,) = discover_sequences(tmp_path, fps=10)
    np.testing.assert_array_equal(seq.read_frame(0), frames[0])
    _raises(str(tmp_path / "1.png"), seq.read_frame, 1, match="unreadable or corrupt image")
    _raises(str(tmp_path / "1.png"), list, seq.iter_frames())
    _raises(str(tmp_path / "2.png"), seq.read_frame, 2, match=f"frame is {W}x{H + 1} RGB")
    _raises(str(tmp_path / "3.png"), seq.read_frame, 3, match="gray")


def _bad_flow_cases():
    good = np.zeros((H, W, 2), np.float32)
    nan = good.copy()
    nan[1, 2, 0] = np.nan
    return {
        "garbage": (b"\x00garbage", "not a readable .npy"),
        "pickle": (np.array([{"a": 1}], dtype=object), "not a readable .npy"),
        "shape": (np.zeros((H, W + 1, 2), np.float32), "shape"),
        "dtype": (np.zeros((H, W, 2), np.int32), "must be float"),
        "nan": (nan, "non-finite"),
    }


@pytest.mark.parametrize("case", list(_bad_flow_cases()))
def test_bad_flow_files(tmp_path, case):
    traj = tmp_path / "E" / "Easy" / "P000"
    _v1(traj, n=3)
    content, match = _bad_flow_cases()[case]
    bad = traj / "flow" / "000001_000002_flow.npy"
    if isinstance(content, bytes):
        bad.write_bytes(content)
    else:
        with open(bad, "wb") as f:
            np.save(f, content, allow_pickle=True)
    (seq,) = discover_sequences(tmp_path)
    assert seq.read_flow(0) is not None
    _raises(str(bad), seq.read_flow, 1, match=match)


def test_missing_flow_and_bad_mask(tmp_path):
    traj = tmp_path / "E" / "Easy" / "P000"
    _v1(traj, n=3)
    (traj / "flow" / "000001_000002_flow.npy").unlink()
    np.save(traj / "flow" / "000000_000001_mask.npy", np.zeros((H, W), np.float32))
    (seq,) = discover_sequences(tmp_path)
    _raises(str(traj / "flow" / "000001_000002_flow.npy"), seq.read_flow, 1, match="missing flow file")
    _raises(str(traj / "flow" / "000000_000001_mask.npy"), seq.read_flow_mask, 0, match="mask")


def test_duplicate_names(tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"x")
    (tmp_path / "clip.avi").write_bytes(b"x")
    _raises(str(tmp_path / "clip.mp4"), discover_sequences, tmp_path, match="same sequence name 'clip'")


def test_timestamps_argument_needs_single_folder(tmp_path):
    _folder(tmp_path / "a", ["0.png"])
    _folder(tmp_path / "b", ["0.png"])
    ts = tmp_path / "t.txt"
    ts.write_text("0\n")
    _raises(str(ts), discover_sequences, tmp_path, timestamps=ts, match="single image folder")


# --- video ----------------------------------------------------------------------------------------------


def test_video_frames_and_timestamps(tmp_path):
    path = tmp_path / "clip.mp4"
    levels = _video(path, n=5, fps=10)
    (seq,) = discover_sequences(path)
    assert isinstance(seq, VideoSequence) and seq.name == "clip" and seq.frame_files is None
    assert seq.size == (32, 32)
    assert len(seq) == 5
    assert seq.timestamps_us.tolist() == [0, 100_000, 200_000, 300_000, 400_000]
    frames = list(seq.iter_frames())
    assert len(frames) == 5 and all(f.shape == (32, 32, 3) and f.dtype == np.uint8 for f in frames)
    assert [abs(float(f.mean()) - level) < 8 for f, level in zip(frames, levels)] == [True] * 5
    assert abs(float(seq.read_frame(3).mean()) - levels[3]) < 8
    assert len(list(seq.iter_frames(start=3))) == 2
    (seq25,) = discover_sequences(path, fps=25)
    assert seq25.timestamps_us.tolist() == [0, 40_000, 80_000, 120_000, 160_000]


def test_corrupt_video(tmp_path):
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"definitely not a video" * 20)
    (seq,) = discover_sequences(path)
    _raises(str(path), len, seq, match="video")
