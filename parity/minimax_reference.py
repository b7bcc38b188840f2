"""A torch reference of MiniMax-Remover's transformer and conditioning,
written from the formulas of its published code (zibojia/MiniMax-Remover,
`transformer_minimax_remover.py`, `pipeline_minimax_remover.py`,
`test_minimax_remover.py`), with diffusers-style parameter names as its
checkpoint has them.

Transformer (`forward(hidden_states, timestep)`, channels-first):
* patch_embedding Conv3d(48 -> D, kernel = stride = (1, 2, 2));
* time: sinusoid of t (256 dims, cos half first, frequencies
  exp(-ln(10000) i / 128)); condition_embedder.time_embedder linear_1 ->
  SiLU -> linear_2 gives temb; condition_embedder.time_proj(SiLU(temb)) gives
  the 6 modulation vectors;
* RoPE: complex, float64, t/h/w split of the head dim (d - 4(d//6), 2(d//6),
  2(d//6)) with theta 10000, on interleaved pairs;
* block: shift, scale, gate, c_shift, c_scale, c_gate = scale_shift_table +
  e6; x += gate * attn1(LN(x)(1 + scale) + shift) (q/k RMSNorm across heads,
  eps 1e-6, before RoPE); x += c_gate * ffn(LN(x)(1 + c_scale) + c_shift),
  ffn = Linear -> GELU(tanh) -> Linear; no cross-attention;
* head: shift, scale = scale_shift_table + temb; proj_out(LN(x)(1 + scale) +
  shift); unpatchify.

Conditioning (the pipeline, for a clip already at the model size): mask
pixel > 20 -> 1; scipy binary_dilation, `iterations` times (3x3 cross), per
frame; bilinear resize (identity at the same size), > 0 -> 1; masked video =
video * (1 - mask) in [-1, 1]; the mask video 2 * mask - 1 (3 channels).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, dim, heads, eps):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x, freqs):
        q, k, v = self.norm_q(self.to_q(x)), self.norm_k(self.to_k(x)), self.to_v(x)
        q, k, v = (a.unflatten(2, (self.heads, -1)).transpose(1, 2) for a in (q, k, v))

        def rotate(a):
            c = torch.view_as_complex(a.to(torch.float64).unflatten(3, (-1, 2)))
            return torch.view_as_real(c * freqs).flatten(3, 4).type_as(a)

        out = F.scaled_dot_product_attention(rotate(q), rotate(k), v)
        return self.to_out[0](out.transpose(1, 2).flatten(2, 3))


class FeedForward(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.net = nn.ModuleList([nn.Module(), nn.Dropout(0.0), nn.Linear(inner, dim)])
        self.net[0].proj = nn.Linear(dim, inner)

    def forward(self, x):
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, dim, ffn, heads, eps):
        super().__init__()
        self.eps = eps
        self.attn1 = Attention(dim, heads, eps)
        self.ffn = FeedForward(dim, ffn)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, e6, freqs):
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table + e6.float()).chunk(6, dim=1)
        ln = lambda a: F.layer_norm(a.float(), a.shape[-1:], eps=self.eps)  # noqa: E731
        x = x + self.attn1(ln(x) * (1 + scale) + shift, freqs) * gate
        return x + self.ffn(ln(x) * (1 + c_scale) + c_shift) * c_gate


class TimeEmbedder(nn.Module):
    def __init__(self, freq, dim):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(freq, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ConditionEmbedder(nn.Module):
    def __init__(self, dim, freq):
        super().__init__()
        self.freq = freq
        self.time_embedder = TimeEmbedder(freq, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)

    def forward(self, t):
        half = self.freq // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        temb = self.time_embedder(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
        return temb, self.time_proj(F.silu(temb))


class MiniMaxTransformer(nn.Module):
    def __init__(self, dim=1536, heads=12, ffn=8960, layers=30, in_channels=48, out_channels=16, freq=256,
                 eps=1e-6, theta=10000.0, max_len=1024):
        super().__init__()
        self.patch, self.heads, self.eps = (1, 2, 2), heads, eps
        self.patch_embedding = nn.Conv3d(in_channels, dim, kernel_size=self.patch, stride=self.patch)
        self.condition_embedder = ConditionEmbedder(dim, freq)
        self.blocks = nn.ModuleList([Block(dim, ffn, heads, eps) for _ in range(layers)])
        self.proj_out = nn.Linear(dim, out_channels * 4)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        d = dim // heads
        self.splits = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
        self.freqs = [torch.polar(torch.ones(max_len, n // 2, dtype=torch.float64),
                                  torch.outer(torch.arange(max_len, dtype=torch.float64),
                                              1.0 / theta ** (torch.arange(0, n, 2, dtype=torch.float64) / n)))
                      for n in self.splits]

    def rope(self, f, h, w):
        ft, fh, fw = (fr[:n] for fr, n in zip(self.freqs, (f, h, w)))
        grid = torch.cat([ft[:, None, None].expand(f, h, w, -1), fh[None, :, None].expand(f, h, w, -1),
                          fw[None, None].expand(f, h, w, -1)], dim=-1)
        return grid.reshape(1, 1, f * h * w, -1)

    def forward(self, hidden_states, timestep):
        b, _, f, h, w = hidden_states.shape
        f2, h2, w2 = f, h // 2, w // 2
        freqs = self.rope(f2, h2, w2)
        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2)
        temb, proj = self.condition_embedder(timestep)
        e6 = proj.unflatten(1, (6, -1))
        for block in self.blocks:
            x = block(x, e6, freqs)
        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = self.proj_out(F.layer_norm(x.float(), x.shape[-1:], eps=self.eps) * (1 + scale) + shift)
        x = x.reshape(b, f2, h2, w2, 1, 2, 2, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def write_transformer_folder(model: MiniMaxTransformer, folder: Path, cfg: dict) -> Path:
    """`transformer/` as the release has it: config.json and the state dict."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "Transformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": cfg["heads"],
        "attention_head_dim": cfg["dim"] // cfg["heads"], "in_channels": 48, "out_channels": 16, "freq_dim": 256,
        "ffn_dim": cfg["ffn"], "num_layers": cfg["layers"], "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "added_kv_proj_dim": None, "rope_max_seq_len": 1024}))
    return folder


def reference_condition(images: np.ndarray, masks_u8: np.ndarray, iterations: int = 6):
    """(masked video, mask video), [T, H, W, 3] float32 in [-1, 1], from uint8
    frames [T, H, W, 3] and uint8 masks [T, H, W] at the model size, as the
    published pipeline builds them before its VAE."""
    img = torch.from_numpy(images).float() / 127.5 - 1.0
    m = torch.from_numpy(masks_u8[..., None].copy())
    m[m > 20] = 255
    m[m < 255] = 0
    m = (m / 255.0).numpy()
    dil = np.stack([scipy.ndimage.binary_dilation(f > 0, iterations=iterations) for f in m]).astype(np.float32)
    mt = torch.from_numpy(dil).repeat(1, 1, 1, 3).permute(3, 0, 1, 2)[None]  # b c f h w
    b, c, f, h, w = mt.shape
    flat = mt.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    mt = F.interpolate(flat, (h, w), mode="bilinear").reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)
    mt[mt > 0] = 1
    vid = img.permute(3, 0, 1, 2)[None]
    masked = vid * (1 - mt)
    mask_video = 2 * mt - 1.0
    to_np = lambda a: a[0].permute(1, 2, 3, 0).numpy().astype(np.float32)  # noqa: E731
    return to_np(masked), to_np(mask_video)
