"""Attention types A/B/C on slices equal a dense-mask reference; chunking
changes nothing but memory, nor do the CPU's head-group streams."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_omnimatte.branch.attention import branch_attention, check_mask_type, make_attn_fn
from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.models import base
from mlx_omnimatte.models.base import head_groups, sdpa


def dense_mask(n: int, mask_type: str) -> np.ndarray:
    """Boolean (2N, 2N) mask, rows = queries (the test reference only)."""
    m = np.ones((2 * n, 2 * n), bool)
    if mask_type == "B":
        m[:n, n:] = False
    elif mask_type == "C":
        m[:n, n:] = False
        m[n:, :n] = False
    return m


def reference(q, k, v, mask):
    q, k, v = (np.array(a, np.float64) for a in (q, k, v))
    s = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def qkv(n=48, heads=3, d=32, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return [mx.array(rng.standard_normal((batch, heads, 2 * n, d)).astype(np.float32)) for _ in range(3)]


@pytest.mark.parametrize("mask_type", ["A", "B", "C"])
def test_matches_dense_mask(mask_type):
    q, k, v = qkv()
    ref = reference(q, k, v, dense_mask(48, mask_type))
    out = np.array(branch_attention(q, k, v, mask_type))
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    # the types really differ
    if mask_type != "A":
        assert np.abs(out - reference(q, k, v, dense_mask(48, "A"))).max() > 1e-2


@pytest.mark.parametrize("mask_type", ["A", "B", "C"])
def test_chunked_equals_unchunked(mask_type):
    q, k, v = qkv(n=100)
    full = np.array(branch_attention(q, k, v, mask_type, budget_bytes=1 << 40))
    # a budget of a few rows: many chunks, the last one ragged
    small = 7 * 2 * 3 * 200 * 8
    out = np.array(branch_attention(q, k, v, mask_type, budget_bytes=small))
    np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-6)


def test_c_batch_of_two_equals_two_calls():
    q, k, v = qkv(n=40)
    a = np.array(branch_attention(q, k, v, "C", c_as_batch=True))
    b = np.array(branch_attention(q, k, v, "C", c_as_batch=False))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_inpaint_half_blind_to_matting_tokens_under_b_and_c():
    q, k, v = qkv(n=16)
    k2 = mx.concatenate([k[:, :, :16], k[:, :, 16:] * 3 + 1], axis=2)
    v2 = mx.concatenate([v[:, :, :16], v[:, :, 16:] - 2], axis=2)
    for t in "BC":
        a = np.array(branch_attention(q, k, v, t))[:, :, :16]
        b = np.array(branch_attention(q, k2, v2, t))[:, :, :16]
        np.testing.assert_array_equal(a, b)


def test_make_attn_fn_and_bad_type():
    q, k, v = qkv(n=8)
    np.testing.assert_array_equal(np.array(make_attn_fn("b")(q, k, v)), np.array(branch_attention(q, k, v, "B")))
    assert check_mask_type("c") == "C"
    with pytest.raises(OmnimatteError, match="mask type 'D'"):
        make_attn_fn("D")


def test_chunking_bounds_memory():
    """A budget caps the peak on every device; on the CPU, where the SDPA
    fallback materializes the scores, unchunked attention holds them all."""
    q, k, v = qkv(n=1024, heads=4, d=64, batch=1)
    mx.eval(q, k, v)
    scores = 4 * 2048 * 2048 * 4  # one full score matrix, fp32
    peaks = {}
    for name, budget in (("full", 1 << 40), ("chunked", scores // 8)):
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(branch_attention(q, k, v, "A", budget_bytes=budget))
        peaks[name] = mx.get_peak_memory() - base
    assert peaks["chunked"] <= scores / 4  # every device
    if mx.default_device() == mx.cpu:  # a fused kernel elsewhere need not hold the scores
        assert peaks["full"] >= scores


def test_head_groups_split_the_heads_evenly_on_the_cpu_only():
    if mx.default_device() == mx.cpu:
        assert head_groups(12) == [slice(0, 6), slice(6, 12)]
        assert head_groups(5) == [slice(0, 2), slice(2, 5)]
    else:
        assert head_groups(12) == [slice(0, 12)]
    assert head_groups(1) == [slice(0, 1)]


def test_chunked_attention_on_head_group_streams_equals_one_stream(monkeypatch):
    """The CPU runs each chunk's head groups on their own streams (one BLAS
    thread each): per head the same ops on the same rows, so the result is
    one stream's up to the BLAS's summation order, and the whole kernel's."""
    q, k, v = qkv(n=300, heads=4, d=32, batch=1)
    budget = 4 * 600 * 8 * 50  # 50 query rows a chunk, the last one ragged
    grouped = np.array(sdpa(q, k, v, budget_bytes=budget))
    monkeypatch.setattr(base, "CPU_STREAMS", 1)
    single = np.array(sdpa(q, k, v, budget_bytes=budget))
    np.testing.assert_allclose(grouped, single, rtol=1e-6, atol=1e-6)
    whole = np.array(mx.fast.scaled_dot_product_attention(q, k, v, scale=32 ** -0.5))
    np.testing.assert_allclose(grouped, whole, rtol=1e-5, atol=1e-6)
