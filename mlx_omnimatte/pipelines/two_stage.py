"""Layers with the public weights (`decompose --method optimize`) or with no
weights at all (`decompose --clean-plate`): a background first, then
Generative Omnimatte's per-layer optimization (`optimize.py`).

* optimize: Casper removal gives the background (every object removed) and,
  with several objects, one solo video per object (that object kept, the
  others removed); for a single object the solo video is the input itself.
  Each layer is then fitted against its solo video over the background on
  the model grid.
* clean plate: the user's plate is the background; one object is the same
  problem with solo = the clip, several are fitted jointly front to back.

The fitted alpha is resized to the source grid and the colour is solved there
in closed form against the background, frame by frame as the layers are
written, so they recompose the source exactly where alpha > 0 (what the
reference's detail transfer aims at).
"""

from __future__ import annotations

import numpy as np

from ..bundle import Bundle
from ..compositing import as_float
from ..io.grid import GridVideo, plan_grid, resize_frames, resize_masks
from ..io.inputs import Clip
from ..io.masks import binarize_mask
from ..progress import Report
from .omnimatte import LayerVideos
from .optimize import OptimizeSettings, optimize_layer, run_clean_plate
from .removal import ALL, run_removal
from .settings import Settings
from .stages import Trajectory


def solo_targets(names: list[str]) -> list[Trajectory]:
    """The background (all removed) and, with several objects, each object's
    solo video (it kept, the others removed)."""
    n = len(names)
    targets = [Trajectory(ALL, None)]
    if n > 1:
        targets += [Trajectory(f"solo_{name}", [j for j in range(n) if j != i]) for i, name in enumerate(names)]
    return targets


def _working(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 [T, H, W, 3] in [0, 1] at the working size, frame by frame (a
    source-size video is never converted whole; a still plate, a broadcast
    view, is resized once)."""
    if frames.strides[0] == 0:
        return np.broadcast_to(resize_frames(as_float(frames[:1]), size, "area"), (len(frames), size[1], size[0], 3))
    out = np.empty((len(frames), size[1], size[0], 3), dtype=np.float32)
    for t in range(len(frames)):
        out[t] = resize_frames(as_float(frames[t:t + 1]), size, "area")[0]
    return out


def _object_masks(clip: Clip, size: tuple[int, int]) -> list[np.ndarray]:
    """Each object's mask, area-resized to the working grid and binarized.
    Not dilated: the optimization erodes it by its own `erode` pixels, and an
    11-pixel dilation (the Casper conditioning's) swallows the effects on a
    small working grid."""
    return [binarize_mask(resize_masks(m, size, "area")) for m in clip.masks]


def _to_layers(clip: Clip, alphas: list[np.ndarray], background: GridVideo) -> dict[str, LayerVideos]:
    """Working-grid alphas over the background, as the writers stream them."""
    return {name: LayerVideos(GridVideo(np.clip(a, 0.0, 1.0), clip.size), background)
            for name, a in zip(clip.names, alphas)}


def working_plan(clip: Clip, settings: Settings):
    """The grid the optimization runs on: the model grid's size, the clip's own
    frame count (no padding: nothing is denoised)."""
    return plan_grid(clip.size[0], clip.size[1], clip.num_frames, size=settings.size, min_frames=1)


def run_optimize(clip: Clip, bundle: Bundle, settings: Settings, opt: OptimizeSettings,
                 report: Report = None) -> dict[str, LayerVideos]:
    """Casper removal, then one optimization per object."""
    videos = run_removal(clip, bundle, settings, report, solo_targets(clip.names))
    size = working_plan(clip, settings).size
    bg = _working(videos[ALL].frames, size)
    masks = _object_masks(clip, size)
    alphas = []
    for i, name in enumerate(clip.names):
        solo = videos[f"solo_{name}"].frames if f"solo_{name}" in videos else clip.frames
        alpha, _ = optimize_layer(_working(solo, size), bg, masks[i], opt, report)
        alphas.append(alpha)
    return _to_layers(clip, alphas, videos[ALL])


def run_with_plate(clip: Clip, plate: np.ndarray, background, opt: OptimizeSettings,
                   report: Report = None) -> dict[str, LayerVideos]:
    """Layers against a clean plate: no model, no weights. ``plate``: on the
    clip's grid ([T, h, w, 3], or one frame for a still plate);
    ``background``: what is written (the plate at the source's size, frame
    by frame)."""
    if len(plate) == 1:
        plate = np.broadcast_to(plate, (clip.num_frames,) + plate.shape[1:])
    fitted = run_clean_plate(_working(clip.frames, clip.grid_size), _object_masks(clip, clip.grid_size),
                             _working(plate, clip.grid_size), opt, report)
    return _to_layers(clip, [a for a, _ in fitted], background)
