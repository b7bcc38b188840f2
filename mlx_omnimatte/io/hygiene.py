"""Mask hygiene for segmenter output: what a decomposition needs of a coarse
object mask (one frame ``[H, W]`` bool, or a window of them).

A segmenter's masks flicker at their edges, keep one-pixel specks and leave
holes where the object is textured; the decomposition reads such artefacts as
objects appearing and vanishing. Each step is a small pure function, applied
per frame in this order: fill holes, drop specks, erode, dilate; then a
temporal majority over a few frames removes flicker (`temporal_majority`,
streamed by `MajorityWindow`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .masks import dilate_mask

# areas as fractions of the frame, so a setting means the same at any size
SPECK_FRACTION = 1 / 4000  # components smaller than this are dropped (~61 px at 640x384)
HOLE_FRACTION = 1 / 200  # enclosed background smaller than this is filled (~1229 px at 640x384)
MAJORITY_FRAMES = 3  # frames voting in the temporal majority (odd)


@dataclass(frozen=True)
class Hygiene:
    """Settings of `clean_frame`; ``raw=True`` turns every step off."""

    dilate: int = 0  # square footprint in pixels (0: none)
    erode: int = 0
    speck_fraction: float = SPECK_FRACTION
    hole_fraction: float = HOLE_FRACTION
    majority: int = MAJORITY_FRAMES
    raw: bool = False


def _area(fraction: float, mask: np.ndarray) -> int:
    return int(fraction * mask.shape[-2] * mask.shape[-1])


def fill_holes(mask: np.ndarray, max_area: int) -> np.ndarray:
    """Fill background regions enclosed by the mask (not touching the frame's
    border, 4-connected) of at most ``max_area`` pixels."""
    m = np.asarray(mask, dtype=bool)
    labels, n = ndimage.label(~m)
    if n == 0:
        return m.copy()
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill = sizes <= max_area
    fill[0] = False
    fill[border] = False
    return m | fill[labels]


def drop_specks(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Remove connected components (8-connected) smaller than ``min_area``."""
    m = np.asarray(mask, dtype=bool)
    labels, n = ndimage.label(m, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return m.copy()
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_area
    keep[0] = False
    return keep[labels]


def erode_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary erosion with a ``size x size`` square; pixels outside the frame
    count as object (an object cut by the border keeps its edge there), as
    ``cv2.erode``'s default border does."""
    m = np.asarray(mask, dtype=bool)
    return m.copy() if size <= 1 else ~dilate_mask(~m, size)


def clean_frame(mask: np.ndarray, hygiene: Hygiene) -> np.ndarray:
    """One frame's spatial steps: holes, specks, erode, dilate."""
    m = np.asarray(mask, dtype=bool)
    if hygiene.raw:
        return m.copy()
    m = fill_holes(m, _area(hygiene.hole_fraction, m))
    m = drop_specks(m, max(1, _area(hygiene.speck_fraction, m)))
    m = erode_mask(m, hygiene.erode)
    return dilate_mask(m, hygiene.dilate) if hygiene.dilate > 1 else m


def temporal_majority(frames: np.ndarray, centre: int) -> np.ndarray:
    """The majority vote of ``[K, H, W]`` masks for frame ``centre`` of
    them; a tie (at the clip's ends fewer frames vote) keeps that frame's own
    value, so an object never appears before the frame it was prompted on."""
    f = np.asarray(frames, dtype=bool)
    votes = 2 * f.sum(axis=0, dtype=np.int32)
    return (votes > f.shape[0]) | ((votes == f.shape[0]) & f[centre])


class MajorityWindow:
    """Streams `temporal_majority` over ``size`` frames centred on each one:
    `push` a frame, get the frames that became decidable; `flush` at the end.
    Holds ``size`` frames, whatever the clip's length."""

    def __init__(self, size: int):
        if size < 1 or size % 2 == 0:
            raise ValueError(f"majority window must be odd and positive, got {size}")
        self.radius = size // 2
        self.frames: deque = deque(maxlen=size)
        self.pushed = self.emitted = 0

    def _vote(self, t: int) -> np.ndarray:
        first = self.pushed - len(self.frames)
        lo, hi = max(t - self.radius, first), min(t + self.radius + 1, self.pushed)
        return temporal_majority([self.frames[i - first] for i in range(lo, hi)], t - lo)

    def push(self, frame: np.ndarray) -> list[np.ndarray]:
        self.frames.append(np.asarray(frame, dtype=bool))
        self.pushed += 1
        out = []
        while self.emitted + self.radius < self.pushed:
            out.append(self._vote(self.emitted))
            self.emitted += 1
        return out

    def flush(self) -> list[np.ndarray]:
        out = []
        while self.emitted < self.pushed:
            out.append(self._vote(self.emitted))
            self.emitted += 1
        return out
