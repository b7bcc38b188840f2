"""Runs on real footage: the clip is read onto the model grid in one
streaming pass, outputs are written in one pass over the source re-read frame
by frame, and the checks that need no work (a damaged video, disk space) come
before any."""

from __future__ import annotations

import os
import shutil

import av
import numpy as np

from mlx_omnimatte.compositing import as_float
from mlx_omnimatte.io.grid import GridVideo, resize_masks
from mlx_omnimatte.io.inputs import read_clip, resolve_clip
from mlx_omnimatte.io.masks import binarize_mask
from mlx_omnimatte.io.video import read_rgba, read_video
from mlx_omnimatte.io.writers import write_png_frames, write_video
from mlx_omnimatte.pipelines import two_stage
from mlx_omnimatte.pipelines.omnimatte import LayerVideos
from mlx_omnimatte.io.outputs import write_decomposition
from mlx_omnimatte.progress import Progress
from helpers import assert_refused, run_cli

W, H, T = 96, 64, 12


def _clip(folder, truncate: float | None = None):
    """A noisy video with a moving square and its PNG mask; ``truncate``:
    cut the mp4 (moov in front) to that fraction, so it declares more frames
    than it holds."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    video = (rng.random((T, H, W, 3)) * 200).astype(np.uint8)
    mask = np.zeros((T, H, W), np.uint8)
    for t in range(T):
        mask[t, 16:40, 4 * t: 4 * t + 30] = 255
    path = folder / "video.mp4"
    if truncate is None:
        write_video(path, video, 16)
    else:
        c = av.open(str(path), "w", options={"movflags": "faststart"})
        s = c.add_stream("libx264", rate=16)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        for f in video:
            for packet in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
        c.close()
        with open(path, "r+b") as fh:
            fh.truncate(int(os.path.getsize(path) * truncate))
    write_png_frames(folder / "mask", mask)
    return path, folder / "mask", mask


def test_clip_is_read_onto_the_grid_in_one_pass(tmp_path):
    video, mask_path, mask = _clip(tmp_path / "c")
    spec = resolve_clip(video, [mask_path])
    calls = []
    clip = read_clip(spec, (48, 32), lambda *a: calls.append(a))
    assert clip.frames.shape == (T, 32, 48, 3) and clip.masks[0].shape == (T, 32, 48)
    assert clip.first_frame.shape == (H, W, 3) and clip.size == (W, H) and clip.grid_size == (48, 32)
    # flooring the area averages keeps the threshold's decision exact
    np.testing.assert_array_equal(binarize_mask(clip.masks[0]), binarize_mask(resize_masks(mask, (48, 32))))
    full = read_video(video)[0]
    np.testing.assert_array_equal(clip.first_frame, full[0])
    assert calls[0][:3] == ("read video + 1 mask", 0, 2 * T) and calls[-1][1] == 2 * T  # video and mask, per frame


def test_truncated_video_is_reported_as_damage(tmp_path, capsys):
    video, mask, _ = _clip(tmp_path / "c", truncate=0.5)
    image = tmp_path / "plate.png"
    write_png_frames(tmp_path / "p", np.zeros((1, H, W, 3), np.uint8))
    os.rename(tmp_path / "p" / "00000.png", image)
    out = tmp_path / "out"
    assert_refused(["decompose", video, "--mask", mask, "--clean-plate", image, "-o", out,
                    "--quiet"], capsys, f"of the {T} frames its container declares: the file is damaged", out)


def test_outputs_need_disk_space_checked_before_any_work(tmp_path, capsys, monkeypatch):
    import mlx_omnimatte.io.writers as writers

    video, mask, _ = _clip(tmp_path / "c")
    image = tmp_path / "p"
    write_png_frames(image, np.zeros((1, H, W, 3), np.uint8))

    def no_work(*a, **k):
        raise AssertionError("the optimization started")

    monkeypatch.setattr(two_stage, "optimize_layers", no_work)
    monkeypatch.setattr(two_stage, "solve_layers", no_work)
    monkeypatch.setattr(writers.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 12, 10 ** 12, 1000))
    out = tmp_path / "out"
    for extra in ([], ["--dry-run"]):
        assert_refused(["decompose", video, "--mask", mask, "--clean-plate", image / "00000.png", "-o", out,
                        "--quiet", *extra], capsys, "has 1000 B free (free some space", out)


def test_streamed_outputs_equal_the_whole_arrays(tmp_path):
    """LayerVideos written frame by frame == the same layers materialized."""
    video, mask_path, _ = _clip(tmp_path / "c")
    spec = resolve_clip(video, [mask_path])
    rng = np.random.default_rng(1)
    alpha = rng.random((T, 32, 48)).astype(np.float32)
    bg = (rng.random((T, 32, 48, 3)) * 255).astype(np.uint8)
    lazy = {"00": LayerVideos(GridVideo(alpha, (W, H)), GridVideo(bg, (W, H)))}
    whole = {"00": lazy["00"].materialize(as_float(read_video(video)[0]))}
    a = write_decomposition(tmp_path / "a", spec, lazy, background="png", preview=False)
    b = write_decomposition(tmp_path / "b", spec, whole, background="png", preview=False)
    la, lb = read_rgba(a / "object_00" / "layer")[0], read_rgba(b / "object_00" / "layer")[0]
    np.testing.assert_array_equal(la, lb)
    assert la.shape == (T, H, W, 4)
    np.testing.assert_array_equal(read_video(a / "object_00" / "background")[0],
                                  read_video(b / "object_00" / "background")[0])


def test_reading_and_writing_show_progress(tmp_path, capsys):
    video, mask, _ = _clip(tmp_path / "c")
    image = tmp_path / "p"
    write_png_frames(image, np.zeros((1, H, W, 3), np.uint8))
    code, _, err = run_cli(["decompose", video, "--mask", mask, "--clean-plate", image / "00000.png", "-o",
                            tmp_path / "out"], capsys)
    assert code == 0, err
    assert f"read video + 1 mask: {2 * T}/{2 * T}" in err and f"write: {T}/{T}" in err  # plain lines: not a terminal
    assert "\r" not in err


def test_progress_records_rss():
    p = Progress(enabled=False)
    p("read video", 0, 2)
    p("read video", 2, 2)
    (record,) = p.records
    assert record.rss_bytes > 10 * 2 ** 20
