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

from pathlib import Path

from ..io.inputs import Clip
from ..io.video import read_video
from ..progress import Report, stage
from ..io.preview import write_preview
from ..io.writers import atomic_output, write_alpha, write_background, write_layer

LAYER_FORMATS = {"png": "layer", "prores": "layer.mov", "webm": "layer.webm"}


def write_decomposition(out: Path, clip, layers: dict, formats=("png",), background: str = "mp4",
                        preview: bool = True, overwrite: bool = False, report: Report = None) -> Path:
    """`clip`: the Clip, or the ClipSpec it was read from (the preview then
    re-reads the source frames)."""
    fps = _fps(clip)
    with atomic_output(out, overwrite, directory=True) as tmp, stage(report, "write", len(layers)) as tick:
        for name, layer in layers.items():
            folder = tmp / f"object_{name}"
            folder.mkdir()
            for fmt in formats:
                write_layer(folder / LAYER_FORMATS[fmt], layer.alpha, layer.foreground, fps)
            write_alpha(folder / "alpha.mp4", layer.alpha, fps)
            write_background(folder / _bg_name(background), layer.background, fps)
            if preview:
                write_preview(folder / "preview.mp4", _source_frames(clip, layer.alpha), [layer.alpha],
                              [layer.foreground], [layer.background], fps)
            tick(name)
    return out


def write_removal(out: Path, clip, backgrounds: dict, background: str = "mp4",
                  overwrite: bool = False, report: Report = None) -> Path:
    fps = _fps(clip)
    with atomic_output(out, overwrite, directory=True) as tmp, stage(report, "write", len(backgrounds)) as tick:
        for label, frames in backgrounds.items():
            write_background(tmp / _bg_name(background, f"background_{label}"), frames, fps)
            tick(label)
    return out


def _fps(clip) -> float:
    return clip.info.fps  # a Clip's or a ClipSpec's: the source's rate


def _source_frames(clip, alpha):
    """The source frames for the preview: a Clip's, else re-read (as many as
    the layers have)."""
    if isinstance(clip, Clip):
        return clip.frames
    return read_video(clip.video, fps=clip.fps, max_frames=len(alpha))[0]


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
