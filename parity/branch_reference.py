"""Torch reference for the EasyOmnimatte branch forward, on diffusers'
`WanTransformer3DModel`.

The reference runs diffusers' own modules (patch embedding, condition
embedder, RoPE, transformer blocks, output norm/projection) over the 2N
tokens [inpaint | replica]; only the attention processor is ours
(`BranchAttnProcessor`): it applies the attention types with DENSE boolean
(2N)^2 masks (the straightforward definition the MLX slices must match) and
adds the LoRA deltas to the replica half of the targeted projections.
The dual-expert loop steps both latents with diffusers'
`FlowMatchEulerDiscreteScheduler`.

Adapters are dicts {"blocks.{i}.{target}": (A (rank, in), B (out, rank))}
in the MLX target names (`self_attn.{q,k,v,o}`, `cross_attn.{q,o}`), numpy
float32; `write_adapter` writes one in a trainer's layout for the converter.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from safetensors.torch import save_file

# MLX target -> (diffusers attention module, projection role)
_ROLES = {"self_attn": "attn1", "cross_attn": "attn2"}
_DIFFUSERS_NAMES = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}


def dense_mask(n: int, mask_type: str) -> torch.Tensor | None:
    """Boolean (2N, 2N), True = may attend; rows are queries. None for A."""
    if mask_type == "A":
        return None
    m = torch.ones(2 * n, 2 * n, dtype=torch.bool)
    m[:n, n:] = False  # inpaint queries never see the matting keys (B and C)
    if mask_type == "C":
        m[n:, :n] = False  # block diagonal
    return m


def _rope(x, cos, sin):
    """Interleaved-pair rotation; x [B, L, H, d], cos/sin [1, L, 1, d] (repeat-interleaved)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out


class BranchAttnProcessor:
    """WanAttention processor for the branch: LoRA on the replica half (tokens
    n..2n) of the projections in `lora` ({"q"|"k"|"v"|"o": (A, B, scale)}),
    and a dense attention mask for the self-attention."""

    def __init__(self, n: int, mask: torch.Tensor | None = None, lora: dict | None = None):
        self.n, self.mask, self.lora = n, mask, lora or {}

    def _proj(self, role, linear, x):
        y = linear(x)
        if role in self.lora:
            A, B, scale = self.lora[role]
            d = (x[:, self.n:] @ A.T @ B.T) * scale
            y = torch.cat([y[:, :self.n], y[:, self.n:] + d], dim=1)
        return y

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        img = None
        if encoder_hidden_states is not None and attn.add_k_proj is not None:
            n_img = encoder_hidden_states.shape[1] - 512  # diffusers' fixed text length
            img, encoder_hidden_states = encoder_hidden_states[:, :n_img], encoder_hidden_states[:, n_img:]
        kv_src = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.norm_q(self._proj("q", attn.to_q, hidden_states))
        k = attn.norm_k(self._proj("k", attn.to_k, kv_src) if encoder_hidden_states is None else attn.to_k(kv_src))
        v = self._proj("v", attn.to_v, kv_src) if encoder_hidden_states is None else attn.to_v(kv_src)
        q, k, v = (a.unflatten(2, (attn.heads, -1)) for a in (q, k, v))
        if rotary_emb is not None:
            q, k = _rope(q, *rotary_emb), _rope(k, *rotary_emb)

        def sdpa(q_, k_, v_, mask=None):
            o = F.scaled_dot_product_attention(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2),
                                               attn_mask=mask)
            return o.transpose(1, 2).flatten(2, 3)

        out = sdpa(q, k, v, self.mask if encoder_hidden_states is None else None)
        if img is not None:
            ki = attn.norm_added_k(attn.add_k_proj(img)).unflatten(2, (attn.heads, -1))
            vi = attn.add_v_proj(img).unflatten(2, (attn.heads, -1))
            out = out + sdpa(q, ki, vi)
        out = self._proj("o", attn.to_out[0], out)
        return attn.to_out[1](out)


def _block_lora(adapter: dict | None, scale: float, i: int, attn: str) -> dict:
    out = {}
    for role in "qkvo":
        pair = (adapter or {}).get(f"blocks.{i}.{attn}.{role}")
        if pair is not None:
            out[role] = (torch.from_numpy(pair[0]), torch.from_numpy(pair[1]), scale)
    return out


@torch.no_grad()
def branch_forward_torch(model, x_bg: torch.Tensor, x_alpha: torch.Tensor, timestep: torch.Tensor,
                         context: torch.Tensor, clip_fea: torch.Tensor | None, mask_type: str,
                         adapter: dict | None = None, scale: float = 1.0, domain: np.ndarray | None = None):
    """Channels-first [B, C, F, H, W] inputs -> (v_bg, v_alpha) channels-first, float32."""
    B, _, nf, nh, nw = x_bg.shape
    p_t, p_h, p_w = model.config.patch_size
    cos, sin = model.rope(x_bg)  # [1, N, 1, d]: one table, reused for the replica (same positions)
    rotary = (torch.cat([cos, cos], 1), torch.cat([sin, sin], 1))
    hb = model.patch_embedding(x_bg).flatten(2).transpose(1, 2)
    ha = model.patch_embedding(x_alpha).flatten(2).transpose(1, 2)
    if domain is not None:
        ha = ha + torch.from_numpy(np.asarray(domain, np.float32)).reshape(1, 1, -1)
    n = hb.shape[1]
    h = torch.cat([hb, ha], 1).contiguous()
    temb, proj, enc, enc_img = model.condition_embedder(timestep, context, clip_fea)
    proj = proj.unflatten(1, (6, -1))
    if enc_img is not None:
        enc = torch.cat([enc_img, enc], 1)
    mask = dense_mask(n, mask_type)
    try:
        for i, block in enumerate(model.blocks):
            block.attn1.set_processor(BranchAttnProcessor(n, mask, _block_lora(adapter, scale, i, "self_attn")))
            block.attn2.set_processor(BranchAttnProcessor(n, None, _block_lora(adapter, scale, i, "cross_attn")))
            h = block(h, enc, proj, rotary)
    finally:
        for block in model.blocks:
            block.attn1.set_processor(WanAttnProcessor())
            block.attn2.set_processor(WanAttnProcessor())
    shift, sc = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
    h = model.proj_out(model.norm_out(h.float()) * (1 + sc) + shift)

    def unpatchify(y):
        y = y.reshape(B, nf // p_t, nh // p_h, nw // p_w, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return y.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    return unpatchify(h[:, :n]), unpatchify(h[:, n:])


def _cf(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 4, 1, 2, 3)


def _cl(t: torch.Tensor) -> np.ndarray:
    return t.float().permute(0, 2, 3, 4, 1).contiguous().numpy()


def reference_branch(model, x_bg, x_alpha, t, context, clip_fea, mask_type, adapter=None, scale=1.0,
                     domain=None):
    """numpy channels-last in and out (the MLX conventions)."""
    B = x_bg.shape[0]
    ts = torch.from_numpy(np.resize(np.asarray(t, np.float32), B))
    img = torch.from_numpy(clip_fea) if clip_fea is not None else None
    vb, va = branch_forward_torch(model, _cf(x_bg), _cf(x_alpha), ts, torch.from_numpy(context), img, mask_type,
                                  adapter, scale, domain)
    return _cl(vb), _cl(va)


@torch.no_grad()
def reference_dual_expert_sampling(model, z_bg, z_alpha, cond, context, clip_fea, experts: dict, tau: float,
                                   steps: int, shift: float = 5.0):
    """diffusers Euler loop over (z_bg, z_alpha) stacked on the channel axis (so
    one scheduler steps both with the same sigmas). `experts`: kind ->
    (adapter, scale, mask_type, domain). numpy channels-last in and out."""
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sch.set_timesteps(steps)
    c = z_bg.shape[-1]
    sample = torch.cat([_cf(z_bg), _cf(z_alpha)], 1)
    cond_t = _cf(cond)
    ctx = torch.from_numpy(context)
    img = torch.from_numpy(clip_fea) if clip_fea is not None else None
    kinds = []
    for t in sch.timesteps:
        kind = "effect" if float(t) / 1000.0 > tau else "quality"
        kinds.append(kind)
        adapter, scale, mask_type, domain = experts[kind]
        xb = torch.cat([sample[:, :c], cond_t], 1)
        xa = torch.cat([sample[:, c:], cond_t], 1)
        vb, va = branch_forward_torch(model, xb, xa, t.expand(sample.shape[0]), ctx, img, mask_type, adapter,
                                      scale, domain)
        sample = sch.step(torch.cat([vb, va], 1), t, sample, return_dict=False)[0]
    return _cl(sample[:, :c]), _cl(sample[:, c:]), kinds


# --------------------------------------------------------------------------- adapters


def random_adapter(blocks, dim: int, rank: int, seed: int, strength: float = 0.5) -> dict:
    """A ~ N(0, 1/dim), B ~ strength * N(0, 1/rank): deltas a fair fraction of the base."""
    from branch_utils import random_adapter as tests_adapter

    return tests_adapter(blocks, dim, rank, seed, scale=strength)


def write_adapter(adapter: dict, path: Path, fmt: str, alpha: float | None = None, manifest: dict | None = None,
                  domain: np.ndarray | None = None) -> Path:
    """Write with torch's safetensors writer: "peft" (diffusers module names,
    `transformer.` prefix), "kohya" (original names) or "diffsynth"."""
    sd = {}
    for module, (a, b) in adapter.items():
        _, i, attn, role = module.split(".")
        if fmt == "peft":
            base = f"transformer.blocks.{i}.{_ROLES[attn]}.{_DIFFUSERS_NAMES[role]}"
            la, lb = f"{base}.lora_A.weight", f"{base}.lora_B.weight"
        elif fmt == "kohya":
            base = f"lora_unet_blocks_{i}_{attn}_{role}"
            la, lb = f"{base}.lora_down.weight", f"{base}.lora_up.weight"
        elif fmt == "diffsynth":
            base = f"blocks.{i}.{attn}.{role}"
            la, lb = f"{base}.lora_A.default.weight", f"{base}.lora_B.default.weight"
        else:
            raise ValueError(fmt)
        sd[la], sd[lb] = torch.from_numpy(a), torch.from_numpy(b)
        if alpha is not None:
            sd[f"{base}.alpha"] = torch.tensor(float(alpha))
    if domain is not None:
        sd["domain_embedding"] = torch.from_numpy(np.asarray(domain, np.float32))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    if manifest is not None:
        path.with_suffix(".json").write_text(json.dumps(manifest))
    return path
