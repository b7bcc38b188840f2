"""Casper removal: the clean background with objects and their effects removed.

Targets: "all" (every object removed) and, per object, that object removed
with the others kept. (The reference's "solo" runs are the converse -- keep
one object, remove the rest; `io.masks.solo_trimasks` builds those.)
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..branch.attention import make_attn_fn
from ..bundle import Bundle
from ..io.grid import from_model_grid
from ..io.inputs import Clip
from ..io.masks import build_trimask
from ..progress import Progress
from .conditioning import condition_channels, model_input
from .stages import Settings, decode, denoise, encode_conditioning, free, load_stage, load_vae, noise

ALL = "all"


def removal_targets(names: list[str], per_object: bool = True, all_objects: bool = True):
    """[(label, indices of the objects to remove or None for all)]."""
    targets = [(ALL, None)] if all_objects or len(names) == 1 else []
    if per_object and len(names) > 1:
        targets += [(f"without_{name}", [i]) for i, name in enumerate(names)]
    return targets


def dit_velocity(dit, y: mx.array, ctx: mx.array):
    """Velocity of one temporal window for the plain (removal) DiT; `ctx` is
    the embedded prompt, computed once per run, and self-attention is
    query-chunked to the memory budget where SDPA is not fused."""
    attn_fn = make_attn_fn("A")

    def velocity(x, t, span):
        s, e = span
        return dit.forward(model_input(x, y[:, s:e]), mx.array([t], dtype=mx.float32), ctx, attn_fn)

    return velocity


def run_removal(clip: Clip, bundle: Bundle, settings: Settings, progress: Progress,
                targets=None) -> dict[str, np.ndarray]:
    """label -> background float32 [T, H, W, 3] in [0, 1] on the source grid."""
    targets = targets or removal_targets(clip.names)
    vae = load_vae(bundle, progress)
    cond = encode_conditioning(clip, bundle, settings, progress, vae)
    dit = load_stage(bundle, "transformer", progress, settings.dtype)
    ctx = dit.embed_context(cond.context, cond.clip_fea)
    mx.eval(ctx)
    latents = {}
    starts = noise(mx.random.key(settings.seed), cond.cond_latent, len(targets))
    for (label, remove), z in zip(targets, starts):
        y = condition_channels(build_trimask(cond.masks, remove), cond.cond_latent)
        latents[label] = denoise(dit_velocity(dit, y, ctx), z, settings, progress, label)
    del dit, ctx
    free()
    return {label: from_model_grid(decode(vae, z, settings, progress, label), cond.plan)
            for label, z in latents.items()}
