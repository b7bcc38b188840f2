"""Decomposition quality measures on numpy arrays (EasyOmnimatte's
supplementary D): PSNR and SSIM of a recomposition against the input, and,
with synthetic truth, alpha error on a region and object IoU.

Images are float in [0, 1] (uint8 is scaled by 1/255); videos ``[T, H, W, C]``
or ``[T, H, W]``; per-frame measures are averaged over frames.
"""

from __future__ import annotations

import numpy as np

from ..compositing import as_float
from ..errors import OmnimatteError

SSIM_SIGMA = 1.5
SSIM_WINDOW = 11
SSIM_K1, SSIM_K2 = 0.01, 0.03  # Wang et al. 2004, for a data range of 1
MAX_PSNR = 100.0  # identical frames: a finite, recognisable ceiling


def gaussian_kernel(sigma: float, size: int | None = None) -> np.ndarray:
    """Normalized 1-D Gaussian; ``size`` defaults to covering +-3 sigma."""
    if size is None:
        size = 2 * int(np.ceil(3 * sigma)) + 1
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _filter_axis(x: np.ndarray, kernel: np.ndarray, axis: int, valid: bool) -> np.ndarray:
    # A sum of shifted copies: fast for short kernels, any number of frames.
    r = len(kernel) // 2
    x = np.moveaxis(x, axis, 0)
    if not valid:
        x = np.pad(x, [(r, r)] + [(0, 0)] * (x.ndim - 1), mode="edge")
    n = x.shape[0] - 2 * r
    out = np.zeros((n,) + x.shape[1:], dtype=np.float32)
    for i, w in enumerate(kernel):
        out += w * x[i:i + n]
    return np.moveaxis(out, 0, axis)


def gaussian_blur(x: np.ndarray, sigma: float, axes=(-2, -1), valid: bool = False) -> np.ndarray:
    """Separable Gaussian over two spatial ``axes`` (edge-padded, same size;
    ``valid``: only where the window fits, as SSIM uses it)."""
    if sigma <= 0:
        return np.asarray(x, dtype=np.float32).copy()
    k = gaussian_kernel(sigma, SSIM_WINDOW if valid else None)
    out = np.asarray(x, dtype=np.float32)
    for axis in axes:
        out = _filter_axis(out, k, axis, valid)
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over frames of the per-frame PSNR in dB (data range 1)."""
    a, b = _frames(a), _frames(b)
    _check(a, b, "psnr")
    mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(axis=1)
    db = np.where(mse > 0, 10.0 * np.log10(1.0 / np.maximum(mse, 1e-20)), MAX_PSNR)
    return float(np.minimum(db, MAX_PSNR).mean())


def _filter_valid(x: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    # A symmetric kernel where it fits: taps at +-i share one multiply, and the
    # sums reuse one buffer (SSIM is most of an evaluation's time).
    r = len(kernel) // 2
    x = np.moveaxis(np.asarray(x, dtype=np.float32), axis, 0)
    n = x.shape[0] - 2 * r
    out = x[r:r + n] * kernel[r]
    tmp = np.empty_like(out)
    for i in range(1, r + 1):
        np.add(x[r - i:r - i + n], x[r + i:r + i + n], out=tmp)
        tmp *= kernel[r + i]
        out += tmp
    return np.moveaxis(out, 0, axis)


def _window(x: np.ndarray) -> np.ndarray:
    k = gaussian_kernel(SSIM_SIGMA, SSIM_WINDOW)
    return _filter_valid(_filter_valid(x, k, 0), k, 1)


def ssim_stats(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Windowed mean and mean of squares of one frame [H, W, C], for
    ``ssim_frame`` to reuse when one frame is compared with several."""
    f = _frames(frame)
    return _window(f), _window(f * f)


def ssim_frame(a: np.ndarray, b: np.ndarray, stats_a=None, stats_b=None) -> float:
    """SSIM of one frame pair [H, W, C] (see ``ssim``); ``stats_*``: their
    ``ssim_stats`` when already known."""
    a, b = _frames(a), _frames(b)
    _check(a, b, "ssim")
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    mu_a, sq_a = stats_a if stats_a is not None else ssim_stats(a)
    mu_b, sq_b = stats_b if stats_b is not None else ssim_stats(b)
    var_a = sq_a - mu_a ** 2
    var_b = sq_b - mu_b ** 2
    cov = _window(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)
    return float((num / den).mean())


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM with an 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03,
    computed per channel over the valid window positions, averaged over
    channels and frames (as skimage's ``gaussian_weights=True``)."""
    a, b = _frames(a), _frames(b)
    _check(a, b, "ssim")
    if a.ndim == 3:
        a, b = a[..., None], b[..., None]
    return float(np.mean([ssim_frame(fa, fb) for fa, fb in zip(a, b)]))


def error_sums(pred: np.ndarray, truth: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
    """[sum |p - t|, sum (p - t)^2, pixels] over ``region`` (float64), to add
    up over frames; ``errors_from_sums`` turns them into MAE and MSE."""
    p, t = _frames(pred), _frames(truth)
    _check(p, t, "alpha_errors")
    d = p - t
    if region is not None:
        region = np.asarray(region, dtype=bool)
        _check(d, region, "alpha_errors region")
        d = d[region]
    d = d.astype(np.float64)
    return np.array([np.abs(d).sum(), (d * d).sum(), d.size], dtype=np.float64)


def errors_from_sums(sums: np.ndarray) -> dict:
    """MAE, MSE and pixel count from ``error_sums``; NaN for no pixels."""
    n = int(sums[2])
    if n == 0:
        return {"mae": float("nan"), "mse": float("nan"), "pixels": 0}
    return {"mae": float(sums[0] / n), "mse": float(sums[1] / n), "pixels": n}


def alpha_errors(pred: np.ndarray, truth: np.ndarray, region: np.ndarray | None = None) -> dict:
    """MAE and MSE of alpha over ``region`` (bool, same shape; None = all).
    An empty region gives NaN (nothing to measure)."""
    return errors_from_sums(error_sums(pred, truth, region))


def iou_counts(pred: np.ndarray, truth: np.ndarray, threshold: float = 0.5,
               ignore: np.ndarray | None = None) -> np.ndarray:
    """[intersection, union] of ``alpha >= threshold`` leaving out ``ignore``,
    to add up over frames (``iou_from_counts``)."""
    p, t = _frames(pred) >= threshold, _frames(truth) >= threshold
    _check(p, t, "iou")
    if ignore is not None:
        ignore = np.asarray(ignore, dtype=bool)
        _check(p, ignore, "iou ignore")
        p, t = p & ~ignore, t & ~ignore
    return np.array([np.logical_and(p, t).sum(), np.logical_or(p, t).sum()], dtype=np.int64)


def iou_from_counts(counts: np.ndarray) -> float:
    """Intersection over union; 1.0 when both are empty."""
    return 1.0 if counts[1] == 0 else float(counts[0] / counts[1])


def iou(pred: np.ndarray, truth: np.ndarray, threshold: float = 0.5, ignore: np.ndarray | None = None) -> float:
    """Intersection over union of ``alpha >= threshold`` over the whole
    video, leaving out the pixels of ``ignore`` (bool, same shape); 1.0 when
    both are empty."""
    return iou_from_counts(iou_counts(pred, truth, threshold, ignore))


def _frames(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype == bool else as_float(x)


def _check(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise OmnimatteError(f"{what}: shapes differ ({a.shape} vs {b.shape})")
