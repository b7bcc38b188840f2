"""What every model config shares: built from a converted directory's
config.json, which also holds fields that are not the architecture's
(component, dtype, source); and what every network uses: the dtype names
and the query-chunked attention kernel."""

from __future__ import annotations

from dataclasses import asdict, fields

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from ..memory import attention_chunk


class BaseConfig:
    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


# weight / compute dtypes by their config and command-line names
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def _eval_eager(x) -> None:
    """Evaluate a chunk now: left lazy, the scheduler computes every chunk's
    scores before any softmax (measured: 8.5 chunks' worth at peak instead of
    ~1.3). Inside mx.compile/vmap evaluation is not allowed: stay lazy there."""
    try:
        mx.eval(x)
    except ValueError as e:
        if "function transformations" not in str(e):
            raise


def sdpa(q, k, v, scale: float | None = None, budget_bytes: int | None = None):
    """Unmasked scaled dot-product attention, q [B, H, Lq, D], k/v [B, H, Lk, D].

    Where SDPA is fused (Metal) the queries run at once unless a budget is
    given; elsewhere the kernel materializes the scores, so the queries are
    cut into chunks whose scores fit `budget_bytes` (`memory.attention_chunk`).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, h, lq, _ = q.shape
    chunk = attention_chunk(h, k.shape[2], lq, q.dtype, b, budget_bytes)
    if chunk >= lq:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    outs = []
    for s in range(0, lq, chunk):
        out = mx.fast.scaled_dot_product_attention(q[:, :, s:s + chunk], k, v, scale=scale)
        _eval_eager(out)
        outs.append(out)
    return mx.concatenate(outs, axis=2)


# --------------------------------------------------------------------------- quantized weights


def quantize_like(model: nn.Module, config: dict, weights: dict) -> None:
    """Turn the layers stored quantized (those with `.scales`) into quantized
    layers, with the bits and group size config.json records."""
    q = config.get("quantization")
    if not q:
        return
    nn.quantize(model, group_size=q["group_size"], bits=q["bits"],
                class_predicate=lambda p, m: f"{p}.scales" in weights)


def float32_scales(model: nn.Module) -> None:
    """MLX's CPU quantized matmul accumulates in the dtype of its scales
    (measured on the text encoder: 20% error at K = 10240 with bfloat16 scales;
    Metal accumulates in float32). On the CPU quantized layers get float32
    scales and biases, so they compute in float32 like the Metal kernels."""
    if mx.default_device().type != mx.DeviceType.cpu:
        return
    model.update(tree_map_with_path(
        lambda p, v: v.astype(mx.float32) if p.endswith((".scales", ".biases")) else v, model.parameters()))
