"""The model grid: spatial size and frame count the networks run at, and the
moves between it and the source grid.

* Size: multiples of 16 (VAE stride 8 x patch 2), the source aspect kept,
  about ``TARGET_AREA`` pixels (the 480x832 of the Wan2.1 1.3B models).
  The reference instead stretches every video to exactly 480x832 (H x W);
  ``size=`` gives any explicit W x H.
* Frames: the VAE needs 4n+1 frames and one model window is 81, so the clip
  is extended at its end by mirroring (frames ..., T-2, T-1, T-1, T-2, ...;
  the reference's ``temporal_padding`` concatenates the time-flipped clip,
  repeating the last frame) up to the next 4n+1 and at least ``min_frames``.
  Outputs are trimmed back to the source count.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import OmnimatteError

MULTIPLE = 16
TARGET_AREA = 480 * 832
MIN_FRAMES = 81  # one window of the Wan2.1 models (21 latent frames)
TEMPORAL = 4  # VAE temporal compression


@dataclass(frozen=True)
class GridPlan:
    """Source grid -> model grid. Sizes are (width, height) pairs."""

    src_width: int
    src_height: int
    src_frames: int
    width: int
    height: int
    frames: int

    @property
    def src_size(self) -> tuple[int, int]:
        return (self.src_width, self.src_height)

    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)

    @property
    def pad_frames(self) -> int:
        """Frames added at the end (mirrored), trimmed off the outputs."""
        return self.frames - self.src_frames

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // TEMPORAL + 1

    @property
    def latent_size(self) -> tuple[int, int]:
        return (self.width // 8, self.height // 8)


def parse_size(text: str) -> tuple[int, int]:
    """``"832x480"`` -> (832, 480): width x height, each a multiple of 16."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", str(text))
    if not m:
        raise OmnimatteError(f"--size {text}: expected WIDTHxHEIGHT, for example 832x480")
    w, h = int(m.group(1)), int(m.group(2))
    if w <= 0 or h <= 0 or w % MULTIPLE or h % MULTIPLE:
        raise OmnimatteError(f"--size {text}: width and height must be positive multiples of {MULTIPLE}")
    return w, h


def model_size(
    width: int, height: int, target_area: int = TARGET_AREA, multiple: int = MULTIPLE
) -> tuple[int, int]:
    """The (W, H) of about ``target_area`` pixels with the source aspect,
    each side rounded to the nearest multiple of ``multiple``."""
    if width <= 0 or height <= 0:
        raise OmnimatteError(f"size {width}x{height}: width and height must be positive")
    scale = math.sqrt(target_area / (width * height))
    w = max(multiple, int(round(width * scale / multiple)) * multiple)
    h = max(multiple, int(round(height * scale / multiple)) * multiple)
    return w, h


def padded_frame_count(
    frames: int, min_frames: int = MIN_FRAMES, even_latents: bool = False
) -> int:
    """Smallest 4n+1 >= ``frames`` and >= ``min_frames``.

    ``even_latents`` also makes n odd (an even latent frame count), as the
    reference's ``temporal_padding`` does -- a rule it shares with its
    CogVideoX path (temporal patch 2); Wan does not need it. Off by default.
    """
    if frames <= 0:
        raise OmnimatteError(f"frame count {frames}: must be positive")
    n = -(-(frames - 1) // TEMPORAL)  # ceil((frames - 1) / 4)
    if even_latents and n % 2 == 0:
        n += 1
    count = TEMPORAL * n + 1
    if min_frames > count:
        count = TEMPORAL * (-(-(min_frames - 1) // TEMPORAL)) + 1
    return count


def plan_grid(
    width: int,
    height: int,
    frames: int,
    size: tuple[int, int] | str | None = None,
    target_area: int = TARGET_AREA,
    min_frames: int = MIN_FRAMES,
    even_latents: bool = False,
) -> GridPlan:
    """Plan the model grid for a ``width x height`` clip of ``frames`` frames.

    ``size``: explicit model (W, H) or "WxH" (multiples of 16); otherwise
    ``model_size`` at ``target_area`` pixels, or at the source's own pixel
    count when that is smaller (a small clip is never upscaled).
    """
    if isinstance(size, str):
        size = parse_size(size)
    elif size is not None:
        size = parse_size(f"{size[0]}x{size[1]}")
    w, h = size if size is not None else model_size(width, height, min(target_area, width * height))
    t = padded_frame_count(frames, min_frames, even_latents)
    return GridPlan(width, height, frames, w, h, t)


# --- spatial resizing -------------------------------------------------------

_PIL_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}


def _area_axis(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """torch ``F.interpolate(mode="area")`` along one axis (= adaptive average
    pooling: output i averages inputs floor(i*n/m) .. ceil((i+1)*n/m) - 1)."""
    n_in = x.shape[axis]
    if n_in == n_out:
        return x
    i = np.arange(n_out)
    start = (i * n_in) // n_out
    end = -((-(i + 1) * n_in) // n_out)
    c = np.cumsum(x, axis=axis, dtype=np.float64)
    c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)
    shape = [1] * x.ndim
    shape[axis] = n_out
    count = (end - start).reshape(shape)
    return ((np.take(c, end, axis=axis) - np.take(c, start, axis=axis)) / count).astype(np.float32)


def _area_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-resize ``[T, H, W, ...]`` frame by frame (bounded float64 scratch)."""
    out = np.empty((x.shape[0], size[1], size[0]) + x.shape[3:], dtype=np.float32)
    for t, frame in enumerate(x):
        out[t] = _area_axis(_area_axis(frame, size[1], 0), size[0], 1)
    return out


def _pil_resize_frame(frame: np.ndarray, size: tuple[int, int], flt) -> np.ndarray:
    if frame.dtype == np.uint8 and (frame.ndim == 2 or frame.shape[-1] in (3, 4)):
        return np.asarray(Image.fromarray(frame).resize(size, flt))
    # Float (or odd channel counts): one 32-bit float image per channel.
    f = np.asarray(frame, dtype=np.float32)
    if f.ndim == 2:
        return np.asarray(Image.fromarray(f, mode="F").resize(size, flt))
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(f[..., c]), mode="F").resize(size, flt))
             for c in range(f.shape[-1])]
    return np.stack(chans, axis=-1)


def resize_frames(
    frames: np.ndarray, size: tuple[int, int], resample: str = "bicubic"
) -> np.ndarray:
    """Resize ``[T, H, W, C]`` or ``[T, H, W]`` frames to ``size`` = (W, H).

    uint8 stays uint8; float stays float32 and, for the overshooting filters,
    is clipped to [0, 1]. ``resample``: bicubic (default), bilinear, lanczos,
    nearest, or area (the reference's ``F.interpolate(mode="area")``).
    """
    frames = np.asarray(frames)
    w, h = size
    if frames.shape[2] == w and frames.shape[1] == h:
        return frames
    if resample == "area":
        out = _area_resize(frames, size)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8) if frames.dtype == np.uint8 else out
    if resample not in _PIL_FILTERS:
        raise OmnimatteError(f"resample {resample}: expected one of area, {', '.join(_PIL_FILTERS)}")
    flt = _PIL_FILTERS[resample]
    out = np.stack([_pil_resize_frame(f, size, flt) for f in frames])
    if out.dtype != np.uint8 and resample in ("bicubic", "lanczos"):
        out = np.clip(out, 0.0, 1.0)
    return out


def resize_masks(masks: np.ndarray, size: tuple[int, int], mode: str = "area") -> np.ndarray:
    """Resize ``[T, H, W]`` masks to ``size`` = (W, H).

    ``area`` (the reference) returns float32 averages on the input's scale, to
    be thresholded again (``masks.binarize_mask``); ``nearest`` keeps the dtype
    and the values (torch "nearest": source index floor(i * in / out)).
    """
    masks = np.asarray(masks)
    w, h = size
    if mode == "area":
        if masks.dtype == bool:
            masks = masks.astype(np.float32) * 255.0
        return _area_resize(masks, size)
    if mode == "nearest":
        rows = (np.arange(h) * masks.shape[1]) // h
        cols = (np.arange(w) * masks.shape[2]) // w
        return masks[:, rows][:, :, cols]
    raise OmnimatteError(f"mask resize mode {mode}: expected area or nearest")


# --- temporal padding -------------------------------------------------------


def mirror_indices(length: int, count: int) -> np.ndarray:
    """Indices 0..length-1 followed by their mirror, repeated as needed:
    for length 3 -> 0 1 2 2 1 0 0 1 2 ... (the reference's flip-and-concat)."""
    if length <= 0:
        raise OmnimatteError("cannot pad an empty clip")
    i = np.arange(count) % (2 * length)
    return np.where(i < length, i, 2 * length - 1 - i)


def pad_frames(x: np.ndarray, frames: int) -> np.ndarray:
    """Extend ``x`` (time on axis 0) to ``frames`` by mirroring its end."""
    x = np.asarray(x)
    if frames < x.shape[0]:
        raise OmnimatteError(f"pad to {frames} frames: the clip already has {x.shape[0]}")
    if frames == x.shape[0]:
        return x
    return x[mirror_indices(x.shape[0], frames)]


def trim_frames(x: np.ndarray, frames: int) -> np.ndarray:
    """The first ``frames`` frames (undoes ``pad_frames``)."""
    return np.asarray(x)[:frames]


def to_model_grid(frames: np.ndarray, plan: GridPlan, resample: str = "bicubic") -> np.ndarray:
    """Source frames -> model grid: resize to ``plan.size``, pad to ``plan.frames``."""
    return pad_frames(resize_frames(frames, plan.size, resample), plan.frames)


def masks_to_model_grid(masks: np.ndarray, plan: GridPlan) -> np.ndarray:
    """Raw gray masks -> area-resized float masks on the model grid, padded."""
    return pad_frames(resize_masks(masks, plan.size, "area"), plan.frames)


def from_model_grid(x: np.ndarray, plan: GridPlan, resample: str = "bicubic") -> np.ndarray:
    """Model-grid outputs -> source grid: trim to ``plan.src_frames``, resize back."""
    return resize_frames(trim_frames(x, plan.src_frames), plan.src_size, resample)


@dataclass
class GridVideo:
    """A source-grid video kept as its model-grid frames (trimmed to the
    source's frame count): a frame is resized back only when asked, so a run
    never holds a whole video at source resolution. Frames already at the
    source's size (a user's clean plate) come back as they are."""

    frames: np.ndarray  # [T, h, w] or [T, h, w, C], uint8 or float32 in [0, 1]
    src_size: tuple[int, int]  # (W, H)
    resample: str = "bicubic"

    @classmethod
    def of(cls, x: np.ndarray, plan: GridPlan, resample: str = "bicubic") -> "GridVideo":
        return cls(trim_frames(x, plan.src_frames), plan.src_size, resample)

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    def frame(self, t: int) -> np.ndarray:
        return resize_frames(self.frames[t:t + 1], self.src_size, self.resample)[0]

    def full(self) -> np.ndarray:
        """The whole video on the source grid (the Python API's arrays)."""
        return resize_frames(self.frames, self.src_size, self.resample)
