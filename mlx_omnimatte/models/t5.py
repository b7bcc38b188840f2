"""UMT5 encoder (the text encoder of Wan2.1: umt5-xxl, encoder half only).

T5 conventions kept from the reference: RMS norm without mean or bias
(eps 1e-6), no bias anywhere, no 1/sqrt(d) attention scaling, a gated-GELU
(tanh approximation) feed-forward, and -- the UMT5 difference from T5 v1.1 --
a relative position bias table in *every* layer (bidirectional buckets).

Precision: the residual stream, norms and the position bias stay in float32;
matmuls run in the weight dtype (bfloat16 by default). T5 activations
overflow float16, so float16 weights are computed in bfloat16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_omnimatte.errors import OmnimatteError
from .base import BaseConfig, float32_scales, quantize_like


@dataclass
class Config(BaseConfig):
    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    # {"bits": 4|8, "group_size": 64} when the stored weights are quantized
    quantization: dict | None = None



@lru_cache(maxsize=8)
def relative_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """[L, L] bucket of (key - query) offsets, bidirectional, as T5 computes it:
    half the buckets per direction, exact below num_buckets/4, log-spaced up to
    max_distance. The float32 op order matches the reference so that offsets on a
    bucket boundary land in the same bucket."""
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        large = np.log(rel.astype(np.float32) / np.float32(max_exact))
    large = large / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = max_exact + np.nan_to_num(large, neginf=0).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        B, L, _ = x.shape
        q, k, v = (p(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3) for p in (self.q, self.k, self.v))
        # T5 folds any scaling into the weights: scale 1
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=bias.astype(q.dtype))
        return self.o(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)  # HF wi_0, through GELU
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)  # HF wi_1, linear
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)  # HF wo

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.gelu_approx(self.gate(x)) * self.fc1(x))


class RelativeBias(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.embedding = nn.Embedding(cfg.num_buckets, cfg.num_heads)

    def __call__(self, buckets: mx.array) -> mx.array:
        return self.embedding.weight[buckets].astype(mx.float32).transpose(2, 0, 1)[None]  # [1, H, L, L]


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=cfg.eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=cfg.eps)
        self.ffn = FeedForward(cfg)
        self.pos_embedding = RelativeBias(cfg)

    def __call__(self, h: mx.array, buckets: mx.array, key_mask: mx.array, dtype) -> mx.array:
        bias = self.pos_embedding(buckets) + key_mask  # UMT5: each layer its own table
        h = h + self.attn(_norm(h, self.norm1, dtype), bias).astype(mx.float32)
        return h + self.ffn(_norm(h, self.norm2, dtype)).astype(mx.float32)


def _norm(h: mx.array, norm: nn.RMSNorm, dtype) -> mx.array:
    """RMS norm of the float32 stream, then cast to the matmul dtype (as T5LayerNorm)."""
    return mx.fast.rms_norm(h, norm.weight.astype(mx.float32), norm.eps).astype(dtype)


class Model(nn.Module):
    """`model(input_ids [B, L], attention_mask [B, L]) -> [B, L, d_model]` float32."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = [Block(config) for _ in range(config.num_layers)]
        self.norm = nn.RMSNorm(config.d_model, eps=config.eps)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        x = self.token_embedding(input_ids)
        dtype = mx.bfloat16 if x.dtype == mx.float16 else x.dtype
        h = x.astype(mx.float32)
        if attention_mask is None:
            key_mask = mx.zeros((1, 1, 1, input_ids.shape[1]), mx.float32)
        else:
            # padded keys get a large negative bias (finite: a fully padded row stays NaN-free)
            key_mask = mx.where(attention_mask.astype(mx.bool_), 0.0, -1e9)[:, None, None, :].astype(mx.float32)
        c = self.config
        buckets = mx.array(relative_buckets(input_ids.shape[1], c.num_buckets, c.max_distance))
        for block in self.blocks:
            h = block(h, buckets, key_mask, dtype)
        return mx.fast.rms_norm(h, self.norm.weight.astype(mx.float32), self.config.eps)


# --------------------------------------------------------------------------- quantization


def quantizable(path: str, module: nn.Module, group_size: int = 64) -> bool:
    """Linear layers and the token table whose rows split into whole groups; the
    tiny position-bias tables stay as they are."""
    if not (isinstance(module, nn.Linear) or path == "token_embedding") or not hasattr(module, "weight"):
        return False
    return module.weight.shape[-1] % group_size == 0


def quantize(model: Model, bits: int, group_size: int = 64) -> Model:
    if bits not in (4, 8):
        raise OmnimatteError(f"quantize: {bits} bits is not supported (4 or 8)")
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=lambda p, m: quantizable(p, m, group_size))
    model.config.quantization = {"bits": bits, "group_size": group_size}
    return model


def load(path, config: dict, weights: dict, quantize_bits: int | None = None) -> Model:
    """Build from a converted directory's config and weights: honours stored
    quantization (config["quantization"]) or quantizes unquantized weights on
    load. float16 weights run in bfloat16 (T5 activations overflow float16)."""
    cfg = Config.from_dict(config)
    model = Model(cfg)
    quantize_like(model, config, weights)
    weights = {k: v.astype(mx.bfloat16) if v.dtype == mx.float16 else v for k, v in weights.items()}
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise OmnimatteError(f"{path}: weights do not fit the model ({e})") from None
    if quantize_bits and not cfg.quantization:
        quantize(model, quantize_bits)
    elif quantize_bits and cfg.quantization["bits"] != quantize_bits:
        raise OmnimatteError(f"{path}: stored with {cfg.quantization['bits']}-bit weights; "
                             f"cannot requantize to {quantize_bits} bits")
    if model.config.quantization:
        float32_scales(model)
    model.eval()
    return model
