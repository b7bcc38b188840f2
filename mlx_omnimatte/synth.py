"""Synthetic clips with known truth: foreground layers with alpha moving over
a background, each with a pseudo-shadow (EasyOmnimatte, supplementary).

A layer is laid out by the temporally coherent augmentation of the paper:
the foreground frame is embedded in a larger canvas (asymmetric horizontal
padding U(0.3, 0.5) of the width each side), and the canvas follows an eased
interpolation between two affine states (horizontal translations of opposite
sign, 15-30% of the canvas width each, so 30-60% of the frame in all; rotation +-5 deg, scale 0.95-1.05, shear
+-3 deg). The pseudo-shadow is the object's alpha compressed vertically to
10-30% of its height, laid on the ground below the object's base (mirrored,
so that it is seen), sheared 30-60 deg, blurred, at 30-70% opacity; it
darkens what lies under it before the object is composited on top.

Layers are listed front to back (index 0 is the front-most) and composited
back to front. Layer k's alpha (the target) is ``o + (1 - o) * s`` for object
alpha ``o`` and shadow alpha ``s``, its colour ``o * F / alpha`` (the shadow is
black), so that ``video = a_k * fg_k + (1 - a_k) * rest`` exactly (up to the
uint8 rounding of the stored colours).

Sources: procedural (textured shapes; a textured background panning slowly)
or user folders (``Source``): foreground clips with alpha in the
VideoMatte240K layout (``fgr/NAME`` and ``pha/NAME``, each a video or a frame
folder) and background videos (a video, a frame folder, or a folder of them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .compositing import as_float, to_uint8
from .errors import OmnimatteError
from .io.grid import mirror_indices, resize_frames
from .io.video import list_frame_files, read_video
from .io.writers import atomic_output, frame_name, write_png_frames
from .metrics import gaussian_blur

FPS = 16.0
PAD_RANGE = (0.3, 0.5)  # canvas padding each side, fraction of the width
TRANSLATE_RANGE = (0.15, 0.30)  # per affine state, fraction of the width
ROTATE_DEG, SHEAR_DEG, SCALE_RANGE = 5.0, 3.0, (0.95, 1.05)
SHADOW_HEIGHT = (0.1, 0.3)
SHADOW_SHEAR_DEG = (30.0, 60.0)
SHADOW_OPACITY = (0.3, 0.7)
SHADOW_BLUR = 0.01  # sigma as a fraction of the frame height
BG_PAN = 0.08  # procedural background drift over the clip, fraction of the width
MASK_THRESHOLD = 0.5  # the model's mask = object alpha above this
ALPHA_BITS = 16  # truth alpha maps are 16-bit grayscale PNG
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v")


@dataclass
class SynthClip:
    video: np.ndarray  # uint8 [T, H, W, 3], the composite
    background: np.ndarray  # uint8 [T, H, W, 3], the clean plate
    masks: list[np.ndarray]  # bool [T, H, W] per object: binarized object alpha (no shadow)
    alpha: list[np.ndarray]  # float32 [T, H, W]: the layer's alpha, effects included
    object_alpha: list[np.ndarray]  # float32 [T, H, W]: the object alone
    effect: list[np.ndarray]  # float32 [T, H, W]: the pseudo-shadow's alpha, opacity included
    foreground: list[np.ndarray]  # uint8 [T, H, W, 3]: the layer's colour (shadow black)
    caption: str
    fps: float


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


def bilinear(img: np.ndarray, sy: np.ndarray, sx: np.ndarray) -> np.ndarray:
    """Sample ``img`` [h, w, ...] at float pixel coordinates (zero outside)."""
    h, w = img.shape[:2]
    padded = np.pad(img, [(1, 1), (1, 1)] + [(0, 0)] * (img.ndim - 2))
    x0, y0 = np.floor(sx), np.floor(sy)
    fx, fy = (sx - x0).astype(np.float32), (sy - y0).astype(np.float32)
    xi = np.clip(x0.astype(np.int64) + 1, 0, w + 1)
    yi = np.clip(y0.astype(np.int64) + 1, 0, h + 1)
    xj, yj = np.clip(xi + 1, 0, w + 1), np.clip(yi + 1, 0, h + 1)
    if img.ndim == 3:
        fx, fy = fx[..., None], fy[..., None]
    top = padded[yi, xi] * (1 - fx) + padded[yi, xj] * fx
    bottom = padded[yj, xi] * (1 - fx) + padded[yj, xj] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def warp(img: np.ndarray, inverse: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Output ``size`` (W, H) frame whose pixel centre p samples ``img`` at
    ``inverse @ p`` (3x3, pixel-centre coordinates)."""
    w, h = size
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2] - 0.5
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2] - 0.5
    return bilinear(img, sy, sx)


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


def augment_layer(rgb: np.ndarray, alpha: np.ndarray, size: tuple[int, int],
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The temporally coherent augmentation of a foreground clip: ``rgb``
    [T, h, w, 3] and ``alpha`` [T, h, w] (uint8 or float) -> float32 at
    ``size`` (W, H). One random path for the whole clip."""
    rgb, alpha = as_float(rgb), as_float(alpha)
    t, sh, sw = alpha.shape
    maps = canvas_transforms((sw, sh), size, t, rng)
    out_rgb = np.stack([warp(rgb[i] * alpha[i, ..., None], m, size) for i, m in enumerate(maps)])
    out_a = np.stack([warp(alpha[i], m, size) for i, m in enumerate(maps)])
    # Warp premultiplied colour so edges do not pick up the black outside.
    out_rgb = np.where(out_a[..., None] > 1e-4, out_rgb / np.maximum(out_a[..., None], 1e-4), 0.0)
    return np.clip(out_rgb, 0, 1).astype(np.float32), np.clip(out_a, 0, 1).astype(np.float32)


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


def shadow_frame(alpha: np.ndarray, style: ShadowStyle) -> np.ndarray:
    """One frame's shadow alpha from the object's alpha [H, W] (opacity included)."""
    rows = np.nonzero(alpha.max(axis=1) > 0.05)[0]
    if rows.size == 0:
        return np.zeros_like(alpha, dtype=np.float32)
    top, base = float(rows[0]), float(rows[-1]) + 1.0
    c = style.height
    h, w = alpha.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    depth = ys - base  # below the base line
    # Inverse map: ground row -> object row mirrored about the base.
    sy = base - depth / c - 0.5
    sx = xs - np.tan(np.deg2rad(style.shear)) * depth - 0.5
    s = bilinear(alpha.astype(np.float32), sy, sx) * (depth > -1.0) * (sy >= top - 1)
    return np.clip(gaussian_blur(s, style.blur) * style.opacity, 0.0, 1.0).astype(np.float32)


def pseudo_shadow(object_alpha: np.ndarray, style: ShadowStyle) -> np.ndarray:
    return np.stack([shadow_frame(a, style) for a in object_alpha])


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
    out = []
    for i in range(frames):
        shift = centre + direction * BG_PAN * w * (i / max(frames - 1, 1) - 0.5)
        inv = np.array([[1.0, 0, shift], [0, 1.0, 1.0], [0, 0, 1]])
        out.append(warp(img, inv, size))
    return np.stack(out), f"a slowly panning textured ground in {_colour_name(c[0])} and {_colour_name(c[1])}"


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


def _layer(rng, size, frames, source, shadow: bool, opacity):
    if source is not None and source.foregrounds is not None:
        rgb, a = user_foreground(source, rng, size, frames)
    else:
        rgb, a = procedural_foreground(rng, size, frames)
    rgb, obj = augment_layer(rgb, a, size, rng)
    style = random_shadow(rng, size[1], opacity)
    eff = pseudo_shadow(obj, style) if shadow else np.zeros_like(obj)
    eff = eff * (1.0 - obj)  # the shadow lies under the object
    return rgb, obj, eff


def compose_layers(background: np.ndarray, layers) -> tuple[np.ndarray, list, list]:
    """Back-to-front composite of (rgb, object alpha, shadow alpha) layers
    listed front to back; returns the video and each layer's alpha and colour."""
    video = as_float(background).copy()
    alphas, colours = [None] * len(layers), [None] * len(layers)
    for k in reversed(range(len(layers))):
        rgb, obj, eff = layers[k]
        o, s = obj[..., None], eff[..., None]
        video = o * rgb + (1 - o) * (1 - s) * video
        a = obj + (1 - obj) * eff
        alphas[k] = a.astype(np.float32)
        colours[k] = np.where(a[..., None] > 0, o * rgb / np.maximum(a[..., None], 1e-6), 0.0)
    return video, alphas, colours


def make_clip(seed: int, frames: int = 21, size: tuple[int, int] = (128, 96), objects: int = 1,
              shadow: bool = True, source: Source | None = None,
              shadow_opacity: float | None = None) -> SynthClip:
    """A clip of ``objects`` layers (front to back) at ``size`` (W, H).
    ``shadow_opacity``: None = random in 30-70%."""
    if frames < 1 or objects < 1 or min(size) < 8:
        raise OmnimatteError(f"synthetic clip: need frames >= 1, objects >= 1, size >= 8x8 (got {frames}, "
                             f"{objects}, {size[0]}x{size[1]})")
    rng = np.random.default_rng(seed)
    if source is not None and source.backgrounds is not None:
        bg, caption = user_background(source, rng, size, frames)
    else:
        bg, caption = procedural_background(rng, size, frames)
    layers = [_layer(rng, size, frames, source, shadow, shadow_opacity) for _ in range(objects)]
    video, alphas, colours = compose_layers(bg, layers)
    return SynthClip(
        video=to_uint8(video), background=to_uint8(bg),
        masks=[obj > MASK_THRESHOLD for _, obj, _ in layers], alpha=alphas,
        object_alpha=[obj for _, obj, _ in layers], effect=[eff.astype(np.float32) for _, _, eff in layers],
        foreground=[to_uint8(c) for c in colours], caption=caption, fps=FPS,
    )


# --- files ----------------------------------------------------------------------


def _write_alpha16(folder: Path, alpha: np.ndarray) -> None:
    folder.mkdir()
    for i, a in enumerate(alpha):
        v = np.clip(np.rint(a * 65535.0), 0, 65535).astype(np.uint16)
        Image.fromarray(v).save(folder / frame_name(i))


def _read_alpha16(folder: Path) -> np.ndarray:
    files = list_frame_files(folder)
    if not files:
        raise OmnimatteError(f"{folder}: no frames")
    frames = []
    for f in files:
        with Image.open(f) as im:
            scale = 65535.0 if im.mode.startswith("I") else 255.0
            frames.append(np.asarray(im, dtype=np.float32) / scale)
    return np.stack(frames)


def write_clip(clip: SynthClip, folder, overwrite: bool = False, meta: dict | None = None) -> Path:
    """Generative Omnimatte layout plus ``truth/``, lossless PNG, atomic."""
    folder = Path(folder)
    with atomic_output(folder, overwrite, directory=True) as tmp:
        write_png_frames(tmp / "input_video", clip.video)
        names = [f"{k:02d}" for k in range(len(clip.masks))]
        for name, m in zip(names, clip.masks):
            write_png_frames(tmp / f"mask_{name}", m.astype(np.uint8) * 255)
        (tmp / "prompt.json").write_text(json.dumps({"bg": clip.caption}) + "\n")
        truth = tmp / "truth"
        truth.mkdir()
        write_png_frames(truth / "background", clip.background)
        for k, name in enumerate(names):
            for key in ("alpha", "effect", "object_alpha"):
                _write_alpha16(truth / f"{key}_{name}", getattr(clip, key)[k])
            write_png_frames(truth / f"foreground_{name}", clip.foreground[k])
        info = {"fps": clip.fps, "frames": int(clip.video.shape[0]), "width": int(clip.video.shape[2]),
                "height": int(clip.video.shape[1]), "names": names, "alpha_bits": ALPHA_BITS,
                "caption": clip.caption, **(meta or {})}
        (truth / "meta.json").write_text(json.dumps(info, indent=2) + "\n")
    return folder


def read_truth(folder) -> dict:
    """The truth of a written clip (``folder`` = the clip or its truth/)."""
    folder = Path(folder)
    truth = folder / "truth" if (folder / "truth").is_dir() else folder
    meta_file = truth / "meta.json"
    if not meta_file.is_file():
        raise OmnimatteError(f"{folder}: no truth/meta.json (not a synthetic clip)")
    meta = json.loads(meta_file.read_text())
    out = {"background": read_video(truth / "background")[0], "names": list(meta["names"]), "meta": meta}
    for key in ("alpha", "effect", "object_alpha"):
        out[key] = [_read_alpha16(truth / f"{key}_{n}") for n in meta["names"]]
    out["foreground"] = [read_video(truth / f"foreground_{n}")[0] for n in meta["names"]]
    return out


def write_dataset(out, count: int, seed: int = 0, overwrite: bool = False, report=None,
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
