"""Torch reference for the DiT step caches (TeaCache, MagCache) around
diffusers' `WanTransformer3DModel`, over temporal windows.

The caches are written here from the published descriptions
(TeaCache4Wan2.1's `teacache_forward` with retention steps, MagCache4Wan2.1's
`magcache_forward`), without guidance, in torch and numpy, independently of
`mlx_omnimatte.step_cache`. They sit where the references put them: around
the block loop, which receives diffusers' own `timestep_proj` (Wan's e0); the
model's patch embedding, condition embedder, RoPE, head and unpatchify are
diffusers' own. The sampling loop is diffusers' `FlowMatchEulerDiscreteScheduler`
stepping the velocities of overlapping windows blended with the reference
pipeline's linear ramps.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler


class TeaCacheRule:
    """TeaCache4Wan2.1, use_ret_steps: e0's relative L1 change, rescaled by
    the polynomial (|poly|, as mlx-examples), accumulated; reset when computing."""

    def __init__(self, threshold, coefficients, ret_steps=5):
        self.threshold, self.rescale, self.ret_steps = threshold, np.poly1d(coefficients), ret_steps

    def new_state(self) -> dict:
        return {"acc": 0.0, "prev": None, "residual": None}

    def skip(self, st: dict, i: int, e0: torch.Tensor) -> bool:
        prev, st["prev"] = st["prev"], e0.clone()
        if i < self.ret_steps or prev is None:
            st["acc"] = 0.0
            return False
        st["acc"] += abs(self.rescale(((e0 - prev).abs().mean() / prev.abs().mean()).item()))
        if st["acc"] < self.threshold:
            return True
        st["acc"] = 0.0
        return False


class MagCacheRule:
    """MagCache4Wan2.1 with one pass per step: the skip error sums |1 - ratio
    product| since the cached step, at most K skips in a row, none in the
    first retention fraction of the steps."""

    def __init__(self, threshold, ratios, k=2, retention=0.2):
        self.threshold, self.ratios, self.k, self.retention = threshold, list(ratios), k, retention

    def new_state(self) -> dict:
        return {"err": 0.0, "steps": 0, "ratio": 1.0, "residual": None}

    def skip(self, st: dict, i: int, e0) -> bool:
        if i < int(len(self.ratios) * self.retention):
            return False
        st["ratio"] *= self.ratios[i]
        st["steps"] += 1
        st["err"] += abs(1 - st["ratio"])
        if st["err"] < self.threshold and st["steps"] <= self.k:
            return True
        st["err"], st["steps"], st["ratio"] = 0.0, 0, 1.0
        return False


class CachedBlocks(torch.nn.Module):
    """Stands in for diffusers' block list (a one-module list the forward's
    loop calls once): runs the blocks and keeps the residual, or adds the
    kept one; one state per window span. `key = (step, span)` is set by the
    sampling loop before each forward; `log` records (step, span, computed)."""

    def __init__(self, blocks: torch.nn.ModuleList, rule):
        super().__init__()
        self.inner, self.rule = blocks, rule
        self.states, self.log, self.key = {}, [], None

    def forward(self, hidden, encoder_hidden_states, timestep_proj, rotary_emb):
        step, span = self.key
        st = self.states.setdefault(span, self.rule.new_state())
        if self.rule.skip(st, step, timestep_proj) and st["residual"] is not None:
            self.log.append((step, span, False))
            return hidden + st["residual"]
        out = hidden
        for block in self.inner:
            out = block(out, encoder_hidden_states, timestep_proj, rotary_emb)
        st["residual"] = out - hidden
        self.log.append((step, span, True))
        return out


def install(model, rule) -> CachedBlocks:
    cached = CachedBlocks(model.blocks, rule)
    model.blocks = torch.nn.ModuleList([cached])
    return cached


def smooth_time_embedding_(model, keep_from: int) -> None:
    """Zero the time MLP's input columns of the sinusoid's frequencies below
    index `keep_from` (cos and sin halves): a random model whose modulation
    moves slowly with t, as a trained one does."""
    with torch.no_grad():
        w = model.condition_embedder.time_embedder.linear_1.weight  # (D, freq_dim) [cos | sin]
        half = w.shape[1] // 2
        w[:, :keep_from] = 0
        w[:, half : half + keep_from] = 0


def window_weights(length: int, window: int, overlap: int) -> list[tuple[int, int, np.ndarray]]:
    """The reference's windows: start 0, stride window - overlap, the last
    aligned to the end; ramps linspace(0, 1, overlap + 2)[1:-1] on shared
    frames, normalized per frame."""
    spans, start = [], 0
    while True:
        end = min(start + window, length)
        start = max(0, end - window)
        spans.append((start, end))
        if end >= length:
            break
        start = end - overlap
    ramp = np.linspace(0, 1, overlap + 2)[1:-1]
    raw = []
    for s, e in spans:
        w = np.ones(e - s)
        if s > 0:
            w[:overlap] = ramp
        if e < length:
            w[-overlap:] = ramp[::-1]
        raw.append(w)
    total = np.zeros(length)
    for (s, e), w in zip(spans, raw):
        total[s:e] += w
    return [(s, e, (w / total[s:e]).astype(np.float32)) for (s, e), w in zip(spans, raw)]


@torch.no_grad()
def sample(model, cached: CachedBlocks, z: np.ndarray, y: np.ndarray, context: np.ndarray, clip_fea: np.ndarray,
           steps: int, shift: float, window: int, overlap: int) -> np.ndarray:
    """Euler from noise `z` [1, F, H, W, 16] conditioned on `y` [1, F, H, W, C]
    (channels last, as the MLX side); returns the latent at sigma 0."""
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    x = torch.from_numpy(z).permute(0, 4, 1, 2, 3).contiguous()
    cond = torch.from_numpy(y).permute(0, 4, 1, 2, 3).contiguous()
    ctx, img = torch.from_numpy(context), torch.from_numpy(clip_fea)
    wins = window_weights(x.shape[2], window, overlap)
    for i, t in enumerate(sched.timesteps):
        v = torch.zeros_like(x)
        for s, e, w in wins:
            cached.key = (i, (s, e))
            inp = torch.cat([x[:, :, s:e], cond[:, :, s:e]], dim=1)
            out = model(inp, t.reshape(1), ctx, img, return_dict=False)[0]
            v[:, :, s:e] += out * torch.from_numpy(w).reshape(1, 1, -1, 1, 1)
        x = sched.step(v, t, x, return_dict=False)[0]
    return x.permute(0, 2, 3, 4, 1).contiguous().numpy()
