"""Dual-expert omnimatte decomposition (EasyOmnimatte).

Per object: one trajectory steps (z_bg, z_alpha) together; each step is one
DiT forward over 2N tokens (frozen Casper path -> background, LoRA'd replica
-> alpha), by the Effect expert while t > tau and the Quality expert after.
The background run removes that object and keeps the others. Alpha leaves
the VAE as 3 equal channels in [-1, 1] and is averaged back to [0, 1]
(a setting of ours: the method does not state it). The foreground is solved
in closed form on the source grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..branch.experts import route, select
from ..branch.forward import branch_forward, check_experts, resolve_tau
from ..bundle import Bundle
from ..compositing import solve_foreground
from ..io.grid import from_model_grid
from ..io.inputs import Clip
from ..io.masks import build_trimask
from ..progress import Progress
from ..weights import load_model
from .conditioning import condition_channels
from .stages import Settings, decode, denoise, encode_conditioning, free, load_stage, load_vae, noise


@dataclass
class Layers:
    alpha: np.ndarray  # float32 [T, H, W] in [0, 1], effects included
    foreground: np.ndarray  # float32 [T, H, W, 3]
    background: np.ndarray  # float32 [T, H, W, 3]


def experts_needed(tau: float | None) -> tuple[str, ...]:
    """tau = 0 runs the Effect expert only, tau = 1 the Quality expert only."""
    if tau is None:
        return ("effect", "quality")
    return ("effect",) if tau <= 0 else ("quality",) if tau >= 1 else ("effect", "quality")


def load_experts(bundle: Bundle, kinds, progress: Progress) -> dict:
    with progress.stage("load experts", total=len(kinds), unit="expert") as bar:
        experts = {}
        for kind in kinds:
            experts[kind] = load_model(bundle.expert(kind), "expert")
            bar.update()
    return experts


def branch_window_velocity(dit, y, ctx, effect, quality, tau: float):
    def velocity(x, t, span):
        s, e = span
        expert = select(t, tau, effect, quality)
        v_bg, v_alpha = branch_forward(dit, expert, x[0], x[1], t, cond=y[:, s:e], ctx=ctx)
        return [v_bg, v_alpha]

    return velocity


def run_decompose(clip: Clip, bundle: Bundle, settings: Settings, progress: Progress,
                  objects: list[int] | None = None) -> dict[str, Layers]:
    """object name -> Layers on the source grid."""
    objects = list(range(len(clip.names))) if objects is None else objects
    experts = load_experts(bundle, experts_needed(settings.tau), progress)
    effect, quality = experts.get("effect"), experts.get("quality")
    tau = resolve_tau(settings.tau, effect, quality)
    vae = load_vae(bundle, progress)
    cond = encode_conditioning(clip, bundle, settings, progress, vae)
    dit = load_stage(bundle, "transformer", progress, settings.dtype)
    check_experts(dit, effect, quality)
    ctx = dit.embed_context(cond.context, cond.clip_fea)
    mx.eval(ctx)
    latents = {}
    starts = noise(mx.random.key(settings.seed), cond.cond_latent, 2 * len(objects))
    for n, i in enumerate(objects):
        y = condition_channels(build_trimask(cond.masks, [i]), cond.cond_latent)
        velocity = branch_window_velocity(dit, y, ctx, effect, quality, tau)
        latents[clip.names[i]] = denoise(velocity, starts[2 * n : 2 * n + 2], settings, progress, clip.names[i],
                                         describe_step=lambda t: f"{route(t, tau)} expert")
    del dit, ctx
    free()
    layers = {}
    src = clip.frames.astype(np.float32) / 255.0
    for name, (z_bg, z_alpha) in latents.items():
        bg = from_model_grid(decode(vae, z_bg, settings, progress, f"{name} background"), cond.plan)
        alpha = from_model_grid(decode(vae, z_alpha, settings, progress, f"{name} alpha").mean(-1), cond.plan)
        alpha = np.clip(alpha, 0.0, 1.0)
        layers[name] = Layers(alpha, solve_foreground(src, alpha, bg), bg)
    return layers
