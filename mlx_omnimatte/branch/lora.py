"""LoRA applied to the replica (second) half of the token sequence only.

The frozen DiT weight runs on all 2N tokens; the low-rank delta
``scale * B @ A`` only on the last N, so the first half (the background
prediction) is exactly the base model's. The base may be an ``nn.Linear`` (any
float dtype) or an ``nn.QuantizedLinear`` (4/8 bit): it is only called.

LoRA tensors use the PEFT layout: A ``(rank, in)``, B ``(out, rank)``.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class ReplicaLoRALinear(nn.Module):
    """``base(x)`` on every token, plus ``scale * (x[n:] A^T) B^T (+ scale * bias)``
    on the tokens from ``n_split`` on (axis -2). ``n_split=None``: half the
    sequence (the two halves of the branch sequence always match)."""

    def __init__(self, base: nn.Module, A: mx.array, B: mx.array, scale: float = 1.0,
                 n_split: int | None = None, bias: mx.array | None = None):
        super().__init__()
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"LoRA shapes A {A.shape} and B {B.shape} do not chain")
        self.base = base
        self.lora_a = A
        self.lora_b = B
        if bias is not None:
            self.lora_bias = bias
        self.scale = float(scale)
        self.n_split = n_split

    def delta(self, x: mx.array) -> mx.array:
        """The low-rank term alone, for the tokens in ``x``."""
        d = (x @ self.lora_a.T) @ self.lora_b.T
        if "lora_bias" in self:
            d = d + self.lora_bias
        return d * self.scale if self.scale != 1.0 else d

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        L = x.shape[-2]
        n = L // 2 if self.n_split is None else self.n_split
        d = self.delta(x[..., n:, :]).astype(y.dtype)
        return mx.concatenate([y[..., :n, :], y[..., n:, :] + d], axis=-2)


def dense_weight(linear: nn.Module) -> mx.array:
    """The (out, in) float weight of an ``nn.Linear`` or ``nn.QuantizedLinear``."""
    if isinstance(linear, nn.QuantizedLinear):
        return mx.dequantize(linear["weight"], linear["scales"], linear.get("biases"),
                             group_size=linear.group_size, bits=linear.bits,
                             mode=getattr(linear, "mode", "affine"))
    return linear["weight"]


def merge_lora(base: nn.Module, A: mx.array, B: mx.array, scale: float = 1.0,
               bias: mx.array | None = None) -> nn.Module:
    """A new linear with ``W + scale * B @ A`` (for a run without the base
    half, e.g. a single-branch check). Quantized bases are dequantized,
    merged in float32 and re-quantized with the same bits and group size."""
    W = dense_weight(base)
    merged = (W.astype(mx.float32) + scale * (B.astype(mx.float32) @ A.astype(mx.float32)))
    out_dim, in_dim = merged.shape
    has_bias = "bias" in base or bias is not None
    lin = nn.Linear(in_dim, out_dim, bias=has_bias)
    lin.weight = merged.astype(W.dtype)
    if has_bias:
        b = base["bias"].astype(mx.float32) if "bias" in base else mx.zeros((out_dim,), mx.float32)
        if bias is not None:
            b = b + scale * bias.astype(mx.float32)
        lin.bias = b.astype(base["bias"].dtype if "bias" in base else W.dtype)
    if isinstance(base, nn.QuantizedLinear):
        return nn.QuantizedLinear.from_linear(lin, group_size=base.group_size, bits=base.bits,
                                              **({"mode": base.mode} if hasattr(base, "mode") else {}))
    return lin
