"""Closed-form foreground, recomposition and compositing over new backgrounds."""

import numpy as np
import pytest

from mlx_omnimatte.compositing import (
    ALPHA_FLOOR,
    EPS,
    over_checkerboard,
    recompose,
    rgba,
    solve_foreground,
    to_uint8,
)
from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.io.compose import as_video, composite_frames, fit_size, fit_times

T, H, W = 4, 32, 48


@pytest.fixture(scope="module")
def truth():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:H, 0:W]
    alpha = np.stack([np.clip((xx - 8 - 4 * t) / 20.0, 0, 1) * (yy > 4) for t in range(T)]).astype(np.float32)
    fg = rng.random((T, H, W, 3)).astype(np.float32)
    bg = rng.random((T, H, W, 3)).astype(np.float32)
    return alpha, fg, bg


def test_exact_inputs_give_biased_fg_and_exact_recomposition(truth):
    alpha, fg, bg = truth
    video = recompose(alpha, fg, bg)
    est = solve_foreground(video, alpha, bg)
    a = alpha[..., None]
    expected = np.where(a >= ALPHA_FLOOR, fg * a / (a + EPS), 0)
    np.testing.assert_allclose(est, expected, atol=2e-6)
    assert np.abs(recompose(alpha, est, bg) - video).max() <= EPS + 1e-6
    assert (est[alpha < ALPHA_FLOOR] == 0).all() and (alpha < ALPHA_FLOOR).any()


def test_quantized_inputs_within_bounds(truth):
    alpha, fg, bg = truth
    video8 = to_uint8(recompose(alpha, fg, bg))
    bg8 = to_uint8(bg)
    est = solve_foreground(video8, alpha, bg8)
    a = alpha[..., None]
    seen = np.broadcast_to(a > 0.05, est.shape)
    recomposed = recompose(alpha, est, bg8)
    # Where alpha > 0.05 the recomposition reproduces the 8-bit input within
    # eps plus the rounding of bg (where clipping fg to [0, 1] bites).
    err = np.abs(recomposed - video8 / 255.0)[seen]
    assert err.max() <= EPS + 0.5 / 255 + 1e-5
    # The fg error is the 8-bit rounding of I and bg, divided by alpha, plus the eps bias.
    bound = (0.5 / 255 + (1 - a) * 0.5 / 255) / np.maximum(a, 1e-6) + EPS / (a + EPS) + 1e-5
    fg_err = np.abs(est - fg)
    assert (fg_err <= bound)[seen].all()
    assert fg_err[np.broadcast_to(a > 0.5, est.shape)].max() < 0.008  # bound there: 0.0079


def test_solve_shape_mismatch():
    with pytest.raises(OmnimatteError, match="shapes differ"):
        solve_foreground(np.zeros((2, 4, 4, 3)), np.zeros((2, 4, 5)), np.zeros((2, 4, 4, 3)))


def composite(layers, background, fit="loop"):
    """What `mlx-omnimatte composite` does, into one array."""
    t, h, w = np.shape(layers[0][1])[:3]
    bg = fit_size(as_video(background, "background"), (w, h), fit, "background", "the layers'")
    times = fit_times(bg.shape[0], t, fit, "background", "the layers'")
    return np.stack(list(composite_frames(layers, bg, times)))


def test_composite_over_image_and_video(truth):
    alpha, fg, _ = truth
    image = np.zeros((H // 2, W // 2, 3), np.uint8)
    image[..., 2] = 255  # blue, resized to the layer size
    out = composite([(alpha, fg)], image)
    expected = alpha[..., None] * fg + (1 - alpha[..., None]) * np.array([0, 0, 1.0], np.float32)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    # A 2-frame background video for 4 layer frames: mirrored (0, 1, 1, 0).
    bgv = np.zeros((2, H, W, 3), np.float32)
    bgv[1] = 1.0
    out = composite([(np.zeros((T, H, W), np.float32), fg)], bgv)
    assert [out[t].mean() for t in range(T)] == [0.0, 1.0, 1.0, 0.0]


def test_composite_layer_order():
    fg_red = np.zeros((1, 4, 4, 3), np.float32)
    fg_red[..., 0] = 1
    fg_green = np.zeros((1, 4, 4, 3), np.float32)
    fg_green[..., 1] = 1
    ones = np.ones((1, 4, 4), np.float32)
    half = np.full((1, 4, 4), 0.5, np.float32)
    out = composite([(ones, fg_red), (half, fg_green)], np.zeros((4, 4, 3), np.float32))
    np.testing.assert_allclose(out[0, 0, 0], [0.5, 0.5, 0.0])  # green over red over black
    with pytest.raises(OmnimatteError, match="layer 1 has fg"):
        composite([(ones, fg_red), (ones[:, :2], fg_green[:, :2])], np.zeros((4, 4, 3)))


def test_rgba_and_checkerboard():
    alpha = np.array([[[0.0, 0.5, 1.0]]], np.float32)
    fg = np.ones((1, 1, 3, 3), np.float32)
    out = rgba(alpha, fg)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 3, 4)
    assert out[0, 0, :, 3].tolist() == [0, 128, 255]
    board = over_checkerboard(np.zeros((1, 32, 32)), np.ones((1, 32, 32, 3)))
    np.testing.assert_allclose(np.unique(board), [0.55, 0.8], atol=1e-6)
    assert over_checkerboard(np.ones((1, 32, 32)), np.ones((1, 32, 32, 3))).min() == 1.0
