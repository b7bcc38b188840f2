"""Side-by-side preview video: input | alpha | foreground over a checkerboard |
background, one row per object, H.264."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..compositing import alpha_channel, as_float, over_checkerboard, to_uint8
from ..errors import OmnimatteError
from .grid import resize_frames
from .writers import check_output, write_video

PANELS = 4
MAX_WIDTH = 2048  # whole preview; panels are scaled down to fit


def panel_size(width: int, height: int, max_width: int = MAX_WIDTH) -> tuple[int, int]:
    """Even (W, H) of one panel so that four of them fit in ``max_width``."""
    scale = min(1.0, max_width / (PANELS * width))
    w = max(2, int(round(width * scale / 2)) * 2)
    h = max(2, int(round(height * scale / 2)) * 2)
    return w, h


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def preview_frame(source: np.ndarray, layers: Sequence[tuple], size: tuple[int, int]) -> np.ndarray:
    """One uint8 preview frame ``[rows * h, 4 * w, 3]`` from the source frame
    and, per object, (alpha, foreground, background) of that frame."""

    def small(x: np.ndarray) -> np.ndarray:
        return resize_frames(to_uint8(x)[None], size, "bilinear")[0]

    src = small(source)
    rows = []
    for a, fg, bg in layers:
        matte = np.repeat(to_uint8(alpha_channel(a)), 3, axis=-1)
        checker = over_checkerboard(a, as_float(fg))
        rows.append(np.concatenate([src, small(matte), small(checker), small(bg)], axis=1))
    return np.concatenate(rows, axis=0)


def preview_frames(
    video: np.ndarray,
    alphas: Sequence[np.ndarray] | np.ndarray,
    foregrounds: Sequence[np.ndarray] | np.ndarray,
    backgrounds: Sequence[np.ndarray] | np.ndarray,
    max_width: int = MAX_WIDTH,
) -> Iterator[np.ndarray]:
    """Yield the preview frames of whole videos; ``alphas``/``foregrounds``:
    one array per object (or a single array); ``backgrounds``: one per
    object or a single shared one."""
    alphas, fgs, bgs = _as_list(alphas), _as_list(foregrounds), _as_list(backgrounds)
    if len(alphas) != len(fgs) or len(bgs) not in (1, len(alphas)):
        raise OmnimatteError(
            f"preview: {len(alphas)} alphas, {len(fgs)} foregrounds, {len(bgs)} backgrounds do not pair up"
        )
    t, h, w = np.shape(video)[:3]
    size = panel_size(w, h, max_width)
    for i in range(t):
        layers = [(a[i], fg[i], bgs[k if len(bgs) > 1 else 0][i]) for k, (a, fg) in enumerate(zip(alphas, fgs))]
        yield preview_frame(video[i], layers, size)


def write_preview(
    path: str | Path,
    video: np.ndarray,
    alphas: Sequence[np.ndarray] | np.ndarray,
    foregrounds: Sequence[np.ndarray] | np.ndarray,
    backgrounds: Sequence[np.ndarray] | np.ndarray,
    fps: float | Fraction,
    overwrite: bool = False,
    max_width: int = MAX_WIDTH,
) -> Path:
    """Write the side-by-side preview as H.264 (``.mp4``), frame by frame."""
    check_output(path, overwrite)
    frames = preview_frames(video, alphas, foregrounds, backgrounds, max_width)
    return write_video(path, frames, fps, overwrite)
