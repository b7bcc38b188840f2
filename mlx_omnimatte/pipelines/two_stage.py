"""Layers over a known background: a removal model's (`decompose --method
two-stage`, alias `optimize`) or the user's clean plate (`decompose
--clean-plate`, no weights at all).

* two-stage: one removal trajectory gives the background with every object
  removed; the layers are fitted jointly against it, front to back in mask
  order. With ``solo`` (the reference's way), one more trajectory per object
  keeps that object and removes the others, and each layer is fitted alone
  against its solo video.
* clean plate: the user's plate is the background; the layers are fitted
  jointly against it.

The layer solver is `layer_solver` (fast, closed form, the default) or
Generative Omnimatte's per-layer U-Net optimization (`optimize.py`,
``unet``). The alpha is resized to the source grid and the colour is solved
there in closed form against the background, frame by frame as the layers
are written, so they recompose the source exactly where alpha > 0 (what the
reference's detail transfer aims at).
"""

from __future__ import annotations

import numpy as np

from ..bundle import Bundle
from ..compositing import as_float
from ..errors import OmnimatteError
from ..io.grid import GridVideo, resize_frames, resize_masks
from ..io.inputs import Clip
from ..io.masks import binarize_mask
from ..layer_solver import SolverSettings, solve_layers
from ..progress import Report
from .omnimatte import LayerVideos
from .optimize import OptimizeSettings, optimize_layers
from .removal import ALL, run_removal
from .settings import Settings
from .stages import Trajectory

SOLVERS = ("fast", "unet")


def solo_targets(names: list[str]) -> list[Trajectory]:
    """The background (all removed) and, with several objects, each object's
    solo video (it kept, the others removed)."""
    n = len(names)
    targets = [Trajectory(ALL, None)]
    if n > 1:
        targets += [Trajectory(f"solo_{name}", [j for j in range(n) if j != i]) for i, name in enumerate(names)]
    return targets


def _on_grid(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Frames as they are when already on the grid, else resized (uint8 stays
    uint8: the solvers read a frame at a time)."""
    if frames.shape[1:3] == (size[1], size[0]):
        return frames
    return np.stack([resize_frames(frames[t:t + 1], size, "area")[0] for t in range(len(frames))])


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


def named(report: Report, name: str) -> Report:
    """The same callback with the object's name after each stage's."""
    return None if report is None else (lambda stage, *a: report(f"{stage} {name}", *a))


def _fit_layers(frames, background, masks: list[np.ndarray], opt: OptimizeSettings, solver: str,
                report: Report) -> list[np.ndarray]:
    """Alpha per object (front to back) on the working grid, by the fast
    solver or by the U-Net optimization (``opt`` as given: the reference's
    schedule, or the clean-plate one)."""
    if solver == "fast":
        return solve_layers(frames, background, masks, SolverSettings(), report)
    if solver != "unet":
        raise OmnimatteError(f"--layer-solver {solver}: unknown (one of {', '.join(SOLVERS)})")
    fitted = optimize_layers(_working(frames, frames.shape[2:0:-1]), _working(background, frames.shape[2:0:-1]),
                             masks, opt, report)
    return [a for a, _ in fitted]


def run_two_stage(clip: Clip, bundle: Bundle, settings: Settings, opt: OptimizeSettings, report: Report = None,
                  solver: str = "fast", solo: bool = False) -> dict[str, LayerVideos]:
    """A removal model's background, then the layers over it. One removal
    trajectory for all objects (the layers are fitted jointly, front to back
    in mask order); ``solo``: also one trajectory per object that keeps it
    and removes the others, each layer fitted alone against its solo video
    (for scenes where one object's effect falls on another)."""
    targets = solo_targets(clip.names) if solo else [Trajectory(ALL, None)]
    videos = run_removal(clip, bundle, settings, report, targets)
    size = clip.grid_size
    bg = _on_grid(videos[ALL].frames, size)
    masks = _object_masks(clip, size)
    if not solo or len(clip.names) == 1:
        return _to_layers(clip, _fit_layers(clip.frames, bg, masks, opt, solver, report), videos[ALL])
    alphas = []
    for i, name in enumerate(clip.names):
        solo_video = _on_grid(videos[f"solo_{name}"].frames, size)
        alphas += _fit_layers(solo_video, bg, [masks[i]], opt, solver, named(report, name))
    return _to_layers(clip, alphas, videos[ALL])


def run_with_plate(clip: Clip, plate: np.ndarray, background, opt: OptimizeSettings,
                   report: Report = None, solver: str = "fast") -> dict[str, LayerVideos]:
    """Layers against a clean plate: no model, no weights. ``plate``: on the
    clip's grid ([T, h, w, 3], or one frame for a still plate);
    ``background``: what is written (the plate at the source's size, frame
    by frame)."""
    if len(plate) == 1:
        plate = np.broadcast_to(plate, (clip.num_frames,) + plate.shape[1:])
    alphas = _fit_layers(clip.frames, plate, _object_masks(clip, clip.grid_size), opt.for_plate(), solver, report)
    return _to_layers(clip, alphas, background)
