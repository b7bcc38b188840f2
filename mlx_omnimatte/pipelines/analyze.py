"""Block-wise effect analysis over synthetic clips with a known effect
(`analysis.py` holds the computation; this module feeds it and writes the
report).

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

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..analysis import STAGES, BlockScores, Stages, block_scores, partition
from ..bundle import Bundle
from ..encoders.image import clip_features
from ..encoders.text import encode_prompts
from ..errors import OmnimatteError
from ..io.grid import GridPlan, pad_frames, resize_masks
from ..io.inputs import Clip, load_clip_folder
from ..io.masks import build_trimask
from ..io.truth import read_truth
from ..io.video import natural_key
from ..io.writers import atomic_output
from ..memory import format_bytes
from ..models.wan.transformer import Config as DiTConfig
from ..progress import Report, stage
from .conditioning import (CHANNELS_PER_LATENT_FRAME, VAE_STRIDE, condition_channels, model_input,
                           model_masks, model_video, plan_for)
from .settings import Settings, vae_budget
from .stages import free, load_stage
from .windows import DEFAULT_WINDOW

class NothingToMeasure(OmnimatteError):
    """A clip whose effect lies inside the dilated object mask: skipped, not fatal."""


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


DEFAULT_T = 0.8  # a high-noise step, where the Effect expert runs (t > tau = 0.5)
EFFECT_THRESHOLD = 0.05  # effect alpha above this is effect (shadows are 30-70% opaque)
OBJECT_COVERAGE = 0.5  # share of a token's cell the object mask must cover
EFFECT_DIR = "truth/effect_00"
MAX_FRAMES = CHANNELS_PER_LATENT_FRAME * (DEFAULT_WINDOW - 1) + 1  # one window: 81 frames
MAP_CLIPS = 2  # clips whose maps are drawn
MAP_FRAMES = 3  # latent frames per map
MAP_MIN_WIDTH = 640  # pixels; narrower strips are enlarged by a whole factor
MAP_HEADER = 38  # pixels of caption above a map


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


@dataclass
class ClipResult:
    name: str
    scores: BlockScores
    frames: np.ndarray | None  # uint8 [F', H, W, 3]: the model-grid input frame of each latent frame
    object_tokens: np.ndarray  # bool [f, h, w]
    effect_weight: np.ndarray  # float32 [f, h, w]


@dataclass
class Analysis:
    t: float
    results: list[ClipResult]
    stages: Stages

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.results]

    @property
    def contributions(self) -> np.ndarray:
        """[clips, blocks]: C_b per clip."""
        return np.stack([r.scores.contribution for r in self.results])

    @property
    def mean(self) -> np.ndarray:
        return self.contributions.mean(axis=0)

    @property
    def std(self) -> np.ndarray:
        return self.contributions.std(axis=0)

    def per_block(self, field: str) -> np.ndarray:
        """Mean over clips of a BlockScores field (seconds, peak_bytes, added_bytes)."""
        return np.mean([getattr(r.scores, field) for r in self.results], axis=0)


# --------------------------------------------------------------------------- inputs


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
                  say=_stderr) -> list[ClipInput]:
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
                 budget_bytes: int | None = None, say=_stderr) -> Analysis:
    """Analyze the first `clips` clips of `data` at noise level `t` in [0, 1].
    Every input is checked before any weight loads; a clip with nothing to
    measure is skipped with one line to `say`."""
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


def _span(r: range) -> str:
    return "none" if not len(r) else f"{r.start}" if len(r) == 1 else f"{r.start}-{r.stop - 1}"


def scores_csv(a: Analysis) -> str:
    rows = ["block," + ",".join(f"C_{n}" for n in a.names) + ",mean,std"]
    per_clip = a.contributions
    for b in range(per_clip.shape[1]):
        values = [*per_clip[:, b], a.mean[b], a.std[b]]
        rows.append(f"{b}," + ",".join(f"{v:.8f}" for v in values))
    return "\n".join(rows) + "\n"


def recommendation(a: Analysis) -> str:
    s = a.stages
    if not s.k:
        return ("no block follows the perception stage (the curve peaks at the last block): "
                "no K can be recommended from this curve")
    return (f"recommended K = {s.k} (the Effect expert's LoRA on blocks {_span(s.suppression)}): "
            f"train --expert effect --k {s.k}, convert --k {s.k}")


def summary_text(a: Analysis) -> str:
    seconds, peak, added = a.per_block("seconds"), a.per_block("peak_bytes"), a.per_block("added_bytes")
    lines = [f"effect analysis at t = {a.t:g} (timestep {1000 * a.t:g}) over {len(a.results)} clip(s)",
             f"{'block':>5} {'C_b mean':>9} {'std':>8} {'stage':<12} {'seconds':>8} {'peak':>10} {'added':>10}"]
    for b in range(a.mean.size):
        lines.append(f"{b:>5} {a.mean[b]:>9.4f} {a.std[b]:>8.4f} {a.stages.of(b):<12} {seconds[b]:>8.3f} "
                     f"{format_bytes(peak[b]):>10} {format_bytes(added[b]):>10}")
    lines.append("stages: " + ", ".join(f"{n} {_span(getattr(a.stages, n))}" for n in STAGES))
    lines.append(recommendation(a))
    return "\n".join(lines)


def summary_json(a: Analysis) -> dict:
    return {"t": a.t, "timestep": 1000 * a.t, "clips": a.names, "blocks": int(a.mean.size),
            "mean": a.mean.tolist(), "std": a.std.tolist(), "stages": a.stages.as_dict(),
            "k": a.stages.k, "seconds_per_block": a.per_block("seconds").tolist(),
            "peak_bytes_per_block": a.per_block("peak_bytes").tolist(),
            "added_bytes_per_block": a.per_block("added_bytes").tolist()}


def write_report(a: Analysis, out, overwrite: bool = False, report: Report = None) -> Path:
    """scores.csv, contribution.png, maps/, summary.txt, summary.json; atomic."""
    with stage(report, "write report", 1) as tick, atomic_output(out, overwrite, directory=True) as tmp:
        (tmp / "scores.csv").write_text(scores_csv(a))
        draw_contribution(a).save(tmp / "contribution.png")
        (tmp / "maps").mkdir()
        for r in a.results[:MAP_CLIPS]:
            for name, block in stage_blocks(a):
                file = tmp / "maps" / f"{r.name}_{name}_block{block:02d}.png"
                draw_map(r, block, f"{r.name}, block {block} ({name})").save(file)
        (tmp / "summary.txt").write_text(summary_text(a) + "\n")
        (tmp / "summary.json").write_text(json.dumps(summary_json(a), indent=2) + "\n")
        tick()
    return Path(out)


# --------------------------------------------------------------------------- drawing

STAGE_COLOURS = {"context": (236, 236, 236), "perception": (255, 226, 196), "suppression": (206, 224, 247)}
CURVE, BAR, INK = (200, 70, 30), (120, 120, 120), (30, 30, 30)
OBJECT_LINE, EFFECT_LINE = (255, 255, 255), (0, 230, 255)
# a dark-to-bright ramp (black, purple, red, orange, pale yellow) for attention maps
RAMP = np.array([[0, 0, 4], [80, 18, 123], [183, 55, 121], [252, 137, 97], [252, 253, 191]], np.float32)


def stage_blocks(a: Analysis) -> list[tuple[str, int]]:
    """(stage, the stage's block with the highest mean C_b) per non-empty stage."""
    out = []
    for name in STAGES:
        r = getattr(a.stages, name)
        if len(r):
            out.append((name, r.start + int(np.argmax(a.mean[r.start:r.stop]))))
    return out


def _font(size: int):
    return ImageFont.load_default(size=size)


def draw_contribution(a: Analysis, size=(900, 420)) -> Image.Image:
    """C_b per block (bars: mean, whiskers: std over clips) on the stages' bands."""
    w, h = size
    left, right, top, bottom = 80, 20, 50, 60
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    n = a.mean.size
    ymax = float(max((a.mean + a.std).max(), 1e-12)) * 1.1
    step = (w - left - right) / n

    def x_of(b: float) -> float:
        return left + step * b

    def y_of(v: float) -> float:
        return top + (h - top - bottom) * (1.0 - v / ymax)

    for name in STAGES:
        r = getattr(a.stages, name)
        if len(r):
            d.rectangle([x_of(r.start), top, x_of(r.stop), h - bottom], fill=STAGE_COLOURS[name])
            d.text((x_of(r.start) + 4, top + 4), name, fill=INK, font=_font(13))
    _draw_axes(d, a, x_of, y_of, ymax, step, size, (left, right, top, bottom))
    for b in range(n):
        x0, x1 = x_of(b) + 0.2 * step, x_of(b + 1) - 0.2 * step
        d.rectangle([x0, y_of(a.mean[b]), x1, y_of(0)], fill=BAR)
        xc = 0.5 * (x0 + x1)
        d.line([xc, y_of(a.mean[b] - a.std[b]), xc, y_of(a.mean[b] + a.std[b])], fill=INK, width=1)
    d.line([(x_of(b + 0.5), y_of(a.mean[b])) for b in range(n)], fill=CURVE, width=2)
    for r in (a.stages.perception, a.stages.suppression):
        if len(r) and r.start > 0:
            d.line([x_of(r.start), top, x_of(r.start), h - bottom], fill=INK, width=2)
    title = f"effect association C_b per block, {len(a.results)} clip(s), t = {a.t:g}; " + (
        f"recommended K = {a.stages.k}" if a.stages.k else "no K")
    d.text((left, 14), title, fill=INK, font=_font(16))
    return img


def _draw_axes(d, a: Analysis, x_of, y_of, ymax: float, step: float, size, margins) -> None:
    w, h = size
    left, right, top, bottom = margins
    d.line([left, h - bottom, w - right, h - bottom], fill=INK)
    d.line([left, top, left, h - bottom], fill=INK)
    every = max(1, int(np.ceil(a.mean.size / 30)))
    for b in range(0, a.mean.size, every):
        d.text((x_of(b + 0.5), h - bottom + 6), str(b), fill=INK, font=_font(11), anchor="ma")
    tick = nice_step(ymax / 5)
    for v in np.arange(0.0, ymax, tick):
        d.line([left - 4, y_of(v), left, y_of(v)], fill=INK)
        d.text((left - 6, y_of(v)), f"{v:.{max(0, -int(np.floor(np.log10(tick))))}f}", fill=INK,
               font=_font(11), anchor="rm")
    d.text((0.5 * (left + w - right), h - 20), "block", fill=INK, font=_font(13), anchor="mm")
    d.text((8, 0.5 * (top + h - bottom)), "C_b", fill=INK, font=_font(13), anchor="lm")


def nice_step(raw: float) -> float:
    """The 1, 2 or 5 times a power of ten at or above `raw`."""
    p = 10.0 ** np.floor(np.log10(raw))
    return next(m * p for m in (1, 2, 5, 10) if m * p >= raw)


def heat(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB through RAMP."""
    v = np.clip(values, 0.0, 1.0) * (len(RAMP) - 1)
    i = np.minimum(v.astype(np.int64), len(RAMP) - 2)
    f = (v - i)[..., None]
    return np.rint(RAMP[i] * (1 - f) + RAMP[i + 1] * f).astype(np.uint8)


def draw_map(r: ClipResult, block: int, label: str, frames: int = MAP_FRAMES, blend: float = 0.6) -> Image.Image:
    """S_b of a few latent frames over their input frames, side by side, on
    one scale (the largest value shown)."""
    maps = r.scores.maps[block]
    picks = np.unique(np.linspace(0, maps.shape[0] - 1, frames).round().astype(int))
    scale = float(maps[picks].max()) or 1.0
    tiles = []
    for f in picks:
        base = r.frames[f].astype(np.float32)
        ry, rx = base.shape[0] // maps.shape[1], base.shape[1] // maps.shape[2]
        up = np.repeat(np.repeat(maps[f] / scale, ry, axis=0), rx, axis=1)
        tiles.append(np.rint((1 - blend) * base + blend * heat(up)).astype(np.uint8))
    zoom = -(-MAP_MIN_WIDTH // (len(picks) * base.shape[1]))  # small grids are enlarged, nearest
    strip = np.concatenate(tiles, axis=1).repeat(zoom, axis=0).repeat(zoom, axis=1)
    img = Image.new("RGB", (strip.shape[1], strip.shape[0] + MAP_HEADER), "white")
    img.paste(Image.fromarray(strip), (0, MAP_HEADER))
    d = ImageDraw.Draw(img)
    cell = (ry * zoom, rx * zoom)
    for n, f in enumerate(picks):
        origin = (n * base.shape[1] * zoom, MAP_HEADER)
        _outline(d, r.object_tokens[f], cell, origin, OBJECT_LINE)
        _outline(d, r.effect_weight[f] > 0, cell, origin, EFFECT_LINE)
    d.text((4, 3), f"{label}, latent frames {', '.join(map(str, picks))}", fill=INK, font=_font(13))
    d.text((4, 20), "S_b over the input frame; object tokens outlined white, effect tokens cyan", fill=INK,
           font=_font(11))
    return img


def _outline(d, cells: np.ndarray, cell: tuple, origin: tuple, colour) -> None:
    """Draw the border of a set of token cells (edges between a member and a non-member)."""
    ch, cw = cell
    ox, oy = origin
    padded = np.pad(cells, 1)
    for y, x in zip(*np.nonzero(cells)):
        x0, y0, x1, y1 = ox + x * cw, oy + y * ch, ox + (x + 1) * cw - 1, oy + (y + 1) * ch - 1
        if not padded[y, x + 1]:
            d.line([x0, y0, x1, y0], fill=colour)
        if not padded[y + 2, x + 1]:
            d.line([x0, y1, x1, y1], fill=colour)
        if not padded[y + 1, x]:
            d.line([x0, y0, x0, y1], fill=colour)
        if not padded[y + 1, x + 2]:
            d.line([x1, y0, x1, y1], fill=colour)
