"""CLIP vision tower (open-clip ViT-H/14, the image encoder of Wan2.1 I2V / Fun-InP).

Pre-LN ViT: patch conv (no bias) -> [class token; patches] + positions ->
LayerNorm -> blocks (LN -> fused-qkv attention -> residual, LN -> MLP with
exact GELU, or quick-GELU where the config says so -> residual). Wan uses the hidden states after the penultimate
block (`use_31_block=True`), before the final LayerNorm and projection, so
the last block is kept in the weights but not run by default.

Inputs are channels-last pixels already resized to `image_size` and
normalized with the CLIP mean/std (see `mlx_omnimatte.encoders.image.clip_preprocess`).
LayerNorms and the residual stream run in float32 (the reference computes its
LayerNorms in float32 too); matmuls in the weight dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from .base import BaseConfig

# The normalization of the reference transforms (OpenAI CLIP statistics).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Config(BaseConfig):
    image_size: int = 224
    patch_size: int = 14
    width: int = 1280
    layers: int = 32
    heads: int = 16
    mlp_dim: int = 5120
    eps: float = 1e-5
    # blocks run before the features are read: layers - 1 = the penultimate block
    feature_layers: int | None = None
    # MLP activation: "gelu" (exact, open-clip ViT-H/14 as Wan uses it) or
    # "quick_gelu" (x * sigmoid(1.702 x), OpenAI's CLIP towers)
    hidden_act: str = "gelu"

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"clip: hidden_act {self.hidden_act!r} is not supported ({', '.join(ACTIVATIONS)})")


    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.heads = cfg.heads
        self.scale = (cfg.width // cfg.heads) ** -0.5
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)  # rows: q, k, v (as open_clip's in_proj)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.heads, -1).transpose(2, 0, 3, 1, 4)
        out = mx.fast.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
        return self.proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))


def quick_gelu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.gelu, "quick_gelu": quick_gelu}  # gelu: exact (erf), Wan's 'gelu'


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def __call__(self, h: mx.array, dtype) -> mx.array:
        h = h + self.attn(_ln(h, self.norm1).astype(dtype)).astype(mx.float32)
        return h + self.mlp(_ln(h, self.norm2).astype(dtype)).astype(mx.float32)


def _ln(h: mx.array, norm: nn.LayerNorm) -> mx.array:
    return mx.fast.layer_norm(h, norm.weight.astype(mx.float32), norm.bias.astype(mx.float32), norm.eps)


class Model(nn.Module):
    """`model(pixels [B, H, W, 3] normalized) -> [B, tokens, width]` float32
    (hidden states after `feature_layers` blocks: [B, 257, 1280] for ViT-H/14)."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        c = config
        self.patch_embedding = nn.Conv2d(3, c.width, c.patch_size, stride=c.patch_size, bias=False)
        self.cls_embedding = mx.zeros((c.width,))
        self.pos_embedding = mx.zeros((c.num_tokens, c.width))
        self.pre_norm = nn.LayerNorm(c.width, eps=c.eps)
        self.blocks = [Block(c) for _ in range(c.layers)]

    def __call__(self, pixels: mx.array) -> mx.array:
        c = self.config
        if pixels.shape[1:] != (c.image_size, c.image_size, 3):
            raise ValueError(f"clip: expected pixels [B, {c.image_size}, {c.image_size}, 3], got {pixels.shape}")
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(pixels.astype(dtype)).astype(mx.float32)
        B = x.shape[0]
        x = x.reshape(B, -1, c.width)
        cls = mx.broadcast_to(self.cls_embedding.astype(mx.float32), (B, 1, c.width))
        h = mx.concatenate([cls, x], axis=1) + self.pos_embedding.astype(mx.float32)
        h = _ln(h, self.pre_norm)
        depth = c.layers - 1 if c.feature_layers is None else c.feature_layers
        for block in self.blocks[:depth]:
            h = block(h, dtype)
        return h
