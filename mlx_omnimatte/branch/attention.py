"""Masked self-attention over the 2N branch tokens, without a (2N)^2 mask.

The sequence is [inpaint tokens (N) | matting tokens (N)]; rows are queries.

* A: full attention over all 2N tokens.
* B: inpaint queries see only inpaint keys; matting queries see all keys.
  = SDPA(q_inp, k_inp, v_inp) and SDPA(q_mat, k_all, v_all).
* C: block diagonal: each half sees only itself. Two independent SDPAs on
  the slices (default), or one SDPA on the halves stacked on the batch axis
  (``c_as_batch=True``: one launch, but a copy of q, k and v).

Each piece is an unmasked SDPA on key/value slices, so B costs 3/4 and C 1/2
of A's work, and the fused GPU kernel applies everywhere. An array mask in
MLX's SDPA skips no work and materializes the whole score matrix: never
used here. Queries are split into chunks sized by a memory budget
(`memory.attention_chunk`): needed on the CPU, where SDPA materializes the
scores of every chunk; on the GPU the fused kernel needs none and runs
unchunked unless a budget is given.
"""

from __future__ import annotations

import math

import mlx.core as mx

from ..errors import OmnimatteError
from ..memory import attention_chunk

MASK_TYPES = ("A", "B", "C")


def check_mask_type(mask_type) -> str:
    m = str(mask_type).upper()
    if m not in MASK_TYPES:
        raise OmnimatteError(f"attention mask type {mask_type!r}: unknown (one of A, B, C)")
    return m


def _eval_eager(x) -> None:
    """Evaluate a chunk now: left lazy, the scheduler computes every chunk's
    scores before any softmax (measured: 8.5 chunks' worth at peak instead of
    ~1.3). Inside mx.compile/vmap evaluation is not allowed: stay lazy there."""
    try:
        mx.eval(x)
    except ValueError as e:
        if "function transformations" not in str(e):
            raise


def sdpa(q, k, v, scale: float, budget_bytes: int | None = None):
    """Unmasked SDPA with the queries cut into budget-sized chunks.
    q [B, H, Lq, D], k/v [B, H, Lk, D]."""
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


def branch_attention(q, k, v, mask_type: str = "A", n: int | None = None, scale: float | None = None,
                     budget_bytes: int | None = None, c_as_batch: bool = False):
    """Attention of type A/B/C over [inpaint | matting] tokens.

    q, k, v: [B, H, 2N, D] after q/k norm and RoPE; ``n`` the length of the
    inpaint half (default: half the sequence). Returns [B, H, 2N, D].
    """
    mask_type = check_mask_type(mask_type)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    L = q.shape[2]
    n = L // 2 if n is None else n
    if mask_type == "A":
        return sdpa(q, k, v, scale, budget_bytes)
    if not 0 < n < L:
        raise ValueError(f"branch attention: split {n} outside the sequence of {L}")
    if mask_type == "B":
        inp = sdpa(q[:, :, :n], k[:, :, :n], v[:, :, :n], scale, budget_bytes)
        mat = sdpa(q[:, :, n:], k, v, scale, budget_bytes)
        return mx.concatenate([inp, mat], axis=2)
    # C
    if c_as_batch and 2 * n == L:
        b = q.shape[0]

        def halves(a):
            return mx.concatenate([a[:, :, :n], a[:, :, n:]], axis=0)

        out = sdpa(halves(q), halves(k), halves(v), scale, budget_bytes)
        return mx.concatenate([out[:b], out[b:]], axis=2)
    inp = sdpa(q[:, :, :n], k[:, :, :n], v[:, :, :n], scale, budget_bytes)
    mat = sdpa(q[:, :, n:], k[:, :, n:], v[:, :, n:], scale, budget_bytes)
    return mx.concatenate([inp, mat], axis=2)


def make_attn_fn(mask_type: str, n: int | None = None, budget_bytes: int | None = None):
    """``attn_fn(q, k, v) -> out`` for the DiT blocks' self-attention hook."""
    mask_type = check_mask_type(mask_type)

    def attn_fn(q, k, v):
        return branch_attention(q, k, v, mask_type, n, budget_bytes=budget_bytes)

    return attn_fn
