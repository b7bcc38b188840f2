"""Training forwards of the replica half, with the LoRA as an explicit input.

The LoRA lives in a plain tree ``{"blocks.{i}.{target}": {"a": (rank, in),
"b": (out, rank)}}`` that `mx.value_and_grad` differentiates; the Expert that
inference loads is built from the same tree (`expert_from_lora`).

Two exact shortcuts of `branch.forward.branch_forward` for the loss, which
only reads the replica half's output:

* mask C: the replica half never sees the inpaint half, so the LoRA'd model
  runs on the replica tokens alone (N tokens instead of 2N, full attention
  among them): the same replica output for half the tokens.
* mask B: the inpaint half sees only itself and carries no LoRA, so it is the
  base model on the inpaint tokens alone; it runs once, outside the
  gradient, and hands each block's keys and values to the replica pass,
  whose queries attend to [inpaint keys | replica keys].

Blocks with LoRA run under `mx.checkpoint` (recomputed in the backward pass)
when ``checkpoint`` is on; blocks before the first LoRA block are constants
of the gradient and are never traced.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import mlx.core as mx
import numpy as np

from ..models.base import sdpa
from ..branch.experts import DEFAULT_MASK, DEFAULT_TARGETS, Expert, LoRA
from ..branch.forward import batch_timesteps
from ..branch.lora import ReplicaLoRALinear
from ..errors import OmnimatteError


def lora_blocks(kind: str, num_layers: int, k: int | None = None) -> list[int]:
    """Effect: the last K blocks (default: the last third); Quality: all."""
    if kind == "quality":
        return list(range(num_layers))
    k = max(1, num_layers // 3) if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise OmnimatteError(f"--k {k!r}: must be a positive number of blocks")
    if k > num_layers:
        raise OmnimatteError(f"--k {k}: larger than the transformer's {num_layers} blocks")
    return list(range(num_layers - k, num_layers))


def init_lora(dim: int, blocks, rank: int, seed: int = 0, targets=DEFAULT_TARGETS) -> dict:
    """PEFT's initialization: A uniform in +-1/sqrt(in) (Kaiming-uniform with
    a = sqrt(5)), B zero, so the untrained expert is the base model."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise OmnimatteError(f"--rank {rank!r}: must be a positive integer")
    rng = np.random.default_rng(seed)
    bound = 1.0 / math.sqrt(dim)
    tree = {}
    for i in blocks:
        for target in targets:
            a = rng.uniform(-bound, bound, (rank, dim)).astype(np.float32)
            tree[f"blocks.{i}.{target}"] = {"a": mx.array(a), "b": mx.zeros((dim, rank), mx.float32)}
    return tree


def expert_from_lora(lora: dict, kind: str, rank: int, alpha: float, dim: int, num_layers: int,
                     k: int | None = None, mask_type: str | None = None, tau: float = 0.5) -> Expert:
    pairs = {name: LoRA(p["a"], p["b"]) for name, p in lora.items()}
    return Expert(kind=kind, lora=pairs, rank=rank, alpha=float(alpha), dim=dim, num_layers=num_layers,
                  mask_type=mask_type or DEFAULT_MASK[kind], k=k if kind == "effect" else None,
                  tau_default=tau, source_format="mlx-omnimatte-train")


def by_block(lora: dict) -> dict[int, dict]:
    """{"blocks.3.self_attn.q": p} -> {3: {"self_attn.q": p}}."""
    out: dict[int, dict] = {}
    for name, p in lora.items():
        _, i, target = name.split(".", 2)
        out.setdefault(int(i), {})[target] = p
    return out


@contextmanager
def _wrapped(block, block_lora: dict, scale: float):
    """The block's targeted linears carry the LoRA on every token (the
    replica pass holds replica tokens only); restored on exit."""
    saved = []
    for target, p in block_lora.items():
        attn, attr = target.split(".")
        parent = getattr(block, attn)
        base = getattr(parent, attr)
        setattr(parent, attr, ReplicaLoRALinear(base, p["a"], p["b"], scale, n_split=0))
        saved.append((parent, attr, base))
    try:
        yield block
    finally:
        for parent, attr, base in saved:
            setattr(parent, attr, base)


def _attention(kv, budget_bytes):
    """Replica self-attention: among the replica tokens (mask C), or with the
    inpaint half's keys and values in front (mask B)."""

    def attn(q, k, v):
        if kv is not None:
            k = mx.concatenate([kv[0].astype(k.dtype), k], axis=2)
            v = mx.concatenate([kv[1].astype(v.dtype), v], axis=2)
        return sdpa(q, k, v, q.shape[-1] ** -0.5, budget_bytes)

    return attn


def _block_fn(block, scale: float, e6, ctx, rope, attn_fn):
    def run(block_lora, x):
        with _wrapped(block, block_lora, scale):
            return block(x, e6, ctx, rope, attn_fn)

    return run


def inpaint_pass(model, x_bg, t, cond, ctx, budget_bytes=None):
    """The base model on the inpaint tokens alone (what mask B gives that
    half): (v_bg [B, F, H, W, 16], per-block (k, v) after norm and RoPE).
    Outside any gradient: nothing here depends on the LoRA."""
    kvs = []

    def attn(q, k, v):
        kvs.append((k, v))
        return sdpa(q, k, v, q.shape[-1] ** -0.5, budget_bytes)

    x = mx.concatenate([x_bg, cond.astype(x_bg.dtype)], axis=-1)
    tokens, grid = model.patchify(x)
    temb, e6 = model.embed_time(batch_timesteps(t, x.shape[0]))
    rope = model.rope(grid)
    for block in model.blocks:
        tokens = block(tokens, e6, ctx, rope, attn)
    v = model.unpatchify(model.head(tokens, temb), grid)
    return mx.stop_gradient(v), [(mx.stop_gradient(k), mx.stop_gradient(v_)) for k, v_ in kvs]


def replica_pass(model, lora: dict, scale: float, x_alpha, t, cond, ctx, kvs=None,
                 checkpoint: bool = True, budget_bytes=None):
    """The replica half's velocity [B, F, H, W, 16] (float32) with the LoRA of
    ``lora`` on its blocks: mask C when ``kvs`` is None, else mask B with the
    inpaint keys/values of `inpaint_pass`."""
    x = mx.concatenate([x_alpha, cond.astype(x_alpha.dtype)], axis=-1)
    tokens, grid = model.patchify(x)
    temb, e6 = model.embed_time(batch_timesteps(t, x.shape[0]))
    rope = model.rope(grid)
    per_block = by_block(lora)
    for i, block in enumerate(model.blocks):
        attn = _attention(None if kvs is None else kvs[i], budget_bytes)
        if i not in per_block:
            tokens = block(tokens, e6, ctx, rope, attn)
            continue
        run = _block_fn(block, scale, e6, ctx, rope, attn)
        tokens = (mx.checkpoint(run) if checkpoint else run)(per_block[i], tokens)
    return model.unpatchify(model.head(tokens, temb), grid)

