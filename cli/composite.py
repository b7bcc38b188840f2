"""`mlx-omnimatte composite`: foreground layers over a new background.

Everything that can be known from the files' headers (the output, every
layer's alpha, size and length, the background's size and length against
--fit) is checked before any frame is decoded; the video is then written
frame by frame into a temporary file that is renamed into place at the end."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
from PIL import Image, UnidentifiedImageError

from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.io.compose import FIT_MODES, check_layer_alpha, check_size, fit_size, fit_times, write_composite
from mlx_omnimatte.io.video import VideoInfo, probe_video, read_rgba, read_video
from mlx_omnimatte.io.writers import RGB_VIDEO_SUFFIXES, check_output
from mlx_omnimatte.progress import Progress, stage

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
WHAT, AGAINST = "background", "the layers'"


def _probe_layers(paths) -> list[VideoInfo]:
    """Every layer carries alpha and has the first layer's size and length."""
    infos = []
    for path in paths:
        info = probe_video(path)
        check_layer_alpha(path)
        first = infos[0] if infos else info
        if (info.size, info.frames) != (first.size, first.frames):
            raise OmnimatteError(f"{path}: {info.width}x{info.height}, {info.frames} frames, differs from "
                                 f"the first layer's {first.width}x{first.height}, {first.frames} frames")
        infos.append(info)
    return infos


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _open_image(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except (OSError, UnidentifiedImageError):
        raise OmnimatteError(f"{path}: not a readable image") from None


def _probe_background(path: Path, layers: VideoInfo, fit: str | None) -> None:
    """The background's size and length against the layers' and --fit."""
    if _is_image(path):
        with _open_image(path) as im:
            size, frames = im.size, 1
    else:
        info = probe_video(path)
        size, frames = info.size, info.frames
    check_size(size, layers.size, fit, WHAT, AGAINST)
    fit_times(frames, layers.frames, fit, WHAT, AGAINST)


def _read_background(path: Path, frames: int) -> np.ndarray:
    """uint8 ``[T, H, W, 3]``; of a video only the frames that can show."""
    if _is_image(path):
        with _open_image(path) as im:
            try:
                return np.asarray(im.convert("RGB"))[None]
            except OSError:
                raise OmnimatteError(f"{path}: not a readable image") from None
    return read_video(path, max_frames=frames)[0]


def _read_layers(paths, frames: int, progress) -> list[tuple[np.ndarray, np.ndarray]]:
    """(alpha, fg) per layer, uint8; the readers decode a layer whole."""
    pairs = []
    with stage(progress, "read layers", frames * len(paths)) as tick:
        for path in paths:
            rgba, info = read_rgba(path)
            pairs.append((rgba[..., 3], rgba[..., :3]))
            tick(Path(path).name, n=info.frames)
    return pairs


@click.command()
@click.argument("layers", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--background", "background", type=click.Path(path_type=Path), required=True,
              help="New background: an image or a video.")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output video (.mp4).")
@click.option("--fit", type=click.Choice(FIT_MODES), default=None,
              help="Fit a background of another size or length: stretch (resize; time-stretch), crop (scale "
                   "to cover, centre-crop; loop in time) or loop (resize; repeat forth and back).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def composite(layers, background, out, fit, overwrite, quiet):
    """Put foreground layers (RGBA PNG folders, .mov or .webm; back to front)
    over a new background image or video, at the layers' fps. A background
    image shows on every frame and a longer video is trimmed; another size or
    a shorter video needs --fit.

    \b
    Examples:
      mlx-omnimatte composite out/beach/object_00/layer out/beach/object_01/layer \\
          --background sunset.jpg -o out/sunset.mp4
      mlx-omnimatte composite out/beach/object_00/layer.mov --background waves.mp4 --fit loop -o out/waves.mp4
    """
    check_output(out, overwrite)
    if out.suffix.lower() not in RGB_VIDEO_SUFFIXES:  # said now, not after decoding
        raise OmnimatteError(f"{out}: the composite is an H.264 video, one of {', '.join(RGB_VIDEO_SUFFIXES)}")
    first = _probe_layers(layers)[0]
    _probe_background(background, first, fit)
    progress = Progress(enabled=not quiet)
    pairs = _read_layers(layers, first.frames, progress)
    frames, height, width = pairs[0][1].shape[:3]  # decoded counts are the truth, not the headers
    bg = fit_size(_read_background(background, frames), (width, height), fit, WHAT, AGAINST)
    times = fit_times(len(bg), frames, fit, WHAT, AGAINST)
    write_composite(out, pairs, bg, times, first.fps, overwrite, report=progress)
    if not quiet:
        click.echo(progress.summary(), err=True)
    click.echo(f"wrote {out}")
