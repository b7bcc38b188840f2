"""Measure a decomposition (EasyOmnimatte's protocol, supplementary D).

Reads a ``decompose`` output folder (``OUT/object_<name>/`` with the RGBA
layer -- ``layer/`` PNG frames, ``layer.mov`` or ``layer.webm`` -- or only
``alpha.mp4`` / ``alpha/``, and ``background.mp4`` or ``background/``), the
input clip, and optionally the synthetic truth (``synth.write_clip``'s
``truth/``).

Measures, per object: recomposition ``a * fg + (1 - a) * bg`` over the
object's own background against the input (PSNR, SSIM); with several
objects sharing one background (clean-plate runs), also all layers front to
back over it ("all"). With truth: alpha MAE/MSE on the object region (truth
object alpha > 0.5) and on the effect region (truth effect > 0.05 and outside
the object mask dilated by ``EFFECT_DILATE``), object IoU of alpha at 0.5
against the truth layer alpha outside that effect region (a 50%-opacity
shadow sits on the threshold itself: it is measured by the effect error, not
by a coin flip in the IoU), and the background's PSNR against the true plate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import metrics
from ..compositing import as_float, recompose, solve_foreground
from ..errors import OmnimatteError
from ..io.inputs import load_clip_folder
from ..io.masks import dilate_mask
from ..io.video import read_rgba, read_video
from ..synth import read_truth

OBJECT_PREFIX = "object_"
LAYER_NAMES = ("layer", "layer.mov", "layer.webm")
ALPHA_NAMES = ("alpha", "alpha.mp4")
BACKGROUND_NAMES = ("background", "background.mp4", "background.mov", "background.mkv")
EFFECT_THRESHOLD = 0.05
EFFECT_DILATE = 5
SHARED_TOLERANCE = 2.0 / 255.0  # mean difference under which backgrounds count as one


@dataclass
class LayerOutput:
    name: str
    alpha: np.ndarray  # float32 [T, H, W]
    foreground: np.ndarray  # float32 [T, H, W, 3]
    background: np.ndarray  # float32 [T, H, W, 3]


@dataclass
class Evaluation:
    rows: dict[str, dict] = field(default_factory=dict)  # object name (or "all") -> measures

    def to_json(self) -> str:
        clean = {k: {m: (None if isinstance(v, float) and np.isnan(v) else v) for m, v in r.items()}
                 for k, r in self.rows.items()}
        return json.dumps(clean, indent=2) + "\n"

    def table(self) -> str:
        cols = sorted({c for r in self.rows.values() for c in r}, key=COLUMN_ORDER.index)
        widths = [max(len(c), 8) + 2 for c in cols]
        lines = [f"{'layer':<8}" + "".join(f"{c:>{w}}" for c, w in zip(cols, widths))]
        for name, r in self.rows.items():
            cells = "".join(f"{_fmt(r.get(c)):>{w}}" for c, w in zip(cols, widths))
            lines.append(f"{name:<8}{cells}")
        return "\n".join(lines)


COLUMN_ORDER = ["recompose_psnr", "recompose_ssim", "object_mae", "object_mse", "effect_mae", "effect_mse",
                "effect_pixels", "iou", "background_psnr"]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    return "n/a" if np.isnan(v) else f"{v:.4f}"


def _find(folder: Path, names) -> Path | None:
    return next((folder / n for n in names if (folder / n).exists()), None)


def read_layer(folder: Path) -> LayerOutput:
    """One ``object_<name>`` folder of a decompose output."""
    name = folder.name[len(OBJECT_PREFIX):]
    bg_path = _find(folder, BACKGROUND_NAMES)
    if bg_path is None:
        raise OmnimatteError(f"{folder}: no background (background.mp4 or background/)")
    bg = as_float(read_video(bg_path)[0])
    layer_path = _find(folder, LAYER_NAMES)
    if layer_path is not None:
        rgba = as_float(read_rgba(layer_path)[0])
        alpha, fg = rgba[..., 3], rgba[..., :3]
    else:
        alpha_path = _find(folder, ALPHA_NAMES)
        if alpha_path is None:
            raise OmnimatteError(f"{folder}: no layer (layer/, layer.mov, layer.webm) and no alpha")
        alpha, fg = as_float(read_video(alpha_path, gray=True)[0]), None
    return LayerOutput(name, alpha, fg, bg)


def read_output(out: Path) -> list[LayerOutput]:
    out = Path(out)
    folders = sorted(p for p in out.glob(f"{OBJECT_PREFIX}*") if p.is_dir()) if out.is_dir() else []
    if not folders:
        raise OmnimatteError(f"{out}: no {OBJECT_PREFIX}<name>/ folders (not a decompose output)")
    return [read_layer(f) for f in folders]


def _check_shapes(layers: list[LayerOutput], frames: np.ndarray) -> None:
    for layer in layers:
        if layer.alpha.shape != frames.shape[:3] or layer.background.shape != frames.shape:
            raise OmnimatteError(f"object {layer.name}: output {layer.alpha.shape} / {layer.background.shape} "
                                 f"does not match the clip's {frames.shape}")


def recomposition(layer: LayerOutput, video: np.ndarray) -> dict:
    fg = layer.foreground if layer.foreground is not None else solve_foreground(video, layer.alpha, layer.background)
    rec = recompose(layer.alpha, fg, layer.background)
    return {"recompose_psnr": metrics.psnr(rec, video), "recompose_ssim": metrics.ssim(rec, video)}


def shared_background(layers: list[LayerOutput]) -> bool:
    first = layers[0].background
    return all(float(np.abs(x.background - first).mean()) < SHARED_TOLERANCE for x in layers[1:])


def all_layers(layers: list[LayerOutput], video: np.ndarray) -> dict:
    """Every layer front to back (folder order) over the shared background."""
    pairs = [(x.alpha, x.foreground if x.foreground is not None else solve_foreground(video, x.alpha, x.background))
             for x in layers]
    rec = layers[0].background
    for alpha, fg in reversed(pairs):
        rec = recompose(alpha, fg, rec)
    return {"recompose_psnr": metrics.psnr(rec, video), "recompose_ssim": metrics.ssim(rec, video)}


def truth_measures(layer: LayerOutput, truth: dict, k: int) -> dict:
    obj_truth = truth["object_alpha"][k]
    obj = obj_truth > 0.5
    effect = (truth["effect"][k] > EFFECT_THRESHOLD) & ~dilate_mask(obj, EFFECT_DILATE)
    o = metrics.alpha_errors(layer.alpha, truth["alpha"][k], obj)
    e = metrics.alpha_errors(layer.alpha, truth["alpha"][k], effect)
    return {"object_mae": o["mae"], "object_mse": o["mse"], "effect_mae": e["mae"], "effect_mse": e["mse"],
            "effect_pixels": e["pixels"], "iou": metrics.iou(layer.alpha, truth["alpha"][k], ignore=effect),
            "background_psnr": metrics.psnr(layer.background, truth["background"])}


def evaluate(out, clip, truth=None) -> Evaluation:
    """Measures of the decompose output ``out`` for the clip folder ``clip``;
    ``truth``: the synthetic truth folder (the clip's ``truth/`` or the clip)."""
    video = as_float(load_clip_folder(clip).frames)
    layers = read_output(Path(out))
    _check_shapes(layers, video)
    result = Evaluation()
    t = read_truth(truth) if truth is not None else None
    for layer in layers:
        row = recomposition(layer, video)
        if t is not None:
            if layer.name not in t["names"]:
                raise OmnimatteError(f"{truth}: no truth for object {layer.name} (has {', '.join(t['names'])})")
            row.update(truth_measures(layer, t, t["names"].index(layer.name)))
        result.rows[layer.name] = row
    if len(layers) > 1 and shared_background(layers):
        result.rows["all"] = all_layers(layers, video)
    return result
