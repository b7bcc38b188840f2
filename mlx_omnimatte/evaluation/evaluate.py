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
by a coin flip in the IoU), false alpha (the mean predicted alpha where the
layer is empty: truth layer alpha below ``EMPTY_ALPHA`` and outside the
region where it is above, dilated as the object mask is, so that soft edges
and faint effect tails do not count), and the background's PSNR against the
true plate.

Everything is measured frame by frame (PSNR and SSIM are means over frames,
errors and IoU sums over them), with the videos kept as read (uint8): a clip
at 832x480 and 81 frames with 2 objects takes about 1.7 GB.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import metrics
from ..compositing import as_float, recompose, solve_foreground
from ..errors import OmnimatteError
from ..io.inputs import load_clip_folder
from ..io.masks import dilate_mask
from ..io.video import read_rgba, read_video
from ..io.truth import read_truth, workers

OBJECT_PREFIX = "object_"
LAYER_NAMES = ("layer", "layer.mov", "layer.webm")
ALPHA_NAMES = ("alpha", "alpha.mp4")
BACKGROUND_NAMES = ("background", "background.mp4", "background.mov", "background.mkv")
EFFECT_THRESHOLD = 0.05
EFFECT_DILATE = 5
EMPTY_ALPHA = 0.01  # truth layer alpha under this (and a margin away) counts as empty
SHARED_TOLERANCE = 2.0 / 255.0  # mean difference under which backgrounds count as one


@dataclass
class LayerOutput:
    name: str
    alpha: np.ndarray  # [T, H, W], uint8 as read (or float in [0, 1])
    foreground: np.ndarray | None  # [T, H, W, 3] likewise; None: only alpha was written
    background: np.ndarray  # [T, H, W, 3] likewise


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
        return "\n".join(lines + self.legend(cols))

    def legend(self, cols) -> list[str]:
        lines = [f"  {c}: {LEGEND[c]}" for c in cols]
        if "all" in self.rows:
            lines.append("  (the layers share one background: each is measured in the 'all' recomposition, "
                         "where the others are present)")
        return lines


COLUMN_ORDER = ["recompose_psnr", "recompose_ssim", "object_mae", "object_mse", "effect_mae", "effect_mse",
                "effect_pixels", "iou", "false_alpha", "false_pixels", "background_psnr"]


LEGEND = {
    "recompose_psnr": "PSNR in dB of alpha*fg + (1-alpha)*bg against the input (higher is better)",
    "recompose_ssim": "SSIM of that recomposition, 0-1 (higher is better)",
    "object_mae": "mean |alpha - truth| on the object (truth object alpha > 0.5), alpha in 0-1",
    "object_mse": "mean squared alpha error on the object",
    "effect_mae": "mean |alpha - truth| on the effect (truth effect > 0.05, off the object by 5 px)",
    "effect_mse": "mean squared alpha error on the effect",
    "effect_pixels": "pixels of the effect region over the clip",
    "iou": "IoU of alpha > 0.5 with the truth's, the effect region left out",
    "false_alpha": "mean alpha where the layer is empty (truth < 0.01, 5 px off anything): 0 is right",
    "false_pixels": "pixels of that empty region over the clip",
    "background_psnr": "PSNR in dB of the background against the true plate",
}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    return "n/a" if np.isnan(v) else f"{v:.4f}"


def _find(folder: Path, names) -> Path | None:
    return next((folder / n for n in names if (folder / n).exists()), None)


def read_layer(folder: Path) -> LayerOutput:
    """One ``object_<name>`` folder of a decompose output (uint8 arrays)."""
    name = folder.name[len(OBJECT_PREFIX):]
    bg_path = _find(folder, BACKGROUND_NAMES)
    if bg_path is None:
        raise OmnimatteError(f"{folder}: no background (background.mp4 or background/)")
    bg = read_video(bg_path)[0]
    layer_path = _find(folder, LAYER_NAMES)
    if layer_path is not None:
        rgba = read_rgba(layer_path)[0]
        alpha, fg = rgba[..., 3], rgba[..., :3]
    else:
        alpha_path = _find(folder, ALPHA_NAMES)
        if alpha_path is None:
            raise OmnimatteError(f"{folder}: no layer (layer/, layer.mov, layer.webm) and no alpha")
        alpha, fg = read_video(alpha_path, gray=True)[0], None
    return LayerOutput(name, alpha, fg, bg)


def output_folders(out: Path) -> list[Path]:
    out = Path(out)
    folders = sorted(p for p in out.glob(f"{OBJECT_PREFIX}*") if p.is_dir()) if out.is_dir() else []
    if not folders:
        raise OmnimatteError(f"{out}: no {OBJECT_PREFIX}<name>/ folders (not a decompose output)")
    return folders


def read_output(out: Path) -> list[LayerOutput]:
    return [read_layer(f) for f in output_folders(out)]


def _check_shapes(layers: list[LayerOutput], frames: np.ndarray) -> None:
    for layer in layers:
        if layer.alpha.shape != frames.shape[:3] or layer.background.shape != frames.shape:
            raise OmnimatteError(f"object {layer.name}: output {layer.alpha.shape} / {layer.background.shape} "
                                 f"does not match the clip's {frames.shape}")


def shared_background(layers: list[LayerOutput]) -> bool:
    first = layers[0].background
    return all(np.mean([np.abs(as_float(x) - as_float(y)).mean() for x, y in zip(layer.background, first)])
               < SHARED_TOLERANCE for layer in layers[1:])


def layer_frame(layer: LayerOutput, video: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frame ``i`` of a layer as floats: alpha, colour (solved from the input
    frame ``video`` when only alpha was written) and background."""
    a, bg = as_float(layer.alpha[i]), as_float(layer.background[i])
    fg = as_float(layer.foreground[i]) if layer.foreground is not None else solve_foreground(video, a, bg)
    return a, fg, bg


def _recomposition(rec: np.ndarray, video: np.ndarray, video_stats) -> dict:
    return {"recompose_psnr": metrics.psnr(rec[None], video[None]),
            "recompose_ssim": metrics.ssim_frame(rec, video, stats_b=video_stats)}


def empty_region(truth_alpha: np.ndarray) -> np.ndarray:
    """Where a layer is empty: truth alpha below ``EMPTY_ALPHA`` and outside
    the region where it is above, dilated by an ``EFFECT_DILATE`` square."""
    return (truth_alpha < EMPTY_ALPHA) & ~dilate_mask(truth_alpha > EMPTY_ALPHA, EFFECT_DILATE)


def truth_frame(alpha: np.ndarray, bg: np.ndarray, truth: dict, k: int, i: int) -> dict:
    """Frame ``i``'s sums for the truth measures of layer ``k``."""
    target = truth["alpha"][k][i]
    obj = truth["object_alpha"][k][i] > 0.5
    effect = (truth["effect"][k][i] > EFFECT_THRESHOLD) & ~dilate_mask(obj, EFFECT_DILATE)
    empty = empty_region(target)
    return {"object": metrics.error_sums(alpha, target, obj), "effect": metrics.error_sums(alpha, target, effect),
            "iou": metrics.iou_counts(alpha, target, ignore=effect),
            "false": np.array([float(alpha[empty].astype(np.float64).sum()), float(empty.sum())]),
            "background_psnr": metrics.psnr(bg[None], truth["background"][i][None])}


def frame_measures(layers: list[LayerOutput], video: np.ndarray, i: int, truth: dict | None,
                   index: dict, shared: bool) -> dict:
    """Frame ``i``'s measures: row name -> measure -> value or sums."""
    v = as_float(video[i])
    stats = metrics.ssim_stats(v)  # the input frame's SSIM windows, shared by every row
    rows, frames = {}, [layer_frame(x, v, i) for x in layers]
    for layer, (a, fg, bg) in zip(layers, frames):
        rows[layer.name] = _recomposition(recompose(a, fg, bg), v, stats)
        if truth is not None:
            rows[layer.name].update(truth_frame(a, bg, truth, index[layer.name], i))
    if shared:  # every layer front to back (folder order) over the first background
        rec = frames[0][2]
        for a, fg, _ in reversed(frames):
            rec = recompose(a, fg, rec)
        rows["all"] = _recomposition(rec, v, stats)
    return rows


def summarize(per_frame: list[dict]) -> dict:
    """Means of the per-frame figures, measures from the summed ones."""
    out = {}
    for name, first in per_frame[0].items():
        values = {m: [f[name][m] for f in per_frame] for m in first}
        row = {m: float(np.mean(values[m])) for m in ("recompose_psnr", "recompose_ssim", "background_psnr")
               if m in values}
        if "object" in values:
            o, e = (metrics.errors_from_sums(np.sum(values[m], axis=0)) for m in ("object", "effect"))
            false = np.sum(values["false"], axis=0)
            row.update({"object_mae": o["mae"], "object_mse": o["mse"], "effect_mae": e["mae"],
                        "effect_mse": e["mse"], "effect_pixels": e["pixels"],
                        "iou": metrics.iou_from_counts(np.sum(values["iou"], axis=0)),
                        "false_alpha": float(false[0] / false[1]) if false[1] else float("nan"),
                        "false_pixels": int(false[1])})
        out[name] = {m: row[m] for m in COLUMN_ORDER if m in row}
    return out


def _truth_index(layers: list[LayerOutput], truth: dict, where) -> dict:
    missing = [x.name for x in layers if x.name not in truth["names"]]
    if missing:
        raise OmnimatteError(f"{where}: no truth for object {missing[0]} (has {', '.join(truth['names'])})")
    return {x.name: truth["names"].index(x.name) for x in layers}


def evaluate(out, clip, truth=None) -> Evaluation:
    """Measures of the decompose output ``out`` for the clip folder ``clip``;
    ``truth``: the synthetic truth folder (the clip's ``truth/`` or the clip)."""
    folders = output_folders(out)
    # Readers decode without the GIL (and numpy computes without it): threads
    # share the cores, for the files and then for the frames.
    with ThreadPoolExecutor(max_workers=workers()) as pool:
        video_job = pool.submit(lambda: load_clip_folder(clip).frames)
        layer_jobs = [pool.submit(read_layer, f) for f in folders]
        truth_job = pool.submit(read_truth, truth, False) if truth is not None else None
        video, layers = video_job.result(), [j.result() for j in layer_jobs]
        t = truth_job.result() if truth_job is not None else None
        _check_shapes(layers, video)
        index = _truth_index(layers, t, truth) if t is not None else {}
        shared = len(layers) > 1 and shared_background(layers)
        per_frame = list(pool.map(lambda i: frame_measures(layers, video, i, t, index, shared),
                                  range(video.shape[0])))
    rows = summarize(per_frame)
    if "all" in rows:  # one layer over the shared background alone lacks the others: not a measure of it
        for name, row in rows.items():
            if name != "all":
                row.pop("recompose_psnr", None)
                row.pop("recompose_ssim", None)
    return Evaluation(rows)
