"""Parity of the layer U-Net, its losses and one AdamW step with a torch
version written from the reference's formulas (``unet_reference.py``), fp32.

Weights are MLX's default random init with random BatchNorm scales and
shifts (the reference's normal(0, 0.01) init would make every activation
nearly constant, which compares nothing). The network is checked in both of
its forms: plain strided / transposed convolutions and the stride-1
rearrangement the CPU runs."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from helpers import rel_err  # noqa: E402
from mlx_omnimatte.models import unet  # noqa: E402
from mlx_omnimatte.pipelines import optimize as opt  # noqa: E402
from unet_reference import TorchUNet, load_from_mlx, reference_losses, reference_step, reference_total  # noqa: E402

pytestmark = pytest.mark.torch
TOL = 1e-5
N, H, W, NF = 3, 64, 96, 32


@pytest.fixture(params=[True, False], ids=["rearranged", "plain"])
def form(request, monkeypatch):
    monkeypatch.setattr(unet, "REARRANGE", request.param)


def _nets(seed=0):
    mx.random.seed(seed)
    nets = opt.LayerNets(1, NF)
    rng = np.random.default_rng(seed)
    params = tree_flatten(nets.trainable_parameters())
    new = [(k, mx.array(1 + 0.2 * rng.standard_normal(p.shape).astype(np.float32)) if k.endswith("norm.weight")
            else mx.array(0.1 * rng.standard_normal(p.shape).astype(np.float32)) if k.endswith("norm.bias") else p)
           for k, p in params]
    nets.update(tree_unflatten(new))
    return nets


def _data(seed=1):
    rng = np.random.default_rng(seed)
    solo = rng.random((N, H, W, 3)).astype(np.float32)
    bg = np.clip(solo + 0.3 * rng.standard_normal(solo.shape), 0, 1).astype(np.float32)
    mask = np.zeros((1, N, H, W, 1), np.float32)
    mask[:, :, 16:48, 20:60] = 1.0
    return solo, bg, mask


def _t(x):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def _torch_model(nets):
    return load_from_mlx(TorchUNet(6, 4, NF), nets.nets[0])


@pytest.mark.usefixtures("form")
@pytest.mark.parametrize("train", [True, False])
def test_forward(train):
    nets = _nets()
    solo, bg, mask = _data()
    if not train:  # give the running statistics values of their own
        rng = np.random.default_rng(3)
        for blk in nets.nets[0].encoder[1:] + nets.nets[0].decoder:
            c = blk.norm.running_mean.shape[0]
            blk.norm.running_mean = mx.array(0.1 * rng.standard_normal(c).astype(np.float32))
            blk.norm.running_var = mx.array(rng.uniform(0.5, 2.0, c).astype(np.float32))
    tm = _torch_model(nets)
    nets.train(train)
    tm.train(train)
    (rgb, a), = nets(mx.array(solo), mx.array(bg), mx.array(mask))
    with torch.no_grad():
        ref = tm(torch.cat([_t(solo), torch.abs(_t(solo) - _t(bg))], 1)).numpy()
    out = np.concatenate([np.array(rgb), np.array(a)], -1)
    assert out.std() > 0.01  # a signal worth comparing
    err = rel_err(out, np.moveaxis(ref, 1, -1))
    assert err < TOL, err


def test_losses():
    solo, bg, mask = _data()
    rng = np.random.default_rng(4)
    rgb = rng.random((N, H, W, 3)).astype(np.float32)
    a = rng.random((N, H, W, 1)).astype(np.float32)
    mean = float(mask.mean())
    terms = opt.layer_losses([(mx.array(rgb), mx.array(a))], mx.array(bg), mx.array(solo), mx.array(mask),
                             [mx.array(mean)])
    ref = reference_losses(_t(rgb), _t(a), _t(solo), _t(bg), _t(mask[0]), mean)
    for k in ("recon", "l0", "l1", "mask"):
        assert rel_err(float(terms[k]), float(ref[k])) < TOL, k
    total = opt.total_loss(terms, opt.step_weights(opt.OptimizeSettings(), 0))
    assert rel_err(float(total), float(reference_total(ref))) < TOL


@pytest.mark.usefixtures("form")
def test_one_adamw_step():
    nets = _nets()
    solo, bg, mask = _data()
    tm = _torch_model(nets)
    s = opt.OptimizeSettings(compile=False)
    adam = optim.AdamW(learning_rate=s.lr, betas=list(s.betas), weight_decay=s.weight_decay, bias_correction=True)
    nets.train()
    step = opt.make_step(nets, adam, (H, W), s)
    mean = float(mask.mean())
    outside = mx.zeros((1, 1, 1, 1, 1))  # the reference: alpha pulled to 0 outside the mask
    loss = step(mx.array(solo), mx.array(bg), mx.array(mask), outside, mx.array([mean]), opt.step_weights(s, 0))
    mx.eval(loss, nets.state)
    topt = torch.optim.AdamW(tm.parameters(), lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
    ref_loss = reference_step(tm, topt, _t(solo), _t(bg), _t(mask[0]), mean)
    assert rel_err(float(loss), ref_loss) < TOL
    after = load_from_mlx(TorchUNet(6, 4, NF), nets.nets[0]).state_dict()
    # Adam's first step is lr * g / (|g| + eps): elements whose gradient is at
    # rounding level (conv biases before BatchNorm have a true gradient of
    # exactly zero) move by +-lr on either side at random; every other
    # element must agree to 1e-5 (2% of the lr-sized step).
    for k, v in tm.state_dict().items():
        if "num_batches" in k:
            continue
        d = np.abs(after[k].numpy() - v.numpy())
        assert d.max() <= 2.0 * s.lr, k
        bias_before_norm = k.endswith("conv.bias") and k not in ("encoder.0.conv.bias", "out_conv.conv.bias")
        if not bias_before_norm:
            assert (d > TOL).mean() < 1e-4, (k, float(d.max()))
