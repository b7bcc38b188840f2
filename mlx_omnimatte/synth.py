"""Synthetic clips with known truth: foreground layers with alpha moving over
a background, each with an effect of its own (EasyOmnimatte, supplementary):
a pseudo-shadow by default, or a reflection, a light pool, or none.

A layer is laid out by the temporally coherent augmentation of the paper:
the foreground frame is embedded in a larger canvas (asymmetric horizontal
padding U(0.3, 0.5) of the width each side), and the canvas follows an eased
interpolation between two affine states (horizontal translations of opposite
sign, 15-30% of the canvas width each, so 30-60% of the frame in all; rotation +-5 deg, scale 0.95-1.05, shear
+-3 deg).

Effects (one kind per object):

* ``shadow``: the object's alpha compressed vertically to 10-30% of its
  height, laid on the ground below the object's base (mirrored, so that it
  is seen), sheared 30-60 deg, blurred, at 30-70% opacity; black.
* ``reflection``: the object's colour and alpha mirrored about its base line
  (the bottom of the object in each frame), lying below it and touching it,
  at 30-50% opacity, fading by up to 40% over one object height; its colour
  is the mirrored object's.
* ``light``: a warm-white (0.98, 0.95, 0.85) pool of light on the ground
  around the object's base: an ellipse about the object's width, flat,
  blurred, at 30-50% opacity.
* ``none``: no effect.

Layers are listed front to back (index 0 is the front-most) and composited
back to front: ``video = o * F + (1 - o) * (e * C + (1 - e) * video)`` for
object alpha ``o``, colour ``F``, effect alpha ``e`` and effect colour ``C``
(black for a shadow). Layer k's alpha (the target) is ``o + (1 - o) * e``, its
colour ``(o * F + (1 - o) * e * C) / alpha``, so that
``video = a_k * fg_k + (1 - a_k) * rest`` exactly (up to the uint8 rounding of
the stored colours). The random numbers of the shadow kind are drawn for every
object and those of the other kinds from streams of their own, so a seed
gives the same objects and background whatever the effects.

Plates: ``exact`` (the true background only) or ``removal``, which adds an
imperfect plate as a video object-removal model would give it: the true plate
displaced by a smooth sub-pixel drift field (amplitude 0.5 px at 480 px height,
a fresh field every 24 frames, eased between), blurred (Gaussian sigma 0.6 px
at 480 px height), with a per-channel gain U(0.97, 1.03) for the whole clip
and Gaussian noise (sigma 1.5/255) fresh each frame; all sizes scale with the
frame height, all draws come from a stream of their own (the clip is the same).

Sources: procedural (textured shapes; a textured background panning slowly)
or user folders (``Source``): foreground clips with alpha in the
VideoMatte240K layout (``fgr/NAME`` and ``pha/NAME``, each a video or a frame
folder) and background videos (a video, a frame folder, or a folder of them).
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .compositing import as_float
from .errors import OmnimatteError
from .io.grid import mirror_indices, resize_frames
from .io.truth import ALPHA_BITS, each_frame
from .io.video import list_frame_files, read_video
from .io.writers import PNG_COMPRESS, atomic_output, frame_name
from .evaluation.metrics import gaussian_blur, gaussian_kernel
from .sampling import DEFAULT_SEED

FPS = 16.0
PAD_RANGE = (0.3, 0.5)  # canvas padding each side, fraction of the width
TRANSLATE_RANGE = (0.15, 0.30)  # per affine state, fraction of the width
ROTATE_DEG, SHEAR_DEG, SCALE_RANGE = 5.0, 3.0, (0.95, 1.05)
SHADOW_HEIGHT = (0.1, 0.3)
SHADOW_SHEAR_DEG = (30.0, 60.0)
SHADOW_OPACITY = (0.3, 0.7)
SHADOW_BLUR = 0.01  # sigma as a fraction of the frame height
EFFECT_KINDS = ("shadow", "reflection", "light", "none")
REFLECTION_OPACITY = (0.3, 0.5)
REFLECTION_FADE = (0.0, 0.4)  # opacity lost one object height below the base
LIGHT_OPACITY = (0.3, 0.5)
LIGHT_COLOUR = (0.98, 0.95, 0.85)  # warm white
LIGHT_WIDTH = (0.9, 1.3)  # pool width / object width
LIGHT_FLAT = (0.2, 0.35)  # pool height / pool width
LIGHT_SOFTNESS = 0.35  # blur sigma / pool half-height: soft edges, peak kept
BASE_ALPHA = 0.05  # object rows above this alpha set the base line
PLATES = ("exact", "removal")
REMOVAL_BLUR = 0.6 / 480  # sigma, fraction of the frame height
REMOVAL_GAIN = (0.97, 1.03)  # per channel, the whole clip
REMOVAL_NOISE = 1.5 / 255
REMOVAL_DRIFT = 0.5 / 480  # displacement amplitude, fraction of the frame height
REMOVAL_DRIFT_CELLS = 3  # control cells across the height of a drift field
REMOVAL_DRIFT_PERIOD = 24  # frames between independent drift fields
EFFECT_STREAM, REMOVAL_STREAM = 1, 2  # seed-derived streams: the clip's own draws stay as they were
BG_PAN = 0.08  # procedural background drift over the clip, fraction of the width
MASK_THRESHOLD = 0.5  # the model's mask = object alpha above this
TRUTH_PNG_COMPRESS = 1  # zlib level of the truth PNGs: fastest, barely bigger
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v")


@dataclass
class SynthClip:
    video: np.ndarray  # uint8 [T, H, W, 3], the composite
    background: np.ndarray  # uint8 [T, H, W, 3], the clean plate
    masks: list[np.ndarray]  # bool [T, H, W] per object: binarized object alpha (no effect)
    alpha: list[np.ndarray]  # float32 [T, H, W]: the layer's alpha, effects included
    object_alpha: list[np.ndarray]  # float32 [T, H, W]: the object alone
    effect: list[np.ndarray]  # float32 [T, H, W]: the effect's alpha, opacity included
    foreground: list[np.ndarray]  # uint8 [T, H, W, 3]: the layer's colour (a shadow is black)
    caption: str
    fps: float
    effects: list[str] = field(default_factory=list)  # the effect kind of each object
    removal_plate: np.ndarray | None = None  # uint8 [T, H, W, 3]: an imperfect plate (plate="removal")

    @property
    def plate(self) -> str:
        return "exact" if self.removal_plate is None else "removal"


@dataclass
class Source:
    """User material: ``foregrounds`` a folder with ``fgr/`` and ``pha/``
    (VideoMatte240K layout), ``backgrounds`` a video, a frame folder or a
    folder of videos / frame folders. Either may be None (procedural)."""

    foregrounds: Path | None = None
    backgrounds: Path | None = None

    def __post_init__(self):
        self.foregrounds = Path(self.foregrounds) if self.foregrounds is not None else None
        self.backgrounds = Path(self.backgrounds) if self.backgrounds is not None else None
        if self.foregrounds is not None:
            foreground_items(self.foregrounds)
        if self.backgrounds is not None:
            background_items(self.backgrounds)


# --- geometry -----------------------------------------------------------------


def ease(t: np.ndarray | float) -> np.ndarray:
    """Cosine ease-in-out on [0, 1]: zero velocity at both ends."""
    return 0.5 - 0.5 * np.cos(np.pi * np.clip(t, 0.0, 1.0))


@dataclass
class AffineState:
    tx: float = 0.0  # pixels
    ty: float = 0.0
    rotate: float = 0.0  # degrees
    scale: float = 1.0
    shear: float = 0.0  # degrees

    def lerp(self, other: "AffineState", t: float) -> "AffineState":
        keys = ("tx", "ty", "rotate", "scale", "shear")
        return AffineState(*[(1 - t) * getattr(self, k) + t * getattr(other, k) for k in keys])

    def matrix(self, center: tuple[float, float]) -> np.ndarray:
        """3x3 forward map about ``center`` (x, y): rotate, shear, scale, translate."""
        r, s = np.deg2rad(self.rotate), np.tan(np.deg2rad(self.shear))
        rot = np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]])
        lin = self.scale * rot @ np.array([[1.0, s], [0.0, 1.0]])
        c = np.asarray(center, dtype=np.float64)
        m = np.eye(3)
        m[:2, :2] = lin
        m[:2, 2] = c - lin @ c + (self.tx, self.ty)
        return m


def random_affine_path(rng: np.random.Generator, width: float) -> tuple[AffineState, AffineState]:
    """Two affine states whose horizontal translations have opposite signs."""
    sign = rng.choice([-1.0, 1.0])
    states = []
    for k in (1.0, -1.0):
        states.append(AffineState(
            tx=sign * k * rng.uniform(*TRANSLATE_RANGE) * width,
            rotate=rng.uniform(-ROTATE_DEG, ROTATE_DEG),
            scale=rng.uniform(*SCALE_RANGE),
            shear=rng.uniform(-SHEAR_DEG, SHEAR_DEG),
        ))
    return states[0], states[1]


def bilinear(img: np.ndarray, sy: np.ndarray, sx: np.ndarray, frame=None) -> np.ndarray:
    """Sample ``img`` [h, w, ...] at float pixel coordinates (zero outside);
    ``sy`` and ``sx`` broadcast against each other. ``frame`` (top, left,
    height, width): ``img`` is that window of a larger image, zero elsewhere,
    and the coordinates are the larger image's (the same values, less work)."""
    h, w = img.shape[:2]
    top, left, fh, fw = (0, 0, h, w) if frame is None else frame
    padded = np.pad(img, [(1, 1), (1, 1)] + [(0, 0)] * (img.ndim - 2))
    flat = padded.reshape((h + 2) * (w + 2), *img.shape[2:])
    x0, y0 = np.floor(sx), np.floor(sy)
    fx, fy = (sx - x0).astype(np.float32), (sy - y0).astype(np.float32)
    xi = np.clip(x0.astype(np.int64) + 1, 0, fw + 1)
    yi = np.clip(y0.astype(np.int64) + 1, 0, fh + 1)
    xj, yj = np.clip(xi + 1, 0, fw + 1), np.clip(yi + 1, 0, fh + 1)
    if frame is not None:  # padded indices of the larger image -> of the window (its zero border beyond)
        xi, xj = np.clip(xi - left, 0, w + 1), np.clip(xj - left, 0, w + 1)
        yi, yj = np.clip(yi - top, 0, h + 1), np.clip(yj - top, 0, h + 1)
    yi, yj = yi * (w + 2), yj * (w + 2)
    if img.ndim == 3:
        fx, fy = fx[..., None], fy[..., None]
    # take on flat indices: the same values as padded[y, x], ten times faster
    top_row = np.take(flat, yi + xi, axis=0) * (1 - fx) + np.take(flat, yi + xj, axis=0) * fx
    bottom_row = np.take(flat, yj + xi, axis=0) * (1 - fx) + np.take(flat, yj + xj, axis=0) * fx
    return (top_row * (1 - fy) + bottom_row * fy).astype(np.float32)


def pixel_centres(rows: tuple[int, int], cols: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Float64 pixel-centre coordinates (ys [n, 1], xs [1, m]) of a window."""
    ys = np.arange(rows[0], rows[1], dtype=np.float64)[:, None] + 0.5
    xs = np.arange(cols[0], cols[1], dtype=np.float64)[None, :] + 0.5
    return ys, xs


def _sample(img: np.ndarray, inverse: np.ndarray, rows, cols, frame=None) -> np.ndarray:
    ys, xs = pixel_centres(rows, cols)
    # A zero cross term is left out (x + 0.0 == x), so that a map without
    # rotation or shear keeps 1-D coordinates: the same values, less work.
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys if inverse[0, 1] != 0 else inverse[0, 0] * xs
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys if inverse[1, 0] != 0 else inverse[1, 1] * ys
    return bilinear(img, sy + inverse[1, 2] - 0.5, sx + inverse[0, 2] - 0.5, frame)


def warp(img: np.ndarray, inverse: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Output ``size`` (W, H) frame whose pixel centre p samples ``img`` at
    ``inverse @ p`` (3x3, pixel-centre coordinates)."""
    w, h = size
    return _sample(img, inverse, (0, h), (0, w))


def support(x: np.ndarray, margin: int = 0) -> tuple[slice, slice] | None:
    """The bounding box of the nonzero pixels of ``x`` [H, W, ...] grown by
    ``margin`` (clipped to the frame); None when all are zero."""
    nz = x if x.ndim == 2 else x.any(axis=tuple(range(2, x.ndim)))
    rows, cols = np.nonzero(nz.any(axis=1))[0], np.nonzero(nz.any(axis=0))[0]
    if rows.size == 0:
        return None
    return (slice(max(0, rows[0] - margin), rows[-1] + 1 + margin),
            slice(max(0, cols[0] - margin), cols[-1] + 1 + margin))


def landing_box(box: tuple[slice, slice], inverse: np.ndarray, size: tuple[int, int]):
    """(rows, cols) of the output that can sample the source ``box``: the
    forward image of the box plus a margin (elsewhere the warp is exactly 0)."""
    w, h = size
    if box[0].start == 0 or box[1].start == 0:
        return (0, h), (0, w)  # bilinear clamps far samples above / left onto the first row / column
    # source samples in (first - 1, last + 1) can read a pixel of the box
    y0, y1, x0, x1 = box[0].start - 0.5, box[0].stop + 0.5, box[1].start - 0.5, box[1].stop + 0.5
    corners = np.array([[x0, x1, x0, x1], [y0, y0, y1, y1], [1, 1, 1, 1]])
    px, py = (np.linalg.inv(inverse) @ corners)[:2]
    rows = (int(np.clip(np.floor(py.min()) - 2, 0, h)), int(np.clip(np.ceil(py.max()) + 2, 0, h)))
    cols = (int(np.clip(np.floor(px.min()) - 2, 0, w)), int(np.clip(np.ceil(px.max()) + 2, 0, w)))
    return rows, cols


def canvas_transforms(src_size: tuple[int, int], size: tuple[int, int], frames: int,
                      rng: np.random.Generator) -> list[np.ndarray]:
    """Per frame, the 3x3 map from output pixels to source pixels: the source
    fitted into the output, padded into a larger canvas, the canvas moved
    along an eased affine path and scaled back to the output size."""
    sw, sh = src_size
    w, h = size
    fit = min(w / sw, h / sh)
    left, right = (rng.uniform(*PAD_RANGE) * w for _ in range(2))
    cw = w + left + right
    ch = cw * h / w
    top = rng.uniform(0.3, 0.7) * (ch - h)  # extra height, split at random
    # source -> fitted output -> canvas
    place = np.array([[fit, 0, left + (w - fit * sw) / 2], [0, fit, top + (h - fit * sh) / 2], [0, 0, 1]])
    shrink = np.diag([w / cw, h / ch, 1.0])
    a0, a1 = random_affine_path(rng, cw)
    out = []
    for i in range(frames):
        t = float(ease(i / max(frames - 1, 1)))
        forward = shrink @ a0.lerp(a1, t).matrix((cw / 2, ch / 2)) @ place
        out.append(np.linalg.inv(forward))
    return out


def warp_object(rgb: np.ndarray, alpha: np.ndarray, inverse: np.ndarray,
                size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One frame of a foreground (float ``rgb`` [h, w, 3], ``alpha`` [h, w])
    warped to ``size`` (W, H): float32 colour and alpha. Only the object's
    box is sampled, only where it lands is computed: the rest is exactly 0."""
    w, h = size
    colour, a = np.zeros((h, w, 3), np.float32), np.zeros((h, w), np.float32)
    box = support(alpha)
    if box is None:
        return colour, a
    rows, cols = landing_box(box, inverse, size)
    if rows[1] <= rows[0] or cols[1] <= cols[0]:
        return colour, a
    # Warp premultiplied colour so edges do not pick up the black outside.
    src = np.concatenate([rgb[box] * alpha[box][..., None], alpha[box][..., None]], axis=-1)
    out = _sample(src, inverse, rows, cols, (box[0].start, box[1].start) + alpha.shape)
    premult, out_a = out[..., :3], out[..., 3]
    window = (slice(*rows), slice(*cols))
    colour[window] = np.clip(np.where(out_a[..., None] > 1e-4, premult / np.maximum(out_a[..., None], 1e-4), 0.0),
                             0, 1)
    a[window] = np.clip(out_a, 0, 1)
    return colour, a


def augment_layer(rgb: np.ndarray, alpha: np.ndarray, size: tuple[int, int],
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The temporally coherent augmentation of a foreground clip: ``rgb``
    [T, h, w, 3] and ``alpha`` [T, h, w] (uint8 or float) -> float32 at
    ``size`` (W, H). One random path for the whole clip."""
    t, sh, sw = alpha.shape
    maps = canvas_transforms((sw, sh), size, t, rng)
    frames = [warp_object(as_float(rgb[i]), as_float(alpha[i]), m, size) for i, m in enumerate(maps)]
    return np.stack([f[0] for f in frames]), np.stack([f[1] for f in frames])


# --- pseudo-shadow --------------------------------------------------------------


@dataclass
class ShadowStyle:
    height: float  # fraction of the object's height
    shear: float  # degrees, signed
    opacity: float
    blur: float  # sigma in pixels


def random_shadow(rng: np.random.Generator, frame_height: int, opacity: float | None = None) -> ShadowStyle:
    return ShadowStyle(
        height=rng.uniform(*SHADOW_HEIGHT),
        shear=rng.choice([-1.0, 1.0]) * rng.uniform(*SHADOW_SHEAR_DEG),
        opacity=rng.uniform(*SHADOW_OPACITY) if opacity is None else float(opacity),
        blur=max(0.5, SHADOW_BLUR * frame_height),
    )


def object_rows(alpha: np.ndarray) -> tuple[int, int] | None:
    """(top, base) rows of the object in one frame: its first row and one
    past its last (the base line); None when it is out of the frame."""
    rows = np.nonzero(alpha.max(axis=1) > BASE_ALPHA)[0]
    return None if rows.size == 0 else (int(rows[0]), int(rows[-1]) + 1)


def blur_support(x: np.ndarray, sigma: float) -> np.ndarray:
    """``gaussian_blur`` of a mostly empty frame [H, W], computed around its
    nonzero part only: zeros blur to exact zeros, and a zero margin wider than
    the kernel keeps the edge padding the same, so the values are identical."""
    out = np.zeros(x.shape, dtype=np.float32)
    box = support(x, len(gaussian_kernel(sigma)) // 2 + 1)
    if box is not None:
        out[box] = gaussian_blur(x[box], sigma)
    return out


def shadow_frame(alpha: np.ndarray, style: ShadowStyle) -> np.ndarray:
    """One frame's shadow alpha from the object's alpha [H, W] (opacity included)."""
    rows = object_rows(alpha)
    h, w = alpha.shape
    s = np.zeros((h, w), dtype=np.float32)
    if rows is None:
        return s
    top, base = float(rows[0]), float(rows[1])
    c = style.height
    ys = pixel_centres((0, h), (0, 1))[0]
    depth = ys - base  # below the base line
    # Inverse map: ground row -> object row mirrored about the base.
    sy = base - depth / c - 0.5
    keep = np.nonzero(((depth > -1.0) & (sy >= top - 1))[:, 0])[0]  # a run of rows: the rest is zero
    if keep.size:
        r0, r1 = int(keep[0]), int(keep[-1]) + 1
        sx = pixel_centres((r0, r1), (0, w))[1] - np.tan(np.deg2rad(style.shear)) * depth[r0:r1] - 0.5
        s[r0:r1] = bilinear(alpha.astype(np.float32), sy[r0:r1], sx)
    return np.clip(blur_support(s, style.blur) * style.opacity, 0.0, 1.0).astype(np.float32)


def pseudo_shadow(object_alpha: np.ndarray, style: ShadowStyle) -> np.ndarray:
    return np.stack([shadow_frame(a, style) for a in object_alpha])


# --- reflection and light ---------------------------------------------------------


@dataclass
class ReflectionStyle:
    opacity: float
    fade: float  # fraction of the opacity lost one object height below the base


@dataclass
class LightStyle:
    opacity: float
    width: float  # pool width / object width
    flat: float  # pool height / pool width


def random_effect_style(kind: str, rng: np.random.Generator):
    """The parameters of a reflection or a light (None for the other kinds)."""
    if kind == "reflection":
        return ReflectionStyle(rng.uniform(*REFLECTION_OPACITY), rng.uniform(*REFLECTION_FADE))
    if kind == "light":
        return LightStyle(rng.uniform(*LIGHT_OPACITY), rng.uniform(*LIGHT_WIDTH), rng.uniform(*LIGHT_FLAT))
    return None


def reflection_frame(rgb: np.ndarray, alpha: np.ndarray, style: ReflectionStyle) -> tuple[np.ndarray, np.ndarray]:
    """One frame's reflection: (alpha [H, W] with opacity, colour [H, W, 3]),
    the object mirrored about its base line, row ``base + d`` showing row
    ``base - 1 - d``."""
    h, w = alpha.shape
    e, colour = np.zeros((h, w), np.float32), np.zeros((h, w, 3), np.float32)
    rows = object_rows(alpha)
    if rows is None:
        return e, colour
    top, base = rows
    d = np.arange(min(h - base, base))
    fade = np.clip(1.0 - style.fade * d / max(base - top, 1), 0.0, 1.0)
    e[base + d] = alpha[base - 1 - d] * (style.opacity * fade)[:, None]
    colour[base + d] = rgb[base - 1 - d]
    return e, colour


def light_frame(alpha: np.ndarray, style: LightStyle) -> np.ndarray:
    """One frame's light pool alpha [H, W] (opacity included): a flat ellipse
    centred on the object's base line, as wide as the object times
    ``style.width``, blurred."""
    h, w = alpha.shape
    e = np.zeros((h, w), np.float32)
    rows, cols = object_rows(alpha), np.nonzero(alpha.max(axis=0) > BASE_ALPHA)[0]
    if rows is None:
        return e
    rx = max(1.0, 0.5 * style.width * (cols[-1] + 1 - cols[0]))
    ry = max(1.0, rx * style.flat)
    cx, cy = 0.5 * (cols[0] + cols[-1] + 1), float(rows[1])
    r0, r1 = int(np.clip(cy - ry - 2, 0, h)), int(np.clip(cy + ry + 2, 0, h))
    mx = rx * (1.0 + 1.0 / ry) + 2  # the anti-aliased edge, stretched along x
    c0, c1 = int(np.clip(cx - mx, 0, w)), int(np.clip(cx + mx, 0, w))
    ys, xs = pixel_centres((r0, r1), (c0, c1))
    d = (np.sqrt(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2) - 1.0) * ry
    e[r0:r1, c0:c1] = np.clip(0.5 - d, 0.0, 1.0)  # anti-aliased edge
    return np.clip(blur_support(e, LIGHT_SOFTNESS * ry) * style.opacity, 0.0, 1.0).astype(np.float32)


# --- procedural sources ---------------------------------------------------------


def _noise(rng: np.random.Generator, size: tuple[int, int], octaves: int = 4) -> np.ndarray:
    """Smooth value noise in [0, 1], ``size`` (W, H)."""
    w, h = size
    out = np.zeros((h, w), dtype=np.float32)
    for o in range(octaves):
        cells = 2 ** (o + 2)
        grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
        img = Image.fromarray(grid, mode="F").resize((w, h), Image.BICUBIC)
        out += np.asarray(img) / 2 ** o
    out -= out.min()
    return out / max(float(out.max()), 1e-6)


def _palette(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.uniform(0.1, 0.95, size=(n, 3)).astype(np.float32)


def texture(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A colour texture [H, W, 3]: stripes, checks or noise in two colours."""
    w, h = size
    c = _palette(rng, 2)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(3)
    period = rng.uniform(0.08, 0.2) * h
    angle = rng.uniform(0, np.pi)
    if kind == 0:
        u = np.sin((xs * np.cos(angle) + ys * np.sin(angle)) * 2 * np.pi / period) * 0.5 + 0.5
    elif kind == 1:
        u = ((np.floor(xs / period) + np.floor(ys / period)) % 2).astype(np.float32) * 0.8 + 0.1
    else:
        u = _noise(rng, size, 3)
    return (c[0] * u[..., None] + c[1] * (1 - u[..., None])).astype(np.float32)


def shape_alpha(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """An anti-aliased shape (ellipse, star-like blob or rounded box) centred
    in a ``size`` frame, about half its height tall."""
    w, h = size
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    ry = rng.uniform(0.26, 0.34) * h
    rx = ry * rng.uniform(0.6, 1.2)
    dx, dy = xs - w / 2, ys - h / 2
    kind = rng.integers(3)
    if kind == 0:
        d = (np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2) - 1.0) * min(rx, ry)
    elif kind == 1:
        theta = np.arctan2(dy, dx)
        radius = 1.0 + rng.uniform(0.1, 0.25) * np.cos(rng.integers(3, 7) * theta + rng.uniform(0, 6.3))
        d = (np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2) - radius) * min(rx, ry)
    else:
        corner = rng.uniform(0.15, 0.4) * min(rx, ry)
        qx, qy = np.abs(dx) - (rx - corner), np.abs(dy) - (ry - corner)
        d = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - corner
    return np.clip(0.5 - d, 0.0, 1.0).astype(np.float32)


def procedural_foreground(rng: np.random.Generator, size: tuple[int, int],
                          frames: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured shape, static in its own frame (the augmentation moves it)."""
    alpha = shape_alpha(rng, size)
    rgb = texture(rng, size)
    return np.broadcast_to(rgb, (frames,) + rgb.shape), np.broadcast_to(alpha, (frames,) + alpha.shape)


def procedural_background(rng: np.random.Generator, size: tuple[int, int], frames: int) -> tuple[np.ndarray, str]:
    """A textured ground with a horizon gradient, panning slowly."""
    w, h = size
    big = (int(w * (1 + 2 * BG_PAN)) + 2, h + 2)
    c = _palette(rng, 3)
    n = _noise(rng, big)[..., None]
    ramp = np.linspace(0, 1, big[1], dtype=np.float32)[:, None, None]
    img = (c[0] * n + c[1] * (1 - n)) * (0.6 + 0.4 * ramp) + 0.25 * c[2] * (1 - ramp)
    img = np.clip(img, 0, 1).astype(np.float32)
    centre = 1 + BG_PAN * w + rng.uniform(-0.5, 0.5) * BG_PAN * w
    direction = rng.choice([-1.0, 1.0])
    out = np.empty((frames, h, w, 3), np.float32)  # filled in place: no list and stack of copies

    def frame(i):
        shift = centre + direction * BG_PAN * w * (i / max(frames - 1, 1) - 0.5)
        out[i] = warp(img, np.array([[1.0, 0, shift], [0, 1.0, 1.0], [0, 0, 1]]), size)

    each_frame(frames, frame)
    return out, f"a slowly panning textured ground in {_colour_name(c[0])} and {_colour_name(c[1])}"


def _colour_name(rgb: np.ndarray) -> str:
    names = {"red": (0.8, 0.2, 0.2), "green": (0.2, 0.7, 0.3), "blue": (0.2, 0.3, 0.8),
             "yellow": (0.85, 0.8, 0.2), "purple": (0.6, 0.3, 0.7), "cyan": (0.2, 0.75, 0.8),
             "orange": (0.9, 0.55, 0.2), "gray": (0.5, 0.5, 0.5), "white": (0.9, 0.9, 0.9),
             "dark brown": (0.3, 0.2, 0.15)}
    return min(names, key=lambda k: float(np.sum((np.asarray(names[k]) - rgb) ** 2)))


# --- user sources ----------------------------------------------------------------


def _is_source(p: Path) -> bool:
    return (p.is_dir() and any(p.iterdir())) or p.suffix.lower() in VIDEO_SUFFIXES


def foreground_items(folder: Path) -> list[tuple[Path, Path]]:
    """(colour, alpha) source pairs of a VideoMatte240K-layout folder."""
    fgr, pha = Path(folder) / "fgr", Path(folder) / "pha"
    if not fgr.is_dir() or not pha.is_dir():
        raise OmnimatteError(f"{folder}: expected fgr/ and pha/ folders (VideoMatte240K layout)")
    alphas = {(p.stem if p.is_file() else p.name): p for p in pha.iterdir() if _is_source(p)}
    pairs = [(p, alphas[p.stem if p.is_file() else p.name]) for p in sorted(fgr.iterdir())
             if _is_source(p) and (p.stem if p.is_file() else p.name) in alphas]
    if not pairs:
        raise OmnimatteError(f"{folder}: no clip in fgr/ has a same-named alpha in pha/")
    return pairs


def background_items(path: Path) -> list[Path]:
    """Background sources: a video, a frame folder, or a folder of either."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise OmnimatteError(f"{path}: no such background video or folder")
    if list_frame_files(path):
        return [path]
    items = sorted(p for p in path.iterdir() if _is_source(p))
    if not items:
        raise OmnimatteError(f"{path}: no background videos or frame folders inside")
    return items


def _subclip(frames: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    if frames.shape[0] <= count:
        return frames[mirror_indices(frames.shape[0], count)]
    start = int(rng.integers(frames.shape[0] - count + 1))
    return frames[start:start + count]


def user_foreground(source: Source, rng: np.random.Generator, size: tuple[int, int],
                    frames: int) -> tuple[np.ndarray, np.ndarray]:
    pairs = foreground_items(source.foregrounds)
    fgr, pha = pairs[int(rng.integers(len(pairs)))]
    rgb, _ = read_video(fgr)
    alpha, _ = read_video(pha, gray=True)
    if rgb.shape[:3] != alpha.shape:
        raise OmnimatteError(f"{fgr}: colour {rgb.shape[:3]} and alpha {alpha.shape} differ")
    index = _subclip(np.arange(rgb.shape[0]), frames, rng)
    # Shrink once to about the output scale so the warp does not alias.
    fit = min(1.0, size[0] / rgb.shape[2], size[1] / rgb.shape[1])
    small = (max(1, round(rgb.shape[2] * fit)), max(1, round(rgb.shape[1] * fit)))
    return resize_frames(rgb[index], small), resize_frames(alpha[index], small)


def user_background(source: Source, rng: np.random.Generator, size: tuple[int, int],
                    frames: int) -> tuple[np.ndarray, str]:
    items = background_items(source.backgrounds)
    path = items[int(rng.integers(len(items)))]
    video, _ = read_video(path)
    video = resize_frames(_subclip(video, frames, rng), size)
    return as_float(video), f"the scene of {path.stem}"


# --- clips ----------------------------------------------------------------------


@dataclass
class LayerPlan:
    """One object, drawn but not yet rendered: its source, path and effect."""

    rgb: np.ndarray  # [T, h, w, 3] source colour (uint8 or float)
    alpha: np.ndarray  # [T, h, w] source alpha
    maps: list[np.ndarray]  # per frame, output pixel -> source pixel
    kind: str  # one of EFFECT_KINDS
    shadow: ShadowStyle
    style: ReflectionStyle | LightStyle | None


def effect_kinds(objects: int, effects=None, shadow: bool = True) -> list[str]:
    """One effect kind per object: ``effects`` cycled (None: all shadow, or
    all none without ``shadow``)."""
    if effects is None:
        return ["shadow" if shadow else "none"] * objects
    kinds = [effects] if isinstance(effects, str) else list(effects)
    bad = [k for k in kinds if k not in EFFECT_KINDS]
    if not kinds or bad:
        raise OmnimatteError(f"synthetic clip: effects must be some of {', '.join(EFFECT_KINDS)} (got {kinds})")
    if not shadow and "shadow" in kinds:
        raise OmnimatteError("synthetic clip: no shadow asked for, yet a shadow effect is listed")
    return [kinds[k % len(kinds)] for k in range(objects)]


def _effect_rng(seed: int, k: int) -> np.random.Generator:
    return np.random.default_rng([EFFECT_STREAM, seed, k])


def _layer(rng, size, frames, source, kind: str, opacity, effect_rng) -> LayerPlan:
    # The draws of today's shadow layers, in their order, whatever the kind.
    if source is not None and source.foregrounds is not None:
        rgb, a = user_foreground(source, rng, size, frames)
    else:
        rgb, a = procedural_foreground(rng, size, frames)
    maps = canvas_transforms((a.shape[2], a.shape[1]), size, frames, rng)
    shadow = random_shadow(rng, size[1], opacity)
    return LayerPlan(rgb, a, maps, kind, shadow, random_effect_style(kind, effect_rng))


def effect_frame(plan: LayerPlan, rgb: np.ndarray, obj: np.ndarray):
    """(effect alpha, effect colour or None for black) of one frame."""
    if plan.kind == "shadow":
        return shadow_frame(obj, plan.shadow), None
    if plan.kind == "reflection":
        return reflection_frame(rgb, obj, plan.style)
    if plan.kind == "light":
        return light_frame(obj, plan.style), np.asarray(LIGHT_COLOUR, np.float32)
    return np.zeros_like(obj), None


def layer_frame(plan: LayerPlan, i: int, size: tuple[int, int]):
    """Frame ``i`` of a layer: (rgb, object alpha, effect alpha, effect colour)."""
    rgb, obj = warp_object(as_float(plan.rgb[i]), as_float(plan.alpha[i]), plan.maps[i], size)
    eff, colour = effect_frame(plan, rgb, obj)
    return rgb, obj, eff * (1.0 - obj), colour  # the effect lies under the object


def compose_layers(background: np.ndarray, layers) -> tuple[np.ndarray, list, list]:
    """Back-to-front composite of (rgb, object alpha, effect alpha[, effect
    colour]) layers listed front to back (a missing or None colour is black:
    a shadow); returns the video and each layer's alpha and colour. Works on
    a frame or a whole video."""
    video = as_float(background).copy()
    alphas, colours = [None] * len(layers), [None] * len(layers)
    for k in reversed(range(len(layers))):
        rgb, obj, eff, ec = (*layers[k], None)[:4]
        o, e = obj[..., None], eff[..., None]
        a = obj + (1 - obj) * eff
        if ec is None:  # black: the original shadow expressions, whose rounding the default clips keep
            video = o * rgb + (1 - o) * (1 - e) * video
            premult = o * rgb
        else:
            video = o * rgb + (1 - o) * (e * ec + (1 - e) * video)
            premult = o * rgb + (1 - o) * e * ec
        alphas[k] = a.astype(np.float32)
        colours[k] = np.where(a[..., None] > 0, premult / np.maximum(a[..., None], 1e-6), 0.0)
    return video, alphas, colours


def _empty_clip(bg: np.ndarray, kinds: list[str], caption: str) -> SynthClip:
    t, h, w = bg.shape[:3]
    n = len(kinds)
    return SynthClip(
        video=np.empty((t, h, w, 3), np.uint8), background=_quantize(bg),
        masks=[np.empty((t, h, w), bool) for _ in range(n)],
        alpha=[np.empty((t, h, w), np.float32) for _ in range(n)],
        object_alpha=[np.empty((t, h, w), np.float32) for _ in range(n)],
        effect=[np.empty((t, h, w), np.float32) for _ in range(n)],
        foreground=[np.empty((t, h, w, 3), np.uint8) for _ in range(n)],
        caption=caption, fps=FPS, effects=list(kinds),
    )


def _quantize(x: np.ndarray) -> np.ndarray:
    """``to_uint8`` of float ``x`` (the same values), in place on one temporary."""
    y = np.multiply(x, 255.0, dtype=np.float32)
    np.rint(y, out=y)
    return np.clip(y, 0, 255, out=y).astype(np.uint8)


def render(bg: np.ndarray, plans: list[LayerPlan], caption: str) -> SynthClip:
    """The clip, frame by frame (every value is per pixel and per frame, so
    this equals compositing whole videos, with a frame's worth of floats)."""
    size = (bg.shape[2], bg.shape[1])
    clip = _empty_clip(bg, [p.kind for p in plans], caption)

    def frame(i):
        layers = [layer_frame(p, i, size) for p in plans]
        video, alphas, colours = compose_layers(bg[i], layers)
        clip.video[i] = _quantize(video)
        for k, (_, obj, eff, _) in enumerate(layers):
            clip.masks[k][i] = obj > MASK_THRESHOLD
            clip.alpha[k][i], clip.object_alpha[k][i], clip.effect[k][i] = alphas[k], obj, eff
            clip.foreground[k][i] = _quantize(colours[k])

    each_frame(bg.shape[0], frame)
    return clip


def make_clip(seed: int, frames: int = 21, size: tuple[int, int] = (128, 96), objects: int = 1,
              shadow: bool = True, source: Source | None = None,
              shadow_opacity: float | None = None, effects=None, plate: str = "exact") -> SynthClip:
    """A clip of ``objects`` layers (front to back) at ``size`` (W, H).
    ``shadow_opacity``: None = random in 30-70%. ``effects``: a kind per
    object, cycled ("shadow": a black pseudo-shadow below the object;
    "reflection": the object mirrored below its base at 30-50% opacity;
    "light": a blurred warm-white pool of light around its base at 30-50%;
    "none"); None = "shadow" for every object ("none" without ``shadow``).
    ``plate``: "exact", or "removal" to add an imperfect plate
    (``removal_plate``, see the module's docstring)."""
    if frames < 1 or objects < 1 or min(size) < 8:
        raise OmnimatteError(f"synthetic clip: need frames >= 1, objects >= 1, size >= 8x8 (got {frames}, "
                             f"{objects}, {size[0]}x{size[1]})")
    if plate not in PLATES:
        raise OmnimatteError(f"synthetic clip: plate must be one of {', '.join(PLATES)} (got {plate!r})")
    kinds = effect_kinds(objects, effects, shadow)
    rng = np.random.default_rng(seed)
    if source is not None and source.backgrounds is not None:
        bg, caption = user_background(source, rng, size, frames)
    else:
        bg, caption = procedural_background(rng, size, frames)
    plans = [_layer(rng, size, frames, source, kind, shadow_opacity, _effect_rng(seed, k))
             for k, kind in enumerate(kinds)]
    clip = render(bg, plans, caption)
    if plate == "removal":
        clip.removal_plate = removal_plate(bg, seed)
    return clip


# --- imperfect plate ----------------------------------------------------------------


@dataclass
class RemovalRecipe:
    blur: float  # Gaussian sigma, pixels
    gain: np.ndarray  # [3], per channel
    noise: float  # Gaussian sigma, in [0, 1] units
    drift: np.ndarray  # float32 [K, H, W, 2]: displacement fields (dy, dx), pixels, one per period
    seed: int  # frame i's noise comes from the stream (REMOVAL_STREAM, seed, i)


def _smooth_field(rng: np.random.Generator, size: tuple[int, int], amplitude: float) -> np.ndarray:
    """A smooth random displacement field [H, W, 2] (dy, dx), each component
    peaking at +-amplitude."""
    w, h = size
    cells = (REMOVAL_DRIFT_CELLS, max(1, round(REMOVAL_DRIFT_CELLS * w / h)))
    out = []
    for _ in range(2):
        grid = rng.uniform(-1.0, 1.0, (cells[0] + 1, cells[1] + 1)).astype(np.float32)
        f = np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.BICUBIC))
        out.append(f * np.float32(amplitude / max(float(np.abs(f).max()), 1e-6)))
    return np.stack(out, axis=-1)


def removal_recipe(seed: int, size: tuple[int, int], frames: int) -> RemovalRecipe:
    """The imperfections of one clip's removal plate, from a stream of the
    seed's own (so the clip does not change)."""
    rng = np.random.default_rng([REMOVAL_STREAM, seed])
    h = size[1]
    gain = rng.uniform(*REMOVAL_GAIN, size=3).astype(np.float32)
    keys = (frames - 1) // REMOVAL_DRIFT_PERIOD + 2
    drift = np.stack([_smooth_field(rng, size, REMOVAL_DRIFT * h) for _ in range(keys)])
    return RemovalRecipe(REMOVAL_BLUR * h, gain, REMOVAL_NOISE, drift, seed)


def removal_frame(frame: np.ndarray, i: int, recipe: RemovalRecipe) -> np.ndarray:
    """Frame ``i`` of the plate (float [H, W, 3]) as a removal model gives it:
    drifted, blurred, gained and noisy; uint8."""
    h, w = frame.shape[:2]
    pos = i / REMOVAL_DRIFT_PERIOD
    k = int(pos)
    t = float(ease(pos - k))
    field = (1 - t) * recipe.drift[k] + t * recipe.drift[k + 1]  # slowly varying in time
    ys, xs = pixel_centres((0, h), (0, w))
    sy = np.clip(ys - 0.5 + field[..., 0], 0, h - 1)  # clamped: the edges repeat, no black border
    sx = np.clip(xs - 0.5 + field[..., 1], 0, w - 1)
    out = gaussian_blur(bilinear(frame, sy, sx), recipe.blur, axes=(0, 1)) * recipe.gain
    noise = np.random.default_rng([REMOVAL_STREAM, recipe.seed, i])  # fresh each frame, in any order
    out += noise.standard_normal(out.shape, dtype=np.float32) * np.float32(recipe.noise)
    return _quantize(out)


def removal_plate(background: np.ndarray, seed: int) -> np.ndarray:
    """An imperfect copy of the plate ``background`` [T, H, W, 3] (uint8 or
    float), deterministic for ``seed``: uint8 [T, H, W, 3]."""
    t, h, w = background.shape[:3]
    recipe = removal_recipe(seed, (w, h), t)
    out = np.empty((t, h, w, 3), np.uint8)

    def frame(i):
        out[i] = removal_frame(as_float(background[i]), i, recipe)

    each_frame(t, frame)
    return out


# --- files ----------------------------------------------------------------------


def _mask8(m: np.ndarray) -> np.ndarray:
    return m.astype(np.uint8) * 255


def _alpha16(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a * 65535.0), 0, 65535).astype(np.uint16)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_bytes(frame: np.ndarray, level: int = TRUTH_PNG_COMPRESS) -> bytes:
    """A PNG file of a uint8 or uint16 frame [H, W] (gray) or [H, W, 3|4].

    Every row uses the Sub filter (each byte minus the same channel's byte one
    pixel left, which suits smooth images and fills no more than Pillow's
    adaptive choice here) and is deflated by ``zlib``, which, unlike Pillow's
    encoder, lets go of the GIL: the frames of a clip compress on all cores,
    several times faster."""
    f = np.asarray(frame)
    f = f[..., None] if f.ndim == 2 else f
    h, w, c = f.shape
    depth = 16 if f.dtype == np.uint16 else 8
    raw = f.astype(">u2").view(np.uint8).reshape(h, -1) if depth == 16 else f.reshape(h, -1)
    step = c * depth // 8  # bytes per pixel
    rows = np.empty((h, raw.shape[1] + 1), np.uint8)
    rows[:, 0] = 1  # filter type: Sub
    rows[:, 1:step + 1] = raw[:, :step]
    np.subtract(raw[:, step:], raw[:, :-step], out=rows[:, step + 1:])  # wraps modulo 256, as PNG wants
    header = struct.pack(">IIBBBBB", w, h, depth, {1: 0, 3: 2, 4: 6}[c], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), level)) + _png_chunk(b"IEND", b""))


def _write_pngs(folder: Path, frames, convert=None, level: int = TRUTH_PNG_COMPRESS) -> None:
    """A PNG frame folder ``00000.png``, ... (``convert``: applied to each frame first)."""
    folder.mkdir()

    def frame(i):
        f = frames[i] if convert is None else convert(frames[i])
        (folder / frame_name(i)).write_bytes(png_bytes(f, level))

    each_frame(len(frames), frame)


def write_clip(clip: SynthClip, folder, overwrite: bool = False, meta: dict | None = None) -> Path:
    """Generative Omnimatte layout plus ``truth/``, lossless PNG, atomic;
    ``truth/background_removal/`` too when the clip has a removal plate."""
    folder = Path(folder)
    with atomic_output(folder, overwrite, directory=True) as tmp:
        _write_pngs(tmp / "input_video", clip.video, level=PNG_COMPRESS)
        names = [f"{k:02d}" for k in range(len(clip.masks))]
        for name, m in zip(names, clip.masks):
            _write_pngs(tmp / f"mask_{name}", m, _mask8, level=PNG_COMPRESS)
        (tmp / "prompt.json").write_text(json.dumps({"bg": clip.caption}) + "\n")
        truth = tmp / "truth"
        truth.mkdir()
        _write_pngs(truth / "background", clip.background)
        if clip.removal_plate is not None:
            _write_pngs(truth / "background_removal", clip.removal_plate)
        for k, name in enumerate(names):
            for key in ("alpha", "effect", "object_alpha"):
                _write_pngs(truth / f"{key}_{name}", getattr(clip, key)[k], _alpha16)
            _write_pngs(truth / f"foreground_{name}", clip.foreground[k])
        info = {"fps": clip.fps, "frames": int(clip.video.shape[0]), "width": int(clip.video.shape[2]),
                "height": int(clip.video.shape[1]), "names": names, "alpha_bits": ALPHA_BITS,
                "caption": clip.caption, "effects": list(clip.effects),
                "plate": clip.plate, **(meta or {})}
        (truth / "meta.json").write_text(json.dumps(info, indent=2) + "\n")
    return folder


def write_dataset(out, count: int, seed: int = DEFAULT_SEED, overwrite: bool = False, report=None,
                  **make_clip_kwargs) -> Path:
    """``count`` clips ``out/00000/``, ... with seeds ``seed``, ``seed + 1``, ..."""
    out = Path(out)
    with atomic_output(out, overwrite, directory=True) as tmp:
        for i in range(count):
            if report:
                report("synth", i, count, "")
            clip = make_clip(seed + i, **make_clip_kwargs)
            write_clip(clip, tmp / f"{i:05d}", meta={"seed": seed + i})
        if report:
            report("synth", count, count, "")
    return out
