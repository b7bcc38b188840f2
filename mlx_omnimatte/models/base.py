"""What every model config shares: built from a converted directory's
config.json, which also holds fields that are not the architecture's
(component, dtype, source); and what every network uses: the dtype names
and the query-chunked attention kernel."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, fields

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from ..memory import CPU_STREAMS, attention_chunk, blas_threads, streams


class BaseConfig:
    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


# weight / compute dtypes by their config and command-line names
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def _eval_eager(*xs) -> bool:
    """Evaluate now (whether it could): left lazy, the scheduler computes
    every chunk's scores before any softmax (measured: 8.5 chunks' worth at
    peak instead of ~1.3). Inside mx.compile/vmap/grad evaluation is not
    allowed: stay lazy there."""
    try:
        mx.eval(*xs)
        return True
    except ValueError as e:
        if "function transformations" not in str(e):
            raise
        return False


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
    groups = head_groups(h) if _eval_eager(q, k, v) else [slice(None)]
    outs = []
    with blas_threads(1) if len(groups) > 1 else nullcontext():
        for s in range(0, lq, chunk):
            outs.append(chunk_attention(q, k, v, scale, slice(s, s + chunk), groups))
            _eval_eager(outs[-1])
    return mx.concatenate(outs, axis=2)


def chunk_attention(q, k, v, scale: float, rows: slice, groups: list[slice]) -> mx.array:
    """The attention of query rows ``rows``, head group j on stream j."""
    out = [None] * len(groups)
    for j, (stream, g) in enumerate(zip(streams(len(groups)), groups)):
        with mx.stream(stream):
            out[j] = mx.fast.scaled_dot_product_attention(q[:, g, rows], k[:, g], v[:, g], scale=scale)
    return out[0] if len(out) == 1 else mx.concatenate(out, axis=1)


def head_groups(heads: int) -> list[slice]:
    """On the CPU, the heads split in CPU_STREAMS groups, one a stream
    (elsewhere one group, the fused or GPU kernel): MLX's CPU softmax
    runs on one core a stream, and its exp (~15 ns a score) is most of a long
    attention's time; two groups on two streams, one BLAS thread each, took a
    32,760-key chunk from 3.3 s to 1.8 s (the same per head, up to the BLAS's
    summation order)."""
    n = min(CPU_STREAMS, heads) if mx.default_device() == mx.cpu else 1
    bounds = [heads * j // n for j in range(n + 1)]
    return [slice(a, z) for a, z in zip(bounds, bounds[1:])]


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
