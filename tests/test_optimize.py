import mlx.core as mx
import numpy as np
import pytest

from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.pipelines import optimize as opt
from mlx_omnimatte.synth import make_clip


def test_losses_follow_the_reference_formulas():
    rng = np.random.default_rng(0)
    a = rng.random((2, 4, 4, 1)).astype(np.float32)
    m = (rng.random((2, 4, 4, 1)) > 0.5).astype(np.float32)
    l0 = float(opt.sparsity_l0(mx.array(a)))
    assert l0 == pytest.approx(float(np.mean((1 / (1 + np.exp(-5 * a)) - 0.5) * 2)), rel=1e-6)
    assert float(opt.sparsity_l1(mx.array(a))) == pytest.approx(float(np.abs(a).mean()), rel=1e-6)
    inside = ((a - m) ** 2 * m).sum() / m.sum()
    outside = ((a - m) ** 2 * (1 - m)).sum() / (1 - m).sum()
    assert float(opt.mask_loss(mx.array(a), mx.array(m))) == pytest.approx(float(inside + outside), rel=1e-5)
    target = rng.random((2, 4, 4, 1)).astype(np.float32)  # clean plate: a prior outside the mask
    outside = ((a - target) ** 2 * (1 - m)).sum() / (1 - m).sum()
    got = float(opt.mask_loss(mx.array(a), mx.array(m), mx.array(target)))
    assert got == pytest.approx(float(inside + outside), rel=1e-5)


def test_step_schedule():
    s = opt.OptimizeSettings()
    assert [s.lr_at(i) for i in (0, 499, 500, 999, 1000, 2000, 5999)] == pytest.approx(
        [5e-4, 5e-4, 5e-5, 5e-5, 5e-6, 5e-7, 5e-7])
    assert float(opt.step_weights(s, 999)[3]) == 10.0 and float(opt.step_weights(s, 1000)[3]) == 0.0
    short = s.scaled(600)
    assert short.milestones == (50, 100, 200) and short.mask_steps == 100 and short.iterations == 600


def test_windows_cover_the_clip_ends():
    rng = np.random.default_rng(0)
    starts = np.array([opt.sample_window(rng, 40, 16) for _ in range(2000)])
    assert starts.min() == 0 and starts.max() == 24
    assert 0.25 < (starts == 0).mean() < 0.35  # 16 of 56 draws clamp to 0
    assert opt.sample_window(rng, 5, 16) == 0


def test_detail_transfer_and_transmission():
    alpha = np.array([[[[0.99, 0.5]]], [[[1.0, 1.0]]]], np.float32)  # [K=2, T=1, H=1, W=2]
    seen = opt.transmission(alpha)
    np.testing.assert_allclose(seen[1, 0, 0], [0.01, 0.5], atol=1e-6)
    rgb = np.zeros((2, 1, 1, 2, 3), np.float32)
    src = np.ones((1, 1, 2, 3), np.float32)
    masks = [np.zeros((1, 1, 2), bool), np.array([[[False, True]]])]
    out = opt.transfer_detail(alpha, rgb, src, masks, 0.98)
    np.testing.assert_array_equal(out[0, 0, 0, :, 0], [1, 0])  # layer 0: seen at 0.99 only
    np.testing.assert_array_equal(out[1, 0, 0, :, 0], [0, 1])  # layer 1: its mask


def test_fit_plate():
    video = np.zeros((3, 32, 48, 3), np.uint8)
    image = np.full((32, 48, 3), 7, np.uint8)
    assert opt.fit_plate(image, 5, (48, 32)).shape == (5, 32, 48, 3)
    assert opt.fit_plate(np.zeros((9, 32, 48, 3), np.uint8), 5, (48, 32)).shape[0] == 5  # trimmed
    with pytest.raises(OmnimatteError, match="differs from the clip's 64x32.*--fit"):
        opt.fit_plate(video, 3, (64, 32))
    with pytest.raises(OmnimatteError, match="3 frames, fewer than the clip's 5"):
        opt.fit_plate(video, 5, (48, 32))
    with pytest.raises(OmnimatteError, match="--fit zoom"):
        opt.fit_plate(video, 5, (48, 32), fit="zoom")
    ramp = np.arange(3, dtype=np.uint8)[:, None, None, None] * np.ones((1, 32, 48, 3), np.uint8)
    assert list(opt.fit_plate(ramp, 6, (48, 32), "loop")[:, 0, 0, 0]) == [0, 1, 2, 2, 1, 0]
    assert list(opt.fit_plate(ramp, 6, (48, 32), "stretch")[:, 0, 0, 0]) == [0, 0, 1, 1, 2, 2]
    assert opt.fit_plate(ramp, 3, (64, 16), "crop").shape == (3, 16, 64, 3)
    assert opt.fit_plate(ramp, 3, (64, 16), "stretch").shape == (3, 16, 64, 3)


def test_bad_inputs():
    v = np.zeros((2, 32, 32, 3), np.float32)
    with pytest.raises(OmnimatteError, match="mask 0"):
        opt.optimize_layer(v, v, np.zeros((2, 16, 32), bool), opt.OptimizeSettings(iterations=1))
    with pytest.raises(OmnimatteError, match="background"):
        opt.optimize_layer(v, v[:, :16], np.zeros((2, 32, 32), bool), opt.OptimizeSettings(iterations=1))


def test_a_short_fit_lowers_the_loss_and_reports():
    clip = make_clip(0, frames=4, size=(32, 32), shadow_opacity=0.5)
    calls = []
    s = opt.OptimizeSettings(iterations=40, batch_frames=2, nf=8, lr=2e-3, norm_identity=True)
    alpha, fg = opt.optimize_layer(clip.video, clip.background, clip.masks[0], s,
                                   report=lambda *a: calls.append(a))
    assert alpha.shape == (4, 32, 32) and fg.shape == (4, 32, 32, 3) and alpha.dtype == np.float32
    assert calls[0][:3] == ("optimize", 0, 40) and calls[-1][1] == 40
    losses = [float(c[3].split()[1]) for c in calls[1:]]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_least_alpha_explains_shadows_and_objects_exactly():
    from mlx_omnimatte.compositing import least_alpha

    bg = np.array([[[0.5, 0.4, 0.8], [0.2, 0.6, 0.5], [0.3, 0.3, 0.3]]], np.float32)
    shadow = bg * (1 - 0.35)  # darkened by 35%: black at alpha 0.35
    fg = np.array([1.0, 0.5, 0.0], np.float32)
    obj = 0.6 * fg + 0.4 * bg  # some colour at alpha 0.6: needs at least that much
    np.testing.assert_allclose(least_alpha(shadow, bg), 0.35, atol=1e-6)
    least = least_alpha(obj, bg)
    assert (least <= 0.6 + 1e-6).all() and (least > 0).all()
    np.testing.assert_allclose(least_alpha(bg + 0.01, bg, floor=0.02), 0.0)  # noise
    with pytest.raises(OmnimatteError, match="shapes differ"):
        least_alpha(bg[:, :2], bg)


def test_plate_prior_gives_each_pixel_to_the_nearest_object():
    masks = np.zeros((2, 1, 16, 32), bool)
    masks[0, 0, 4:8, 2:6] = True
    masks[1, 0, 4:8, 24:28] = True
    video = np.full((1, 16, 32, 3), 0.25, np.float32)
    plate = np.full((1, 16, 32, 3), 0.5, np.float32)  # everything darkened by half
    prior = opt.plate_prior(video, plate, masks, floor=0.02)
    assert prior.shape == (2, 1, 16, 32)
    np.testing.assert_allclose(prior[0, 0, 12, 3], 0.5)  # below object 0
    assert prior[1, 0, 12, 3] == 0.0
    np.testing.assert_allclose(prior[1, 0, 12, 29], 0.5)  # below object 1
    assert (prior[:, masks.any(axis=0)] == 0).all()  # inside a mask: that mask supervises
    np.testing.assert_allclose(prior.sum(axis=0)[~masks.any(axis=0)], 0.5)  # every pixel has one owner


def test_erosion_scales_with_the_grid_and_plate_schedule():
    s = opt.OptimizeSettings()
    assert s.erosion(480, 832) == 5 and s.erosion(96, 128) == 1 and s.erosion(1080, 1920) == 11
    p = s.scaled(200).for_plate()
    assert p.plate_prior and p.mask_steps == 200 and p.milestones == (140, 180)
    assert float(opt.step_weights(p, 199)[3]) == s.w_mask


@pytest.mark.slow
def test_clean_plate_decomposition_meets_the_quality_bar(tmp_path, capsys):
    """The README's main job: a 64x64, 8-frame synthetic clip with a 50%
    shadow, decomposed against its true plate in 120 iterations, then
    evaluated. Measured: IoU 0.988, object alpha MAE 0.022, shadow MAE
    0.040, recomposition 40.0 dB; asserted at the targets."""
    import json

    from helpers import run_ok

    clip, out, scores = tmp_path / "clip", tmp_path / "out", tmp_path / "scores.json"
    run_ok(["synth", "-o", clip, "--seed", "3", "--frames", "8", "--size", "64x64", "--shadow-opacity", "0.5"], capsys)
    run_ok(["decompose", clip, "--clean-plate", clip / "truth" / "background", "-o", out, "--layer-solver", "unet", "--iterations", "120",
            "--batch-frames", "4", "--lr", "5e-3", "--quiet"], capsys)
    run_ok(["evaluate", out, "--clip", clip, "--truth", clip / "truth", "--json", scores], capsys)
    row = json.loads(scores.read_text())["00"]
    assert row["iou"] >= 0.9 and row["object_mae"] <= 0.05 and row["effect_mae"] <= 0.1
    assert row["recompose_psnr"] >= 30.0 and row["effect_pixels"] > 100


def test_joint_clean_plate_layers_learn_their_own_objects():
    clip = make_clip(1, frames=4, size=(32, 32), objects=2, shadow_opacity=0.5)
    # objects of a few dozen pixels here: no erosion
    s = opt.OptimizeSettings(iterations=60, batch_frames=2, nf=8, lr=3e-3, norm_identity=True, erode=1)
    layers = opt.run_clean_plate(clip.video, clip.masks, clip.background, s)
    assert len(layers) == 2
    for k, (alpha, fg) in enumerate(layers):
        assert alpha.shape == (4, 32, 32) and np.isfinite(fg).all()
        own, other = clip.masks[k], clip.masks[1 - k] & ~clip.masks[k]
        # mask supervision (and the mask input channel) separate the layers
        assert alpha[own].mean() > alpha[other].mean() + 0.2


def test_compiled_step_matches_the_plain_one():
    clip = make_clip(0, frames=3, size=(32, 32))
    runs = []
    for compiled in (True, False):
        calls = []
        s = opt.OptimizeSettings(iterations=4, batch_frames=2, nf=4, lr=1e-2, compile=compiled, milestones=(2,))
        alpha, _ = opt.optimize_layer(clip.video, clip.background, clip.masks[0], s, lambda *a: calls.append(a))
        runs.append(([float(c[3].split()[1]) for c in calls[1:]], alpha))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-4)
    np.testing.assert_allclose(runs[0][1], runs[1][1], atol=1e-4)
