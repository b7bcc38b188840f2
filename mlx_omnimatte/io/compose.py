"""Layers over a new background: the `composite` command's math. A
background image is repeated over time, a video mirrored at its end or
trimmed, both resized to the layers' grid."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..compositing import alpha_channel, as_float
from ..errors import OmnimatteError
from .grid import mirror_indices, resize_frames


def fit_background(background: np.ndarray, frames: int, size: tuple[int, int]) -> np.ndarray:
    """A background image ``[H, W, 3]`` or video ``[T, H, W, 3]`` as a float
    video of ``frames`` frames at ``size`` (W, H): resized bicubically, an
    image repeated over time, a shorter video extended by mirroring, a longer
    one trimmed."""
    bg = np.asarray(background)
    if bg.ndim == 3:
        bg = bg[None]
    if bg.ndim != 4 or bg.shape[-1] not in (3, 4):
        raise OmnimatteError(f"background: expected [H, W, 3] or [T, H, W, 3], got {bg.shape}")
    bg = bg[..., :3]
    bg = as_float(resize_frames(bg, size, "bicubic"))
    if bg.shape[0] == 1:
        return np.broadcast_to(bg, (frames,) + bg.shape[1:])
    return bg[mirror_indices(bg.shape[0], frames)]


def composite(
    layers: Sequence[tuple[np.ndarray, np.ndarray]], background: np.ndarray
) -> np.ndarray:
    """Put foreground layers over a new background.

    ``layers``: ``(alpha, fg)`` pairs, listed back to front (the first is
    drawn first, the last ends on top), all of the same ``[T, H, W]`` grid.
    ``background``: an image ``[H', W', 3]`` (repeated over time) or a video
    ``[T', H', W', 3]`` (mirrored at its end if shorter, trimmed if longer),
    resized to the layers' size. Returns float32 ``[T, H, W, 3]`` in [0, 1].
    """
    if not layers:
        raise OmnimatteError("composite: no layers given")
    _, fg0 = layers[0]
    t, h, w = np.shape(fg0)[:3]
    out = fit_background(background, t, (w, h)).copy()
    for k, (alpha, fg) in enumerate(layers):
        a, f = alpha_channel(alpha), as_float(fg)
        if f.shape != (t, h, w, 3) or a.shape != (t, h, w, 1):
            raise OmnimatteError(
                f"composite: layer {k} has fg {f.shape} and alpha {a.shape}, expected ({t}, {h}, {w}, 3)"
            )
        out = a * f + (1.0 - a) * out
    return out.astype(np.float32)
