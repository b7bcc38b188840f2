"""The fast layer solver on constructed scenes with exact expected values:
least alpha of shadows and lights, a body kept whole where its colour
matches the background, a coarse mask a few pixels off, noise and specks
far from the objects, ownership between objects, and stillness in time."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.layer_solver import SolverSettings, calibrate, fit_exposure, solve_layers

H, W, T = 96, 160, 4


def _ground(seed: int = 0) -> np.ndarray:
    """A smooth, textured background [H, W, 3] in (0.2, 0.8)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    base = 0.5 + 0.2 * np.sin(xs / 9.0)[..., None] * np.array([1.0, 0.6, 0.3]) + 0.05 * np.cos(ys / 7.0)[..., None]
    return np.clip(base + rng.uniform(-0.02, 0.02, (1, 1, 3)), 0.2, 0.8).astype(np.float32)


def _box(y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def _scene(shadow=0.5, light=0.0, patch=True):
    """An object (a red box with a patch of background colour inside it), a
    shadow darkening the ground below it by ``shadow`` and a light pool
    (white at ``light`` opacity) to its right. Returns (video, bg, object
    mask, shadow region, light region) as T still frames."""
    bg = _ground()
    obj = _box(20, 60, 40, 80)
    frame = bg.copy()
    shade = _box(60, 75, 30, 95)
    frame[shade] *= 1.0 - shadow
    glow = _box(30, 55, 80, 100) if light else np.zeros((H, W), bool)
    frame[glow] = light * 1.0 + (1 - light) * frame[glow]
    frame[obj] = (0.9, 0.1, 0.1)
    if patch:  # inside the object, exactly the background's colour
        inner = _box(35, 45, 55, 65)
        frame[inner] = bg[inner]
    video = np.broadcast_to(frame, (T, H, W, 3))
    return video, np.broadcast_to(bg, (T, H, W, 3)), obj, shade, glow


def _masks(m: np.ndarray) -> list[np.ndarray]:
    return [np.broadcast_to(m, (T, H, W))]


def test_shadow_gets_its_darkening_and_the_body_stays_whole():
    video, bg, obj, shade, _ = _scene(shadow=0.5)
    [alpha] = solve_layers(video, bg, _masks(obj))
    assert alpha.shape == (T, H, W) and alpha.dtype == np.float32
    np.testing.assert_allclose(alpha[:, obj], 1.0)  # the background-coloured patch included
    np.testing.assert_allclose(alpha[:, shade], 0.5, atol=1e-5)
    rest = ~(obj | shade)
    assert alpha[:, rest].max() == 0.0


@pytest.mark.parametrize("grow", [-3, 3])
def test_coarse_mask_a_few_pixels_off(grow):
    video, bg, obj, shade, _ = _scene(shadow=0.0, patch=False)
    coarse = _box(20 - grow, 60 + grow, 40 - grow, 80 + grow)
    [alpha] = solve_layers(video, bg, _masks(coarse))
    pred = alpha[0] > 0.5
    iou = (pred & obj).sum() / (pred | obj).sum()
    assert iou > 0.99, iou
    assert np.abs(alpha[0] - obj).mean() < 0.002


def test_light_gets_its_opacity():
    video, bg, obj, _, glow = _scene(shadow=0.0, light=0.4)
    [alpha] = solve_layers(video, bg, _masks(obj))
    np.testing.assert_allclose(alpha[:, glow & ~obj], 0.4, atol=1e-5)


def test_reflection_gets_its_opacity_in_the_objects_colours():
    """A reflection: the object's two colours mirrored below it at 40%."""
    bg = _ground()
    frame = bg.copy()
    obj = _box(20, 50, 40, 80)
    colours = np.where((np.arange(W) // 8 % 2 == 0)[None, :, None], (0.9, 0.6, 0.2), (0.3, 0.3, 0.8)).astype(np.float32)
    colours = np.broadcast_to(colours, (H, W, 3))
    frame[obj] = colours[obj]
    mirror = _box(50, 80, 40, 80)
    frame[mirror] = 0.4 * colours[mirror] + 0.6 * bg[mirror]
    video, plate = np.broadcast_to(frame, (T, H, W, 3)), np.broadcast_to(bg, (T, H, W, 3))
    [alpha] = solve_layers(video, plate, _masks(obj))
    np.testing.assert_allclose(alpha[:, 52:80, 42:78], 0.4, atol=0.02)  # off the one-pixel rim by the body


def test_far_specks_and_noise_are_not_the_object():
    video, bg, obj, shade, _ = _scene(shadow=0.5)
    rng = np.random.default_rng(1)
    video = np.clip(video + rng.normal(0, 1.5 / 255, video.shape), 0, 1).astype(np.float32)
    video[:, 5:12, 130:140] *= 0.5  # a change far from the object: not its effect
    [alpha] = solve_layers(video, bg, _masks(obj))
    assert alpha[:, 5:12, 130:140].max() == 0.0
    far = ~(obj | shade)
    far[58:78, 27:98] = False  # the shadow's low-passed rim
    assert alpha[:, far].mean() < 0.002
    assert abs(float(alpha[:, shade].mean()) - 0.5) < 0.03


def test_exposure_and_noise_floor_from_the_clip():
    video, bg, obj, _, _ = _scene(shadow=0.5)
    shifted = np.clip(bg * np.array([1.03, 0.98, 1.0], np.float32), 0, 1)
    cal = calibrate(video, shifted, _masks(obj))
    np.testing.assert_allclose(cal.gain * np.array([1.03, 0.98, 1.0]), 1.0, atol=0.01)
    assert cal.floor == pytest.approx(SolverSettings().min_floor)  # no noise: the rounding floor
    # a minority of strongly changed samples does not move the fit
    x = np.random.default_rng(0).uniform(0.2, 0.8, (1000, 3)).astype(np.float32)
    y = x * 1.02
    y[:200] *= 0.4
    gain, offset = fit_exposure(y, x)
    np.testing.assert_allclose(gain, 1.02, atol=1e-3)
    np.testing.assert_allclose(offset, 0.0, atol=1e-3)


def test_each_shadow_goes_to_the_nearest_object():
    bg = _ground()
    frame = bg.copy()
    left, right = _box(20, 50, 10, 40), _box(20, 50, 110, 140)
    shade_l, shade_r = _box(50, 60, 10, 50), _box(50, 60, 100, 140)
    frame[shade_l] *= 0.6
    frame[shade_r] *= 0.3
    frame[left], frame[right] = (0.1, 0.8, 0.2), (0.2, 0.2, 0.9)
    video, plate = np.broadcast_to(frame, (T, H, W, 3)), np.broadcast_to(bg, (T, H, W, 3))
    a, b = solve_layers(video, plate, [np.broadcast_to(left, (T, H, W)), np.broadcast_to(right, (T, H, W))])
    np.testing.assert_allclose(a[:, shade_l], 0.4, atol=1e-5)
    np.testing.assert_allclose(b[:, shade_r], 0.7, atol=1e-5)
    assert a[:, shade_r].max() == 0.0 and b[:, shade_l].max() == 0.0
    assert a[:, right].max() == 0.0 and b[:, left].max() == 0.0


def test_still_effects_do_not_flicker_with_noise():
    video, bg, obj, shade, _ = _scene(shadow=0.5)
    rng = np.random.default_rng(2)
    noisy = np.clip(np.repeat(bg[:1], 8, 0) + rng.normal(0, 2 / 255, (8, H, W, 3)), 0, 1).astype(np.float32)
    frames = np.repeat(video[:1], 8, 0)
    masks = [np.broadcast_to(obj, (8, H, W))]

    def flicker(still):
        [alpha] = solve_layers(frames, noisy, masks, SolverSettings(still=still))
        return float(np.abs(np.diff(alpha[:, shade], axis=0)).mean())

    assert flicker(0.5) < 0.75 * flicker(0.0)


def test_refuses_what_does_not_fit():
    video, bg, obj, _, _ = _scene()
    with pytest.raises(OmnimatteError, match="no object masks"):
        solve_layers(video, bg, [])
    with pytest.raises(OmnimatteError, match="share one"):
        solve_layers(video, bg[:, :50], _masks(obj))


def test_synthetic_clip_meets_the_bar_on_a_small_grid():
    """A generated two-object clip (a shadow and a reflection), both plates:
    the object, its effects and nothing else (at real size:
    test_layers_real_size.py)."""
    from mlx_omnimatte import synth
    from mlx_omnimatte.evaluation import metrics
    from mlx_omnimatte.io.masks import dilate_mask

    clip = synth.make_clip(3, frames=6, size=(320, 192), objects=2, effects=["shadow", "reflection"],
                           plate="removal")
    for plate in (clip.background, clip.removal_plate):
        alphas = solve_layers(clip.video, plate, clip.masks)
        for k, alpha in enumerate(alphas):
            truth = clip.alpha[k]
            obj = clip.object_alpha[k] > 0.5
            effect = (clip.effect[k] > 0.05) & ~dilate_mask(obj, 5)
            empty = (truth < 0.01) & ~dilate_mask(truth >= 0.01, 5)
            assert metrics.iou(alpha, truth, ignore=effect) > 0.95
            assert metrics.alpha_errors(alpha, truth, obj)["mae"] < 0.03
            assert metrics.alpha_errors(alpha, truth, effect)["mae"] < 0.08
            assert float(alpha[empty].mean()) < 0.005
