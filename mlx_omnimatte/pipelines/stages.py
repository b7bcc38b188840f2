"""The stage runner every diffusion mode shares: load the VAE, encode the
conditioning, load the DiT, denoise each trajectory with temporal windows,
free the DiT, decode. Each stage loads what it needs, runs and frees it, so
peak memory is one stage's, not the sum.

A mode supplies only what differs (`ModeSpec`): its trajectories (which
objects each removes, how many latents it steps together), the velocity of
one window, and a check of the loaded DiT. Stages report through the
caller's `report` callback (`progress.py`).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import mlx.core as mx
import numpy as np

from ..bundle import Bundle
from ..encoders.image import clip_features
from ..encoders.text import encode_prompts
from ..errors import OmnimatteError
from ..io.inputs import Clip
from ..memory import buffer_cache, kept_heap
from ..progress import Report, stage
from ..sampling import make_sampler, sample
from ..removers import Remover
from ..step_cache import Calibration, Recorder, attached, current_calibration, new_cache, parse_cache
from ..weights import load_model
from .conditioning import (CLIP_TOKENS, Conditioning, grey_hole_channels, model_masks, model_video, plan_for,
                           removal_mask, remover_prompt, trajectory_channels)
from .settings import Settings, vae_budget
from .windows import blend_velocity, make_windows


@dataclass
class Trajectory:
    label: str
    remove: Optional[list[int]]  # objects the trimask removes (None: all)
    latents: int = 1  # latents stepped together (2: background and alpha)


@dataclass
class ModeSpec:
    """What a mode adds to the shared stages.

    `velocity(dit, y, ctx)` returns ``window_velocity(x, t, (start, end))``
    for one trajectory's conditioning `y`; `check(dit)` runs once the DiT is
    loaded; `describe(t)` names what runs at a step (for the progress bar).
    """

    trajectories: list[Trajectory]
    velocity: Callable
    check: Callable = lambda dit: None
    describe: Optional[Callable] = None


def free() -> None:
    gc.collect()
    mx.clear_cache()


def load_stage(bundle: Bundle, component: str, report: Report, dtype: str | None = None):
    with stage(report, f"load {component}", 1) as tick:
        model = load_model(bundle.path(component), component, dtype=dtype)
        tick()
    return model


def encode_conditioning(clip: Clip, bundle: Bundle, vae, settings: Settings, report: Report,
                        trajectories: Sequence[Trajectory] = ()) -> Conditioning:
    """What the bundle's remover is conditioned on; MiniMax-Remover's latents
    depend on which objects a trajectory removes, so they are encoded here
    for each of `trajectories`, before the DiT loads."""
    remover = bundle.remover
    plan = plan_for(clip, settings.size, settings.min_frames)
    video = model_video(clip, plan)
    masks = model_masks(clip, plan, remover)
    context, clip_fea = encode_context(clip, bundle, remover, settings, report)

    def encode(x, name="vae encode"):
        z = vae.encode(x, tiling=settings.vae_tiling, memory_budget=vae_budget(settings),
                       on_chunk=_chunks(report, name))
        mx.eval(z)
        return z

    if remover.condition == "grey-hole":
        channels = {t.label: grey_hole_channels(video, removal_mask(masks, t.remove, remover),
                                                lambda x, what: encode(x, f"vae encode {t.label} {what}"))
                    for t in trajectories}
        return Conditioning(plan, video, masks, context, clip_fea, None, remover, channels)
    return Conditioning(plan, video, masks, context, clip_fea, encode(mx.array(video[None])), remover)


def encode_context(clip: Clip, bundle: Bundle, remover: Remover, settings: Settings, report: Report):
    """(text context, CLIP features) as the remover takes them: the caption
    or "" through the text encoder (each encoder loads, runs and frees in its
    own stage; a cached prompt loads nothing), CLIP of frame 0 or zeros; None
    for a branch the DiT does not have."""
    context = clip_fea = None
    prompt = remover_prompt(remover, clip.caption)
    if prompt is not None:
        context = mx.array(encode_prompts(bundle.path("t5"), [prompt], settings.cache_dir, report=report)[0])[None]
        free()
    if remover.clip == "frame0":
        clip_fea = clip_features(bundle.path("clip"), clip.first_frame, report=report)
        mx.eval(clip_fea)
        free()
    elif remover.clip == "zeros":
        clip_fea = mx.zeros((1, CLIP_TOKENS, bundle.config("transformer")["image_dim"]))
    with stage(report, f"conditioning {remover.kind}", 1) as tick:
        tick(describe_conditioning(remover))
    return context, clip_fea


def describe_conditioning(r: Remover) -> str:
    """One line of what the DiT is conditioned on (the run's records keep it)."""
    prompt = {"caption": "the caption", "empty": 'prompt ""', "none": "no text encoder"}[r.prompt]
    image = {"frame0": "CLIP of frame 0", "zeros": "CLIP context zeros", "none": "no image encoder"}[r.clip]
    return f"{r.name}: {r.mask} mask, {r.condition} video latent, {prompt}, {image}"


def check_finite(v, step: int, steps: int, dtype: str) -> None:
    leaves = v if isinstance(v, (list, tuple)) else [v]
    if not all(bool(mx.all(mx.isfinite(a)).item()) for a in leaves):
        hint = " (try --dtype float32)" if dtype != "float32" else ""
        raise OmnimatteError(f"denoising step {step + 1}/{steps}: NaN or Inf in the latents with {dtype} "
                             f"weights; nothing was written{hint}")


def denoise(window_velocity, latents, *, sampler, window: int, overlap: int, report: Report = None,
            label: str = "", describe=None, dtype: str = "float32", cache=None):
    """Sample `latents` (an array or a list stepped together) along `sampler`.

    `window_velocity(x, t, (start, end))` returns the velocity of one temporal
    window; windows are blended at every step. `describe(t)` names what runs
    at a step (the expert) for the progress bar; `dtype` (of the weights)
    goes into the message when the latents stop being finite. `cache`: the
    trajectory's step cache (`step_cache.py`, attached to the DiT by the
    caller): told which step and window each forward is, its counts go into
    the progress detail.
    """
    first = latents[0] if isinstance(latents, (list, tuple)) else latents
    windows = make_windows(first.shape[1], window, overlap)
    steps = len(sampler.timesteps)
    with stage(report, f"denoise {label}".strip(), steps) as tick:
        detail = {}

        def velocity(x, t, i):
            detail["d"] = describe(t) if describe is not None else ""
            v = blend_velocity(_at_step(window_velocity, cache, i), x, t, windows)
            mx.eval(v)
            check_finite(v, i, steps, dtype)
            if cache is not None:
                cache.step_done(i, v)
            return v

        with buffer_cache(), kept_heap():
            return sample(velocity, latents, sampler, callback=lambda i, t: tick(_detail(detail["d"], cache)))


def _at_step(window_velocity, cache, step: int):
    """The window velocity telling the cache which step and window each forward is."""
    if cache is None:
        return window_velocity

    def at(x, t, span):
        cache.at(step, span)
        return window_velocity(x, t, span)

    return at


def _detail(described: str, cache) -> str:
    return "; ".join(d for d in (described, cache.detail() if cache is not None else "") if d)


def decode(vae, latent: mx.array, settings: Settings, report: Report, label: str) -> np.ndarray:
    """Latent -> float32 video [T, H, W, 3] in [0, 1], decoded frame by frame
    into a preallocated buffer."""
    out = np.empty(vae.video_shape(latent.shape), np.float32)
    vae.decode(latent, tiling=settings.vae_tiling, memory_budget=vae_budget(settings), out=out,
               on_chunk=_chunks(report, f"vae decode {label}"))
    return (out[0] + 1.0) * 0.5


def _chunks(report: Report, name: str):
    """The VAE's per-chunk callback as stage reports (a bar with an ETA)."""
    if report is None:
        return None
    report(name, 0, None, "")
    return lambda done, total: report(name, done, total, "")


def noise(key, shape: tuple, count: int) -> list[mx.array]:
    """`count` independent standard-normal latents of `shape`."""
    keys = mx.random.split(key, count)
    return [mx.random.normal(shape, key=k) for k in keys]


def _sample_all(dit, cond: Conditioning, spec: ModeSpec, settings: Settings, report: Report,
                calibration: Optional[Calibration] = None) -> dict:
    """label -> list of latents at sigma 0, one trajectory after another, each
    with a fresh step cache when one is asked for."""
    ctx = dit.embed_context(cond.context, cond.clip_fea)
    mx.eval(ctx)
    total = sum(t.latents for t in spec.trajectories)
    starts = noise(mx.random.key(settings.seed), cond.latent_shape, total)
    sampler = make_sampler(settings.sampler, settings.steps, settings.shift)
    out, n = {}, 0
    for traj in spec.trajectories:
        z = starts[n : n + traj.latents]
        n += traj.latents
        cache = new_cache(parse_cache(settings.cache), sampler.num_steps, calibration)
        out[traj.label] = _trajectory(dit, cond, ctx, traj, z, spec, settings, sampler, report, cache)
    return out


def _trajectory(dit, cond: Conditioning, ctx, traj: Trajectory, z: list, spec: ModeSpec, settings: Settings,
                sampler, report: Report, cache=None) -> list:
    """One trajectory's latents at sigma 0, `cache` (or None) attached to the DiT."""
    y = trajectory_channels(cond, traj.label, traj.remove)
    return sample_trajectory(dit, spec, y, ctx, z, settings, sampler, report, traj.label, cache)


def sample_trajectory(dit, spec: ModeSpec, y, ctx, z: list, settings: Settings, sampler, report: Report = None,
                      label: str = "", cache=None) -> list:
    """Latents ``z`` (one, or the branch's background and alpha, stepped
    together) from noise to sigma 0 under the mode's velocity, conditioned on
    ``y`` (mask channels + condition latent) and the embedded context, in
    temporal windows."""
    with attached(dit, cache):
        out = denoise(spec.velocity(dit, y, ctx), z if len(z) > 1 else z[0], sampler=sampler,
                      window=settings.window, overlap=settings.overlap, report=report, label=label,
                      describe=spec.describe, dtype=settings.dtype, cache=cache)
    return list(out) if len(z) > 1 else [out]


def bundle_calibration(bundle: Bundle, settings: Settings) -> tuple[Optional[Calibration], Optional[str]]:
    """The bundle's own step-cache figures when a cache is asked for and it has
    them for its weights; else None, with a one-line note when a calibration
    of other weights is ignored."""
    if not parse_cache(settings.cache).enabled:
        return None, None
    return current_calibration(bundle.path("transformer"))


def run_stages(clip: Clip, bundle: Bundle, spec: ModeSpec, settings: Settings, report: Report = None,
               decode_as: Sequence[str] = ("background",)):
    """Run a mode's trajectories; returns (grid plan, {label: {name: decoded
    video [T, H, W, 3] in [0, 1] on the model grid}}), the latents of each
    trajectory decoded under the names of `decode_as`."""
    # a broken calibration file stops the run before any weight loads
    calibration, _ = bundle_calibration(bundle, settings)
    vae = load_stage(bundle, "vae", report)
    cond = encode_conditioning(clip, bundle, vae, settings, report, spec.trajectories)
    dit = load_stage(bundle, "transformer", report, settings.dtype)
    spec.check(dit)
    latents = _sample_all(dit, cond, spec, settings, report, calibration)
    del dit
    free()
    decoded = {label: {name: decode(vae, z, settings, report, f"{label} {name}".strip()) for name, z in zip(decode_as, zs)}
               for label, zs in latents.items()}
    return cond.plan, decoded


def run_calibration(clip: Clip, bundle: Bundle, spec: ModeSpec, settings: Settings,
                    report: Report = None) -> Calibration:
    """One reference trajectory (the spec's first) with every forward computed,
    measured for the step caches (`calibrate-cache`); nothing is decoded."""
    recorder = Recorder(settings.steps)
    vae = load_stage(bundle, "vae", report)
    cond = encode_conditioning(clip, bundle, vae, settings, report, spec.trajectories[:1])
    del vae
    free()
    dit = load_stage(bundle, "transformer", report, settings.dtype)
    spec.check(dit)
    ctx = dit.embed_context(cond.context, cond.clip_fea)
    traj = spec.trajectories[0]
    z = noise(mx.random.key(settings.seed), cond.latent_shape, traj.latents)
    sampler = make_sampler(settings.sampler, settings.steps, settings.shift)
    _trajectory(dit, cond, ctx, traj, z, spec, settings, sampler, report, recorder)
    return recorder.calibration(settings.sampler, settings.shift, str(clip.source))
