"""Mask reading, validation, binarization, dilation and trimasks."""

import numpy as np
import pytest
from PIL import Image

from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.io.masks import (
    NEUTRAL,
    binarize_mask,
    build_trimask,
    dilate_mask,
    prepare_mask,
    read_mask,
)
from mlx_omnimatte.io.inputs import read_clip, resolve_clip
from mlx_omnimatte.io.video import probe_video
from mlx_omnimatte.io.writers import write_video
from helpers import EXAMPLES

needs_examples = pytest.mark.skipif(
    not EXAMPLES.is_dir(), reason=f"shared example clips not found at {EXAMPLES}"
)

T, H, W, FPS = 9, 48, 64, 16


def _box_mask(t=T, h=H, w=W):
    m = np.zeros((t, h, w), np.uint8)
    for i in range(t):
        m[i, 10:30, 8 + i : 30 + i] = 255
    return m


def load_mask(path, video_info):
    """A mask as a run reads it (resolved against its video from the headers,
    then decoded and checked frame by frame): (raw uint8 mask, its info)."""
    clip = read_clip(resolve_clip(video_info.path, [path]))
    return clip.masks[0], clip.mask_infos[0]


@pytest.fixture(scope="module")
def video_info(tmp_path_factory):
    d = tmp_path_factory.mktemp("maskvid")
    path = write_video(d / "input_video.mp4", np.full((T, H, W, 3), 90, np.uint8), FPS)
    return probe_video(path)


@needs_examples
def test_real_masks_validate_and_prepare():
    clip = EXAMPLES / "boys-beach"
    info = probe_video(clip / "input_video.mp4")
    for name in ("mask_00.mp4", "mask_01.mp4"):
        mask, minfo = load_mask(clip / name, info)
        assert mask.shape == (85, 384, 640) and mask.dtype == np.uint8
        assert (minfo.frames, minfo.fps) == (85, 16.0)
        white = binarize_mask(mask)
        assert 0.001 < white.mean() < 0.2
        model = prepare_mask(mask[:20], (816, 496))
        assert model.shape == (20, 496, 816) and model.dtype == bool
        # Dilation only grows the object.
        undilated = prepare_mask(mask[:20], (816, 496), dilate=1)
        assert model.mean() > 1.2 * undilated.mean() and model[undilated].all()


def test_valid_synthetic_mask(tmp_path, video_info):
    path = write_video(tmp_path / "mask_00.mp4", _box_mask(), FPS)
    mask, info = load_mask(path, video_info)
    assert mask.shape == (T, H, W)
    np.testing.assert_array_equal(binarize_mask(mask)[:, 12:28, 18:28], True)
    assert not binarize_mask(mask)[:, 35:, :].any()


@pytest.mark.parametrize(
    "kind,pattern",
    [
        ("frames", r"mask\.mp4: mask has 7 frames but the video .*input_video\.mp4 has 9"),
        ("size", r"mask\.mp4: mask is 80x48 but the video .*input_video\.mp4 is 64x48"),
        ("fps", r"mask\.mp4: mask is 12 fps but the video .*input_video\.mp4 is 16 fps"),
        ("empty", r"mask\.mp4: mask is empty"),
        ("white", r"mask\.mp4: mask is white everywhere"),
        ("gray", r"mask\.mp4: mask is not binary \(\d+\.\d% of pixels"),
    ],
)
def test_mask_errors(tmp_path, video_info, kind, pattern):
    mask, fps = _box_mask(), FPS
    if kind == "frames":
        mask = mask[:7]
    elif kind == "size":
        mask = _box_mask(w=80)
    elif kind == "fps":
        fps = 12
    elif kind == "empty":
        mask = np.zeros_like(mask)
    elif kind == "white":
        mask = np.full_like(mask, 255)
    elif kind == "gray":
        mask = np.broadcast_to(np.linspace(0, 255, W).astype(np.uint8), mask.shape)
    path = write_video(tmp_path / "mask.mp4", mask, fps)
    with pytest.raises(OmnimatteError, match=pattern):
        load_mask(path, video_info)


def test_compression_noise_is_tolerated(video_info, tmp_path):
    # A few gray edge pixels (< 1% of the video) are fine.
    mask = _box_mask()
    mask[0, 30, 8:20] = 128
    path = write_video(tmp_path / "mask.mp4", mask, FPS)
    loaded, info = load_mask(path, video_info)
    assert loaded.shape == mask.shape and loaded.dtype == np.uint8 and info.frames == mask.shape[0]
    got, want = binarize_mask(loaded), _box_mask() == 255
    # the box survives H.264 to within its edges; the gray pixels stay background
    assert (got != want).mean() < 0.01 and got.sum() == pytest.approx(want.sum(), rel=0.05)
    assert not got[0, 30, 8:20].any()


def test_zero_one_png_masks_are_scaled(tmp_path):
    folder = tmp_path / "mask_00"
    folder.mkdir()
    for i, m in enumerate(_box_mask() // 255):
        Image.fromarray(m).save(folder / f"{i:03d}.png")
    mask, info = read_mask(folder)
    assert set(np.unique(mask)) == {0, 255}
    video = probe_video(write_video(tmp_path / "input_video.mp4", np.full((T, H, W, 3), 90, np.uint8), FPS))
    loaded, _ = load_mask(folder, video)
    np.testing.assert_array_equal(loaded, _box_mask())


def test_binarize_threshold_is_240():
    assert binarize_mask(np.array([0, 16, 239, 240, 255], np.uint8)).tolist() == [False, False, False, True, True]


def _dilate_brute(m, size):
    # cv2.dilate with np.ones((size, size)), anchor size // 2, zero border.
    a = size // 2
    out = np.zeros_like(m)
    h, w = m.shape[-2:]
    for y in range(h):
        for x in range(w):
            y0, y1 = max(0, y - a), min(h, y - a + size)
            x0, x1 = max(0, x - a), min(w, x - a + size)
            out[..., y, x] = m[..., y0:y1, x0:x1].any(axis=(-1, -2))
    return out


@pytest.mark.parametrize("size", [11, 4, 1])
def test_dilate_matches_brute_force(size):
    rng = np.random.default_rng(size)
    m = rng.random((2, 23, 31)) > 0.985
    m[0, 0, 0] = m[1, -1, -1] = True  # corners: clipping at the border
    np.testing.assert_array_equal(dilate_mask(m, size), _dilate_brute(m, size))


def test_dilate_single_pixel_gives_11x11_square():
    m = np.zeros((40, 40), bool)
    m[20, 20] = True
    d = dilate_mask(m, 11)
    assert d.sum() == 121 and d[15:26, 15:26].all()


def test_prepare_mask_area_then_threshold():
    # Area-averaging a 1-pixel-wide line to half size gives 127.5 < 240: gone,
    # as in the reference (resize first, then threshold).
    m = np.zeros((1, 8, 8), np.uint8)
    m[0, :, 3] = 255
    assert not prepare_mask(m, (4, 4), dilate=1).any()
    m[0, :, 2] = 255
    np.testing.assert_array_equal(prepare_mask(m, (4, 4), dilate=1)[0, :, 1], True)


def test_trimask_values_and_overlap():
    a = np.zeros((1, 6, 6), bool)
    b = np.zeros((1, 6, 6), bool)
    a[0, 0:3, 0:3] = True
    b[0, 2:5, 2:5] = True  # overlaps a at (2, 2)
    every = build_trimask([a, b])
    assert every[0, 0, 0] == 1 and every[0, 4, 4] == 1 and every[0, 5, 5] == pytest.approx(127 / 255)
    assert NEUTRAL == pytest.approx(0.498, abs=1e-3)
    first = build_trimask([a, b], remove=[0])
    assert first[0, 0, 0] == 1 and first[0, 4, 4] == 0 and first[0, 2, 2] == 1  # removal wins
    assert first[0, 5, 0] == pytest.approx(NEUTRAL)
    assert build_trimask([a, b], remove=[1])[0, 0, 0] == 0 and build_trimask([a, b], remove=[1])[0, 4, 4] == 1
    from mlx_omnimatte.pipelines.two_stage import solo_targets

    solo = build_trimask([a, b], solo_targets(["a", "b"])[1].remove)  # keep a, remove b
    assert solo[0, 0, 0] == 0 and solo[0, 4, 4] == 1
    assert set(np.unique(every).tolist()) == {np.float32(NEUTRAL), 1.0}
    with pytest.raises(OmnimatteError, match="object index 2 out of range"):
        build_trimask([a, b], remove=[2])


def test_model_masks_on_plan():
    from types import SimpleNamespace

    from mlx_omnimatte.io.grid import plan_grid
    from mlx_omnimatte.pipelines.conditioning import model_masks

    plan = plan_grid(W, H, T, size=(96, 64))
    masks = model_masks(SimpleNamespace(masks=[_box_mask(), _box_mask()[:, ::-1]]), plan)
    assert [m.shape for m in masks] == [(81, 64, 96)] * 2 and masks[0].dtype == bool
    np.testing.assert_array_equal(masks[0][T], masks[0][T - 1])  # mirrored padding
    np.testing.assert_array_equal(masks[0][:T], prepare_mask(_box_mask(), (96, 64)))
    tri = build_trimask(masks, remove=[1])
    assert tri.shape == (81, 64, 96) and set(np.unique(tri).tolist()) == {0.0, np.float32(NEUTRAL), 1.0}
