"""Side-by-side preview video: input | alpha | foreground over a checkerboard |
background, one row per object, H.264."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..compositing import alpha_channel, as_float, over_checkerboard, to_uint8
from .grid import resize_frames

PANELS = 4
MAX_WIDTH = 2048  # whole preview; panels are scaled down to fit


def panel_size(width: int, height: int, max_width: int = MAX_WIDTH) -> tuple[int, int]:
    """Even (W, H) of one panel so that four of them fit in ``max_width``."""
    scale = min(1.0, max_width / (PANELS * width))
    w = max(2, int(round(width * scale / 2)) * 2)
    h = max(2, int(round(height * scale / 2)) * 2)
    return w, h


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
