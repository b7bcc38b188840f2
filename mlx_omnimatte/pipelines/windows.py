"""Temporal multi-diffusion: denoise long latents in overlapping windows.

The model was trained on 81-frame clips (21 latent frames). Longer latents
are covered, at every denoising step, by windows of ``window`` latent frames;
consecutive windows share ``overlap`` frames and the last window is aligned
to the end. Each window's velocity is weighted per frame (1 inside, a linear
ramp over the first/last ``overlap`` frames where another window takes over)
and the weighted velocities are averaged.

This is the scheme of the Generative Omnimatte / Casper reference pipeline
(``temporal_multidiffusion_stride=16`` pixel frames = 4 latent frames, which
is the *overlap*: windows start 17 latent frames apart). The reference blends
the Euler-stepped window latents; because the weights are normalized per
frame, that equals one Euler step with the blended velocity, which is what we
do (and which also keeps multistep samplers such as UniPC well defined).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ..errors import OmnimatteError

DEFAULT_WINDOW = 21  # latent frames (81 pixel frames)
DEFAULT_OVERLAP = 4  # latent frames (16 pixel frames)


class Window(NamedTuple):
    start: int
    end: int
    weight: np.ndarray  # [end - start] float32, normalized: weights of all windows sum to 1 per frame


def window_spans(length: int, window: int = DEFAULT_WINDOW, overlap: int = DEFAULT_OVERLAP):
    """(start, end) spans covering ``length`` frames, in the reference's order."""
    if length < 1:
        raise OmnimatteError(f"latent length {length}: must be >= 1")
    if window < 1:
        raise OmnimatteError(f"window {window}: must be >= 1 latent frame")
    if not 0 <= overlap < window:
        raise OmnimatteError(f"overlap {overlap}: must be in [0, window={window})")
    spans, start = [], 0
    while True:
        end = min(start + window, length)
        start = max(0, end - window)  # a short tail window slides back to full size
        spans.append((start, end))
        if end >= length:
            return spans
        start = end - overlap


def _raw_weight(start: int, end: int, length: int, overlap: int) -> np.ndarray:
    w = np.ones(end - start, np.float64)
    n = min(overlap, end - start)
    if n > 0 and start > 0:  # ramp up where the previous window fades out
        w[:n] = np.linspace(0.0, 1.0, overlap + 2)[1:-1][:n]
    if n > 0 and end < length:  # ramp down where the next window takes over
        w[-n:] = np.linspace(1.0, 0.0, overlap + 2)[1:-1][-n:]
    return w


def make_windows(length: int, window: int = DEFAULT_WINDOW, overlap: int = DEFAULT_OVERLAP) -> list[Window]:
    """Windows with per-frame weights, normalized so they sum to 1 on every frame.

    Ramp values are those of the reference (linspace(0, 1, overlap + 2)[1:-1]),
    so every weight is > 0 and a frame covered by a single window gets 1.
    """
    spans = window_spans(length, window, overlap)
    raw = [_raw_weight(s, e, length, overlap) for s, e in spans]
    total = np.zeros(length, np.float64)
    for (s, e), w in zip(spans, raw):
        total[s:e] += w
    return [Window(s, e, (w / total[s:e]).astype(np.float32)) for (s, e), w in zip(spans, raw)]


def _slice_frames(tree, start: int, end: int):
    return tree_map(lambda a: a[:, start:end], tree)


def blend_velocity(
    velocity_fn: Callable,
    x,
    t,
    windows: Sequence[Window] | None = None,
    window: int = DEFAULT_WINDOW,
    overlap: int = DEFAULT_OVERLAP,
):
    """Velocity of the whole latent from per-window model calls.

    ``velocity_fn(x_window, t, (start, end))`` gets the frames ``start:end``
    (axis 1) of ``x``; the span lets it slice its per-frame conditioning (mask
    channels, condition latent) the same way. ``x`` is ``[B, T', H', W', C]``
    or a list/tuple of such arrays with the same T' (e.g. background and
    alpha latents); the output has the same structure, in float32 when
    windows are blended.

    ``windows`` defaults to ``make_windows(T', window, overlap)``; when one
    window covers all frames, ``velocity_fn`` is called once on ``x`` itself.
    Memory: one window's output plus a float32 accumulator of ``x``'s size
    (each window is evaluated before the next starts).
    """
    leaves = [a for _, a in tree_flatten(x)]
    if not leaves:
        raise OmnimatteError("blend_velocity: no latent arrays given")
    length = leaves[0].shape[1]
    if any(a.shape[1] != length for a in leaves):
        raise OmnimatteError("blend_velocity: latents differ in frame count")
    if windows is None:
        windows = make_windows(length, window, overlap)
    if len(windows) == 1 and windows[0].start == 0 and windows[0].end == length:
        return velocity_fn(x, t, (0, length))

    acc = tree_map(lambda a: mx.zeros(a.shape, mx.float32), x)
    covered = np.zeros(length, bool)
    for win in windows:
        out = velocity_fn(_slice_frames(x, win.start, win.end), t, (win.start, win.end))
        w = mx.array(win.weight)

        def add(a, o, w=w, win=win):
            wb = w.reshape((1, -1) + (1,) * (o.ndim - 2))
            a[:, win.start : win.end] = a[:, win.start : win.end] + o.astype(mx.float32) * wb
            return a

        acc = tree_map(add, acc, out)
        mx.eval(acc)  # bound memory to one window's graph
        covered[win.start : win.end] = True
    if not covered.all():
        raise OmnimatteError(f"blend_velocity: windows do not cover all {length} latent frames")
    return acc
