"""Layer writers: round trips through PyAV, atomic writes, no silent overwrite."""

from fractions import Fraction

import av
import numpy as np
import pytest

from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.io.video import probe_video, read_rgba, read_video
from mlx_omnimatte.compositing import rgba
from mlx_omnimatte.io.writers import (
    alpha_sink,
    atomic_output,
    background_sink,
    layer_sink,
    rgba_video_sink,
    write_frames,
    write_png_frames,
    write_video,
)

T, H, W = 6, 48, 64


def _layer(t=T, h=H, w=W):
    yy, xx = np.mgrid[0:h, 0:w]
    alpha = np.stack([np.clip((xx + 3 * i) / (w - 1), 0, 1) for i in range(t)]).astype(np.float32)
    alpha[:, :, :6] = 0.0
    alpha[:, :, -6:] = 1.0
    fg = np.stack(
        [np.stack([yy / (h - 1), xx / (w - 1), np.full_like(xx, 0.25 + 0.1 * i, dtype=float)], -1) for i in range(t)]
    ).astype(np.float32)
    return alpha, fg


def write_layer(path, alpha, fg, fps, overwrite=False):
    """A layer through the sink a decomposition writes with, frame by frame."""
    return write_frames(layer_sink(path, fps, overwrite), (rgba(a, f) for a, f in zip(alpha, fg)))


def _leftovers(folder, final_name):
    return sorted(p.name for p in folder.iterdir() if p.name != final_name)


def test_png_layer_round_trip_is_exact(tmp_path):
    alpha, fg = _layer()
    path = write_layer(tmp_path / "obj", alpha, fg, fps=12)
    got, info = read_rgba(path, fps=12)
    assert (info.frames, info.size, info.fps) == (T, (W, H), 12.0)
    np.testing.assert_array_equal(got[..., 3], np.rint(alpha * 255).astype(np.uint8))
    np.testing.assert_array_equal(got[..., :3], np.rint(fg * 255).astype(np.uint8))
    assert sorted(p.name for p in path.iterdir())[:2] == ["00000.png", "00001.png"]


@pytest.mark.parametrize(
    "suffix,fps,codec,alpha_tol,rgb_tol",
    [(".mov", Fraction(24000, 1001), "prores", 1, 2), (".webm", 12, "vp9", 4, 12)],
)
def test_rgba_video_round_trip(tmp_path, suffix, fps, codec, alpha_tol, rgb_tol):
    alpha, fg = _layer()
    path = write_layer(tmp_path / f"obj{suffix}", alpha, fg, fps=fps)
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == codec
        assert s.average_rate == Fraction(fps)
        assert (s.codec_context.colorspace, s.codec_context.color_range) == (1, 1)  # BT.709, limited
        if codec == "prores":
            assert s.codec_context.profile == "4444"
        else:
            assert s.metadata.get("alpha_mode") == "1"
    got, info = read_rgba(path)
    assert (info.frames, info.size) == (T, (W, H)) and info.fps == pytest.approx(float(fps))
    a8 = np.rint(alpha * 255).astype(int)
    assert np.abs(got[..., 3].astype(int) - a8).max() <= alpha_tol
    assert got[..., 3][:, :, :6].max() <= alpha_tol and got[..., 3][:, :, -6:].min() >= 255 - alpha_tol
    # Colour only matters where the layer is visible.
    seen = alpha > 0.1
    assert np.abs(got[..., :3].astype(int) - np.rint(fg * 255))[seen].max() <= rgb_tol


def test_vp9_alpha_needs_libvpx_decoder(tmp_path):
    # The native vp9 decoder returns no alpha plane: read_rgba must not use it.
    alpha, fg = _layer()
    path = write_layer(tmp_path / "obj.webm", alpha, fg, fps=16)
    with av.open(str(path)) as c:
        frame = next(c.decode(video=0))
    assert "a" not in frame.format.name  # yuv420p
    assert read_rgba(path)[0][..., 3].min() == 0


@pytest.mark.parametrize("name", ["odd.mov", "odd.webm", "odd"])
def test_odd_sizes(tmp_path, name):
    alpha, fg = _layer(t=3, h=47, w=65)
    got, info = read_rgba(write_layer(tmp_path / name, alpha, fg, fps=16), fps=16)
    assert got.shape == (3, 47, 65, 4)


def test_alpha_and_background_outputs(tmp_path):
    alpha, fg = _layer()
    for name in ("alpha.mp4", "alpha_frames"):
        path = write_frames(alpha_sink(tmp_path / name, 12), alpha)
        got, info = read_video(path, fps=12, gray=True)
        assert (info.frames, info.size, info.fps) == (T, (W, H), 12.0)
        tol = 0 if name == "alpha_frames" else 3
        assert np.abs(got.astype(int) - np.rint(alpha * 255)).max() <= tol
    odd = write_frames(background_sink(tmp_path / "bg_odd.mp4", 12), fg[:, :47, :63])
    assert probe_video(odd).size == (63, 47)
    for name in ("bg.mp4", "bg_frames"):
        path = write_frames(background_sink(tmp_path / name, 12), fg)
        got, info = read_video(path, fps=12)
        assert (info.frames, info.size, info.fps) == (T, (W, H), 12.0)
        assert np.abs(got.astype(int) - np.rint(fg * 255)).mean() < (0.01 if name == "bg_frames" else 2.5)  # yuv420p chroma


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    alpha, fg = _layer()
    for name in ("obj", "obj.mov"):
        path = write_layer(tmp_path / name, alpha, fg, fps=16)
        with pytest.raises(OmnimatteError, match=f"{name}: already exists"):
            write_layer(path, 1 - alpha, fg, fps=16)
        assert read_rgba(path, fps=16)[0][0, 0, -1, 3] == 255  # untouched
        write_layer(path, 1 - alpha, fg, fps=16, overwrite=True)
        assert read_rgba(path, fps=16)[0][0, 0, -1, 3] <= 1  # replaced
    assert _leftovers(tmp_path, "") == ["obj", "obj.mov"]


def _failing_frames(n_ok, exc):
    alpha, fg = _layer()
    rgba = np.concatenate([np.rint(fg * 255), np.rint(alpha[..., None] * 255)], -1).astype(np.uint8)
    for i in range(n_ok):
        yield rgba[i]
    raise exc


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
@pytest.mark.parametrize("name", ["frames", "layer.mov", "layer.webm", "bg.mp4"])
def test_failure_mid_write_leaves_nothing(tmp_path, exc, name):
    path = tmp_path / name
    with pytest.raises(type(exc)):
        if name == "frames":
            write_png_frames(path, _failing_frames(3, exc))
        elif name == "bg.mp4":
            write_video(path, (f[..., :3] for f in _failing_frames(3, exc)), fps=16)
        else:
            write_frames(rgba_video_sink(path, 16), _failing_frames(3, exc))
    assert list(tmp_path.iterdir()) == []


def test_failure_during_overwrite_keeps_old_output(tmp_path):
    alpha, fg = _layer()
    path = write_layer(tmp_path / "obj", alpha, fg, fps=16)
    with pytest.raises(RuntimeError):
        write_png_frames(path, _failing_frames(2, RuntimeError("boom")), overwrite=True)
    assert read_rgba(path, fps=16)[0].shape == (T, H, W, 4)
    assert _leftovers(tmp_path, "obj") == []


def test_atomic_output_creates_parents_and_rejects_empty(tmp_path):
    with pytest.raises(OmnimatteError, match="produced nothing"):
        with atomic_output(tmp_path / "a" / "b.mp4"):
            pass
    assert list((tmp_path / "a").iterdir()) == []
    with pytest.raises(OmnimatteError, match="no frames to write"):
        write_png_frames(tmp_path / "empty", [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    with pytest.raises(OmnimatteError, match=r"needs \.mov \(ProRes 4444\) or \.webm"):
        write_frames(rgba_video_sink(tmp_path / "x.mp4", 16), np.zeros((1, 8, 8, 4), np.uint8))
