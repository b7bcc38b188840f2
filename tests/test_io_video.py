"""Reading videos and frame folders."""


import numpy as np
import pytest
from PIL import Image

from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.io.video import natural_key, probe_video, read_video
from mlx_omnimatte.io.writers import write_video
from helpers import EXAMPLES

needs_examples = pytest.mark.skipif(
    not EXAMPLES.is_dir(), reason=f"shared example clips not found at {EXAMPLES}"
)


@pytest.fixture(scope="module")
def real_clips():
    return {name: read_video(EXAMPLES / name / "input_video.mp4") for name in ("boys-beach", "animator-draw")}


@needs_examples
@pytest.mark.parametrize("name,frames", [("boys-beach", 85), ("animator-draw", 200)])
def test_real_clip_shape_and_rate(real_clips, name, frames):
    video, info = real_clips[name]
    assert video.shape == (frames, 384, 640, 3) and video.dtype == np.uint8
    assert (info.frames, info.width, info.height, info.fps) == (frames, 640, 384, 16.0)
    probed = probe_video(EXAMPLES / name / "input_video.mp4")
    assert (probed.frames, probed.size, probed.fps) == (frames, (640, 384), 16.0)
    # Real content, not a blank decode.
    sample = video[::10, ::4, ::4]
    assert 20 < sample.mean() < 235 and sample.std() > 10


def _gradient(t, h=24, w=40):
    x = np.zeros((t, h, w, 3), np.uint8)
    x[..., 0] = np.arange(w, dtype=np.uint8)[None, None, :] * 6
    x[..., 1] = np.arange(t, dtype=np.uint8)[:, None, None] * 20
    return x


def test_frame_folder_natural_order_and_fps(tmp_path):
    frames = _gradient(12)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"frame_{i + 1}.png")  # frame_1 .. frame_12
    (folder / ".hidden.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not a frame")
    video, info = read_video(folder)
    np.testing.assert_array_equal(video, frames)  # frame_10 after frame_9
    assert (info.frames, info.size, info.fps) == (12, (40, 24), 16.0)
    assert read_video(folder, fps=24)[1].fps == 24.0
    assert probe_video(folder, fps=30).frames == 12
    assert sorted(["f10", "f2", "f1"], key=natural_key) == ["f1", "f2", "f10"]


def test_video_file_roundtrip_rate_and_gray(tmp_path):
    frames = _gradient(9)
    path = write_video(tmp_path / "v.mp4", frames, fps=12)
    video, info = read_video(path)
    assert (info.frames, info.size, info.fps) == (9, (40, 24), 12.0)
    assert np.abs(video.astype(int) - frames).mean() < 3
    gray, _ = read_video(path, gray=True)
    assert gray.shape == (9, 24, 40)


def test_probe_counts_packets_for_webm(tmp_path):
    # WebM headers carry no frame count: probe_video counts packets instead.
    from mlx_omnimatte.io.writers import rgba_video_sink, write_frames

    rgba = np.full((7, 16, 16, 4), 200, np.uint8)
    path = write_frames(rgba_video_sink(tmp_path / "v.webm", 16), rgba)
    assert probe_video(path).frames == 7


def test_missing_unreadable_and_empty_inputs(tmp_path):
    with pytest.raises(OmnimatteError, match="nope.mp4: no such file"):
        read_video(tmp_path / "nope.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_text("hello")
    with pytest.raises(OmnimatteError, match="bad.mp4: not a readable video"):
        read_video(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OmnimatteError, match="empty: folder holds no frames"):
        read_video(empty)


def test_frame_folder_size_mismatch(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (32, 16)).save(folder / "0.png")
    Image.new("RGB", (32, 18)).save(folder / "1.png")
    with pytest.raises(OmnimatteError, match="1.png: frame size 32x18 differs"):
        read_video(folder)


def test_zero_frame_video(tmp_path):
    import av

    path = tmp_path / "zero.mkv"
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=16)
    stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    container.start_encoding()
    container.close()
    with pytest.raises(OmnimatteError, match="zero.mkv"):
        read_video(path)


def test_display_rotation_is_applied(tmp_path):
    import av

    path = tmp_path / "phone.mp4"
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=16)
    stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv444p"
    stream.set_display_rotation(90)  # counter-clockwise, as phones store portrait video
    frame = np.zeros((32, 64, 3), np.uint8)
    frame[:8, :16] = 255  # top-left block of the stored pixels
    for i in range(3):
        vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
        vf.pts = i
        for p in stream.encode(vf):
            container.mux(p)
    for p in stream.encode():
        container.mux(p)
    container.close()
    info = probe_video(path)
    video, read_info = read_video(path)
    assert (info.width, info.height, info.frames) == (32, 64, 3) == (read_info.width, read_info.height, 3)
    assert video.shape == (3, 64, 32, 3)
    assert video[0, 52:62, 1:7].min() > 240 and video[0, :40].max() < 15  # now bottom-left
