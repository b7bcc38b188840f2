"""The fast layer solver: each object's alpha, effects included, from a known
background (a clean plate or a removal model's output), frame by frame in
closed form; no network, no optimization.

Per clip (from a sample of frames, far from every object):
* exposure: a per-channel gain and offset that map the background onto the
  video (a removal model re-exposes slightly), applied to the background
  before anything is compared;
* noise floor: a high quantile of what is left there (sensor noise, a
  removal model's blur and re-texturing). When it is above a few grey levels
  the difference is low-passed first: a re-textured or blurred background
  differs from the video at high frequencies, a shadow at low ones.

Per frame, for each object (front to back in mask order):
* body: alpha 1 over the mask eroded by ``edge`` pixels (the coarse mask may
  be that much too large); in the band out to ``edge`` pixels past the mask
  (it may be that much too small) a pixel is the object where it is a mix of
  the nearest body colour and the background (the projection of ``I - B``
  on ``F - B`` explains it); the body is closed and its holes filled, so a
  body pixel whose colour matches the background stays 1;
* soft edge: on the body's one-pixel rim alpha is that projection;
* effects: where the difference passes the noise floor and the pixel's
  connected region touches the object (noise specks and far changes are not
  the object's), the alpha of the colour that explains the pixel best:
  black (a shadow that darkens by s gets s), white (a light) or one of the
  object's own colours (its reflection), never below the least alpha that
  any colour needs; each pixel goes to the nearest object (where one
  object's effect lies over another's, the nearer object takes it);
* time: where the difference does not change between frames, it is averaged
  with the previous frame's (a recursive filter), so still effects do not
  flicker with the noise.

Memory: one frame at a time plus one frame of filter state; the caller keeps
the alphas on the working grid (what the writers resize back).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .compositing import EPS, as_float
from .errors import OmnimatteError

STAGE = "solve layers"
REFERENCE_SIDE = 480  # pixel sizes below are for a frame of this shorter side
MIN_EDGE = 3  # a hand-drawn or resized mask is this many pixels off on any grid


@dataclass(frozen=True)
class SolverSettings:
    edge: float = 6.0  # how far off the coarse mask may be, in pixels at 480
    reach: float = 12.0  # an effect must come this close to its object, pixels at 480
    far: float = 32.0  # noise and exposure are measured this far from every object
    floor_sigmas: float = 4.0  # the noise floor, in robust standard deviations
    min_floor: float = 2.5 / 255.0  # uint8 rounding of two images
    smooth_above: float = 1.0 / 255.0  # low-pass the difference when its noise is above this
    smooth_sigma: float = 1.2  # pixels at 480
    still: float = 0.5  # weight of the previous frame where the difference is still
    sample_frames: int = 12
    palette: int = 4  # the object's colours an effect may take (a reflection's)

    def pixels(self, value: float, height: int, width: int, least: int = 1) -> int:
        return max(least, int(round(value * min(height, width) / REFERENCE_SIDE)))


@dataclass
class Calibration:
    """What the clip says about its background: exposure and noise."""

    gain: np.ndarray  # [3]
    offset: np.ndarray  # [3]
    floor: float  # largest channel difference that is still noise
    sigma: float  # low-pass of the difference, pixels (0: none)


# --- the clip's statistics ------------------------------------------------------


def far_region(masks: list[np.ndarray], distance: int) -> np.ndarray:
    """Pixels at least ``distance`` from every mask ([H, W] bool masks)."""
    near = np.zeros(masks[0].shape, dtype=bool)
    for m in masks:
        near |= m
    return ~ndimage.maximum_filter(near, size=2 * distance + 1)


def fit_exposure(video: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel gain and offset with ``video ~ gain * background + offset``
    on [N, 3] samples. Robust: it starts from the identity and fits only the
    samples that it already explains (effects far from their objects, such as
    a long shadow, are a minority that never enters)."""
    gain, offset = np.ones(3, np.float32), np.zeros(3, np.float32)
    if len(video) < 64:
        return gain, offset
    for c in range(3):
        x, y = background[:, c], video[:, c]
        g, o = 1.0, 0.0
        for _ in range(3):
            r = np.abs(y - (g * x + o))
            keep = r <= max(3.0 * float(np.median(r)), 2.0 / 255.0)
            xs, ys = x[keep], y[keep]
            if xs.size < 64 or float(xs.std()) < 0.02:  # a flat background says nothing about gain
                break
            g = float(((xs - xs.mean()) * (ys - ys.mean())).mean() / xs.var())
            g = min(max(g, 0.8), 1.25)  # a re-exposure, not another picture
            o = float(ys.mean() - g * xs.mean())
        gain[c], offset[c] = g, o
    return gain, offset


def _difference(frame, background, cal: Calibration) -> tuple[np.ndarray, np.ndarray]:
    """(exposure-corrected background, frame - it, low-passed if noisy)."""
    bg = np.clip(background * cal.gain + cal.offset, 0.0, 1.0)
    d = frame - bg
    if cal.sigma > 0:
        d = ndimage.gaussian_filter(d, sigma=(cal.sigma, cal.sigma, 0), mode="nearest")
    return bg, d


def calibrate(frames, backgrounds, masks, settings: SolverSettings = SolverSettings()) -> Calibration:
    """Exposure and noise floor from up to ``sample_frames`` frames, far from
    every object. ``frames``/``backgrounds`` [T, H, W, 3]; ``masks`` per
    object [T, H, W] bool."""
    t, h, w = frames.shape[:3]
    picks = np.unique(np.linspace(0, t - 1, min(t, settings.sample_frames)).round().astype(int))
    dist = settings.pixels(settings.far, h, w)
    regions = [far_region([m[i] for m in masks], dist) for i in picks]
    vid = np.concatenate([as_float(frames[i])[r] for i, r in zip(picks, regions)])
    bgs = np.concatenate([as_float(backgrounds[i])[r] for i, r in zip(picks, regions)])
    gain, offset = fit_exposure(vid, bgs)
    cal = Calibration(gain, offset, settings.min_floor, 0.0)
    sigma = _noise(frames, backgrounds, picks, regions, cal)
    if sigma > settings.smooth_above:
        cal.sigma = settings.smooth_sigma * min(h, w) / REFERENCE_SIDE
        sigma = _noise(frames, backgrounds, picks, regions, cal)
    cal.floor = max(settings.floor_sigmas * sigma, settings.min_floor)
    return cal


def _noise(frames, backgrounds, picks, regions, cal) -> float:
    """The difference's noise level far from the objects: a robust standard
    deviation (1.4826 MAD, largest channel), blind to a minority of effects."""
    d = np.concatenate([_difference(as_float(frames[i]), as_float(backgrounds[i]), cal)[1][r]
                        for i, r in zip(picks, regions)])
    if d.size == 0:
        return 0.0
    mad = np.median(np.abs(d - np.median(d, axis=0)), axis=0)
    return float(1.4826 * mad.max())


# --- one frame -------------------------------------------------------------------


def least_alpha_of(diff: np.ndarray, bg: np.ndarray, floor: float) -> np.ndarray:
    """The least alpha that explains ``bg + diff`` over ``bg`` (see
    ``compositing.least_alpha``), 0 where no channel passes ``floor``."""
    room = np.where(diff < 0, bg, 1.0 - bg)
    a = np.clip(np.abs(diff) / np.maximum(room, EPS), 0.0, 1.0).max(axis=-1)
    a[np.abs(diff).max(axis=-1) <= floor] = 0.0
    return a


def project(frame: np.ndarray, bg: np.ndarray, colour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Alpha of ``frame`` as a mix of ``colour`` over ``bg`` (least squares)
    and the residual of that explanation (largest channel), [H, W] each."""
    span = colour - bg
    a = np.clip((frame - bg) * span, None, None).sum(axis=-1) / np.maximum((span * span).sum(axis=-1), 1e-6)
    a = np.clip(a, 0.0, 1.0)
    residual = np.abs(frame - bg - a[..., None] * span).max(axis=-1)
    return a, residual


def darkening(frame: np.ndarray, bg: np.ndarray, floor: float) -> np.ndarray:
    """Where ``frame`` is ``bg`` darkened by one factor in every channel (a
    shadow's signature), [H, W] bool."""
    s = np.clip(1.0 - (frame * bg).sum(axis=-1) / np.maximum((bg * bg).sum(axis=-1), 1e-6), 0.0, 1.0)
    residual = np.abs(frame - (1.0 - s[..., None]) * bg).max(axis=-1)
    return (s > 0) & (residual <= 2.0 * floor)


def _box(region: np.ndarray, pad: int) -> tuple[slice, slice] | None:
    ys, xs = np.nonzero(region.any(axis=1))[0], np.nonzero(region.any(axis=0))[0]
    if ys.size == 0:
        return None
    h, w = region.shape
    return slice(max(ys[0] - pad, 0), min(ys[-1] + pad + 1, h)), slice(max(xs[0] - pad, 0), min(xs[-1] + pad + 1, w))


def body(frame, bg, mask, edge: int, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """(alpha of the object's body with its soft rim, the body as bool), on
    the frame's grid; the mask may be ``edge`` pixels off either way."""
    alpha, solid = np.zeros(mask.shape, np.float32), np.zeros(mask.shape, bool)
    box = _box(mask, 2 * edge + 2)
    if box is None:
        return alpha, solid
    f, b, m = frame[box], bg[box], mask[box]
    # inside the mask, whatever the background does not explain is the
    # object, unless it is a plain darkening (a shadow at the object's foot)
    changed = (np.abs(f - b).max(axis=-1) > floor) & ~darkening(f, b, floor)
    # the core: surely the object (a mask too large by up to ``edge`` has no
    # background left here once unchanged pixels are out; the holes that
    # leaves inside the object are filled below)
    core = ndimage.minimum_filter(m, size=2 * edge + 1) & changed
    if not core.any():
        core = m
    band = ndimage.maximum_filter(m, size=2 * edge + 1)
    # the nearest core pixel's colour: what the object looks like nearby
    idx = ndimage.distance_transform_edt(~core, return_distances=False, return_indices=True)
    colour = f[idx[0], idx[1]]
    a, residual = project(f, b, colour)
    distinct = np.abs(colour - b).max(axis=-1) > 3.0 * floor
    mixes = (residual <= np.maximum(2.0 * floor, 0.1 * a)) & distinct
    grown = core | (m & changed) | (band & mixes & (a > 0.5))
    closed = ndimage.binary_closing(grown, structure=np.ones((3, 3), bool), iterations=max(1, edge // 2))
    filled = ndimage.binary_fill_holes(closed | core) & band
    inner = ndimage.binary_erosion(filled, structure=np.ones((3, 3), bool), border_value=1)
    rim = ndimage.binary_dilation(filled, structure=np.ones((3, 3), bool)) & ~inner & band
    soft = np.where(mixes, a, np.where(filled, 1.0, 0.0))
    alpha[box] = np.where(inner, 1.0, np.where(rim, soft, 0.0))
    solid[box] = filled
    return alpha, solid


def owners(masks: list[np.ndarray]) -> np.ndarray:
    """Each pixel's nearest object (index in mask order; ties to the front)."""
    if len(masks) == 1:
        return np.zeros(masks[0].shape, np.int32)
    dist = np.stack([ndimage.distance_transform_edt(~m) if m.any() else np.full(m.shape, np.inf) for m in masks])
    return np.argmin(dist, axis=0).astype(np.int32)


def effects(least: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """``least`` kept on the connected regions of ``least > 0`` that touch
    ``seeds`` (near an object)."""
    labels, n = ndimage.label(least > 0, structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros_like(least)
    keep = np.zeros(n + 1, dtype=bool)
    keep[np.unique(labels[seeds & (labels > 0)])] = True
    keep[0] = False
    return np.where(keep[labels], least, 0.0).astype(np.float32)


def palette(frame: np.ndarray, region: np.ndarray, size: int, samples: int = 4096, rounds: int = 6) -> np.ndarray:
    """A few dominant colours of ``frame`` over ``region`` (k-means on a
    fixed subsample): what the object can lend an effect such as its
    reflection. [size, 3] (none when the region is empty)."""
    pixels = frame[region]
    if len(pixels) < size:
        return np.zeros((0, 3), np.float32)
    pixels = pixels[np.linspace(0, len(pixels) - 1, min(samples, len(pixels))).astype(int)]
    centres = pixels[np.linspace(0, len(pixels) - 1, size).astype(int)].copy()
    for _ in range(rounds):
        nearest = np.argmin(((pixels[:, None] - centres[None]) ** 2).sum(-1), axis=1)
        for j in range(size):
            if (nearest == j).any():
                centres[j] = pixels[nearest == j].mean(axis=0)
    return centres.astype(np.float32)


def effect_colours(alpha: np.ndarray, diff: np.ndarray, bg: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Where an effect was found, the alpha of the colour that explains the
    pixel best: black (a shadow), white (a light) or one of the object's own
    colours (a reflection). The least alpha stays the floor: it is what any
    colour needs at the least."""
    where = alpha > 0
    if not where.any():
        return alpha
    d, b = diff[where], bg[where]
    candidates = np.concatenate([np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], np.float32), colours])
    span = candidates[None] - b[:, None]  # [N, C, 3]
    a = np.clip((d[:, None] * span).sum(-1) / np.maximum((span * span).sum(-1), 1e-6), 0.0, 1.0)
    residual = np.abs(d[:, None] - a[..., None] * span).max(-1)
    best = a[np.arange(len(a)), np.argmin(residual, axis=1)]
    out = alpha.copy()
    out[where] = np.maximum(best, alpha[where])
    return out


class FrameSolver:
    """Solves the layers one frame at a time, carrying the temporal filter's
    state from frame to frame."""

    def __init__(self, cal: Calibration, shape: tuple[int, int], settings: SolverSettings = SolverSettings()):
        h, w = shape
        self.cal, self.settings = cal, settings
        self.edge = settings.pixels(settings.edge, h, w, least=MIN_EDGE)
        self.reach = settings.pixels(settings.reach, h, w)
        self.previous: np.ndarray | None = None

    def smooth_in_time(self, d: np.ndarray) -> np.ndarray:
        """Average with the previous frame's difference where it is still."""
        if self.previous is not None and self.settings.still > 0:
            still = np.abs(d - self.previous).max(axis=-1, keepdims=True) <= 2.0 * self.cal.floor
            d = np.where(still, d + self.settings.still * (self.previous - d), d)
        self.previous = d
        return d

    def __call__(self, frame, background, masks: list[np.ndarray]) -> list[np.ndarray]:
        """Alpha [H, W] float32 per object (front to back) for one frame."""
        f, b = as_float(frame), as_float(background)
        bg, d = _difference(f, b, self.cal)
        d = self.smooth_in_time(d)
        bodies = [body(f, bg, m, self.edge, self.cal.floor) for m in masks]
        solid = np.zeros(f.shape[:2], bool)
        for _, s in bodies:
            solid |= s
        least = least_alpha_of(d, bg, self.cal.floor)
        least[solid] = 0.0
        owner = owners([s | m for (_, s), m in zip(bodies, masks)])
        out = []
        for k, ((a, s), m) in enumerate(zip(bodies, masks)):
            seeds = ndimage.maximum_filter(s | m, size=2 * self.reach + 1)
            e = effects(np.where(owner == k, least, 0.0), seeds)
            e = effect_colours(e, d, bg, palette(f, a >= 1.0, self.settings.palette))
            out.append(np.maximum(a, e))
        return out


def solve_layers(frames, backgrounds, masks: list[np.ndarray], settings: SolverSettings = SolverSettings(),
                 report=None) -> list[np.ndarray]:
    """Alpha float32 [T, H, W] per object (front to back). ``frames`` and
    ``backgrounds`` [T, H, W, 3] uint8 or float (a still plate may be a
    broadcast view), ``masks`` per object [T, H, W] bool, on one grid."""
    t, h, w = frames.shape[:3]
    if np.shape(backgrounds)[:3] != (t, h, w) or any(np.shape(m) != (t, h, w) for m in masks):
        raise OmnimatteError(f"layer solver: frames {frames.shape}, background {np.shape(backgrounds)} and "
                             f"masks must share one [T, H, W] grid")
    if not masks:
        raise OmnimatteError("layer solver: no object masks")
    cal = calibrate(frames, backgrounds, masks, settings)
    solver = FrameSolver(cal, (h, w), settings)
    alphas = [np.empty((t, h, w), np.float32) for _ in masks]
    if report:
        report(STAGE, 0, t, "")
    for i in range(t):
        for a, layer in zip(alphas, solver(frames[i], backgrounds[i], [m[i] for m in masks])):
            a[i] = layer
        if report:
            report(STAGE, i + 1, t, "")
    return alphas
