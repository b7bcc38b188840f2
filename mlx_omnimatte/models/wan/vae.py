"""Wan2.1 causal video VAE (encoder + decoder), channels-last.

Video `[B, T, H, W, 3]` in [-1, 1] <-> normalized latents `[B, 1 + (T-1)/4, H/8, W/8, 16]`.

Like the reference (original Wan2.1 `wan/modules/vae.py`, diffusers
`AutoencoderKLWan`), the video is processed causally in time: the encoder sees
frame 0 alone, then chunks of 4 frames; the decoder one latent frame at a
time. Every causal 3x3x3 conv keeps the last 2 frames of its input between
chunks; the temporal resamplers keep their own state and are skipped on the
first chunk. Each chunk is evaluated before the next one is built, so memory
follows the chunk, not the video length.

Optional spatial tiling (encode and decode) splits the frame into overlapping
tiles, runs each tile through the whole video, and blends the tiles with
linear ramps. It is chosen automatically from a memory budget or explicitly
(`vae_tiling.py`: tile layout, blend weights and the fitted memory model).

Parameter names: original Wan2.1 block layout (`encoder.downsamples.i`,
`decoder.upsamples.i`, `*.middle.{0,1,2}`, `resample.1`, `time_conv`) with
diffusers' names inside residual blocks (`norm1, conv1, norm2, conv2,
conv_shortcut`) and at the ends (`conv_in`, `norm_out`, `conv_out`,
`quant_conv`, `post_quant_conv`). Norm gammas keep the reference shapes
(`(C,1,1,1)`, `(C,1,1)`) so weights convert verbatim.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_omnimatte.errors import OmnimatteError
from ..base import DTYPES, BaseConfig
from .vae_tiling import MAX_SCORES_BYTES, Tiling, choose_tiling, estimate_peak_bytes, tile_grid, tiles

CACHE_T = 2  # frames of input each causal conv keeps between chunks

LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

@dataclass
class Config(BaseConfig):
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple = (False, True, True)
    latents_mean: tuple = LATENTS_MEAN
    latents_std: tuple = LATENTS_STD
    dtype: str = "float32"  # compute dtype of a freshly built model (loaded weights keep theirs)


    def __post_init__(self):
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise OmnimatteError(f"vae config: latents_mean/std need {self.z_dim} values")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise OmnimatteError("vae config: temporal_downsample needs len(dim_mult) - 1 entries")
        if self.dtype not in DTYPES:
            raise OmnimatteError(f"vae config: unknown dtype {self.dtype!r} (one of {', '.join(DTYPES)})")

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


# --------------------------------------------------------------------------- state between chunks


class _Rep:
    """Marker of an upsampler that has seen its first chunk (the reference's 'Rep')."""


REP = _Rep()


class ChunkCache:
    """Per-module state carried from one temporal chunk to the next.

    `settle` evaluates an activation right away: a lazily built chunk lets the
    backend run ahead and hold the buffers (and conv temporaries) of many
    layers at once; evaluating layer by layer keeps the peak near one layer's."""

    def __init__(self, eager: bool = True):
        self.state: dict[int, object] = {}
        self.eager = eager

    def get(self, module):
        return self.state.get(id(module))

    def set(self, module, value):
        # A copy, so the slice does not keep the whole activation alive.
        self.state[id(module)] = mx.contiguous(value) if isinstance(value, mx.array) else value

    def arrays(self) -> list:
        return [v for v in self.state.values() if isinstance(v, mx.array)]

    def settle(self, *xs):
        if self.eager:
            mx.eval(*xs, *self.arrays())


# --------------------------------------------------------------------------- layers


class CausalConv3d(nn.Conv3d):
    """3D conv, all temporal padding in front (2 * pad_t), spatial padding symmetric.

    `prev` (the cached last frames of the previous chunk) replaces as many
    leading zero frames."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        k = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        p = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        s = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        super().__init__(cin, cout, k, stride=s, padding=0)
        self.time_pad, self.space_pad, self.conv_stride = 2 * p[0], (p[1], p[2]), s
        self.pointwise = k == (1, 1, 1) and s == (1, 1, 1)

    def __call__(self, x, prev=None):
        if self.pointwise:  # 1x1x1: a matmul
            return x @ self.weight.reshape(self.weight.shape[0], -1).T + self.bias
        front = self.time_pad
        if front > 0:
            pieces = [x] if prev is None else [prev, x]
            front -= 0 if prev is None else prev.shape[1]
            if front > 0:
                pieces.insert(0, mx.zeros((x.shape[0], front, *x.shape[2:]), x.dtype))
            x = mx.concatenate(pieces, axis=1) if len(pieces) > 1 else x
        y = mx.conv3d(x, self.weight, stride=self.conv_stride, padding=(0, *self.space_pad))
        return y + self.bias


def cached_conv(conv: CausalConv3d, x, cache: ChunkCache | None):
    """The reference's cache rule: keep the last 2 input frames; a 1-frame chunk
    keeps the previous chunk's last frame in front of it."""
    if cache is None:
        return conv(x)
    prev = cache.get(conv)
    keep = x[:, -CACHE_T:]
    if keep.shape[1] < CACHE_T and prev is not None:
        keep = mx.concatenate([prev[:, -1:], keep], axis=1)
    y = conv(x, prev)
    cache.set(conv, keep)
    cache.settle(y)
    return y


class RMSNorm(nn.Module):
    """x / ||x|| * sqrt(C) * gamma over channels (= rms_norm); gamma keeps the reference shape."""

    def __init__(self, dim: int, spatial_dims: int):
        super().__init__()
        self.gamma = mx.ones((dim,) + (1,) * spatial_dims)

    def __call__(self, x):
        return mx.fast.rms_norm(x, self.gamma.reshape(-1), 1e-12)


@mx.compile
def _norm_silu(x, gamma):
    return nn.silu(mx.fast.rms_norm(x, gamma, 1e-12))


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = RMSNorm(cin, 3)
        self.conv1 = CausalConv3d(cin, cout, 3, padding=1)
        self.norm2 = RMSNorm(cout, 3)
        self.conv2 = CausalConv3d(cout, cout, 3, padding=1)
        if cin != cout:
            self.conv_shortcut = CausalConv3d(cin, cout, 1)

    def __call__(self, x, cache=None):
        h = self.conv_shortcut(x) if "conv_shortcut" in self else x
        x = cached_conv(self.conv1, _norm_silu(x, self.norm1.gamma.reshape(-1)), cache)
        x = cached_conv(self.conv2, _norm_silu(x, self.norm2.gamma.reshape(-1)), cache)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame."""

    # Query rows per SDPA call: bounds the score matrix where SDPA materializes it.
    max_scores_bytes = MAX_SCORES_BYTES

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, 2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def __call__(self, x):
        b, t, h, w, c = x.shape
        y = self.norm(x).reshape(b * t, h * w, c)
        qkv = y @ self.to_qkv.weight.reshape(3 * c, c).T + self.to_qkv.bias
        q, k, v = (a[:, None] for a in mx.split(qkv, 3, axis=-1))
        n = h * w
        rows = max(1, min(n, self.max_scores_bytes // max(1, 4 * n * b * t)))
        outs = [mx.fast.scaled_dot_product_attention(q[:, :, i:i + rows], k, v, scale=c ** -0.5)
                for i in range(0, n, rows)]
        y = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)
        y = y[:, 0] @ self.proj.weight.reshape(c, c).T + self.proj.bias
        return x + y.reshape(b, t, h, w, c)


class ZeroPadRB(nn.Module):
    """Placeholder for the reference's ZeroPad2d((0, 1, 0, 1)); the conv does the padding."""


class Nearest2x(nn.Module):
    """Placeholder for the reference's nearest x2 upsampling (done in `Resample`)."""


class Resample(nn.Module):
    """Spatial down/upsampling by 2 per frame, optionally with a causal temporal
    down/upsampling conv (`time_conv`) carrying state between chunks."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("up"):
            self.resample = [Nearest2x(), nn.Conv2d(dim, dim // 2, 3, padding=1)]
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            self.resample = [ZeroPadRB(), nn.Conv2d(dim, dim, 3, stride=2)]
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def _spatial(self, x):
        b, t, h, w, c = x.shape
        x = x.reshape(b * t, h, w, c)
        conv = self.resample[1]
        if self.mode.startswith("up"):
            x = mx.broadcast_to(x[:, :, None, :, None], (b * t, h, 2, w, 2, c)).reshape(b * t, 2 * h, 2 * w, c)
            x = mx.conv2d(x, conv.weight, padding=1)
        else:  # zero row/column at the bottom/right, 3x3 stride 2
            x = mx.conv_general(x, conv.weight, stride=2, padding=([0, 0], [1, 1]))
        x = x + conv.bias
        return x.reshape(b, t, *x.shape[1:])

    def __call__(self, x, cache=None):
        if self.mode == "upsample3d" and cache is not None:
            prev = cache.get(self)
            if prev is None:  # first chunk: one frame in, one frame out
                cache.set(self, REP)
            else:
                keep = x[:, -CACHE_T:]
                if keep.shape[1] < CACHE_T:
                    front = mx.zeros_like(keep) if prev is REP else prev[:, -1:]
                    keep = mx.concatenate([front, keep], axis=1)
                y = self.time_conv(x, None if prev is REP else prev)
                cache.set(self, keep)
                b, t, h, w, c = x.shape  # channels [2c] -> frames (2t): frame 2i+j = half j of step i
                x = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
        x = self._spatial(x)
        if cache is not None:
            cache.settle(x)
        if self.mode == "downsample3d" and cache is not None:
            prev = cache.get(self)
            if prev is None:  # first chunk passes through; its last frame is kept
                cache.set(self, x[:, -1:])
            else:
                keep = x[:, -1:]
                x = self.time_conv(mx.concatenate([prev[:, -1:], x], axis=1))
                cache.set(self, keep)
        return x


def _run(blocks, x, cache):
    for blk in blocks:
        x = blk(x) if isinstance(blk, AttentionBlock) else blk(x, cache)
    return x


class Encoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(3, dims[0], 3, padding=1)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Resample(cout, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
        self.downsamples = blocks
        self.middle = [ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]), ResidualBlock(dims[-1], dims[-1])]
        self.norm_out = RMSNorm(dims[-1], 3)
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1)

    def __call__(self, x, cache=None):
        x = cached_conv(self.conv_in, x, cache)
        x = _run(self.downsamples, x, cache)
        x = _run(self.middle, x, cache)
        return cached_conv(self.conv_out, _norm_silu(x, self.norm_out.gamma.reshape(-1)), cache)


class Decoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.base_dim * m for m in (mult[-1], *mult[::-1])]
        temporal_up = tuple(cfg.temporal_downsample)[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = [ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0])]
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                cin //= 2  # the upsampler before halves the channels
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(mult) - 1:
                blocks.append(Resample(cout, "upsample3d" if temporal_up[i] else "upsample2d"))
        self.upsamples = blocks
        self.norm_out = RMSNorm(dims[-1], 3)
        self.conv_out = CausalConv3d(dims[-1], 3, 3, padding=1)

    def __call__(self, x, cache=None):
        x = cached_conv(self.conv_in, x, cache)
        x = _run(self.middle, x, cache)
        x = _run(self.upsamples, x, cache)
        return cached_conv(self.conv_out, _norm_silu(x, self.norm_out.gamma.reshape(-1)), cache)


# --------------------------------------------------------------------------- tiling


# --------------------------------------------------------------------------- model


def _counter(on_chunk, total: int):
    """tick() -> on_chunk(done, total); a no-op without a callback."""
    done = 0

    def tick():
        nonlocal done
        done += 1
        if on_chunk is not None:
            on_chunk(done, total)

    return tick


class Model(nn.Module):
    def __init__(self, config: Config | None = None, dtype: str | None = None):
        super().__init__()
        self.config = config = config or Config()
        self.encoder = Encoder(config)
        self.quant_conv = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)
        self._mean = mx.array(config.latents_mean, dtype=mx.float32)
        self._std = mx.array(config.latents_std, dtype=mx.float32)
        dtype = dtype or config.dtype
        if dtype != "float32":
            self.set_dtype(DTYPES[dtype])

    @property
    def dtype(self):
        return self.encoder.conv_in.weight.dtype

    @property
    def weights_bytes(self) -> int:
        from mlx.utils import tree_flatten
        return sum(v.nbytes for _, v in tree_flatten(self.parameters()))

    # ----------------------------------------------------------- shapes and checks

    def latent_shape(self, video_shape) -> tuple:
        b, t, h, w, _ = video_shape
        s, f = self.config.spatial_factor, self.config.temporal_factor
        return (b, 1 + (t - 1) // f, h // s, w // s, self.config.z_dim)

    def video_shape(self, latent_shape) -> tuple:
        b, t, h, w, _ = latent_shape
        s, f = self.config.spatial_factor, self.config.temporal_factor
        return (b, 1 + f * (t - 1), h * s, w * s, 3)

    def _check_video(self, video):
        f, s = self.config.temporal_factor, self.config.spatial_factor
        if video.ndim != 5:
            raise OmnimatteError(f"video: expected [B, T, H, W, 3], got shape {tuple(video.shape)}")
        b, t, h, w, c = video.shape
        if c != 3:
            raise OmnimatteError(f"video: expected 3 channels (RGB) in the last axis, "
                                 f"got {c} (shape {tuple(video.shape)})")
        if t < 1 or (t - 1) % f:
            raise OmnimatteError(f"video: {t} frames; the VAE needs {f}n+1 frames "
                                 f"(e.g. {1 + f * max(1, (t - 1) // f)})")
        if h % s or w % s or h == 0 or w == 0:
            raise OmnimatteError(f"video: {h}x{w} pixels; height and width must be positive multiples of {s}")

    def _check_latents(self, z):
        if z.ndim != 5 or z.shape[-1] != self.config.z_dim or min(z.shape) < 1:
            raise OmnimatteError(f"latents: expected [B, T', H', W', {self.config.z_dim}], got shape {tuple(z.shape)}")

    def _tiling_for(self, stage: str, h: int, w: int, tiling, memory_budget) -> Tiling | None:
        """h, w in pixels. None = whole frames."""
        if tiling is False:
            return None
        if isinstance(tiling, Tiling):
            return tiling
        if tiling is not None and tiling is not True:
            raise OmnimatteError(f"tiling: expected None, True, False or a Tiling, got {tiling!r}")
        def est(th, tw):
            return estimate_peak_bytes(stage, th, tw, self.dtype, self.config.base_dim, self.weights_bytes)
        if memory_budget is None:
            return Tiling() if tiling else None
        if not tiling and est(h, w) <= memory_budget:
            return None
        return choose_tiling(h, w, memory_budget, est, self.config.spatial_factor)

    # ----------------------------------------------------------- encode

    def encode(self, video, *, tiling: Tiling | bool | None = None, memory_budget: int | None = None,
               on_chunk=None) -> mx.array:
        """[B, T, H, W, 3] in [-1, 1] (T = 4n+1) -> normalized posterior mean
        [B, 1+n, H/8, W/8, 16] (float32).

        tiling: None = automatic (tiles only when `memory_budget`, in bytes, is
        given and the whole frame would not fit); False = never; True = tiles
        sized from the budget (default Tiling() without one); a Tiling = those tiles.
        `on_chunk(done, total)` is called after each chunk (of each tile)."""
        video = mx.array(video) if not isinstance(video, mx.array) else video
        self._check_video(video)
        _, _, h, w, _ = video.shape
        s = self.config.spatial_factor
        tl = self._tiling_for("encode", h, w, tiling, memory_budget)
        chunks = 1 + (video.shape[1] - 1) // self.config.temporal_factor
        if tl is None:
            mu = self._encode_frames(video, _counter(on_chunk, chunks))
        else:
            lh, lw = h // s, w // s
            th, tw, ov = tile_grid(tl, s, lh, lw)
            tick = _counter(on_chunk, chunks * len(list(tiles(lh, lw, th, tw, ov, 1))))
            acc = np.zeros(self.latent_shape(video.shape), np.float32)
            wsum = np.zeros((lh, lw, 1), np.float32)
            for y0, y1, x0, x1, wt in tiles(lh, lw, th, tw, ov, 1):
                part = self._encode_frames(video[:, :, y0 * s:y1 * s, x0 * s:x1 * s], tick)
                acc[:, :, y0:y1, x0:x1] += np.array(part) * wt[:, :, None]
                wsum[y0:y1, x0:x1] += wt[:, :, None]
            mu = mx.array(acc / wsum)
        return (mu - self._mean) / self._std

    def _encode_frames(self, video, tick) -> mx.array:
        """Raw posterior mean (float32) of whole frames, chunk by chunk."""
        x = video.astype(self.dtype)
        f = self.config.temporal_factor
        cache, outs = ChunkCache(), []
        t = x.shape[1]
        for start, stop in [(0, 1)] + [(i, i + f) for i in range(1, t, f)]:
            h = self.quant_conv(self.encoder(x[:, start:stop], cache))
            mu = h[..., : self.config.z_dim].astype(mx.float32)
            mx.eval(mu, *cache.arrays())
            tick()
            outs.append(mu)
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)

    # ----------------------------------------------------------- decode

    def decode(self, latents, *, tiling: Tiling | bool | None = None, memory_budget: int | None = None,
               out: np.ndarray | None = None, on_chunk=None):
        """Normalized latents [B, T', H', W', 16] -> video [B, 1+4(T'-1), 8H', 8W', 3]
        in [-1, 1] (clamped), one latent frame at a time.

        The frames are written into a float32 numpy buffer as they come: pass
        `out` (e.g. a memmap of shape `video_shape(latents.shape)`) to get it back
        filled; otherwise an mx.array is returned. `tiling`/`memory_budget` as in
        `encode` (tile sizes in pixels)."""
        latents = mx.array(latents) if not isinstance(latents, mx.array) else latents
        self._check_latents(latents)
        shape = self.video_shape(latents.shape)
        if out is None:
            buf = np.empty(shape, np.float32)
        elif tuple(out.shape) != shape:
            raise OmnimatteError(f"decode: out has shape {tuple(out.shape)}, expected {shape}")
        else:
            buf = out
        s = self.config.spatial_factor
        z = latents.astype(mx.float32) * self._std + self._mean
        tl = self._tiling_for("decode", shape[2], shape[3], tiling, memory_budget)
        if tl is None:
            self._decode_frames(z, buf, None, _counter(on_chunk, latents.shape[1]))
        else:
            lh, lw = latents.shape[2:4]
            th, tw, ov = tile_grid(tl, s, lh, lw)
            tick = _counter(on_chunk, latents.shape[1] * len(list(tiles(lh, lw, th, tw, ov, s))))
            buf[...] = 0
            wsum = np.zeros((lh * s, lw * s, 1), np.float32)
            for y0, y1, x0, x1, wt in tiles(lh, lw, th, tw, ov, s):
                view = buf[:, :, y0 * s:y1 * s, x0 * s:x1 * s]
                self._decode_frames(z[:, :, y0:y1, x0:x1], view, wt[:, :, None], tick)
                wsum[y0 * s:y1 * s, x0 * s:x1 * s] += wt[:, :, None]
            for t in range(shape[1]):  # frame by frame: no full-size temporaries
                buf[:, t] /= wsum
        np.clip(buf, -1.0, 1.0, out=buf)
        return buf if out is not None else mx.array(buf)

    def _decode_frames(self, z, buf: np.ndarray, weight: np.ndarray | None, tick) -> None:
        """Decodes un-normalized latents one latent frame at a time into `buf`
        (assigned, or accumulated times `weight` when tiling)."""
        x = self.post_quant_conv(z.astype(self.dtype))
        cache = ChunkCache()
        t0 = 0
        for i in range(z.shape[1]):
            y = self.decoder(x[:, i:i + 1], cache).astype(mx.float32)
            mx.eval(y, *cache.arrays())
            tick()
            n = y.shape[1]
            if weight is None:
                buf[:, t0:t0 + n] = np.array(y)
            else:
                buf[:, t0:t0 + n] += np.array(y) * weight
            t0 += n

    def __call__(self, video):
        """Round trip (encode then decode), untiled."""
        return self.decode(self.encode(video))
