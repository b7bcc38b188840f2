"""Spatial tiling of the Wan VAE and its peak-memory model.

A frame too large for the memory budget is split into overlapping tiles (in
pixels, multiples of the spatial factor 8); each tile runs through the whole
video and the tiles are blended with linear ramps over the overlaps. The
memory model (weights + bytes per tile pixel, fitted by `parity/bench_vae.py`)
picks the fewest tiles that fit, and lets a run plan predict the VAE's peak
without loading it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_omnimatte.errors import OmnimatteError

# bytes of scores one call of the VAE's middle attention may materialize
MAX_SCORES_BYTES = 256 << 20


@dataclass(frozen=True)
class Tiling:
    """Spatial tiles in pixels (multiples of the spatial factor, 8): tile size
    and the overlap blended with linear ramps."""

    height: int = 256
    width: int = 256
    overlap: int = 64


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Evenly spread starts of tiles of `tile` covering [0, size) with at least `overlap`."""
    if tile >= size:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def _ramps(size: int, starts: list[int], tile: int, scale: int) -> list[np.ndarray]:
    """1D blend weight of each tile (in units of `scale` x the tile grid): rising
    linearly over the overlap with the previous tile, falling over the next."""
    out = []
    for i, s in enumerate(starts):
        e = min(s + tile, size)
        w = np.ones((e - s) * scale, np.float32)
        if i > 0:
            n = (starts[i - 1] + tile - s) * scale  # overlap with the previous tile
            if n > 0:
                w[:n] = np.minimum(w[:n], (np.arange(n) + 1) / (n + 1))
        if i + 1 < len(starts):
            n = (e - starts[i + 1]) * scale
            if n > 0:
                w[-n:] = np.minimum(w[-n:], (n - np.arange(n)) / (n + 1))
        out.append(w)
    return out


def tiles(h: int, w: int, th: int, tw: int, ov: int, scale: int):
    """Yields (y0, y1, x0, x1) in grid units and the 2D blend weight at `scale`."""
    ys, xs = tile_starts(h, th, ov), tile_starts(w, tw, ov)
    wy, wx = _ramps(h, ys, th, scale), _ramps(w, xs, tw, scale)
    for y0, ry in zip(ys, wy):
        for x0, rx in zip(xs, wx):
            yield y0, min(y0 + th, h), x0, min(x0 + tw, w), ry[:, None] * rx[None, :]


# Peak-memory model of one tile: weights + k * tile pixels (+ the middle
# attention's scores), independent of the frame count. k (float32 bytes per
# pixel of the tile, per chunk of 4 frames in / one latent frame out) was
# measured with parity/bench_vae.py on the MLX CPU backend (60.3 / 62.6 KiB,
# fitted at 64x96 and 128x224), plus 10% margin. Most of it is the CPU conv's
# unfold buffer (27 * 96 channels * 4 frames * 4 bytes = 41.5 KB per pixel);
# Metal's implicit-GEMM conv3d has none, so the GPU value is the CPU one minus
# that buffer, plus margin: an estimate, not a measurement.
BYTES_PER_PIXEL = {
    "cpu": {"encode": 68_000, "decode": 70_000},
    "gpu": {"encode": 26_000, "decode": 28_000},
}


def estimate_peak_bytes(stage: str, height: int, width: int, dtype=mx.float32, base_dim: int = 96,
                        weights_bytes: int | None = None, device: str | None = None) -> int:
    """Estimated peak memory (bytes) of encoding/decoding frames of `height` x
    `width` pixels (one tile), whatever the number of frames."""
    item = 4 if dtype == mx.float32 else 2
    if weights_bytes is None:
        weights_bytes = int(127e6 * (base_dim / 96) ** 2 * item)
    device = device or ("gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu")
    act = BYTES_PER_PIXEL[device][stage] * (base_dim / 96) * height * width * item / 4
    tokens = (height // 8) * (width // 8)
    scores = min(tokens * tokens * 4, MAX_SCORES_BYTES)
    return int(weights_bytes + act + scores)


def tile_grid(tl: Tiling, s: int, lh: int, lw: int) -> tuple[int, int, int]:
    """Tiling in pixels -> (tile h, tile w, overlap) in latent units, clamped to the frame."""
    if min(tl.height, tl.width) < 1 or tl.overlap < 0 or tl.height % s or tl.width % s or tl.overlap % s:
        raise OmnimatteError(f"tiling: {tl} must use positive multiples of {s} pixels")
    th, tw, ov = min(tl.height // s, lh), min(tl.width // s, lw), tl.overlap // s
    if (th < lh and ov >= th) or (tw < lw and ov >= tw):
        raise OmnimatteError(f"tiling: overlap {tl.overlap} must be smaller than the tile ({tl.height}x{tl.width})")
    return th, tw, ov


def choose_tiling(h: int, w: int, budget: int, estimate, s: int = 8, overlap: int = 64,
                  min_tile: int = 128) -> Tiling:
    """Fewest tiles (then the squarest) whose estimated peak fits `budget`;
    the smallest tiles when none does."""
    best = None
    for n in range(1, 1 + (h // s) * (w // s)):
        for ny in range(1, n + 1):
            if n % ny:
                continue
            nx = n // ny
            th = _tile_len(h, ny, overlap, s)
            tw = _tile_len(w, nx, overlap, s)
            if th < min(min_tile, h) or tw < min(min_tile, w):
                continue
            cand = (abs(math.log(th / tw)), Tiling(th, tw, overlap if th < h or tw < w else 0))
            if estimate(th, tw) <= budget and (best is None or cand[0] < best[0]):
                best = cand
        if best is not None:
            return best[1]
        if _tile_len(h, n, overlap, s) < min(min_tile, h) and _tile_len(w, n, overlap, s) < min(min_tile, w):
            break
    th, tw = min(h, min_tile), min(w, min_tile)
    return Tiling(th, tw, min(overlap, s * ((min(th, tw) // s - 1) // 2)))


def _tile_len(size: int, n: int, overlap: int, s: int) -> int:
    """Tile length (multiple of s) so that n tiles with `overlap` cover `size`."""
    if n == 1:
        return size
    return min(size, s * math.ceil((size + (n - 1) * overlap) / n / s))
