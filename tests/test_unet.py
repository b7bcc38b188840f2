import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_omnimatte.models.unet import UNet, UNetConfig, UpBlock, init_weights, same_padding


def test_same_padding_matches_the_reference_rule():
    assert same_padding(64, 2, 1) == (1, 1)  # kernel 4 stride 2
    assert same_padding(6, 1, 2) == (3, 3)  # dilation 2
    assert same_padding(64, 1, 1) == (1, 2)  # the odd pad goes right/bottom


def test_shapes_range_and_parameter_count():
    cfg = UNetConfig(nf=8)
    net = init_weights(UNet(cfg), seed=0)
    y = net(mx.random.uniform(shape=(2, 64, 96, 6)))
    assert y.shape == (2, 64, 96, 4)
    assert float(y.min()) > 0.0 and float(y.max()) < 1.0
    nf = 8
    conv = lambda i, o: 16 * i * o + o  # noqa: E731
    enc = conv(6, nf) + conv(nf, 2 * nf) + conv(2 * nf, 4 * nf) + 4 * conv(4 * nf, 4 * nf)
    dec = 2 * conv(8 * nf, 4 * nf) + conv(8 * nf, 2 * nf) + conv(4 * nf, nf) + conv(2 * nf, nf)
    bn = 2 * (2 * nf + 4 * nf * 5 + 4 * nf * 2 + 2 * nf + nf + nf)
    count = sum(p.size for _, p in tree_flatten(net.trainable_parameters()))
    assert count == enc + dec + conv(nf, 4) + bn


def test_init_is_normal_001():
    net = init_weights(UNet(), seed=1)
    w = np.concatenate([np.array(p).ravel() for _, p in tree_flatten(net.trainable_parameters())])
    assert abs(w.mean()) < 1e-4 and w.std() == pytest.approx(0.01, rel=0.02)
    norm = net.encoder[1].norm
    np.testing.assert_array_equal(np.array(norm.running_var), 1.0)
    np.testing.assert_array_equal(np.array(norm.running_mean), 0.0)


def test_up_block_is_a_stride_2_transposed_conv():
    """Sub-pixel form against the definition y[2i - 1 + k] += x[i] w[k] (cropped)."""
    up = UpBlock(3, 2, UNetConfig())
    x = np.random.default_rng(0).standard_normal((1, 3, 4, 3)).astype(np.float32)
    w = np.array(up.weight)  # [O, 4, 4, I]
    full = np.zeros((1, 8, 10, 2), np.float32)  # 2n + 2 rows / cols
    for i in range(3):
        for j in range(4):
            for ky in range(4):
                for kx in range(4):
                    full[0, 2 * i + ky, 2 * j + kx] += w[:, ky, kx] @ x[0, i, j]
    y = mx.conv2d(mx.array(x), up.phase_kernel(), padding=1)
    y = np.array(y.reshape(1, 3, 4, 2, 2, 2).transpose(0, 1, 3, 2, 4, 5).reshape(1, 6, 8, 2))
    np.testing.assert_allclose(y, full[:, 1:-1, 1:-1], atol=1e-5)


def test_size_must_be_a_multiple_of_32():
    with pytest.raises(ValueError, match="multiples of 32"):
        UNet(UNetConfig(nf=4))(mx.zeros((1, 48, 64, 6)))
