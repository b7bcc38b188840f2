"""`composite` on the command line: the refusals (another size or length
without --fit, a layer without alpha), each --fit mode read back, layers as
PNG folders and alpha videos, and progress on stderr."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mlx_omnimatte.io.video import read_video
from mlx_omnimatte.io.writers import rgba_video_sink, write_frames, write_png_frames, write_video
from helpers import assert_refused, run_cli, run_ok

T, H, W = 5, 24, 32
LEVELS = (0, 100, 200)  # a 3-frame background, one grey level per frame


def _layer_frames() -> np.ndarray:
    """RGBA: clear on the left half, opaque white on the right."""
    frames = np.full((T, H, W, 4), 255, np.uint8)
    frames[:, :, : W // 2, 3] = 0
    return frames


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("composite")
    write_png_frames(root / "layer", _layer_frames())
    write_png_frames(root / "rgb_layer", _layer_frames()[..., :3])
    write_video(root / "rgb_layer.mp4", _layer_frames()[..., :3], 16)
    write_frames(rgba_video_sink(root / "layer.mov", 16), _layer_frames())
    write_frames(rgba_video_sink(root / "layer.webm", 16), _layer_frames())
    short = np.stack([np.full((40, 48, 3), v, np.uint8) for v in LEVELS])
    write_video(root / "short.mp4", short, 16)  # 3 frames, 48x40
    write_video(root / "short_same_size.mp4", short[:, :H, :W], 16)
    write_video(root / "long.mp4", np.repeat(short[:1, :H, :W], 8, axis=0), 16)
    Image.fromarray(short[1]).save(root / "big.png")
    Image.fromarray(short[2, :H, :W]).save(root / "same.png")
    return root


def _levels(path) -> list[float]:
    """The mean grey of each frame's clear (left) half, read back."""
    frames, _ = read_video(path)
    return [round(float(f[:, : W // 4].mean()) / 100) * 100 for f in frames]


def test_size_mismatch_is_refused(files, tmp_path, capsys):
    out = tmp_path / "comp.mp4"
    assert_refused(["composite", files / "layer", "--background", files / "big.png", "-o", out], capsys,
                   "background: 48x40 differs from the layers' 32x24 (pass --fit", out)


def test_length_mismatch_is_refused(files, tmp_path, capsys):
    out = tmp_path / "comp.mp4"
    assert_refused(["composite", files / "layer", "--background", files / "short_same_size.mp4", "-o", out],
                   capsys, "background: 3 frames, fewer than the layers' 5 (pass --fit", out)


@pytest.mark.parametrize("layer", ["rgb_layer", "rgb_layer.mp4"])
def test_layer_without_alpha_is_refused(files, tmp_path, capsys, layer):
    out = tmp_path / "comp.mp4"
    assert_refused(["composite", files / layer, "--background", files / "same.png", "-o", out], capsys,
                   "has no alpha channel", out)
    _, _, err = run_cli(["composite", files / layer, "--background", files / "same.png", "-o", out], capsys)
    assert "object_<name>/layer, layer.mov or layer.webm" in err


@pytest.mark.parametrize("fit, order", [("stretch", [0, 0, 1, 1, 2]), ("crop", [0, 1, 2, 2, 1]),
                                        ("loop", [0, 1, 2, 2, 1])])
def test_fit_modes(files, tmp_path, capsys, fit, order):
    out = tmp_path / f"{fit}.mp4"
    run_ok(["composite", files / "layer", "--background", files / "short.mp4", "--fit", fit, "-o", out,
            "--quiet"], capsys)
    frames, info = read_video(out)
    assert frames.shape == (T, H, W, 3) and info.fps == 16
    assert _levels(out) == [LEVELS[i] for i in order]
    assert frames[:, :, W // 2 + 2:].min() > 245  # the opaque layer stays on top


def test_image_repeats_and_longer_video_is_trimmed(files, tmp_path, capsys):
    for background in ("same.png", "long.mp4"):
        out = tmp_path / f"{background}.mp4"
        run_ok(["composite", files / "layer", "--background", files / background, "-o", out, "--quiet"], capsys)
        frames, _ = read_video(out)
        assert frames.shape == (T, H, W, 3)
        assert len(set(_levels(out))) == 1
    out = tmp_path / "fitted_image.mp4"  # an image of another size, fitted and repeated
    run_ok(["composite", files / "layer", "--background", files / "big.png", "--fit", "crop", "-o", out, "--quiet"],
           capsys)
    assert read_video(out)[0].shape == (T, H, W, 3) and _levels(out) == [100] * T


def test_alpha_videos_and_progress(files, tmp_path, capsys):
    out = tmp_path / "comp.mp4"
    err = run_ok(["composite", files / "layer.mov", files / "layer.webm", "--background", files / "same.png",
                  "-o", out], capsys)
    assert read_video(out)[0].shape == (T, H, W, 3)
    assert _levels(out) == [200] * T  # the layers' clear halves show the background
    assert "read layers: 10/10 frame" in err and "write composite: 5/5 frame" in err
    quiet = tmp_path / "quiet.mp4"
    err = run_ok(["composite", files / "layer", "--background", files / "same.png", "-o", quiet, "--quiet"],
                 capsys)
    assert "write composite" not in err


def test_output_must_be_a_video(files, tmp_path, capsys):
    out = tmp_path / "comp.webm"
    assert_refused(["composite", files / "layer", "--background", files / "same.png", "-o", out], capsys,
                   "the composite is an H.264 video", out)
