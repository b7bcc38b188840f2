"""The layer U-Net of Generative Omnimatte's optimization stage (Omnimatte's
network, nf 32), channels-last.

Encoder: 7 conv blocks of kernel 4 -- five of stride 2, then two of stride 1
and dilation 2 -- with "same" padding (output = input // stride; the odd pad
goes right/bottom), BatchNorm from the second block, ReLU on the first and
leaky ReLU (0.2) on the rest. Decoder: 5 transposed convs of kernel 4,
stride 2 (output cropped to twice the input), BatchNorm and ReLU, each fed
the previous output concatenated with the encoder skip of its resolution.
Output: a kernel-4 conv to RGBA and a sigmoid. Every parameter (BatchNorm's
scale and shift included) starts as normal(0, 0.01), as in the reference.

The public torch code asks its output block for a ``'sigmoid'`` activation
that its ConvBlock has no branch for (the output is left linear); here the
sigmoid is applied, so alpha and colour stay in [0, 1].

Height and width must be multiples of 32 (five halvings); callers pad.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..memory import CPU_STREAMS, blas_threads, kept_heap, streams
from .base import BaseConfig

KERNEL = 4
LEAKY_SLOPE = 0.2
INIT_STD = 0.01
DOWNSAMPLE = 32  # 2 ** (number of stride-2 encoder blocks)


# MLX's CPU backend computes stride-2 and transposed convolutions (above all
# their gradients) 15-100x slower than stride-1 ones, copies every pixel once
# per tap for the others, and runs one op at a time per stream, on one core
# but for its matmuls. There the U-Net takes its rearranged (CPU) form:
# convolutions as one matmul per tap over rearranged pixels (equal by
# construction), and the batch split in PARTS run on as many streams
# (BatchNorm statistics are still the whole batch's). REARRANGE None: by
# device (rearranged on the CPU, plain on a GPU, where it is fast); tests
# force either.
REARRANGE: bool | None = None
PARTS = CPU_STREAMS


def rearranged() -> bool:
    """Whether the U-Net runs in its rearranged (CPU) form."""
    return mx.default_device() == mx.cpu if REARRANGE is None else REARRANGE


@contextmanager
def running():
    """What the U-Net's training and inference run fastest within: the heap
    kept for reuse (``memory.kept_heap``) and, with batch parts on their own
    streams, one BLAS thread per stream (two cores, two streams)."""
    with kept_heap(), blas_threads(1) if rearranged() and PARTS > 1 else nullcontext():
        yield


def batch_parts(x: mx.array) -> list[mx.array]:
    """x split along the batch: PARTS parts in the rearranged form, else one."""
    n = min(PARTS, x.shape[0]) if rearranged() else 1
    return [x] if n == 1 else mx.split(x, [x.shape[0] * k // n for k in range(1, n)], axis=0)


def per_part(f, *parts: list) -> list:
    """``f`` of each part's arrays, part k on stream k."""
    if len(parts[0]) == 1:
        return [f(*args) for args in zip(*parts)]
    out = []
    for stream, args in zip(streams(len(parts[0])), zip(*parts)):
        with mx.stream(stream):
            out.append(f(*args))
    return out


@dataclass
class UNetConfig(BaseConfig):
    in_channels: int = 6  # the solo frame and |solo - background|
    out_channels: int = 4  # RGB + alpha
    nf: int = 32
    norm_momentum: float = 0.1
    norm_eps: float = 1e-5


def same_padding(size: int, stride: int, dilation: int) -> tuple[int, int]:
    """(before, after) padding so that a kernel-4 conv gives size // stride."""
    out = size // stride
    total = stride * (out - 1) + (KERNEL - 1) * (dilation - 1) + KERNEL - size
    return total // 2, total - total // 2


class ConvBlock(nn.Module):
    """Maps a list of batch parts (``batch_parts``) to the list of outputs."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1, norm: bool = True,
                 act: str = "leaky", cfg: UNetConfig | None = None):
        super().__init__()
        cfg = cfg or UNetConfig()
        self.stride, self.dilation, self.act = stride, dilation, act
        self.conv = nn.Conv2d(cin, cout, KERNEL, stride=stride, dilation=dilation)
        if norm:
            self.norm = nn.BatchNorm(cout, eps=cfg.norm_eps, momentum=cfg.norm_momentum)

    def pad(self, x: mx.array) -> mx.array:
        ph = same_padding(x.shape[1], self.stride, self.dilation)
        pw = same_padding(x.shape[2], self.stride, self.dilation)
        return mx.pad(x, [(0, 0), ph, pw, (0, 0)])

    def __call__(self, parts: list[mx.array]) -> list[mx.array]:
        if not rearranged():
            x = self.conv(self.pad(parts[0]))
            return [activate(self.norm(x) if "norm" in self else x, self.act)]
        ys = per_part(lambda x: rearranged_conv(self.pad(x), self.conv.weight, self.stride, self.dilation), parts)
        if "norm" in self:
            return norm_act(ys, self.conv.bias, self.norm, self.act)
        return per_part(lambda y: activate(y + self.conv.bias, self.act), ys)


class UpBlock(nn.Module):
    """Transposed conv, kernel 4 stride 2, cropped to twice the input (torch's
    ``ConvTranspose2d(k=4, s=2)`` and a crop of 1 each side), BatchNorm, ReLU,
    of a list of batch parts. ``weight`` is ``[O, 4, 4, I]``, MLX's
    transposed-conv layout."""

    def __init__(self, cin: int, cout: int, cfg: UNetConfig):
        super().__init__()
        bound = 1.0 / (cin * KERNEL * KERNEL) ** 0.5
        self.weight = mx.random.uniform(-bound, bound, (cout, KERNEL, KERNEL, cin))
        self.bias = mx.zeros((cout,))
        self.norm = nn.BatchNorm(cout, eps=cfg.norm_eps, momentum=cfg.norm_momentum)

    def __call__(self, parts: list[mx.array]) -> list[mx.array]:
        if not rearranged():
            y = mx.conv_transpose2d(parts[0], self.weight, stride=2)[:, 1:-1, 1:-1]
            return [nn.relu(self.norm(y + self.bias))]
        ys = norm_act(per_part(lambda x: subpixel_conv(x, self.weight), parts), self.bias, self.norm, "relu")
        return [y.reshape(x.shape[0], 2 * x.shape[1], 2 * x.shape[2], -1) for x, y in zip(parts, ys)]


# --- the rearranged (CPU) form ---------------------------------------------------
# Each tap of a conv is a matmul over a slice of the flattened pixels (no
# patch copies; every new buffer here also costs page faults), and
# rearrangements stay strided views where their readers allow. The
# hand-written gradients run on the stream their forward ran on.


def rearranged_conv(x: mx.array, weight: mx.array, stride: int, dilation: int) -> mx.array:
    """``conv2d(x, weight, stride, dilation=dilation)`` of an already padded x, stride 1 or 2."""
    if stride == 2:
        return strided_conv(x, weight)
    if dilation == 1 and weight.shape[0] < weight.shape[-1]:
        return narrow_conv(x, weight)
    return shift_conv(x, weight, dilation)


def current_stream() -> mx.Stream:
    """The stream ops go to now (``per_part`` sets it): gradients go there too."""
    return mx.default_stream(mx.default_device())


def space_to_depth(x: mx.array) -> mx.array:
    """[N, 2H, 2W, C] -> [N, H, W, 4C], channels ordered (row phase, column phase, C)."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h // 2, w // 2, 4 * c)


def strided_conv(x: mx.array, weight: mx.array) -> mx.array:
    """Stride 2 (even kernel) as a stride-1 conv over ``space_to_depth(x)``:
    tap 2a + p of the kernel becomes tap a over phase p."""
    o, k, _, c = weight.shape
    h, w = (x.shape[1] - k) // 2 + 1, (x.shape[2] - k) // 2 + 1
    if x.shape[1] % 2 or x.shape[2] % 2:  # an odd last row / column feeds no output
        x = mx.pad(x, [(0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0)])
    weight = weight.reshape(o, k // 2, 2, k // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(o, k // 2, k // 2, 4 * c)
    y = shift_conv(space_to_depth(x), weight)
    return y if y.shape[1:3] == (h, w) else y[:, :h, :w]  # (a no-op crop's gradient is a zero-filled copy)


def tap_offsets(width: int, kh: int, kw: int, dilation: int = 1) -> tuple[int, ...]:
    """Each tap's offset in the flattened pixels of an image ``width`` wide."""
    return tuple(dilation * (ty * width + tx) for ty in range(kh) for tx in range(kw))


def shift_matmuls(x: mx.array, taps: mx.array, offsets: tuple[int, ...]) -> mx.array:
    """x [N, P, Q, C], taps [T, C, O] -> [N P Q - offsets[-1], O]: row m is the
    sum over taps of flattened pixel m + offsets[t] times taps[t] (rows that
    run past an image's edge into the next are computed and never read)."""
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0] - offsets[-1]
    y = flat[:rows] @ taps[0]
    for t in range(1, len(offsets)):  # accumulates in place: addmm takes over its unshared input
        y = mx.addmm(y, flat[offsets[t]:offsets[t] + rows], taps[t])
    return y


def shift_grads(x: mx.array, taps: mx.array, dy: mx.array, offsets: tuple[int, ...]):
    """(dx, dtaps) of ``shift_matmuls`` from ``dy`` [N, >= offsets[-1] + P Q, O]
    holding each image's cotangent from row offsets[-1] on (zeros around):
    x's gradient is then the same sum of shifted matmuls, run backwards."""
    n, p, q, c = x.shape
    span, rows = offsets[-1], p * q - offsets[-1]
    back = taps.swapaxes(1, 2)
    dx = dy[:, span:span + p * q] @ back[0]
    for t in range(1, len(offsets)):
        dx = mx.addmm(dx, dy[:, span - offsets[t]:span - offsets[t] + p * q], back[t])
    flat, dy_out = x.reshape(n, p * q, c), dy[:, span:span + rows]
    dtaps = mx.stack([(flat[:, off:off + rows].swapaxes(1, 2) @ dy_out).sum(0) for off in offsets])
    return dx.reshape(x.shape), dtaps


def shift_conv(x: mx.array, weight: mx.array, dilation: int = 1) -> mx.array:
    """Valid stride-1 conv by ``shift_matmuls``; outputs that wrap around the
    right edge are computed and left out of the returned strided view."""
    n, p, q, c = x.shape
    o, kh, kw, _ = weight.shape
    h, w = p - dilation * (kh - 1), q - dilation * (kw - 1)
    offsets, stream = tap_offsets(q, kh, kw, dilation), current_stream()

    @mx.custom_function
    def conv(x, taps):
        return mx.as_strided(shift_matmuls(x, taps, offsets), (n, h, w, o), (p * q * o, q * o, o, 1))

    @conv.vjp
    def conv_vjp(primals, cotangent, output):
        with mx.stream(stream):
            dy = mx.pad(cotangent, [(0, 0), (p - h, p - h + 1), (q - w, 0), (0, 0)])  # onto the input grid
            return shift_grads(*primals, dy.reshape(n, -1, o), offsets)

    return conv(x, weight.transpose(1, 2, 3, 0).reshape(kh * kw, c, o))


def subpixel_kernel(weight: mx.array) -> mx.array:
    """[O, 4, 4, I] -> [4 O, 2, 2, I], output phase (p, q) at rows (2p + q) O:
    uncropped output row 2r + p takes input rows r - 1 + t through the
    transposed conv's taps p + 2 - 2t."""
    o, _, _, i = weight.shape
    taps = weight.reshape(o, 2, 2, 2, 2, i)[:, ::-1, :, ::-1]  # (O, t, p, t', q, I)
    return taps.transpose(2, 4, 0, 1, 3, 5).reshape(4 * o, 2, 2, i)


def subpixel_conv(x: mx.array, weight: mx.array) -> mx.array:
    """The cropped kernel-4 stride-2 transposed conv of x [N, H, W, I] as a
    stride-1 conv to the four output phases, returned as a view
    [N, H, 2, W, 2, O] of (row, row phase, column, column phase): cropped
    row 2i + a is phase 1 - a of conv row i + a."""
    n, h, w, _ = x.shape
    o, q = weight.shape[0], w + 2
    offsets, stream = tap_offsets(q, 2, 2), current_stream()

    @mx.custom_function
    def conv(x, taps):
        y = shift_matmuls(x, taps, offsets)  # channels (p, q, O)
        image, row, pixel = (h + 2) * q * 4 * o, q * 4 * o, 4 * o
        return mx.as_strided(y, (n, h, 2, w, 2, o), (image, row, row - 2 * o, pixel, 3 * o, 1), 3 * o)

    @conv.vjp
    def conv_vjp(primals, cotangent, output):
        # each phase back on the conv's grid, with one row of margin each
        # side: phase p of cropped row 2i + 1 - p sits at grid row i + 2 - p
        with mx.stream(stream):
            grid = mx.zeros((n, h + 4, q, 2, 2, o), dtype=cotangent.dtype)
            for p in (0, 1):
                for p2 in (0, 1):
                    grid[:, 2 - p:2 - p + h, 2 - p2:2 - p2 + w, p, p2] = cotangent[:, :, 1 - p, :, 1 - p2]
            return shift_grads(*primals, grid.reshape(n, -1, 4 * o), offsets)

    k = subpixel_kernel(weight)
    return conv(mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)]), k.transpose(1, 2, 3, 0).reshape(4, -1, 4 * o))


def narrow_conv(x: mx.array, weight: mx.array) -> mx.array:
    """Stride-1 conv to fewer channels than it reads (the output conv): every
    pixel times all taps in one matmul, the products then summed along the
    taps, which reads x once rather than once per tap."""
    o, kh, kw, c = weight.shape
    n, hx, wx, _ = x.shape
    h, w, stream = hx - kh + 1, wx - kw + 1, current_stream()

    @mx.custom_function
    def tap_sum(z):
        # taps flipped: out[i, j] = sum over (u, v) of z[i + kh-1-u, j + kw-1-v, u, v]
        return sum(z[:, kh - 1 - u:kh - 1 - u + h, kw - 1 - v:kw - 1 - v + w, u, v]
                   for u in range(kh) for v in range(kw))

    @tap_sum.vjp
    def tap_sum_vjp(z, cotangent, output):
        # z's gradient at (i', j', u, v) is the cotangent at (i' + u, j' + v)
        # of its zero-padded copy: one strided view of it, copied once
        with mx.stream(stream):
            dy = mx.pad(cotangent, [(0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0)])
            row = dy.shape[2] * o
            return mx.contiguous(mx.as_strided(dy, z.shape, (dy.shape[1] * row, row, o, row, o, 1)))

    products = x @ weight[:, ::-1, ::-1].transpose(3, 1, 2, 0).reshape(c, kh * kw * o)
    return tap_sum(products.reshape(n, hx, wx, kh, kw, o))


def norm_act(parts: list[mx.array], conv_bias: mx.array, norm: nn.BatchNorm, act: str) -> list[mx.array]:
    """``activate(norm(x + conv_bias), act)`` of the batch parts of a conv
    output (views from ``shift_conv`` or ``subpixel_conv``), contiguous. In
    training the conv bias only shifts the statistics it is normalized
    away by: it moves the running mean alone (its gradient, exactly zero,
    is left out)."""
    if not norm.training:
        scale = norm.weight * mx.rsqrt(norm.running_var + norm.eps)
        shift = norm.bias + (conv_bias - norm.running_mean) * scale
        return per_part(lambda x: activate(x * scale + shift, act), parts)
    ys, mean, var = batch_norm_act(parts, norm.weight, norm.bias, norm.eps, act)
    count = sum(x.size for x in parts) // parts[0].shape[-1]
    mu = norm.momentum
    norm.running_mean = (1 - mu) * norm.running_mean + mu * (mean + conv_bias)
    norm.running_var = (1 - mu) * norm.running_var + mu * var * (count / (count - 1))
    return ys


def batch_norm_act(parts: list[mx.array], weight: mx.array, bias: mx.array, eps: float, act: str):
    """Training BatchNorm (statistics over all parts) and activation with a
    hand-written gradient: two full-size buffers forward (the centred input,
    kept for the gradient, and the output) and two backward, where autodiff
    of the composed ops makes several more. Returns (outputs, mean, var)."""
    k, count = len(parts), sum(x.size for x in parts) // parts[0].shape[-1]
    slope = 0.0 if act == "relu" else LEAKY_SLOPE

    @mx.custom_function
    def f(weight, bias, *parts):
        # subpixel_conv's phase view is copied once: summed in place it is 100x slower
        parts = per_part(lambda x: mx.contiguous(x) if x.ndim > 4 else x, parts)
        mean = sum(per_part(channel_sum, parts)) / count
        centred = per_part(lambda x: x - mean, parts)
        var = sum(per_part(lambda c: channel_dot(c, c), centred)) / count
        scale = weight * mx.rsqrt(var + eps)
        return (*per_part(lambda c: activate(c * scale + bias, act), centred), mean, var, *centred)

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        outs, var, centred = outputs[:k], outputs[k + 1], outputs[k + 2:]
        rstd = mx.rsqrt(var + eps)
        gs = per_part(lambda y, dy: mx.where(y > 0, dy, slope * dy), outs, cotangents[:k])
        g_sum = sum(per_part(channel_sum, gs))
        gx_sum = sum(per_part(channel_dot, gs, centred)) * rstd
        scale, mean_g, mean_gx = primals[0] * rstd, g_sum / count, gx_sum * rstd / count
        return (gx_sum, g_sum, *per_part(lambda g, c: scale * (g - mean_g - c * mean_gx), gs, centred))

    out = f(weight, bias, *parts)
    return list(out[:k]), out[k], out[k + 1]


def channel_sum(x: mx.array) -> mx.array:
    """Sum over all axes but the last."""
    return x.sum(tuple(range(x.ndim - 1)))


def channel_dot(a: mx.array, b: mx.array) -> mx.array:
    """Per-channel sum of a * b over all other axes (both contiguous); for
    few channels a matmul's diagonal, which needs no full-size temporary."""
    c = a.shape[-1]
    a, b = a.reshape(-1, c), b.reshape(-1, c)
    return mx.diagonal(a.T @ b) if c <= 64 else (a * b).sum(0)


def activate(x: mx.array, kind: str) -> mx.array:
    if kind == "relu":
        return nn.relu(x)
    if kind == "leaky":
        return nn.leaky_relu(x, LEAKY_SLOPE)
    if kind == "sigmoid":
        return mx.sigmoid(x)
    return x


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig | None = None):
        super().__init__()
        cfg = cfg or UNetConfig()
        self.config = cfg
        nf = cfg.nf
        enc = [(cfg.in_channels, nf, 2, 1), (nf, 2 * nf, 2, 1), (2 * nf, 4 * nf, 2, 1),
               (4 * nf, 4 * nf, 2, 1), (4 * nf, 4 * nf, 2, 1), (4 * nf, 4 * nf, 1, 2), (4 * nf, 4 * nf, 1, 2)]
        self.encoder = [
            ConvBlock(i, o, s, d, norm=k > 0, act="relu" if k == 0 else "leaky", cfg=cfg)
            for k, (i, o, s, d) in enumerate(enc)
        ]
        dec = [(8 * nf, 4 * nf), (8 * nf, 4 * nf), (8 * nf, 2 * nf), (4 * nf, nf), (2 * nf, nf)]
        self.decoder = [UpBlock(i, o, cfg) for i, o in dec]
        self.out_conv = ConvBlock(nf, cfg.out_channels, norm=False, act="sigmoid", cfg=cfg)

    def __call__(self, x: mx.array) -> mx.array:
        """x ``[N, H, W, in_channels]`` -> RGBA ``[N, H, W, out_channels]`` in (0, 1)."""
        if x.shape[1] % DOWNSAMPLE or x.shape[2] % DOWNSAMPLE:
            raise ValueError(f"UNet: height and width must be multiples of {DOWNSAMPLE}, got {x.shape[1:3]}")
        xs, skips = batch_parts(x), []
        for k, block in enumerate(self.encoder):
            xs = block(xs)
            if k < 5:
                skips.append(xs)
        for block in self.decoder:
            xs = block(per_part(lambda a, b: mx.concatenate([a, b], axis=-1), xs, skips.pop()))
        ys = self.out_conv(xs)
        return ys[0] if len(ys) == 1 else mx.concatenate(ys, axis=0)


def init_weights(model: UNet, seed: int = 0, norm_identity: bool = False) -> UNet:
    """The reference initialization: every trainable parameter normal(0,
    0.01); BatchNorm's running statistics keep their 0 / 1. ``norm_identity``:
    BatchNorm scale 1 and shift 0 instead (torch's default), which trains far
    faster in short runs: with scales of 0.01 the gradient reaching the first
    blocks is scaled by 0.01 per block."""
    key = mx.random.key(seed)
    params = tree_flatten(model.trainable_parameters())
    keys = mx.random.split(key, len(params))
    new = []
    for (name, p), k in zip(params, keys):
        if norm_identity and ".norm." in name:
            new.append((name, mx.ones(p.shape) if name.endswith("weight") else mx.zeros(p.shape)))
        else:
            new.append((name, INIT_STD * mx.random.normal(p.shape, key=k)))
    model.update(tree_unflatten(new))
    return model
