"""The analysis report: scores.csv (C_b per clip, mean, std),
contribution.png (the curve with its stages), maps/ (S_b over the input
frames, one block per stage), summary.txt and summary.json (stages, the
recommended K, seconds and memory per block)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..io.writers import atomic_output
from ..memory import format_bytes
from ..progress import Report, stage
from .scores import STAGES, Analysis, ClipResult

MAP_CLIPS = 2  # clips whose maps are drawn
MAP_FRAMES = 3  # latent frames per map
MAP_MIN_WIDTH = 640  # pixels; narrower strips are enlarged by a whole factor
MAP_HEADER = 38  # pixels of caption above a map


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
