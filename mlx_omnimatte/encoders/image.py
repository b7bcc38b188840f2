"""The image encoder as a pipeline stage: frame 0 -> CLIP ViT-H/14 features.

Reference behaviour (Wan2.1 `CLIPModel.visual`): the frame in [-1, 1] is
resized to 224x224 (whole frame, aspect not kept) with torch's bicubic filter
(A = -0.75, align_corners=False, no antialias), mapped to [0, 1] and
normalized with the CLIP mean/std. The tower is loaded, run and freed.
"""

from __future__ import annotations

import gc

import mlx.core as mx
import numpy as np

from ..errors import OmnimatteError
from ..models.clip import MEAN, STD
from ..progress import Report, stage
from ..weights import load_model


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of torch's bicubic resize (align_corners=False, no
    antialias, Keys' A = -0.75, border taps clamped), with torch's float32
    rounding: at 1920 px a float32 source coordinate is only good to ~1e-4, so
    the coordinate is rounded as torch's CPU kernel does (float32 scale, one
    fused multiply-add) to stay within 1e-6 of its weights."""
    f = np.float32
    a = f(-0.75)
    scale = np.float64(f(n_in) / f(n_out))
    src = (scale * (np.arange(n_out) + 0.5) - 0.5).astype(f)  # exact in float64, rounded once
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    t = np.clip(src - i0.astype(f), f(0), f(1))

    def near(x):  # |x| <= 1
        return ((a + f(2)) * x - (a + f(3))) * x * x + f(1)

    def far(x):  # 1 < |x| < 2
        return ((a * x - f(5) * a) * x + f(8) * a) * x - f(4) * a

    w = np.stack([far(t + f(1)), near(t), near(f(1) - t), far(f(1) - t + f(1))], axis=1)
    idx = np.clip(i0[:, None] + np.arange(-1, 3), 0, n_in - 1)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.repeat(np.arange(n_out), 4), idx.ravel()), w.ravel())
    return m


def clip_preprocess(frames, size: int = 224) -> mx.array:
    """frames [H, W, 3] or [B, H, W, 3], uint8 in [0, 255] or float in [-1, 1]
    -> normalized pixels [B, size, size, 3] float32 (the reference transform)."""
    a = np.asarray(frames)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise OmnimatteError(f"clip frame: expected [H, W, 3] or [B, H, W, 3], got shape {a.shape}")
    x = a.astype(np.float32) / 127.5 - 1.0 if a.dtype == np.uint8 else a.astype(np.float32)
    wh = mx.array(bicubic_matrix(a.shape[1], size))
    ww = mx.array(bicubic_matrix(a.shape[2], size))
    x = mx.einsum("oh,bhwc->bowc", wh, mx.array(x))
    x = mx.einsum("pw,bowc->bopc", ww, x)
    return ((x * 0.5 + 0.5) - mx.array(MEAN)) / mx.array(STD)


def clip_features(clip_dir, frame, *, report: Report = None) -> mx.array:
    """CLIP features [B, 257, 1280] (float32) of one frame [H, W, 3] (B = 1)
    or a batch: load the vision tower, preprocess, run, free."""
    with stage(report, "image encoder", 1) as tick:
        model = load_model(clip_dir, component="clip")
        pixels = clip_preprocess(frame, model.config.image_size)
        out = model(pixels)
        mx.eval(out)
        del model
        gc.collect()
        mx.clear_cache()
        tick()
    return out
