"""Write a run's layers into one output folder, atomically: the folder
appears complete or not at all (errors and Ctrl-C leave nothing behind).

decompose:                              remove:
  OUT/object_<name>/layer/ (RGBA PNG)     OUT/background_all.mp4
         layer.mov / layer.webm           OUT/background_without_<name>.mp4
         alpha.mp4                        (or PNG frame folders)
         background.mp4
         preview.mp4
"""

from __future__ import annotations

import itertools
from contextlib import ExitStack
from pathlib import Path

from ..compositing import rgba
from ..progress import Report, stage
from .preview import panel_size, preview_frame
from .video import iter_frames
from .writers import alpha_sink, atomic_output, background_sink, layer_sink, video_sink

LAYER_FORMATS = {"png": "layer", "prores": "layer.mov", "webm": "layer.webm"}


def source_stream(clip, count: int):
    """The source frames again, one at a time (`clip`: a Clip or a ClipSpec)."""
    return itertools.islice(iter_frames(clip.info.path), count)


def _object_sinks(folder: Path, formats, background: str, preview: bool, fps, stack: ExitStack) -> dict:
    folder.mkdir()
    sinks = {"layers": [stack.enter_context(layer_sink(folder / LAYER_FORMATS[f], fps)) for f in formats],
             "alpha": stack.enter_context(alpha_sink(folder / "alpha.mp4", fps)),
             "background": stack.enter_context(background_sink(folder / _bg_name(background), fps))}
    if preview:
        sinks["preview"] = stack.enter_context(video_sink(folder / "preview.mp4", fps))
    return sinks


def _add_frame(sinks: dict, a, fg, bg, source, panel) -> None:
    for sink in sinks["layers"]:
        sink.add(rgba(a, fg))
    sinks["alpha"].add(a)
    sinks["background"].add(bg)
    if "preview" in sinks:
        sinks["preview"].add(preview_frame(source, [(a, fg, bg)], panel))


def write_decomposition(out: Path, clip, layers: dict, formats=("png",), background: str = "mp4",
                        preview: bool = True, overwrite: bool = False, report: Report = None) -> Path:
    """Every output of every object in one pass over the source, re-read frame
    by frame: each layer gives its source-grid frame (`Layers` or
    `LayerVideos`), and every format is written as it comes. `clip`: the Clip
    or the ClipSpec it was read from."""
    fps, count = clip.info.fps, min(len(x) for x in layers.values())
    panel = panel_size(*clip.info.size)
    with atomic_output(out, overwrite, directory=True) as tmp, ExitStack() as stack:
        sinks = {name: _object_sinks(tmp / f"object_{name}", formats, background, preview, fps, stack)
                 for name in layers}
        with stage(report, "write", count) as tick:
            for t, source in enumerate(source_stream(clip, count)):
                for name, layer in layers.items():
                    _add_frame(sinks[name], *layer.frame(t, source), source, panel)
                tick()
    return out


def write_removal(out: Path, clip, backgrounds: dict, background: str = "mp4",
                  overwrite: bool = False, report: Report = None) -> Path:
    """label -> background GridVideo, written frame by frame."""
    fps, count = clip.info.fps, min(len(x) for x in backgrounds.values())
    with atomic_output(out, overwrite, directory=True) as tmp, ExitStack() as stack:
        sinks = {label: stack.enter_context(background_sink(tmp / _bg_name(background, f"background_{label}"), fps))
                 for label in backgrounds}
        with stage(report, "write", count) as tick:
            for t in range(count):
                for label, video in backgrounds.items():
                    sinks[label].add(video.frame(t))
                tick()
    return out


def _bg_name(fmt: str, stem: str = "background") -> str:
    return stem if fmt == "png" else f"{stem}.{fmt}"


def listing(out: Path) -> list[str]:
    """Files of an output folder (frame folders summarized), for the CLI."""
    lines = []
    for p in sorted(Path(out).rglob("*")):
        if p.is_dir() and any(p.glob("*.png")):
            lines.append(f"{p.relative_to(out)}/  ({len(list(p.glob('*.png')))} PNG frames)")
        elif p.is_file() and p.suffix != ".png":
            lines.append(f"{p.relative_to(out)}  ({p.stat().st_size / 1e6:.1f} MB)")
    return lines
