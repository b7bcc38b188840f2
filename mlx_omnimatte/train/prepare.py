"""Encode a training data set into the latent cache (`train/cache.py`).

A data set is a folder of clip folders in the Generative Omnimatte layout
with their truth (``truth/`` as `synth.write_clip` writes it: the clean
background, per object its alpha with effects, object alpha and effect
alpha). Each object of each clip is one sample, encoded as inference sees
it: the unmasked video's condition latent, the mask channels of the trimask
that removes that object and keeps the others (masks binarized and dilated
on the model grid as at inference), the target alpha through the VAE as 3
equal channels in [-1, 1], the clean background without that object, CLIP of
frame 0 and the caption's embedding (all captions in one text-encoder load,
through the prompt cache). A ROSE bundle's samples carry its conditioning
instead (binary mask, the prompt "", a zero CLIP context). The model grid is the clip's own size rounded to
multiples of 16 (or ``size``), frames padded to 4n+1 as at inference.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..bundle import open_bundle
from ..compositing import over
from ..errors import OmnimatteError
from ..encoders.image import clip_features
from ..io.grid import pad_frames, plan_grid, resize_frames
from ..io.inputs import find_clip_files, load_clip_folder, mask_name, read_caption
from ..io.video import iter_frames
from ..io.writers import check_output
from ..io.truth import read_truth
from ..progress import Report, stage
from ..encoders.text import encode_prompts
from ..pipelines.conditioning import CLIP_TOKENS, condition_channels, model_masks, model_video, removal_mask, remover_prompt
from ..removers import CASPER, Remover
from ..weights import load_model
from . import cache as lc

MULTIPLE = 16


def clip_folders(data) -> list[Path]:
    data = Path(data)
    if not data.is_dir():
        raise OmnimatteError(f"{data}: not a data set folder")
    folders = sorted(p for p in data.iterdir() if p.is_dir() and (p / "truth").is_dir())
    if not folders:
        raise OmnimatteError(f"{data}: no clip folders with truth/ (make a data set with `mlx-omnimatte synth`)")
    return folders


def train_grid(width: int, height: int, frames: int, size=None):
    """The clip's own size rounded to multiples of 16 (``size``: "WxH"), 4n+1 frames."""
    if size is None:
        size = tuple(max(MULTIPLE, int(round(v / MULTIPLE)) * MULTIPLE) for v in (width, height))
    return plan_grid(width, height, frames, size=size, min_frames=1)


def without_object(truth: dict, i: int) -> np.ndarray:
    """The clean plate with every layer but ``i`` composited back to front
    (float32 [T, H, W, 3] in [0, 1]); layer 0 is the front-most."""
    others = [(truth["alpha"][k][..., None], truth["foreground"][k].astype(np.float32) / 255.0)
              for k in reversed(range(len(truth["alpha"]))) if k != i]
    return over(truth["background"].astype(np.float32) / 255.0, others)


def on_grid(x: np.ndarray, plan) -> np.ndarray:
    """float [T, H, W(, C)] in [0, 1] -> area-resized to the model grid, padded."""
    return pad_frames(resize_frames(x.astype(np.float32), plan.size, "area"), plan.frames)


def encode(vae, video01: np.ndarray) -> mx.array:
    """[T, H, W, 3] in [0, 1] -> latent [F, h, w, 16]."""
    z = vae.encode(mx.array(video01[None] * 2.0 - 1.0))
    mx.eval(z)
    return z[0]


def alpha_video(alpha: np.ndarray) -> np.ndarray:
    """Alpha [T, H, W] in [0, 1] -> 3 equal channels (the mapping inference inverts)."""
    return np.repeat(np.clip(alpha, 0.0, 1.0)[..., None], 3, axis=-1)


def encode_clip(vae, folder: Path, size=None, remover: Remover = CASPER) -> list[dict]:
    """The samples of one clip (one per object), without context and CLIP."""
    clip = load_clip_folder(folder)
    truth = read_truth(folder)
    plan = train_grid(clip.size[0], clip.size[1], clip.num_frames, size)
    cond_latent = encode(vae, (model_video(clip, plan) + 1.0) * 0.5)[None]
    masks = model_masks(clip, plan, remover)
    out = []
    for i, name in enumerate(clip.names):
        cond = condition_channels(removal_mask(masks, [i], remover), cond_latent)[0]
        px = {k: on_grid(truth[src][i], plan).astype(np.float16)
              for k, src in (("alpha_px", "alpha"), ("object_px", "object_alpha"), ("effect_px", "effect"))}
        out.append({"cond": cond, "alpha": encode(vae, alpha_video(on_grid(truth["alpha"][i], plan))),
                    "bg": encode(vae, on_grid(without_object(truth, i), plan)),
                    **{k: mx.array(v) for k, v in px.items()},
                    "_meta": {"clip": folder.name, "object": name}})
    return out


def _listing(folders, size) -> list[dict]:
    """Samples in order, one per object mask of each clip (no decoding)."""
    rows = []
    for f in folders:
        _, masks, _ = find_clip_files(f)
        rows += [{"clip": f.name, "object": mask_name(m)} for m in masks]
    return rows


def open_or_create(out: Path, bundle, data: Path, size, folders, overwrite: bool = False) -> dict:
    """The manifest of ``out``: a new one, or the existing one of the same
    bundle, data and grid (resume); anything else there is refused, unless
    ``overwrite`` (whatever is there is replaced by a new cache)."""
    want = {"format": lc.FORMAT, "version": lc.VERSION, "encoders": lc.bundle_identity(bundle),
            "bundle": str(bundle.root), "data": str(Path(data).resolve()), "size": size,
            "listing": _listing(folders, size)}
    check_output(out, overwrite=True)  # writable, not the current folder
    if out.is_dir() and not out.is_symlink() and overwrite:
        shutil.rmtree(out)
    elif (out.exists() or out.is_symlink()) and overwrite:
        out.unlink()
    elif out.exists():
        try:
            have = lc.read_manifest(out)
        except OmnimatteError:
            raise OmnimatteError(f"{out}: already exists and is not a latent cache (add --overwrite to replace it)"
                                 ) from None
        for key in ("encoders", "data", "size", "listing"):
            if have.get(key) != want[key]:
                raise OmnimatteError(f"{out}: a cache of other {key if key != 'encoders' else 'encoders (another bundle)'}"
                                     f"; choose another -o, or add --overwrite to replace it")
        return have
    out.mkdir(parents=True)
    manifest = {**want, "complete": False, "samples": []}
    lc.write_manifest(out, manifest)
    return manifest


def encode_conditions(bundle, folders, cache_dir, report: Report = None) -> dict:
    """clip name -> (context [L, d] of its caption's tokens, CLIP [257, 1280]).
    The text encoder loads once for all captions (and not at all when the
    prompt cache has them); CLIP once per frame size."""
    captions, frames = {}, {}
    for f in folders:
        video, _, prompt = find_clip_files(f)
        captions[f.name] = remover_prompt(bundle.remover, read_caption(prompt) if prompt is not None else "")
        frames[f.name] = next(iter(iter_frames(video)))
    texts = list(dict.fromkeys(captions.values()))
    contexts = dict(zip(texts, encode_prompts(bundle.path("t5"), texts, cache_dir, report=report)))
    contexts = {t: c[: max(1, int(mx.sum(mx.any(c != 0, axis=-1)).item()))] for t, c in contexts.items()}
    by_size: dict = {}
    for name, fr in frames.items():
        by_size.setdefault(fr.shape, []).append(name)
    feats = {}
    if bundle.remover.clip == "zeros":
        zeros = mx.zeros((CLIP_TOKENS, bundle.config("transformer")["image_dim"]))
        return {n: (contexts[captions[n]], zeros) for n in frames}
    for names in by_size.values():
        out = clip_features(bundle.path("clip"), np.stack([frames[n] for n in names]), report=report)
        feats.update({n: out[j] for j, n in enumerate(names)})
    return {n: (contexts[captions[n]], feats[n]) for n in frames}


def prepare(bundle_path, data, out, size: str | None = None, cache_dir=None, report: Report = None,
            overwrite: bool = False) -> Path:
    """Encode ``data`` into the cache ``out`` (resuming an interrupted one;
    ``overwrite``: replacing whatever ``out`` holds)."""
    out = Path(out)
    bundle = open_bundle(bundle_path, need=lc.ENCODERS)
    if bundle.remover.prompt == "none":
        raise OmnimatteError(f"{bundle_path}: {bundle.remover.name} has no cross-attention; experts (LoRA on "
                             "cross_attn q/o) train on a Casper or ROSE bundle")
    folders = clip_folders(data)
    manifest = open_or_create(out, bundle, Path(data), size, folders, overwrite)
    if manifest.get("complete"):
        return out
    done = {s["index"]: s for s in manifest["samples"] if lc.sample_file(out, s["index"]).is_file()}
    starts = np.cumsum([0] + [_count(manifest, f.name) for f in folders])
    todo = [(f, int(starts[j])) for j, f in enumerate(folders)
            if not all(i in done for i in range(starts[j], starts[j + 1]))]
    conditions = encode_conditions(bundle, [f for f, _ in todo], cache_dir, report) if todo else {}
    vae = load_model(bundle.path("vae"), "vae")
    with stage(report, "prepare", len(todo)) as tick:
        for folder, start in todo:
            samples = encode_clip(vae, folder, size, bundle.remover)
            write_samples(out, samples, start, conditions[folder.name], done)
            manifest["samples"] = [done[i] for i in sorted(done)]
            lc.write_manifest(out, manifest)
            tick(folder.name)
    manifest["complete"] = True
    lc.write_manifest(out, manifest)
    return out


def _count(manifest: dict, clip: str) -> int:
    return sum(1 for row in manifest["listing"] if row["clip"] == clip)


def write_samples(out: Path, samples: list[dict], start: int, condition, done: dict) -> None:
    context, clip = condition
    for j, s in enumerate(samples):
        meta = s.pop("_meta")
        s["context"], s["clip"] = context, clip
        lc.write_sample(out, start + j, s, {"clip": meta["clip"], "object": meta["object"]})
        done[start + j] = {"index": start + j, "clip": meta["clip"], "object": meta["object"],
                           "shape": list(s["alpha"].shape[:3])}
