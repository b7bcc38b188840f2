"""Validation of an expert being trained: decompose held-out cached samples
with a few-step schedule and measure the alpha error.

Steps, shift and tau are settings: the authors' layers come from 2-step
diffusion, and with shift 5 a 2-step grid (sigmas 1.0, 0.83) stays above
tau = 0.5, so a Quality expert alone needs tau = 1 (or shift 1) to run at all.
One expert runs the whole schedule here (tau 0 for Effect, 1 for Quality)
unless both are given.

Errors: the alpha latent's mean squared error against the cached target,
and, when a VAE is given, the decoded alpha's MSE on the object region
(object alpha > 0.5) and on the effect region (effect alpha > 0.05 outside
the object), on the model grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..branch.experts import Expert, select
from ..branch.forward import branch_forward
from ..sampling import DEFAULT_SEED, make_sampler, sample
from .trainer import stack_batch

OBJECT_THRESHOLD = 0.5
EFFECT_THRESHOLD = 0.05


@dataclass
class ValidationSettings:
    steps: int = 4
    shift: float = 5.0
    sampler: str = "euler"
    tau: float | None = None  # None: 0 with only an Effect expert, 1 with only a Quality one, else 0.5
    seed: int = DEFAULT_SEED


def _tau(vs: ValidationSettings, effect, quality) -> float:
    if vs.tau is not None:
        return vs.tau
    return 0.0 if quality is None else 1.0 if effect is None else 0.5


def sample_alpha(model, item: dict, vs: ValidationSettings, effect: Expert | None = None,
                 quality: Expert | None = None) -> mx.array:
    """z_alpha [1, F, h, w, 16] of one cached sample, sampled from noise."""
    b = stack_batch([item], model.config.text_len)
    ctx = model.embed_context(b["context"], b.get("clip"))
    keys = mx.random.split(mx.random.key(vs.seed))
    z = [mx.random.normal(b["alpha"].shape, key=keys[0]), mx.random.normal(b["alpha"].shape, key=keys[1])]
    tau = _tau(vs, effect, quality)

    def velocity(x, t, i):
        expert = select(t, tau, effect, quality)
        return list(branch_forward(model, expert, x[0], x[1], t, cond=b["cond"], ctx=ctx))

    return sample(velocity, z, make_sampler(vs.sampler, vs.steps, vs.shift))[1]


def region_errors(alpha: np.ndarray, truth: dict) -> dict[str, float]:
    """MSE of decoded alpha [T, H, W] against the truth on object and effect regions."""
    target = truth["alpha_px"].astype(np.float32)
    obj = truth["object_px"].astype(np.float32) > OBJECT_THRESHOLD
    eff = (truth["effect_px"].astype(np.float32) > EFFECT_THRESHOLD) & ~obj
    err = (alpha[: target.shape[0]] - target) ** 2
    return {"object_mse": float(err[obj].mean()) if obj.any() else float("nan"),
            "effect_mse": float(err[eff].mean()) if eff.any() else float("nan")}


def validate(model, samples, vs: ValidationSettings, effect: Expert | None = None,
             quality: Expert | None = None, vae=None) -> dict[str, float]:
    """Mean errors over ``samples`` (a `LatentCache` or a list of sample dicts)."""
    rows = []
    for i in range(len(samples)):
        s = samples.read(i, keys=None) if hasattr(samples, "read") else samples[i]
        z = sample_alpha(model, s, vs, effect, quality)
        row = {"latent_mse": float(mx.mean(mx.square(z[0] - mx.array(s["alpha"]))).item())}
        if vae is not None and "alpha_px" in s:
            video = np.array(vae.decode(z))[0]
            row.update(region_errors(np.clip((video.mean(-1) + 1) * 0.5, 0, 1), s))
        rows.append(row)
    return {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}
