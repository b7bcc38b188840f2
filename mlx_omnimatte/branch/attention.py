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
used here. Each piece is `models.base.sdpa`, query-chunked to a memory
budget where the kernel is not fused.
"""

from __future__ import annotations

import math

import mlx.core as mx

from ..errors import OmnimatteError
from ..models.base import sdpa

MASK_TYPES = ("A", "B", "C")


def check_mask_type(mask_type) -> str:
    m = str(mask_type).upper()
    if m not in MASK_TYPES:
        raise OmnimatteError(f"attention mask type {mask_type!r}: unknown (one of A, B, C)")
    return m


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
