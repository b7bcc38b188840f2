"""The branch forward: one DiT pass over [inpaint tokens | replica tokens].

    tokens = [patchify(noisy bg | mask | cond) | patchify(noisy alpha | mask | cond)]

Both halves share the RoPE positions, the time modulation and the context
(text + image tokens); the replica half may get the expert's domain
embedding, and only the replica half gets the LoRA deltas (`ReplicaLoRALinear`)
on the expert's targeted linears of its blocks. Self-attention uses the
expert's mask type (A/B/C, see `attention.py`). The head runs on all 2N
tokens; the halves are unpatchified into (v_bg, v_alpha).

The LoRA wrappers are built once per (expert, model) and cached on the
expert; a forward only swaps them in and out (a few attribute sets), so
switching experts between steps costs nothing measurable.

The dual-expert sampling loop (both latents stepped together, the expert --
and with it LoRA and mask -- switched at tau) is the product's:
`pipelines.stages.sample_trajectory`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .attention import check_mask_type, make_attn_fn
from .experts import Expert
from .lora import ReplicaLoRALinear, merge_lora


def _parent(model, module: str):
    """'blocks.3.self_attn.q' -> (the block's self_attn module, 'q')."""
    _, i, attn, attr = module.split(".")
    return getattr(model.blocks[int(i)], attn), attr


def _wrappers(model, expert: Expert) -> list[tuple[nn.Module, str, ReplicaLoRALinear]]:
    """ReplicaLoRALinear per targeted linear, built once and cached on the
    expert (rebuilt if the model's linears were replaced since)."""
    cached = expert._cache.get(id(model))
    if cached is not None and all(getattr(p, a) is w.base or getattr(p, a) is w for p, a, w in cached):
        return cached
    out = []
    for module, lora in expert.lora.items():
        parent, attr = _parent(model, module)
        base = getattr(parent, attr)
        if isinstance(base, ReplicaLoRALinear):
            raise RuntimeError(f"{module} already carries a LoRA wrapper (nested expert application)")
        out.append((parent, attr, ReplicaLoRALinear(base, lora.a, lora.b, expert.scale, None, lora.bias)))
    expert._cache[id(model)] = out
    return out


@contextmanager
def expert_applied(model, expert: Optional[Expert]):
    """Within the block, the model's targeted linears carry the expert's
    replica-only LoRA; restored on exit."""
    if expert is None:
        yield model
        return
    wrappers = _wrappers(model, expert)
    for parent, attr, w in wrappers:
        setattr(parent, attr, w)
    try:
        yield model
    finally:
        for parent, attr, w in wrappers:
            setattr(parent, attr, w.base)


def merge_expert(model, expert: Expert):
    """Replace the targeted linears of ``model`` in place with ``W + scale*B@A``
    (a single-branch model with the LoRA merged: what the replica half alone
    computes under mask C). Returns the model."""
    for module, lora in expert.lora.items():
        parent, attr = _parent(model, module)
        setattr(parent, attr, merge_lora(getattr(parent, attr), lora.a, lora.b, expert.scale, lora.bias))
    return model


def check_experts(model, *experts: Optional[Expert]) -> None:
    cfg = model.config
    for e in experts:
        if e is not None:
            e.check_model(cfg.dim, cfg.num_layers)


def batch_timesteps(t, batch: int) -> mx.array:
    t = t if isinstance(t, mx.array) else mx.array(t, dtype=mx.float32)
    t = t.reshape(-1).astype(mx.float32)
    return mx.broadcast_to(t, (batch,)) if t.shape[0] == 1 else t


def branch_forward(model, expert: Optional[Expert], x_bg, x_alpha, t, context=None, clip_fea=None,
                   mask_type: Optional[str] = None, *, cond=None, ctx=None,
                   budget_bytes: Optional[int] = None):
    """One DiT forward over both halves -> (v_bg, v_alpha), each [B, F, H, W, out_dim] float32.

    x_bg, x_alpha: the model inputs [B, F, H, W, in_dim] (noisy latent, then
      mask channels, then condition latent); or, with ``cond`` [B, F, H, W,
      in_dim - 16] given, the noisy latents alone (``cond`` is appended to both).
    t: [B] or scalar timesteps in [0, 1000].
    context, clip_fea: as for the plain model; or ``ctx`` from
      ``model.embed_context`` (computed once per run by the sampling loop).
    expert: LoRA, mask type and domain embedding of the replica half; None
      runs the base model on both halves. ``mask_type`` overrides the expert's.
    budget_bytes: memory for attention scores per call (see `memory.py`).
    """
    if cond is not None:
        x_bg = mx.concatenate([x_bg, cond.astype(x_bg.dtype)], axis=-1)
        x_alpha = mx.concatenate([x_alpha, cond.astype(x_alpha.dtype)], axis=-1)
    if x_bg.shape != x_alpha.shape:
        raise ValueError(f"branch inputs differ in shape: {x_bg.shape} vs {x_alpha.shape}")
    mask_type = check_mask_type(mask_type or (expert.mask_type if expert is not None else "A"))
    if expert is not None and expert.dim != model.config.dim:
        check_experts(model, expert)  # raises, naming the expert
    B = x_bg.shape[0]
    tokens, grid = model.patchify(mx.concatenate([x_bg, x_alpha], axis=0))
    n = tokens.shape[1]
    replica = tokens[B:]
    if expert is not None and expert.domain_embedding is not None:
        replica = replica + expert.domain_embedding.astype(replica.dtype)
    x = mx.concatenate([tokens[:B], replica], axis=1)  # [B, 2N, D]
    temb, e6 = model.embed_time(batch_timesteps(t, B))
    if ctx is None:
        if context is None:
            raise ValueError("branch_forward needs context (or a precomputed ctx)")
        ctx = model.embed_context(context, clip_fea)
    cos, sin = model.rope(grid)
    rope = (mx.concatenate([cos, cos], axis=0), mx.concatenate([sin, sin], axis=0))
    attn_fn = make_attn_fn(mask_type, n, budget_bytes)
    with expert_applied(model, expert):
        x = model.run_blocks(x, temb, e6, ctx, rope, attn_fn, tag=expert)
    y = model.head(x, temb)  # token-local: both halves at once
    v = model.unpatchify(mx.concatenate([y[:, :n], y[:, n:]], axis=0), grid)
    return v[:B], v[B:]
