"""Block-wise effect analysis over synthetic clips with a known effect: this
module feeds the frozen DiT (`scores` holds the computation, `report` writes
the report).

A data folder holds clips in the layout `synth.write_clip` writes (or is one
such clip): input_video/, mask_00/ (the front-most object, the one analyzed),
prompt.json and truth/ with effect_00/, the effect-only alpha. Per clip:

* the model grid as for removal (`--size`, else ~480x832 area), the clip's
  own frame count (4n+1, at most one 81-frame window, no padding to 81);
* the conditioning of the removal of object 00 (the other objects kept):
  trimask, condition latent of the unmasked video, CLIP features, caption;
* the noisy latent at sigma t: (1 - t) * z0 + t * noise, z0 the VAE latent
  of the clean background (truth/background/), the removal's target;
* one forward of the frozen DiT at timestep 1000 t, probing every block.

On the token grid (VAE stride 8 x patch (1, 2, 2); latent frame 0 is pixel
frame 0 alone, each later one 4 pixel frames), the object's queries are the
tokens at least half covered by the dilated object mask, and the effect
weight of a token is the share of its cell inside M^e = (effect alpha >
EFFECT_THRESHOLD) and not the dilated object mask.

The report: scores.csv (C_b per clip, mean, std), contribution.png (the curve
with its stages), maps/ (S_b over the input frames, one block per stage),
summary.txt and summary.json (stages, the recommended K, seconds and memory
per block).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..bundle import Bundle
from ..encoders.image import clip_features
from ..encoders.text import encode_prompts
from ..errors import OmnimatteError
from ..io.grid import GridPlan, pad_frames, resize_masks
from ..io.inputs import Clip, load_clip_folder
from ..io.masks import build_trimask
from ..io.truth import read_truth
from ..io.video import natural_key
from ..models.wan.transformer import Config as DiTConfig
from ..pipelines.conditioning import (CHANNELS_PER_LATENT_FRAME, VAE_STRIDE, condition_channels, model_input,
                                      model_masks, model_video, plan_for)
from ..pipelines.settings import Settings, vae_budget
from ..pipelines.stages import free, load_stage
from ..pipelines.windows import DEFAULT_WINDOW
from ..progress import Report, stage
from .report import MAP_CLIPS
from .scores import Analysis, ClipResult, block_scores, partition

class NothingToMeasure(OmnimatteError):
    """A clip whose effect lies inside the dilated object mask: skipped, not fatal."""


DEFAULT_T = 0.8  # a high-noise step, where the Effect expert runs (t > tau = 0.5)
EFFECT_THRESHOLD = 0.05  # effect alpha above this is effect (shadows are 30-70% opaque)
OBJECT_COVERAGE = 0.5  # share of a token's cell the object mask must cover
EFFECT_DIR = "truth/effect_00"
MAX_FRAMES = CHANNELS_PER_LATENT_FRAME * (DEFAULT_WINDOW - 1) + 1  # one window: 81 frames


@dataclass
class ClipInput:
    """One clip on the model grid, ready to encode."""

    name: str
    clip: Clip
    plan: GridPlan
    masks: list[np.ndarray]  # bool [T, H, W] per object, dilated, model grid
    background: np.ndarray  # uint8 [T, H, W, 3] truth clean plate, source grid
    object_tokens: np.ndarray  # bool [f, h, w]
    effect_weight: np.ndarray  # float32 [f, h, w]




def check_t(t) -> float:
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0.0 <= float(t) <= 1.0:
        raise OmnimatteError(f"t {t!r}: the noise level must be in [0, 1] (timestep 1000 t)")
    return float(t)


def find_clips(data, limit: int | None = None) -> list[Path]:
    """The clip folders of `data` (itself a clip, or a folder of clips), in
    natural order, the first `limit`; each must have the effect truth."""
    data = Path(data)
    if limit is not None and limit < 1:
        raise OmnimatteError(f"--clips {limit}: must be at least 1")
    if not data.is_dir():
        raise OmnimatteError(f"{data}: not a folder of clips")
    if (data / "input_video").exists() or any(data.glob("input_video.*")):
        folders = [data]
    else:
        folders = sorted((p for p in data.iterdir() if p.is_dir() and not p.name.startswith(".")),
                         key=lambda p: natural_key(p.name))
    if not folders:
        raise OmnimatteError(f"{data}: no clip folders in it")
    folders = folders[:limit]
    for f in folders:
        if not (f / EFFECT_DIR).is_dir():
            raise OmnimatteError(f"{f}: no {EFFECT_DIR}/ (the effect-only alpha); the analysis needs clips "
                                 "with a known effect, as `mlx_omnimatte.synth` writes them")
    return folders


def token_coverage(mask: np.ndarray, patch: tuple) -> np.ndarray:
    """Share of each token's cell covered by `mask` [T, H, W] (T = 4n+1, on
    the model grid) -> float32 [f, h, w] on the token grid. Frame 0 counts
    4 times, so it fills latent frame 0 alone, as in the mask channels."""
    m = np.asarray(mask, dtype=np.float32)
    g = CHANNELS_PER_LATENT_FRAME
    m = np.concatenate([np.repeat(m[:1], g, axis=0), m[1:]], axis=0)
    pt, ph, pw = patch
    sh, sw = VAE_STRIDE * ph, VAE_STRIDE * pw
    t4, h, w = m.shape
    if t4 % (g * pt) or h % sh or w % sw:
        raise ValueError(f"mask {mask.shape} does not tile into tokens of {g * pt}x{sh}x{sw}")
    cells = m.reshape(t4 // (g * pt), g * pt, h // sh, sh, w // sw, sw)
    return cells.mean(axis=(1, 3, 5))


def effect_region(effect: np.ndarray, plan: GridPlan, object_mask: np.ndarray) -> np.ndarray:
    """M^e on the model grid: the effect alpha (source grid, float [T, H, W])
    area-resized, above EFFECT_THRESHOLD, outside the dilated object mask."""
    small = resize_masks(np.asarray(effect, dtype=np.float32), plan.size, "area")
    return pad_frames(small > EFFECT_THRESHOLD, plan.frames) & ~object_mask


def prepare_clip(folder: Path, settings: Settings, patch: tuple) -> ClipInput:
    clip = load_clip_folder(folder)
    truth = read_truth(folder)
    n = min(clip.num_frames, MAX_FRAMES)
    clip = replace(clip, frames=clip.frames[:n], masks=[m[:n] for m in clip.masks])
    plan = plan_for(clip, settings.size, min_frames=1)
    masks = model_masks(clip, plan)
    effect = truth["effect"][0][:n]
    if effect.shape[0] != n or effect.shape[1:] != clip.frames.shape[1:3]:
        raise OmnimatteError(f"{folder / EFFECT_DIR}: {effect.shape[0]} frames of {effect.shape[2]}x"
                             f"{effect.shape[1]}, the video has {n} of {clip.size[0]}x{clip.size[1]}")
    objects = token_coverage(masks[0], patch) >= OBJECT_COVERAGE
    if not objects.any():
        raise OmnimatteError(f"{folder}: the object mask mask_00 covers no token of the latent grid "
                             f"(no {VAE_STRIDE * patch[1]}x{VAE_STRIDE * patch[2]} cell at least "
                             f"{OBJECT_COVERAGE:.0%} object); use a larger --size or a larger object")
    weight = token_coverage(effect_region(effect, plan, masks[0]), patch)
    if not weight.any():
        raise NothingToMeasure(f"{folder}: the effect in {EFFECT_DIR} lies entirely inside the dilated object "
                               "mask (or is empty): nothing to measure")
    return ClipInput(folder.name, clip, plan, masks, truth["background"][:n], objects, weight)


def prepare_clips(folders: list[Path], settings: Settings, patch: tuple, report: Report,
                  say=None) -> list[ClipInput]:
    """The clips' inputs; a clip with nothing to measure is skipped with one
    line to ``say`` (small synthetic clips make such clips), not the data set."""
    items, skipped = [], []
    with stage(report, "prepare clips", len(folders)) as tick:
        for f in folders:
            try:
                items.append(prepare_clip(f, settings, patch))
            except NothingToMeasure as e:
                skipped.append(e)
            tick(f.name)
    if not items and len(skipped) == 1:
        raise skipped[0]
    if not items:
        raise OmnimatteError(f"{folders[0].parent}: no clip has an effect outside its dilated object mask: "
                             "nothing to measure (a larger --size or other clips)")
    for e in skipped:
        if say is not None:
            say(f"{e}; skipped")
    return items


# --------------------------------------------------------------------------- conditioning


def encode_texts(bundle: Bundle, items: list[ClipInput], settings: Settings, report: Report) -> list:
    """(context [1, 512, d], clip_fea [1, 257, 1280]) per clip: every caption
    in one encoder run, frame 0 of clips of one size in one batch."""
    contexts = encode_prompts(bundle.path("t5"), [i.clip.caption or "" for i in items], settings.cache_dir,
                              report=report)
    free()
    images = [None] * len(items)
    shapes = {i.clip.frames.shape[1:]: None for i in items}
    for shape in shapes:
        idx = [j for j, i in enumerate(items) if i.clip.frames.shape[1:] == shape]
        feats = clip_features(bundle.path("clip"), np.stack([items[j].clip.frames[0] for j in idx]), report=report)
        mx.eval(feats)
        for row, j in enumerate(idx):
            images[j] = feats[row:row + 1]
        free()
    return [(mx.array(c)[None], f) for c, f in zip(contexts, images)]


def encode_latents(vae, items: list[ClipInput], settings: Settings, report: Report) -> list:
    """(condition latent, z0, preview frames) per clip: the VAE latents of the
    unmasked video and of the clean background, and for the first MAP_CLIPS
    clips the model-grid frame of each latent frame (else None)."""
    budget = vae_budget(settings)
    out = []
    with stage(report, "vae encode", sum(2 * i.plan.frames for i in items)) as tick:  # video and plate
        for n, item in enumerate(items):
            video = model_video(item.clip, item.plan)
            plate = model_video(replace(item.clip, frames=item.background), item.plan)
            cond, z0 = (vae.encode(mx.array(v[None]), tiling=settings.vae_tiling, memory_budget=budget)
                        for v in (video, plate))
            mx.eval(cond, z0)
            frames = None
            if n < MAP_CLIPS:
                picks = np.minimum(np.arange(cond.shape[1]) * CHANNELS_PER_LATENT_FRAME, video.shape[0] - 1)
                frames = np.clip(np.rint((video[picks] + 1.0) * 127.5), 0, 255).astype(np.uint8)
            out.append((cond, z0, frames))
            tick(item.name, n=2 * item.plan.frames)
    return out


def noisy_input(item: ClipInput, cond: mx.array, z0: mx.array, t: float, seed: int) -> mx.array:
    """The 36-channel DiT input of the removal of object 00 at sigma t."""
    eps = mx.random.normal(z0.shape, key=mx.random.key(seed))
    x_t = (1.0 - t) * z0 + t * eps
    return model_input(x_t, condition_channels(build_trimask(item.masks, [0]), cond))


# --------------------------------------------------------------------------- the run


def dit_patch(bundle: Bundle) -> tuple:
    return DiTConfig.from_dict(bundle.config("transformer")).patch_size


def run_analysis(data, bundle: Bundle, t: float = DEFAULT_T, clips: int | None = None,
                 settings: Settings | None = None, report: Report = None,
                 budget_bytes: int | None = None, say=None) -> Analysis:
    """Analyze the first `clips` clips of `data` at noise level `t` in [0, 1].
    Every input is checked before any weight loads; a clip with nothing to
    measure is skipped with one line to `say` (the caller's, as `report`;
    None: silent)."""
    t = check_t(t)
    settings = settings or Settings()
    folders = find_clips(data, clips)
    items = prepare_clips(folders, settings, dit_patch(bundle), report, say)
    texts = encode_texts(bundle, items, settings, report)
    vae = load_stage(bundle, "vae", report)
    latents = encode_latents(vae, items, settings, report)
    del vae
    free()
    dit = load_stage(bundle, "transformer", report, settings.dtype)
    results = []
    with stage(report, "analyze", len(items)) as tick:
        for item, (context, clip_fea), (cond, z0, frames) in zip(items, texts, latents):
            ctx = dit.embed_context(context, clip_fea)
            x = noisy_input(item, cond, z0, t, settings.seed)
            scores = block_scores(dit, x, 1000.0 * t, ctx, item.object_tokens, item.effect_weight, budget_bytes)
            results.append(ClipResult(item.name, scores, frames, item.object_tokens, item.effect_weight))
            tick(f"{item.name}: peak at block {int(np.argmax(scores.effect_mass))}")
    del dit
    free()
    mean = np.mean([r.scores.contribution for r in results], axis=0)
    return Analysis(t, results, partition(mean))


# --------------------------------------------------------------------------- the report
