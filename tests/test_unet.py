import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from helpers import rel_err
from mlx_omnimatte.models import unet
from mlx_omnimatte.models.unet import ConvBlock, UNet, UNetConfig, UpBlock, init_weights, same_padding


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


@pytest.mark.parametrize("form", ["plain", "rearranged"])
def test_up_block_is_a_stride_2_transposed_conv(form):
    """Both forms against the definition y[2i - 1 + k] += x[i] w[k] (cropped)."""
    up = UpBlock(3, 2, UNetConfig())
    x = np.random.default_rng(0).standard_normal((1, 3, 4, 3)).astype(np.float32)
    w = np.array(up.weight)  # [O, 4, 4, I]
    full = np.zeros((1, 8, 10, 2), np.float32)  # 2n + 2 rows / cols
    for i in range(3):
        for j in range(4):
            for ky in range(4):
                for kx in range(4):
                    full[0, 2 * i + ky, 2 * j + kx] += w[:, ky, kx] @ x[0, i, j]
    if form == "plain":
        y = mx.conv_transpose2d(mx.array(x), up.weight, stride=2)[:, 1:-1, 1:-1]
    else:
        y = unet.subpixel_conv(mx.array(x), up.weight).reshape(1, 6, 8, 2)
    np.testing.assert_allclose(np.array(y), full[:, 1:-1, 1:-1], atol=1e-5)


def test_size_must_be_a_multiple_of_32():
    with pytest.raises(ValueError, match="multiples of 32"):
        UNet(UNetConfig(nf=4))(mx.zeros((1, 48, 64, 6)))


# --- the rearranged (CPU) form equals the plain form --------------------------------

CFG = UNetConfig()
BLOCKS = {  # (block, input shape [N, H, W, C]); N = 3 splits in uneven parts
    "stride 2, BatchNorm, leaky": (lambda: ConvBlock(8, 16, 2, 1, cfg=CFG), (3, 12, 18, 8)),
    "stride 2, ReLU (first)": (lambda: ConvBlock(6, 8, 2, 1, norm=False, act="relu", cfg=CFG), (3, 12, 18, 6)),
    "dilation 2, BatchNorm": (lambda: ConvBlock(16, 16, 1, 2, cfg=CFG), (3, 6, 5, 16)),
    "output, sigmoid": (lambda: ConvBlock(8, 4, norm=False, act="sigmoid", cfg=CFG), (3, 10, 14, 8)),
    "transposed, BatchNorm, ReLU": (lambda: UpBlock(16, 8, CFG), (3, 5, 7, 16)),
}


def _randomized(block: nn.Module, seed: int) -> dict:
    """Random values for every parameter and running statistic; returns them."""
    rng = np.random.default_rng(seed)
    values = {}
    for name, p in tree_flatten(block.parameters()):
        a = rng.standard_normal(p.shape).astype(np.float32)
        if name.endswith("running_var"):
            a = rng.uniform(0.5, 2.0, p.shape).astype(np.float32)
        elif name.endswith("norm.weight"):
            a = 1 + 0.2 * a
        elif p.ndim > 1:
            a /= np.sqrt(np.prod(p.shape[1:]))
        values[name] = mx.array(a)
    block.update(tree_unflatten(list(values.items())))
    return values


def _run(block, values, x, g, form, train, monkeypatch):
    """Output, input gradient, parameter gradients and running statistics in one form."""
    monkeypatch.setattr(unet, "REARRANGE", form == "rearranged")
    block.update(tree_unflatten(list(values.items())))
    block.train(train)

    def loss(params, x):
        block.update(params)
        y = mx.concatenate(block(unet.batch_parts(x)), axis=0)
        return (y * g).sum(), y

    (_, y), (dp, dx) = mx.value_and_grad(loss, argnums=(0, 1))(block.trainable_parameters(), x)
    stats = {k: v for k, v in tree_flatten(block.parameters()) if "running" in k}
    mx.eval(y, dp, dx, stats)
    return y, dx, dict(tree_flatten(dp)), stats


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_rearranged_form_equals_plain_form(name, train, monkeypatch):
    make, shape = BLOCKS[name]
    block = make()
    values = _randomized(block, 0)
    rng = np.random.default_rng(1)
    x = mx.array(rng.standard_normal(shape).astype(np.float32))
    y = block(unet.batch_parts(x))[0]
    g = mx.array(rng.standard_normal((shape[0], *y.shape[1:])).astype(np.float32))
    want = _run(block, values, x, g, "plain", train, monkeypatch)
    got = _run(block, values, x, g, "rearranged", train, monkeypatch)
    assert rel_err(got[0], want[0]) < 1e-5
    assert rel_err(got[1], want[1]) < 1e-5
    for k, ref in want[2].items():
        if train and k in ("conv.bias", "bias") and "norm" in block:
            # normalized away: the plain form's gradient is rounding noise, the rearranged form's exactly 0
            assert float(mx.abs(got[2][k]).max()) == 0.0 and float(mx.abs(ref).max()) < 1e-4
            continue
        assert rel_err(got[2][k], ref) < 1e-5, k
    for k, ref in want[3].items():
        assert rel_err(got[3][k], ref) < 1e-5, k


@pytest.mark.parametrize("stride, dilation, size", [(2, 1, (9, 12)), (2, 1, (10, 7)), (1, 2, (11, 9)), (1, 1, (9, 8))])
def test_rearranged_conv_is_conv2d(stride, dilation, size):
    """Odd sizes included (a stride-2 conv's odd last row feeds no output)."""
    rng = np.random.default_rng(4)
    x = mx.array(rng.standard_normal((2, *size, 6)).astype(np.float32))
    w = mx.array(rng.standard_normal((5, 4, 4, 6)).astype(np.float32))
    y = mx.conv2d(x, w, stride=stride, dilation=dilation)
    g = mx.array(rng.standard_normal(y.shape).astype(np.float32))

    def grads(f):
        return mx.grad(lambda x, w: (f(x, w) * g).sum(), argnums=(0, 1))(x, w)

    got = unet.rearranged_conv(x, w, stride, dilation)
    assert rel_err(got, y) < 1e-5
    for a, b in zip(grads(lambda x, w: unet.rearranged_conv(x, w, stride, dilation)),
                    grads(lambda x, w: mx.conv2d(x, w, stride=stride, dilation=dilation))):
        assert rel_err(a, b) < 1e-5


def test_compiled_training_step_is_the_same_in_both_forms(monkeypatch):
    """The whole network, compiled, with its batch split over streams."""
    cfg = UNetConfig(nf=8)
    net = UNet(cfg)
    values = _randomized(net, 2)
    rng = np.random.default_rng(3)
    x = mx.array(rng.random((3, 32, 64, 6)).astype(np.float32))
    results = []
    for form in (False, True):
        monkeypatch.setattr(unet, "REARRANGE", form)
        net.update(tree_unflatten(list(values.items())))
        net.train()
        grad_fn = nn.value_and_grad(net, lambda model, x: mx.square(model(x) - 0.5).mean())
        step = mx.compile(lambda x: grad_fn(net, x), inputs=net.state, outputs=net.state)
        loss, grads = step(x)
        stats = {k: v for k, v in tree_flatten(net.parameters()) if "running" in k}
        mx.eval(loss, grads, stats)
        results.append((loss, dict(tree_flatten(grads)), stats))
    (loss0, g0, s0), (loss1, g1, s1) = results
    assert rel_err(loss1, loss0) < 1e-5
    scale = max(float(mx.abs(v).max()) for v in g0.values())
    for k, ref in g0.items():  # conv biases before BatchNorm: ~0 in one, exactly 0 in the other
        assert float(mx.abs(g1[k] - ref).max()) < 1e-5 * scale, k
    for k, ref in s0.items():
        assert rel_err(s1[k], ref) < 1e-5, k
