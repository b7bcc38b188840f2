"""Torch reference for the Wan2.1 VAE: diffusers' AutoencoderKLWan with random
weights, written in both source formats (diffusers `vae/` folder and the
original `Wan2.1_VAE.pth`), and channels-last encode/decode helpers.

Only parity/ imports torch.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan

MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
       3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


def make_vae(seed: int = 0, **config) -> AutoencoderKLWan:
    """AutoencoderKLWan (full Wan2.1 config unless overridden) with random weights
    scaled so activations stay O(1): conv weights ~ N(0, 1/fan_in), norm gammas
    ~ 1 + 0.2 N(0, 1), biases ~ 0.05 N(0, 1); the decoder's last conv is scaled
    so the video lies mostly inside [-1, 1] (the clamp would hide differences)."""
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
        vae.decoder.conv_out.weight.mul_(0.3)
    return vae


# --------------------------------------------------------------------------- original key names

# diffusers -> original (the inverse of diffusers' scripts/convert_wan_to_diffusers.py
# and loaders/single_file_utils.convert_wan_vae_to_diffusers).
_RES = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
        "conv2": "residual.6", "conv_shortcut": "shortcut"}


def _res_suffix(rest: str) -> str:
    for new, old in _RES.items():
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest  # resample.1.*, time_conv.*, norm.gamma, to_qkv.*, proj.*


def original_key(key: str) -> str:
    top = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
    head, _, rest = key.partition(".")
    if head in top:
        return f"{top[head]}.{rest}"
    m = re.fullmatch(r"(encoder|decoder)\.(conv_in|norm_out|conv_out)\.(.+)", key)
    if m:
        part = {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}[m[2]]
        return f"{m[1]}.{part}.{m[3]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d)\.(.+)", key)
    if m:
        idx = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(m[2], m[3])]
        return f"{m[1]}.middle.{idx}.{_res_suffix(m[4])}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", key)
    if m:
        return f"encoder.downsamples.{m[1]}.{_res_suffix(m[2])}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{_res_suffix(m[3])}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key)
    if m:
        return f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
    raise KeyError(f"no original name for {key}")


def original_state_dict(vae: AutoencoderKLWan) -> dict:
    return {original_key(k): v.detach().clone() for k, v in vae.state_dict().items()}


def save_original(vae: AutoencoderKLWan, path: Path) -> Path:
    """`Wan2.1_VAE.pth`: the original key names, a plain state dict via torch.save."""
    torch.save(original_state_dict(vae), path)
    return Path(path)


def save_diffusers(vae: AutoencoderKLWan, folder: Path) -> Path:
    """A diffusers `vae/` folder: config.json + diffusion_pytorch_model.safetensors."""
    vae.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


# --------------------------------------------------------------------------- channels-last helpers


@torch.no_grad()
def encode(vae: AutoencoderKLWan, video: np.ndarray) -> np.ndarray:
    """[B, T, H, W, 3] -> normalized posterior mean [B, T', H', W', 16] (numpy)."""
    x = torch.from_numpy(np.ascontiguousarray(video.transpose(0, 4, 1, 2, 3))).float()
    mu = vae.encode(x).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    return ((mu - mean) / std).permute(0, 2, 3, 4, 1).numpy()


@torch.no_grad()
def decode(vae: AutoencoderKLWan, latents: np.ndarray) -> np.ndarray:
    """Normalized latents [B, T', H', W', 16] -> video [B, T, H, W, 3] in [-1, 1]."""
    z = torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 4, 1, 2, 3))).float()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    return vae.decode(z * std + mean).sample.permute(0, 2, 3, 4, 1).numpy()
