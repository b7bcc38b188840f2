"""Stages shared by the removal and omnimatte pipelines: encode the
conditioning, denoise with temporal windows, decode. Each loads what it
needs, runs, and frees it, so peak memory is one stage's, not the sum."""

from __future__ import annotations

import gc
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .. import text
from ..bundle import Bundle
from ..errors import OmnimatteError
from ..io.inputs import Clip
from ..memory import machine_memory
from ..progress import Progress
from ..sampling import make_sampler, sample
from ..weights import load_model
from .conditioning import Conditioning, model_masks, model_video, plan_for
from .windows import DEFAULT_OVERLAP, DEFAULT_WINDOW, blend_velocity, make_windows


@dataclass
class Settings:
    """Every knob of a run; the defaults are the reference's."""

    steps: int = 50
    seed: int = 43
    shift: float = 5.0
    sampler: str = "euler"
    size: str | None = None  # "WxH" on the model grid; default: ~480x832 area, source aspect
    min_frames: int = 81  # short clips are padded to one full window
    dtype: str = "bfloat16"  # DiT weights and matmuls
    tau: float | None = None  # expert switch (omnimatte); None: the experts' default
    window: int = DEFAULT_WINDOW
    overlap: int = DEFAULT_OVERLAP
    cache_dir: str | None = None  # prompt-embedding cache
    vae_tiling: bool | None = None  # None: tiles only when a frame does not fit vae_budget
    vae_budget: int | None = None  # bytes for the VAE; None: half of this machine's memory


def vae_budget(settings: Settings) -> int:
    return settings.vae_budget or machine_memory() // 2


def free() -> None:
    gc.collect()
    mx.clear_cache()


def encode_conditioning(clip: Clip, bundle: Bundle, settings: Settings, progress: Progress, vae) -> Conditioning:
    plan = plan_for(clip, settings.size, settings.min_frames)
    video = model_video(clip, plan)
    masks = model_masks(clip, plan)
    caption = clip.caption or ""
    # each encoder loads, runs and frees inside its own stage of `progress`;
    # a cached prompt loads nothing
    context = text.encode_prompts(bundle.path("t5"), [caption], settings.cache_dir, report=progress)[0]
    context = mx.array(context)[None]
    free()
    clip_fea = text.clip_features(bundle.path("clip"), clip.frames[0], report=progress)
    mx.eval(clip_fea)
    free()
    with progress.stage("vae encode", total=1, unit="video") as bar:
        cond = vae.encode(mx.array(video[None]), tiling=settings.vae_tiling, memory_budget=vae_budget(settings))
        mx.eval(cond)
        bar.update()
    return Conditioning(plan, video, masks, context, clip_fea, cond)


def check_finite(v, step: int, steps: int, dtype: str) -> None:
    leaves = v if isinstance(v, (list, tuple)) else [v]
    if not all(bool(mx.all(mx.isfinite(a)).item()) for a in leaves):
        raise OmnimatteError(
            f"denoising step {step + 1}/{steps}: NaN or Inf in the latents with {dtype} weights; "
            "nothing was written (try --dtype float32)")


def denoise(window_velocity, latents, settings: Settings, progress: Progress, label: str,
            describe_step=None):
    """Sample `latents` (an array or a list stepped together).

    `window_velocity(x, t, (start, end))` returns the velocity of one temporal
    window; windows are blended at every step. `describe_step(t)` names what
    runs at a step (the expert) for the progress bar.
    """
    sampler = make_sampler(settings.sampler, settings.steps, settings.shift)
    first = latents[0] if isinstance(latents, (list, tuple)) else latents
    windows = make_windows(first.shape[1], settings.window, settings.overlap)
    with progress.stage(f"denoise {label}", total=settings.steps, unit="step") as bar:
        def velocity(x, t, i):
            if describe_step is not None:
                bar.set_postfix_str(describe_step(t))
            v = blend_velocity(window_velocity, x, t, windows)
            mx.eval(v)
            check_finite(v, i, settings.steps, settings.dtype)
            return v

        return sample(velocity, latents, sampler, callback=lambda i, t: bar.update())


def decode(vae, latent: mx.array, settings: Settings, progress: Progress, label: str) -> np.ndarray:
    """Latent -> float32 video [T, H, W, 3] in [0, 1], decoded frame by frame
    into a preallocated buffer."""
    with progress.stage(f"vae decode {label}", total=1, unit="video") as bar:
        out = np.empty(vae.video_shape(latent.shape), np.float32)
        vae.decode(latent, tiling=settings.vae_tiling, memory_budget=vae_budget(settings), out=out)
        bar.update()
    return (out[0] + 1.0) * 0.5


def noise(key, cond_latent: mx.array, count: int) -> list[mx.array]:
    """`count` independent standard-normal latents shaped like the condition."""
    keys = mx.random.split(key, count)
    return [mx.random.normal(cond_latent.shape, key=k) for k in keys]


def load_stage(bundle: Bundle, component: str, progress: Progress, dtype: str | None = None):
    with progress.stage(f"load {component}", total=1, unit="model") as bar:
        model = load_model(bundle.path(component), component, dtype=dtype)
        bar.update()
    return model


def load_vae(bundle: Bundle, progress: Progress):
    return load_stage(bundle, "vae", progress)


def num_windows(latent_frames: int, settings: Settings) -> int:
    return len(make_windows(latent_frames, settings.window, settings.overlap))
