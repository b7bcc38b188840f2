"""A torch version of the layer U-Net and the losses of Generative Omnimatte's
optimization (written from the reference's formulas, NCHW), used by the
parity test and the benchmark; weights are copied from the MLX model."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F


def same_pad(size: int, stride: int, dilation: int, k: int = 4) -> tuple[int, int]:
    out = size // stride
    total = stride * (out - 1) + (k - 1) * (dilation - 1) + k - size
    return total // 2, total - total // 2


class TorchConvBlock(tnn.Module):
    def __init__(self, cin, cout, stride=1, dilation=1, norm=True, act="leaky"):
        super().__init__()
        self.s, self.d, self.act = stride, dilation, act
        self.conv = tnn.Conv2d(cin, cout, 4, stride=stride, dilation=dilation)
        self.norm = tnn.BatchNorm2d(cout) if norm else None

    def forward(self, x):
        py, px = same_pad(x.shape[-2], self.s, self.d), same_pad(x.shape[-1], self.s, self.d)
        x = self.conv(F.pad(x, [px[0], px[1], py[0], py[1]]))
        if self.norm is not None:
            x = self.norm(x)
        return {"relu": F.relu, "leaky": lambda v: F.leaky_relu(v, 0.2), "sigmoid": torch.sigmoid}[self.act](x)


class TorchUpBlock(tnn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = tnn.ConvTranspose2d(cin, cout, 4, stride=2)
        self.norm = tnn.BatchNorm2d(cout)

    def forward(self, x):
        x = self.conv(x)[:, :, 1:-1, 1:-1]  # 2n + 2 outputs, cropped to 2n
        return F.relu(self.norm(x))


class TorchUNet(tnn.Module):
    def __init__(self, in_c=6, out_c=4, nf=32):
        super().__init__()
        enc = [(in_c, nf, 2, 1), (nf, 2 * nf, 2, 1), (2 * nf, 4 * nf, 2, 1), (4 * nf, 4 * nf, 2, 1),
               (4 * nf, 4 * nf, 2, 1), (4 * nf, 4 * nf, 1, 2), (4 * nf, 4 * nf, 1, 2)]
        self.encoder = tnn.ModuleList([TorchConvBlock(i, o, s, d, norm=k > 0, act="relu" if k == 0 else "leaky")
                                       for k, (i, o, s, d) in enumerate(enc)])
        dec = [(8 * nf, 4 * nf), (8 * nf, 4 * nf), (8 * nf, 2 * nf), (4 * nf, nf), (2 * nf, nf)]
        self.decoder = tnn.ModuleList([TorchUpBlock(i, o) for i, o in dec])
        self.out_conv = TorchConvBlock(nf, out_c, norm=False, act="sigmoid")

    def forward(self, x):
        skips = []
        for k, block in enumerate(self.encoder):
            x = block(x)
            if k < 5:
                skips.append(x)
        for block in self.decoder:
            x = block(torch.cat([x, skips.pop()], dim=1))
        return self.out_conv(x)


def load_from_mlx(tmodel: TorchUNet, mlx_model) -> TorchUNet:
    """Copy MLX weights into torch: conv (O,kH,kW,I) -> (O,I,kH,kW); the
    decoder's transposed-conv ``weight`` (O,kH,kW,I) -> (I,O,kH,kW)."""
    from mlx.utils import tree_flatten

    sd = {}
    for name, p in tree_flatten(mlx_model.parameters()):
        a = torch.from_numpy(np.array(p))
        if name.startswith("decoder") and name.count(".") == 2:  # decoder.k.weight / bias
            name = name.replace(".weight", ".conv.weight").replace(".bias", ".conv.bias")
            a = a.permute(3, 0, 1, 2) if name.endswith("weight") else a
        elif name.endswith("conv.weight"):
            a = a.permute(0, 3, 1, 2)
        sd[name] = a
    for name, p in tree_flatten(mlx_model.state):
        if "running" in name:
            sd[name] = torch.from_numpy(np.array(p))
    missing = tmodel.load_state_dict(sd, strict=False)
    assert not [k for k in missing.missing_keys if "num_batches" not in k], missing
    return tmodel


def reference_losses(rgb, alpha, solo, bg, mask, mask_mean, k=5.0):
    """The reference's terms (NCHW tensors)."""
    comp = rgb * alpha + bg * (1 - alpha)

    def masked(pred, target, m):
        return (torch.square(pred - target) * m).sum() / (m.sum() + 1e-9)

    return {
        "recon": torch.mean(torch.square(solo - comp)),
        "l0": mask_mean * torch.mean((torch.sigmoid(alpha * k) - 0.5) * 2.0),
        "l1": mask_mean * torch.mean(torch.abs(alpha)),
        "mask": masked(alpha, mask, mask) + masked(alpha, mask, 1.0 - mask),
    }


WEIGHTS = {"recon": 1.0, "l0": 0.075, "l1": 0.75, "mask": 10.0}


def reference_total(terms: dict, mask_on: bool = True) -> torch.Tensor:
    return sum(WEIGHTS[k] * v for k, v in terms.items() if k != "mask" or mask_on)


def reference_step(model, optimizer, solo, bg, mask, mask_mean):
    """One training step as the reference runs it: forward in train mode, the
    total loss, backward, AdamW."""
    model.train()
    x = torch.cat([solo, torch.abs(solo - bg)], dim=1)
    out = model(x)
    loss = reference_total(reference_losses(out[:, :3], out[:, 3:], solo, bg, mask, mask_mean))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()
