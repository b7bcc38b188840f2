"""ReplicaLoRALinear: base on all tokens, delta on the replica half only;
merging into the weights equals the runtime delta."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_omnimatte.branch.lora import ReplicaLoRALinear, dense_weight, merge_lora

D_IN, D_OUT, R, N = 64, 96, 8, 5


def _parts(seed=0, dtype=mx.float32):
    rng = np.random.default_rng(seed)
    base = nn.Linear(D_IN, D_OUT)
    base.update({"weight": mx.array(rng.standard_normal((D_OUT, D_IN)).astype(np.float32) / 8),
                 "bias": mx.array(rng.standard_normal(D_OUT).astype(np.float32))})
    base.set_dtype(dtype)
    A = mx.array(rng.standard_normal((R, D_IN)).astype(np.float32) / 8).astype(dtype)
    B = mx.array(rng.standard_normal((D_OUT, R)).astype(np.float32) / 3).astype(dtype)
    x = mx.array(rng.standard_normal((2, 2 * N, D_IN)).astype(np.float32)).astype(dtype)
    return base, A, B, x


def _np(a):
    return np.array(a.astype(mx.float32))


def test_delta_only_on_replica_half_fp32():
    base, A, B, x = _parts()
    lin = ReplicaLoRALinear(base, A, B, scale=0.5)
    y, y0 = _np(lin(x)), _np(base(x))
    np.testing.assert_array_equal(y[:, :N], y0[:, :N])  # inpaint half untouched, bit for bit
    delta = 0.5 * _np(x)[:, N:] @ _np(A).T @ _np(B).T
    np.testing.assert_allclose(y[:, N:], y0[:, N:] + delta, rtol=1e-5, atol=1e-5)
    assert np.abs(delta).max() > 0.1
    # an explicit split point
    lin3 = ReplicaLoRALinear(base, A, B, scale=0.5, n_split=3)
    np.testing.assert_array_equal(_np(lin3(x))[:, :3], y0[:, :3])
    np.testing.assert_allclose(_np(lin3(x))[:, 3:] - y0[:, 3:], 0.5 * _np(x)[:, 3:] @ _np(A).T @ _np(B).T,
                               rtol=1e-5, atol=1e-5)


def test_bf16_base():
    base, A, B, x = _parts(dtype=mx.bfloat16)
    lin = ReplicaLoRALinear(base, A, B, scale=1.0)
    y = lin(x)
    assert y.dtype == mx.bfloat16
    y0 = _np(base(x))
    np.testing.assert_array_equal(_np(y)[:, :N], y0[:, :N])
    delta = _np(x)[:, N:] @ _np(A).T @ _np(B).T
    err = np.abs(_np(y)[:, N:] - (y0[:, N:] + delta)).max()
    assert err < 0.02 * np.abs(y0).max()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_and_merge(bits):
    base, A, B, x = _parts(seed=bits)
    q = nn.QuantizedLinear.from_linear(base, group_size=32, bits=bits)
    lin = ReplicaLoRALinear(q, A, B, scale=2.0)
    y, yq = _np(lin(x)), _np(q(x))
    np.testing.assert_array_equal(y[:, :N], yq[:, :N])
    delta = 2.0 * _np(x)[:, N:] @ _np(A).T @ _np(B).T
    np.testing.assert_allclose(y[:, N:], yq[:, N:] + delta, rtol=1e-4, atol=1e-4)
    # merged: W_deq + 2 B A, re-quantized with the same bits -> close to the runtime delta
    merged = merge_lora(q, A, B, 2.0)
    assert isinstance(merged, nn.QuantizedLinear) and merged.bits == bits and merged.group_size == 32
    w_exact = _np(dense_weight(q)) + 2.0 * _np(B) @ _np(A)
    quant_step = 2 * np.abs(w_exact).max() / (2 ** bits - 1)  # widest group range / levels
    assert np.abs(_np(dense_weight(merged)) - w_exact).max() <= quant_step
    ym = _np(merged(x))[:, N:]
    assert np.abs(ym - y[:, N:]).max() < (0.2 if bits == 4 else 0.02) * np.abs(y).max()


def test_merge_equals_runtime_on_replica():
    base, A, B, x = _parts(seed=5)
    bias = mx.array(np.linspace(-1, 1, D_OUT).astype(np.float32))
    lin = ReplicaLoRALinear(base, A, B, scale=0.75, bias=bias)
    merged = merge_lora(base, A, B, 0.75, bias)
    assert isinstance(merged, nn.Linear)
    np.testing.assert_allclose(_np(merged(x[:, N:])), _np(lin(x))[:, N:], rtol=1e-5, atol=1e-5)
    # no LoRA bias: base bias kept
    np.testing.assert_allclose(_np(merge_lora(base, A, B, 0.75)(x[:, N:])),
                               _np(ReplicaLoRALinear(base, A, B, 0.75)(x))[:, N:], rtol=1e-5, atol=1e-5)


def test_bad_shapes():
    base, A, B, _ = _parts()
    with pytest.raises(ValueError, match="do not chain"):
        ReplicaLoRALinear(base, A, B[:, :3])
