"""The Wan2.1 diffusion transformer (T2V, and I2V / Fun-InP with the CLIP image
branch; with `cross_attn=False`, MiniMax-Remover's: no text embedder, no
cross-attention, no image branch) in MLX, channels-last.

    model(x, t, context, clip_fea=None, attn_fn=None) -> v
      x        [B, F, H, W, in_dim]   noise latent (+ mask + condition latent for InP)
      t        [B] (or a scalar)      timesteps in [0, 1000]
      context  [B, L, text_dim]       text embeddings, L <= text_len (512); shorter
                                      contexts are zero-padded to text_len here, as the
                                      reference does (pad tokens are embedded and attended);
                                      None without cross-attention
      clip_fea [B, 257, image_dim]    CLIP features (image models only, required there)
      v        [B, F, H, W, out_dim]  float32

`__call__` is the composition of small pieces, so the branch machinery can run
the blocks over 2N tokens itself:

    tokens, grid = model.patchify(x)            # [B, N, D] float32, (f, h, w)
    temb, e6 = model.embed_time(t)              # [B, D], [B, 6, D] float32
    ctx = model.embed_context(context, clip_fea)  # [B, (257 +) text_len, D], weight dtype
    rope = model.rope(grid)                     # (cos, sin), each [N, head_dim // 2] float32;
                                                # concatenate along axis 0 for 2N tokens
    for block in model.blocks:
        tokens = block(tokens, e6, ctx, rope, attn_fn=None)
    v = model.unpatchify(model.head(tokens, temb), grid)

`attn_fn(q, k, v) -> out` replaces the self-attention kernel: q, k, v are
[B, heads, L, head_dim] after q/k RMSNorm and RoPE, `out` has q's shape; the
default is full `mx.fast.scaled_dot_product_attention`. The projections
`self_attn.{q,k,v,o}` and `cross_attn.{q,k,v,o}` are plain attributes called as
`self.q(x)`, so a wrapper module (LoRA on the replica half) can replace them.

Precision: the residual stream, the modulation (time embedding, tables, the
LayerNorm + scale/shift) and RoPE run in float32; linears and attention run in
the dtype of the weights (float32, bfloat16 or float16; quantized linears use
their scales' dtype).

Parameter names are the original Wan names (also VideoX-Fun, DiffSynth,
Casper), so converted checkpoints load without renaming:

    patch_embedding.{weight (D, pt, ph, pw, in_dim) MLX conv layout, bias}
    text_embedding.{0,2}.*        Linear(text_dim, D) -> GELU(tanh) -> Linear(D, D)
    time_embedding.{0,2}.*        Linear(freq_dim, D) -> SiLU -> Linear(D, D)
    time_projection.1.*           SiLU -> Linear(D, 6D)
    img_emb.proj.{0,1,3,4}.*      LayerNorm(1280) Linear GELU Linear LayerNorm(D)  (image models)
    blocks.N.modulation           (1, 6, D)
    blocks.N.self_attn.{q,k,v,o,norm_q,norm_k}.*
    blocks.N.cross_attn.{q,k,v,o,norm_q,norm_k}.*  (+ k_img, v_img, norm_k_img for image models)
    blocks.N.norm3.{weight,bias}  the cross-attention LayerNorm (affine)
    blocks.N.ffn.{0,2}.*          Linear(D, ffn) -> GELU(tanh) -> Linear(ffn, D)
    head.head.*, head.modulation  (1, 2, D)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from ..base import BaseConfig, sdpa


@dataclass
class Config(BaseConfig):
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6
    patch_size: tuple = (1, 2, 2)
    image_dim: int | None = None  # 1280 for I2V / Fun-InP (CLIP ViT-H/14 width)
    text_len: int = 512
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0
    rope_max_seq_len: int = 1024
    image_eps: float = 1e-5  # img_emb LayerNorms use torch's default eps
    cross_attn: bool = True  # False: no text embedder and no cross-attention (MiniMax-Remover)

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of num_heads {self.num_heads}")
        if not self.cross_attn and self.image_dim is not None:
            raise ValueError("an image branch needs cross-attention")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads



_1_3B = Config(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
_14B = Config(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
PRESETS = {
    "t2v-1.3b": _1_3B,
    "fun-inp-1.3b": replace(_1_3B, in_dim=36, image_dim=1280),  # Casper's base
    "t2v-14b": _14B,
    "i2v-14b": replace(_14B, in_dim=36, image_dim=1280),  # also Fun-14B-InP
}


def compute_dtype(linear) -> mx.Dtype:
    """The dtype a linear computes in (quantized linears: their scales')."""
    return getattr(linear, "scales", linear.weight).dtype


# --------------------------------------------------------------------------- elementwise kernels


@mx.compile
def _modulate(x, shift, scale, eps):
    # LayerNorm without affine, then adaLN scale/shift; all float32
    return mx.fast.layer_norm(x, None, None, eps) * (1 + scale) + shift


@mx.compile
def _gated_add(x, gate, y):
    return x + gate * y


@mx.compile
def apply_rope(x, cos, sin):
    """Rotate interleaved pairs (x[..., 0::2], x[..., 1::2]) in float32.
    x [B, H, L, d]; cos, sin [L, d // 2]."""
    xf = x.astype(mx.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = mx.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


@mx.compile
def gelu_tanh(x):
    # GELU's tanh approximation written as x * sigmoid(2z) (== 0.5x(1 + tanh z)):
    # the same function, one transcendental, no pow (both slow on MLX's CPU backend)
    return x * mx.sigmoid(1.5957691216057308 * (x + 0.044715 * (x * x * x)))


class GELUTanh(nn.Module):
    def __call__(self, x):
        return gelu_tanh(x)


def timestep_embedding(t: mx.array, dim: int) -> mx.array:
    """Sinusoid of t: cos half first, then sin; frequencies 10000^(-i/(dim/2))."""
    half = dim // 2
    freqs = mx.array(np.exp(-math.log(10000.0) * np.arange(half, dtype=np.float32) / half))
    args = t.astype(mx.float32)[:, None] * freqs[None]
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


@lru_cache(maxsize=32)
def rope_tables(grid: tuple, head_dim: int, theta: float = 10000.0, max_len: int = 1024):
    """(cos, sin), each [f*h*w, head_dim // 2] float32, for tokens in (f, h, w)
    raster order. The head dim splits into t = d - 4*(d//6), h = w = 2*(d//6)
    channels, each axis with its own 1D table theta^(-2i/axis_dim)."""
    f, h, w = grid
    if max(grid) > max_len:
        raise ValueError(f"latent grid {grid} exceeds the RoPE table length {max_len}")
    hw = 2 * (head_dim // 6)
    angles = []
    for n, d, axis in ((f, head_dim - 2 * hw, 0), (h, hw, 1), (w, hw, 2)):
        inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
        a = np.arange(n, dtype=np.float64)[:, None] * inv[None]  # [n, d/2]
        shape = [1, 1, 1, d // 2]
        shape[axis] = n
        angles.append(np.broadcast_to(a.reshape(shape), (f, h, w, d // 2)))
    a = np.concatenate(angles, axis=-1).reshape(f * h * w, head_dim // 2)
    return mx.array(np.cos(a).astype(np.float32)), mx.array(np.sin(a).astype(np.float32))


# --------------------------------------------------------------------------- modules


class PatchEmbedding(nn.Module):
    """Conv3d with kernel = stride = patch, as one matmul over patches.
    Weight in MLX conv layout (D, pt, ph, pw, in_dim)."""

    torch_conv_layout = True  # the converter moves torch's (O, I, *k) to (O, *k, I)

    def __init__(self, in_dim: int, dim: int, patch: tuple):
        super().__init__()
        scale = 1 / math.sqrt(in_dim * math.prod(patch))
        self.weight = mx.random.uniform(-scale, scale, (dim, *patch, in_dim))
        self.bias = mx.zeros((dim,))

    def __call__(self, x):
        B, F, H, W, C = x.shape
        D, pt, ph, pw, _ = self.weight.shape
        if F % pt or H % ph or W % pw:
            raise ValueError(f"latent size {(F, H, W)} is not a multiple of the patch {(pt, ph, pw)}")
        f, h, w = F // pt, H // ph, W // pw
        x = x.reshape(B, f, pt, h, ph, w, pw, C).transpose(0, 1, 3, 5, 2, 4, 6, 7)
        x = x.reshape(B, f * h * w, pt * ph * pw * C).astype(self.weight.dtype)
        return mx.addmm(self.bias, x, self.weight.reshape(D, -1).T), (f, h, w)


def _split_heads(x, heads):
    B, L, D = x.shape
    return x.reshape(B, L, heads, D // heads).transpose(0, 2, 1, 3)


def _merge_heads(x):
    B, H, L, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, L, H * d)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        # RMSNorm over the full width (across heads), before RoPE
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def __call__(self, x, rope, attn_fn=None):
        cos, sin = rope
        q = apply_rope(_split_heads(self.norm_q(self.q(x)), self.num_heads), cos, sin)
        k = apply_rope(_split_heads(self.norm_k(self.k(x)), self.num_heads), cos, sin)
        v = _split_heads(self.v(x), self.num_heads)
        out = (attn_fn or sdpa)(q, k, v)
        return self.o(_merge_heads(out))


class CrossAttention(nn.Module):
    """Attention from the video tokens to the text tokens; image models add a
    second attention over the image tokens (put before the text in ctx) with
    their own k/v, summed before the output projection."""

    def __init__(self, dim: int, num_heads: int, eps: float, image: bool, text_len: int):
        super().__init__()
        self.num_heads, self.text_len = num_heads, text_len
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        if image:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = nn.RMSNorm(dim, eps=eps)

    def __call__(self, x, ctx):
        n = self.num_heads
        q = _split_heads(self.norm_q(self.q(x)), n)
        n_img = ctx.shape[1] - self.text_len if "k_img" in self else 0
        txt = ctx[:, n_img:]
        out = sdpa(q, _split_heads(self.norm_k(self.k(txt)), n), _split_heads(self.v(txt), n))
        if n_img:
            img = ctx[:, :n_img]
            k = _split_heads(self.norm_k_img(self.k_img(img)), n)
            out = out + sdpa(q, k, _split_heads(self.v_img(img), n))
        return self.o(_merge_heads(out))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        D, self.eps = cfg.dim, cfg.eps
        self.modulation = mx.random.normal((1, 6, D)) / D**0.5
        self.self_attn = SelfAttention(D, cfg.num_heads, cfg.eps)
        if cfg.cross_attn:
            self.cross_attn = CrossAttention(D, cfg.num_heads, cfg.eps, cfg.image_dim is not None, cfg.text_len)
            if cfg.cross_attn_norm:
                self.norm3 = nn.LayerNorm(D, eps=cfg.eps)
        self.ffn = [nn.Linear(D, cfg.ffn_dim), GELUTanh(), nn.Linear(cfg.ffn_dim, D)]

    def __call__(self, x, e6, ctx, rope, attn_fn=None):
        """x [B, L, D] float32; e6 [B, 6, D] float32; ctx from `embed_context`;
        rope (cos, sin) [L, head_dim // 2]. Returns the new x (float32)."""
        dt = compute_dtype(self.ffn[0])
        mod = self.modulation.astype(mx.float32) + e6
        shift, scale, gate, c_shift, c_scale, c_gate = mx.split(mod, 6, axis=1)
        h = _modulate(x, shift, scale, self.eps).astype(dt)
        x = _gated_add(x, gate, self.self_attn(h, rope, attn_fn))
        if "cross_attn" in self:
            h = self.norm3(x) if "norm3" in self else x
            x = x + self.cross_attn(h.astype(dt), ctx)
        h = _modulate(x, c_shift, c_scale, self.eps).astype(dt)
        for layer in self.ffn:
            h = layer(h)
        return _gated_add(x, c_gate, h)


class Head(nn.Module):
    def __init__(self, dim: int, out: int, eps: float):
        super().__init__()
        self.eps = eps
        self.head = nn.Linear(dim, out)
        self.modulation = mx.random.normal((1, 2, dim)) / dim**0.5

    def __call__(self, x, temb):
        """x [B, N, D] float32, temb [B, D] -> [B, N, out * prod(patch)] float32.
        Modulated by temb itself (not by the 6-way projection)."""
        mod = self.modulation.astype(mx.float32) + temb[:, None]
        shift, scale = mod[:, 0:1], mod[:, 1:2]
        h = _modulate(x, shift, scale, self.eps).astype(compute_dtype(self.head))
        return self.head(h).astype(mx.float32)


class ImageEmbedding(nn.Module):
    def __init__(self, image_dim: int, dim: int, eps: float):
        super().__init__()
        self.proj = [
            nn.LayerNorm(image_dim, eps=eps),
            nn.Linear(image_dim, image_dim),
            nn.GELU(),  # exact (erf)
            nn.Linear(image_dim, dim),
            nn.LayerNorm(dim, eps=eps),
        ]

    def __call__(self, x):
        norm1, lin1, act, lin2, norm2 = self.proj
        dt = compute_dtype(lin1)
        h = norm1(x.astype(mx.float32)).astype(dt)
        h = lin2(act(lin1(h)))
        return norm2(h.astype(mx.float32))


class Model(nn.Module):
    step_cache = None  # a step cache's hook while one is attached (step_cache.py), else None

    def __init__(self, config: Config):
        super().__init__()
        cfg = self.config = config
        D = cfg.dim
        self.patch_embedding = PatchEmbedding(cfg.in_dim, D, cfg.patch_size)
        if cfg.cross_attn:
            self.text_embedding = [nn.Linear(cfg.text_dim, D), GELUTanh(), nn.Linear(D, D)]
        self.time_embedding = [nn.Linear(cfg.freq_dim, D), nn.SiLU(), nn.Linear(D, D)]
        self.time_projection = [nn.SiLU(), nn.Linear(D, 6 * D)]
        if cfg.image_dim is not None:
            self.img_emb = ImageEmbedding(cfg.image_dim, D, cfg.image_eps)
        self.blocks = [Block(cfg) for _ in range(cfg.num_layers)]
        self.head = Head(D, cfg.out_dim * math.prod(cfg.patch_size), cfg.eps)

    # -- pieces --------------------------------------------------------------

    def patchify(self, x):
        """x [B, F, H, W, in_dim] -> (tokens [B, N, D] float32, grid (f, h, w))."""
        if x.shape[-1] != self.config.in_dim:
            raise ValueError(f"expected {self.config.in_dim} input channels, got {x.shape[-1]}")
        tokens, grid = self.patch_embedding(x)
        return tokens.astype(mx.float32), grid

    def embed_time(self, t):
        """t [B] (or scalar) in [0, 1000] -> (temb [B, D], e6 [B, 6, D]), float32."""
        t = mx.array(t, dtype=mx.float32) if not isinstance(t, mx.array) else t
        t = t.reshape(-1)
        h = timestep_embedding(t, self.config.freq_dim)
        for layer in self.time_embedding:  # float32 input keeps these linears in float32
            h = layer(h)
        temb = h.astype(mx.float32)
        e = temb
        for layer in self.time_projection:
            e = layer(e)
        return temb, e.astype(mx.float32).reshape(t.shape[0], 6, self.config.dim)

    def embed_context(self, context, clip_fea=None):
        """context [B, L <= text_len, text_dim] (zero-padded to text_len here),
        clip_fea [B, 257, image_dim] for image models -> ctx [B, (257 +) text_len, D]
        in the weight dtype, image tokens first; None without cross-attention."""
        cfg = self.config
        if not cfg.cross_attn:
            return None
        B, L, _ = context.shape
        if L > cfg.text_len:
            raise ValueError(f"context has {L} tokens, more than text_len {cfg.text_len}")
        if L < cfg.text_len:
            context = mx.concatenate([context, mx.zeros((B, cfg.text_len - L, context.shape[-1]), context.dtype)], 1)
        lin1, act, lin2 = self.text_embedding
        ctx = lin2(act(lin1(context.astype(compute_dtype(lin1)))))
        if cfg.image_dim is None:
            return ctx
        if clip_fea is None:
            raise ValueError("this model has an image branch: clip_fea [B, 257, image_dim] is required")
        return mx.concatenate([self.img_emb(clip_fea).astype(ctx.dtype), ctx], axis=1)

    def rope(self, grid):
        """(cos, sin), each [f*h*w, head_dim // 2] float32."""
        cfg = self.config
        return rope_tables(tuple(grid), cfg.head_dim, cfg.rope_theta, cfg.rope_max_seq_len)

    def unpatchify(self, y, grid):
        """y [B, N, out * pt*ph*pw] (patch order pt, ph, pw, c) -> [B, F, H, W, out]."""
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        B = y.shape[0]
        y = y.reshape(B, f, h, w, pt, ph, pw, -1).transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return y.reshape(B, f * pt, h * ph, w * pw, -1)

    # -- forward -------------------------------------------------------------

    def __call__(self, x, t, context=None, clip_fea=None, attn_fn=None):
        """`attn_fn` (see the module docstring) replaces the self-attention
        kernel in every block, e.g. a query-chunked one on a memory budget."""
        return self.forward(x, t, self.embed_context(context, clip_fea), attn_fn)

    def forward(self, x, t, ctx, attn_fn=None):
        """The forward with the context already embedded (`embed_context`),
        for samplers that call the model many times with one prompt."""
        tokens, grid = self.patchify(x)
        temb, e6 = self.embed_time(t)  # a batch of 1 broadcasts over B
        tokens = self.run_blocks(tokens, temb, e6, ctx, self.rope(grid), attn_fn)
        return self.unpatchify(self.head(tokens, temb), grid)

    def run_blocks(self, tokens, temb, e6, ctx, rope, attn_fn=None, tag=None):
        """The block stack on tokens [B, L, D] float32. With a step cache
        attached (`step_cache.attached`), the cache decides: it runs the stack
        and keeps the residual, or adds the kept one; `tag` (the expert of a
        branch forward) keys what it keeps."""

        def stack(h):
            for block in self.blocks:
                h = block(h, e6, ctx, rope, attn_fn)
            return h

        cache = self.step_cache
        return stack(tokens) if cache is None else cache(tokens, temb, e6, stack, tag)
