"""Model grid planning, resizing and temporal padding."""

import numpy as np
import pytest

from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.io.grid import (
    from_model_grid,
    masks_to_model_grid,
    model_size,
    pad_frames,
    padded_frame_count,
    parse_size,
    plan_grid,
    resize_frames,
    resize_masks,
    to_model_grid,
    trim_frames,
)


def test_model_size_keeps_aspect_and_area():
    assert model_size(640, 384) == (816, 496)
    assert model_size(832, 480) == (832, 480)
    assert model_size(1920, 1080) == (848, 480)
    w, h = model_size(1080, 1920)  # portrait
    assert (w, h) == (480, 848)
    for src in [(640, 384), (1920, 1080), (1000, 1000), (333, 777)]:
        w, h = model_size(*src)
        assert w % 16 == 0 and h % 16 == 0
        assert abs(w * h / (480 * 832) - 1) < 0.06
        assert abs((w / h) / (src[0] / src[1]) - 1) < 0.04


def test_parse_size():
    assert parse_size("832x480") == (832, 480)
    assert parse_size(" 480 X 832 ") == (480, 832)
    with pytest.raises(OmnimatteError, match="--size 830x480: width and height must be positive multiples of 16"):
        parse_size("830x480")
    with pytest.raises(OmnimatteError, match="expected WIDTHxHEIGHT"):
        parse_size("832")


@pytest.mark.parametrize(
    "frames,expected,expected_even",
    [(1, 81, 81), (10, 81, 81), (81, 81, 85), (82, 85, 85), (85, 85, 85), (89, 89, 93), (97, 97, 101), (200, 201, 205)],
)
def test_padded_frame_count(frames, expected, expected_even):
    assert padded_frame_count(frames) == expected
    assert padded_frame_count(frames, even_latents=True) == expected_even
    assert padded_frame_count(frames, min_frames=1) == 4 * ((frames - 1 + 3) // 4) + 1


def _reference_temporal_padding(x, min_length, max_length=10_000):
    # The reference's temporal_padding (Generative Omnimatte utils.py) on numpy.
    length = x.shape[0]
    min_len = (length // 4) * 4 + 1
    if min_len < length:
        min_len += 4
    if (min_len // 4) % 2 == 0:
        min_len += 4
    target = max(min_length, min(min_len, max_length))
    x = x[:target]
    while x.shape[0] < target:
        x = np.concatenate([x, x[::-1]])[:target]
    return x


@pytest.mark.parametrize("length", [1, 3, 10, 50, 81, 85, 89, 97, 150])
def test_padding_matches_reference(length):
    x = np.arange(length)
    ref = _reference_temporal_padding(x, 81)
    ours = pad_frames(x, padded_frame_count(length, 81, even_latents=True))
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(trim_frames(ours, length), x)


def test_plan_grid_fields():
    plan = plan_grid(1280, 768, 85)
    assert (plan.size, plan.frames, plan.pad_frames, plan.latent_frames, plan.latent_size) == (
        (816, 496), 85, 0, 22, (102, 62))


def test_default_grid_never_upscales():
    # a 640x384 source stays at its own size; a 96x64 one is not blown up to ~480x832
    assert plan_grid(640, 384, 85).size == (640, 384)
    assert plan_grid(96, 64, 9).size == (96, 64)
    assert plan_grid(100, 60, 9).size == (96, 64)  # rounded to multiples of 16 at the source's area
    assert plan_grid(1920, 1080, 9).size == (848, 480)
    assert plan_grid(96, 64, 9, size="832x480").size == (832, 480)  # asked for
    plan = plan_grid(640, 384, 30, size="832x480")
    assert (plan.size, plan.frames, plan.pad_frames, plan.src_size) == ((832, 480), 81, 51, (640, 384))
    assert plan_grid(640, 384, 30, size=(320, 192)).size == (320, 192)


def _area_brute(x, out_h, out_w):
    # torch F.interpolate(mode="area") == adaptive_avg_pool2d, written out.
    h, w = x.shape[-2:]
    out = np.zeros(x.shape[:-2] + (out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            y0, y1 = (i * h) // out_h, -((-(i + 1) * h) // out_h)
            x0, x1 = (j * w) // out_w, -((-(j + 1) * w) // out_w)
            out[..., i, j] = x[..., y0:y1, x0:x1].mean(axis=(-1, -2))
    return out


@pytest.mark.parametrize("out_hw", [(7, 5), (20, 30), (13, 17)])
def test_area_resize_matches_adaptive_avg_pool(out_hw):
    rng = np.random.default_rng(0)
    m = (rng.random((2, 13, 17)) * 255).astype(np.uint8)
    ours = resize_masks(m, (out_hw[1], out_hw[0]), "area")
    np.testing.assert_allclose(ours, _area_brute(m.astype(np.float64), *out_hw), atol=1e-4)
    video = rng.random((2, 13, 17, 3)).astype(np.float32)
    ours = resize_frames(video, (out_hw[1], out_hw[0]), "area")
    ref = _area_brute(video.transpose(0, 3, 1, 2).astype(np.float64), *out_hw).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_resize_nearest_masks_keeps_values():
    m = np.zeros((1, 4, 4), np.uint8)
    m[0, 1, 2] = 255
    up = resize_masks(m, (8, 8), "nearest")
    assert up.dtype == np.uint8 and up.sum() == 4 * 255 and up[0, 2:4, 4:6].all()


def test_resize_dtypes_and_range():
    rng = np.random.default_rng(1)
    u8 = (rng.random((3, 20, 30, 3)) * 255).astype(np.uint8)
    out = resize_frames(u8, (48, 32))
    assert out.shape == (3, 32, 48, 3) and out.dtype == np.uint8
    f = rng.random((3, 20, 30, 3)).astype(np.float32)
    out = resize_frames(f, (48, 32))
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    alpha = rng.random((3, 20, 30)).astype(np.float32)
    assert resize_frames(alpha, (48, 32)).shape == (3, 32, 48)
    with pytest.raises(OmnimatteError, match="resample cubic"):
        resize_frames(u8, (48, 32), "cubic")


def test_model_grid_round_trip():
    t, h, w = 10, 48, 80
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([0.5 + 0.4 * np.sin(xx / 9.0 + k) * np.cos(yy / 7.0) for k in range(t)])
    video = np.repeat(smooth[..., None], 3, axis=-1).astype(np.float32)
    plan = plan_grid(w, h, t, size=(112, 64))
    model = to_model_grid(video, plan)
    assert model.shape == (81, 64, 112, 3)
    np.testing.assert_array_equal(model[10], model[9])  # mirror starts by repeating the last frame
    back = from_model_grid(model, plan)
    assert back.shape == video.shape
    assert np.abs(back - video).max() < 0.02
    masks = masks_to_model_grid(np.zeros((t, h, w), np.uint8), plan)
    assert masks.shape == (81, 64, 112)
