"""Object masks: reading, validation against the video, binarization,
dilation and the Casper trimask.

Facts from the Generative Omnimatte public code (``videox_fun/utils/utils.py``,
``read_mask_video_binary`` and ``get_video_mask_input``):

* a mask video is decoded, resized to the model grid with area averaging,
  then binarized with ``white = value >= 240`` (of 255), then dilated with a
  square 11x11 footprint at the model resolution;
* the trimask starts neutral (127 of 255), objects to keep are set to 0 and
  objects to remove to 255 -- removal written last, so it wins where objects
  overlap; "remove all objects" is the union of all masks = 255 on a neutral
  127 background. The pipeline then re-quantizes to {0, 127/255, 1}.

So the neutral value is 127/255 (0.498), not exactly 0.5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import OmnimatteError
from .grid import resize_masks
from .video import VideoInfo, read_video

THRESHOLD = 240  # white = value >= THRESHOLD (reference: torch.where(m < 240, 0, 255))
DILATE = 11  # square footprint, in model-grid pixels
NEUTRAL = 127 / 255  # trimask value of the background that may change
GRAY_LOW = 16  # values strictly between GRAY_LOW and THRESHOLD count as mid-gray
MAX_GRAY_FRACTION = 0.01  # more mid-gray pixels than this (whole video) -> not binary
FPS_TOLERANCE = 1e-3  # relative


def read_mask(path: str | Path, fps: float | None = None,
              max_frames: int | None = None) -> tuple[np.ndarray, VideoInfo]:
    """Decode a mask video or frame folder as grayscale uint8 ``[T, H, W]``.

    Frame folders stored as 0/1 (some tools write PNGs that way) are scaled
    to 0/255; videos are not (a lossy black video may hold stray 1s).
    """
    mask, info = read_video(path, fps=fps, gray=True, max_frames=max_frames)
    if Path(path).is_dir() and mask.max() == 1:
        mask = mask * np.uint8(255)
    return mask, info


def check_mask_matches(mask_info: VideoInfo, video_info: VideoInfo) -> None:
    """Frame count, size and fps of a mask must equal the video's."""
    m, v = mask_info, video_info
    if m.frames != v.frames:
        raise OmnimatteError(
            f"{m.path}: mask has {m.frames} frames but the video {v.path} has {v.frames}"
        )
    if m.size != v.size:
        raise OmnimatteError(
            f"{m.path}: mask is {m.width}x{m.height} but the video {v.path} is {v.width}x{v.height}"
        )
    if abs(m.fps - v.fps) > FPS_TOLERANCE * max(v.fps, 1e-6):
        raise OmnimatteError(
            f"{m.path}: mask is {m.fps:g} fps but the video {v.path} is {v.fps:g} fps"
        )


def mask_counts(mask: np.ndarray, threshold: int = THRESHOLD) -> np.ndarray:
    """(white, mid-gray, all) pixel counts of a mask or of one of its frames:
    summed over frames, they decide `check_mask_counts` while streaming."""
    m = np.asarray(mask)
    return np.array([np.count_nonzero(m >= threshold), np.count_nonzero((m > GRAY_LOW) & (m < threshold)), m.size],
                    dtype=np.int64)


def check_mask_content(
    mask: np.ndarray,
    path: str | Path,
    threshold: int = THRESHOLD,
    max_gray_fraction: float = MAX_GRAY_FRACTION,
) -> None:
    """A mask must be binary, and neither empty nor white everywhere."""
    check_mask_counts(mask_counts(mask, threshold), path, threshold, max_gray_fraction)


def check_mask_counts(counts, path: str | Path, threshold: int = THRESHOLD,
                      max_gray_fraction: float = MAX_GRAY_FRACTION) -> None:
    white, gray_pixels, total = (int(c) for c in counts)
    if white == 0:
        raise OmnimatteError(
            f"{path}: mask is empty (no pixel >= {threshold} in any frame); white marks the object"
        )
    if white == total:
        raise OmnimatteError(f"{path}: mask is white everywhere; it must mark only the object")
    gray = gray_pixels / total
    if gray > max_gray_fraction:
        raise OmnimatteError(
            f"{path}: mask is not binary ({gray:.1%} of pixels are between {GRAY_LOW} and "
            f"{threshold}, at most {max_gray_fraction:.0%} allowed); give a black/white mask"
        )


def binarize_mask(mask: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """bool mask, True where ``mask >= threshold`` (uint8 or float on 0..255)."""
    return np.asarray(mask) >= threshold


def dilate_mask(mask: np.ndarray, size: int = DILATE) -> np.ndarray:
    """Binary dilation of ``[..., H, W]`` with a ``size x size`` square of ones.

    Same as ``cv2.dilate(m, np.ones((size, size)))`` (anchor at ``size // 2``,
    pixels outside the image count as 0) and, for odd sizes, as skimage's
    ``binary_dilation(m, footprint=np.ones((size, size)))``. A square is
    separable, so it is a 1-D max along H then along W.
    """
    m = np.asarray(mask, dtype=bool)
    if size <= 1:
        return m.copy()
    for axis in (-2, -1):
        m = _dilate_1d(m, size, axis)
    return m


def _dilate_1d(m: np.ndarray, size: int, axis: int) -> np.ndarray:
    out = m.copy()
    n = m.shape[axis]
    anchor = size // 2
    for offset in range(-anchor, size - anchor):
        if offset == 0 or abs(offset) >= n:
            continue
        # out[i] |= m[i + offset] for the i where i + offset is inside.
        dst = [slice(None)] * m.ndim
        src = [slice(None)] * m.ndim
        dst[axis] = slice(max(0, -offset), n - max(0, offset))
        src[axis] = slice(max(0, offset), n + min(0, offset))
        out[tuple(dst)] |= m[tuple(src)]
    return out


def prepare_mask(
    mask: np.ndarray,
    size: tuple[int, int] | None = None,
    threshold: float = THRESHOLD,
    dilate: int = DILATE,
) -> np.ndarray:
    """Raw grayscale mask -> bool object mask on the model grid.

    The reference order: area-resize the gray values to ``size`` (W, H),
    binarize at ``threshold``, then dilate by ``dilate`` pixels of that grid.
    """
    gray = resize_masks(mask, size, mode="area") if size is not None else mask
    return dilate_mask(binarize_mask(gray, threshold), dilate)


def build_trimask(
    masks: Sequence[np.ndarray],
    remove: Iterable[int] | None = None,
    neutral: float = NEUTRAL,
) -> np.ndarray:
    """The Casper trimask (float32 ``[T, H, W]``) from bool object masks.

    ``remove``: indices of the objects to remove (value 1); the other objects
    are kept (value 0); everything else is neutral background that may change
    (value ``neutral``). ``None`` removes every object (the "clean
    background" run). Where a removed and a kept object overlap, removal wins,
    as in the reference.
    """
    if not masks:
        raise OmnimatteError("trimask: no object masks given")
    remove_ids = set(range(len(masks)) if remove is None else remove)
    bad = [i for i in remove_ids if not 0 <= i < len(masks)]
    if bad:
        raise OmnimatteError(f"trimask: object index {bad[0]} out of range 0..{len(masks) - 1}")
    tri = np.full(np.shape(masks[0]), neutral, dtype=np.float32)
    for i, m in enumerate(masks):
        if i not in remove_ids:
            tri[np.asarray(m, dtype=bool)] = 0.0
    for i in sorted(remove_ids):
        tri[np.asarray(masks[i], dtype=bool)] = 1.0
    return tri
