import numpy as np
import pytest

from mlx_omnimatte.evaluation import metrics
from mlx_omnimatte.errors import OmnimatteError


def test_psnr_of_a_known_error():
    a = np.full((2, 8, 8, 3), 0.5, np.float32)
    assert metrics.psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-3)  # mse 0.01
    assert metrics.psnr(a, a) == metrics.MAX_PSNR
    # uint8 is scaled by 1/255: an error of 255 * 0.1 ~ 25.5 levels
    assert metrics.psnr((a * 255).astype(np.uint8), ((a + 0.1) * 255).astype(np.uint8)) == pytest.approx(20.0, abs=0.2)


def _ssim_brute(a, b):
    k = metrics.gaussian_kernel(1.5, 11)
    w = np.outer(k, k)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    h, wd = a.shape
    vals = []
    for y in range(h - 10):
        for x in range(wd - 10):
            pa, pb = a[y:y + 11, x:x + 11], b[y:y + 11, x:x + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * pa * pa).sum() - ma ** 2, (w * pb * pb).sum() - mb ** 2
            cov = (w * pa * pb).sum() - ma * mb
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_the_windowed_definition():
    rng = np.random.default_rng(0)
    a = rng.random((16, 20)).astype(np.float32)
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1).astype(np.float32)
    assert metrics.ssim(a[None], b[None]) == pytest.approx(_ssim_brute(a, b), abs=1e-5)
    assert metrics.ssim(a[None], a[None]) == pytest.approx(1.0, abs=1e-6)
    assert metrics.ssim(a[None], b[None]) < 0.9


def test_alpha_errors_on_a_region_and_iou():
    truth = np.zeros((1, 4, 4), np.float32)
    truth[0, :2] = 1.0
    pred = truth.copy()
    pred[0, 0, 0] = 0.5
    region = truth > 0.5
    e = metrics.alpha_errors(pred, truth, region)
    assert e["pixels"] == 8 and e["mae"] == pytest.approx(0.5 / 8) and e["mse"] == pytest.approx(0.25 / 8)
    assert np.isnan(metrics.alpha_errors(pred, truth, np.zeros_like(region))["mae"])
    assert metrics.iou(pred, truth) == pytest.approx(1.0)  # 0.5 counts as inside
    pred[0, 0, 1] = 0.0
    assert metrics.iou(pred, truth) == pytest.approx(7 / 8)
    ignore = np.zeros_like(region)
    ignore[0, 0, 1] = True  # e.g. a shadow exactly at the threshold: measured by its MAE instead
    assert metrics.iou(pred, truth, ignore=ignore) == pytest.approx(1.0)
    with pytest.raises(OmnimatteError):
        metrics.iou(pred, truth[:, :2])


def test_gaussian_blur_keeps_mass_and_smooths():
    x = np.zeros((21, 21), np.float32)
    x[10, 10] = 1.0
    y = metrics.gaussian_blur(x, 2.0)
    assert y.sum() == pytest.approx(1.0, abs=1e-5)
    assert y[10, 10] == pytest.approx(metrics.gaussian_kernel(2.0)[6] ** 2, rel=1e-5)


def test_per_frame_sums_add_up_to_the_whole_video():
    rng = np.random.default_rng(1)
    pred, truth = rng.random((3, 9, 11)).astype(np.float32), rng.random((3, 9, 11)).astype(np.float32)
    region = truth > 0.3
    whole = metrics.alpha_errors(pred, truth, region)
    summed = metrics.errors_from_sums(sum(metrics.error_sums(p, t, r) for p, t, r in zip(pred, truth, region)))
    assert summed["pixels"] == whole["pixels"] == int(region.sum())
    assert summed["mae"] == pytest.approx(float(np.abs(pred - truth)[region].mean()), rel=1e-6)
    assert summed["mse"] == pytest.approx(whole["mse"], rel=1e-6)
    counts = sum(metrics.iou_counts(p, t) for p, t in zip(pred, truth))
    p, t = pred >= 0.5, truth >= 0.5
    assert list(counts) == [int((p & t).sum()), int((p | t).sum())]
    assert metrics.iou_from_counts(counts) == pytest.approx(metrics.iou(pred, truth))
    assert metrics.iou_from_counts(np.array([0, 0])) == 1.0


def test_ssim_frame_reuses_known_windows():
    rng = np.random.default_rng(2)
    a = rng.random((20, 24, 3)).astype(np.float32)
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1).astype(np.float32)
    direct = metrics.ssim(a[None], b[None])
    assert metrics.ssim_frame(a, b, stats_b=metrics.ssim_stats(b)) == pytest.approx(direct, abs=1e-7)
    assert metrics.ssim_frame(a, b) == pytest.approx(np.mean([_ssim_brute(a[..., c], b[..., c]) for c in range(3)]),
                                                     abs=1e-5)
