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
in closed form against the background, so the layers recompose the source
exactly where alpha > 0 (what the reference's detail transfer aims at).
"""

from __future__ import annotations

import numpy as np

from ..bundle import Bundle
from ..compositing import solve_foreground
from ..io.grid import from_model_grid, plan_grid, resize_frames, resize_masks
from ..io.inputs import Clip
from ..io.masks import binarize_mask
from ..progress import Report
from .omnimatte import Layers
from .optimize import OptimizeSettings, fit_plate, optimize_layer, run_clean_plate
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
    """float32 [T, H, W, 3] in [0, 1] at the working size."""
    return resize_frames(frames.astype(np.float32) / (255.0 if frames.dtype == np.uint8 else 1.0), size, "area")


def _object_masks(clip: Clip, size: tuple[int, int]) -> list[np.ndarray]:
    """Each object's mask, area-resized to the working grid and binarized.
    Not dilated: the optimization erodes it by its own `erode` pixels, and an
    11-pixel dilation (the Casper conditioning's) swallows the effects on a
    small working grid."""
    return [binarize_mask(resize_masks(m, size, "area")) for m in clip.masks]


def _to_layers(clip: Clip, plan, alphas: list[np.ndarray], background: np.ndarray) -> dict[str, Layers]:
    """Working-size alphas -> Layers on the source grid (closed-form colour)."""
    src = clip.frames.astype(np.float32) / 255.0
    layers = {}
    for name, alpha in zip(clip.names, alphas):
        a = np.clip(from_model_grid(alpha[..., None], plan)[..., 0], 0.0, 1.0)
        layers[name] = Layers(a, solve_foreground(src, a, background), background)
    return layers


def working_plan(clip: Clip, settings: Settings):
    """The grid the optimization runs on: the model grid's size, the clip's own
    frame count (no padding: nothing is denoised)."""
    return plan_grid(clip.size[0], clip.size[1], clip.num_frames, size=settings.size, min_frames=1)


def run_optimize(clip: Clip, bundle: Bundle, settings: Settings, opt: OptimizeSettings,
                 report: Report = None) -> dict[str, Layers]:
    """Casper removal, then one optimization per object."""
    videos = run_removal(clip, bundle, settings, report, solo_targets(clip.names))
    background = videos[ALL]
    plan = working_plan(clip, settings)
    bg = _working(background, plan.size)
    masks = _object_masks(clip, plan.size)
    alphas = []
    for i, name in enumerate(clip.names):
        solo = videos.get(f"solo_{name}", clip.frames)
        alpha, _ = optimize_layer(_working(solo, plan.size), bg, masks[i], opt, report)
        alphas.append(alpha)
    return _to_layers(clip, plan, alphas, background)


def run_with_plate(clip: Clip, plate: np.ndarray, settings: Settings, opt: OptimizeSettings,
                   fit: str | None = None, report: Report = None) -> dict[str, Layers]:
    """Layers against a clean plate: no model, no weights."""
    background = fit_plate(plate, clip.num_frames, clip.size, fit)
    background = background.astype(np.float32) / (255.0 if background.dtype == np.uint8 else 1.0)
    plan = working_plan(clip, settings)
    fitted = run_clean_plate(_working(clip.frames, plan.size), _object_masks(clip, plan.size),
                             _working(background, plan.size), opt, report)
    return _to_layers(clip, plan, [a for a, _ in fitted], background)
