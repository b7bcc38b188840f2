"""Side-by-side preview video: the frames `decompose` writes into
preview.mp4, one per source frame."""

import numpy as np

from mlx_omnimatte.io.preview import panel_size, preview_frame
from mlx_omnimatte.io.video import read_video
from mlx_omnimatte.io.writers import video_sink, write_frames

T, H, W = 5, 40, 64


def _inputs():
    video = np.full((T, H, W, 3), 200, np.uint8)
    alpha = np.zeros((T, H, W), np.float32)
    alpha[:, :, W // 2:] = 1.0
    fg = np.zeros((T, H, W, 3), np.float32)
    fg[..., 0] = 1.0
    bg = np.full((T, H, W, 3), 0.2, np.float32)
    return video, alpha, fg, bg


def test_preview_panels():
    video, alpha, fg, bg = _inputs()
    f = preview_frame(video[0], [(alpha[0], fg[0], bg[0]), (1 - alpha[0], fg[0], bg[0])], (W, H)).astype(int)
    assert f.shape == (2 * H, 4 * W, 3)
    assert (f[:H, :W] == 200).all()  # input
    assert (f[:H, W : W + W // 2 - 1] == 0).all() and (f[:H, W + W // 2 + 1 : 2 * W] == 255).all()  # alpha
    assert (f[:H, 2 * W + W // 2 + 1 : 3 * W, 0] == 255).all()  # fg (red) where alpha = 1
    assert set(np.unique(f[:H, 2 * W : 2 * W + W // 2 - 1])) <= {140, 204}  # checkerboard where alpha = 0
    assert (f[:H, 3 * W :] == 51).all()  # background
    assert (f[H:, W : W + W // 2 - 1] == 255).all()  # second object's alpha
    assert panel_size(1920, 1080) == (512, 288)


def test_write_preview_round_trip(tmp_path):
    video, alpha, fg, bg = _inputs()
    frames = (preview_frame(video[i], [(alpha[i], fg[i], bg[i])], panel_size(W, H)) for i in range(T))
    path = write_frames(video_sink(tmp_path / "preview.mp4", 16), frames)
    got, info = read_video(path)
    assert (info.frames, info.size, info.fps) == (T, (4 * W, H), 16.0)
    assert abs(int(got[0, H // 2, W + W // 4, 0]) - 0) <= 4 and abs(int(got[0, H // 2, 2 * W - 8, 0]) - 255) <= 4
