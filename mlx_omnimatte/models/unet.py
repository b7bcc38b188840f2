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

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .base import BaseConfig

KERNEL = 4
LEAKY_SLOPE = 0.2
INIT_STD = 0.01
DOWNSAMPLE = 32  # 2 ** (number of stride-2 encoder blocks)


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
    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1, norm: bool = True,
                 act: str = "leaky", cfg: UNetConfig | None = None):
        super().__init__()
        cfg = cfg or UNetConfig()
        self.stride, self.dilation, self.act = stride, dilation, act
        self.conv = nn.Conv2d(cin, cout, KERNEL, stride=stride, dilation=dilation)
        if norm:
            self.norm = nn.BatchNorm(cout, eps=cfg.norm_eps, momentum=cfg.norm_momentum)

    def __call__(self, x: mx.array) -> mx.array:
        ph = same_padding(x.shape[1], self.stride, self.dilation)
        pw = same_padding(x.shape[2], self.stride, self.dilation)
        x = self.conv(mx.pad(x, [(0, 0), ph, pw, (0, 0)]))
        if "norm" in self:
            x = self.norm(x)
        return activate(x, self.act)


class UpBlock(nn.Module):
    """Transposed conv, kernel 4 stride 2, cropped to twice the input (torch's
    ``ConvTranspose2d(k=4, s=2)`` and a crop of 1 each side), BatchNorm, ReLU.

    ``weight`` is ``[O, 4, 4, I]`` with torch's tap order. Computed as one
    3x3 conv to the four output phases (sub-pixel form): even outputs take
    taps 3, 1 of inputs i-1, i; odd outputs taps 2, 0 of inputs i, i+1. MLX's
    CPU transposed conv is tens of times slower than this.
    """

    def __init__(self, cin: int, cout: int, cfg: UNetConfig):
        super().__init__()
        bound = 1.0 / (cin * KERNEL * KERNEL) ** 0.5
        self.weight = mx.random.uniform(-bound, bound, (cout, KERNEL, KERNEL, cin))
        self.bias = mx.zeros((cout,))
        self.norm = nn.BatchNorm(cout, eps=cfg.norm_eps, momentum=cfg.norm_momentum)

    def phase_kernel(self) -> mx.array:
        """[4 * O, 3, 3, I]: phase (a, b) at rows a * 2 + b of the output groups."""
        o, _, _, i = self.weight.shape
        zero = mx.zeros((o, i), dtype=self.weight.dtype)
        taps = {0: (3, 1, None), 1: (None, 2, 0)}  # phase -> tap used at offsets -1, 0, +1
        phases = []
        for a in (0, 1):
            for b in (0, 1):
                rows = []
                for ty in taps[a]:
                    rows.append(mx.stack([zero if ty is None or tx is None else self.weight[:, ty, tx]
                                          for tx in taps[b]], axis=1))
                phases.append(mx.stack(rows, axis=1))
        return mx.concatenate(phases, axis=0)

    def __call__(self, x: mx.array) -> mx.array:
        n, h, w, _ = x.shape
        o = self.weight.shape[0]
        y = mx.conv2d(x, self.phase_kernel(), padding=1)
        y = y.reshape(n, h, w, 2, 2, o).transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, o)
        return nn.relu(self.norm(y + self.bias))


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
        skips = []
        for k, block in enumerate(self.encoder):
            x = block(x)
            if k < 5:
                skips.append(x)
        for block in self.decoder:
            x = block(mx.concatenate([x, skips.pop()], axis=-1))
        return self.out_conv(x)


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
