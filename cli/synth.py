"""`mlx-omnimatte synth`: synthetic clips with known truth (a clip folder in
the Generative Omnimatte layout plus ``truth/``), for measuring decompositions
and for training."""

from __future__ import annotations

import math
from pathlib import Path

import click

from mlx_omnimatte.io.grid import parse_size
from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.io.writers import check_output, check_space
from mlx_omnimatte.memory import format_bytes, machine_memory
from mlx_omnimatte.progress import Progress
from mlx_omnimatte.sampling import DEFAULT_SEED
from mlx_omnimatte.synth import EFFECT_KINDS, PLATES, Source, make_clip, write_clip, write_dataset


# measured at 81x832x480 with two objects and both plates: 1.9 GB of RSS
HOST_BYTES_PER_PIXEL = 40  # per pixel and frame, plus per object below
HOST_BYTES_PER_OBJECT_PIXEL = 12
FRAME_BUFFERS = 64  # per pixel of one frame: the panning canvas and warps


def _check_size(out: Path, size: tuple[int, int], frames: int, objects: int, count: int, plate: str) -> None:
    """A clip that cannot fit in memory or on the disk is refused before any
    array is made."""
    px = size[0] * size[1]
    host = px * frames * (HOST_BYTES_PER_PIXEL + HOST_BYTES_PER_OBJECT_PIXEL * objects) + px * FRAME_BUFFERS
    if host > 0.85 * machine_memory():
        raise OmnimatteError(f"--size {size[0]}x{size[1]} with {frames} frames needs about {format_bytes(host)} of "
                             f"memory, more than this machine's {format_bytes(machine_memory())} allows: lower "
                             "--size or --frames")
    per_object = 3 * 2 + 3  # alpha, effect and object alpha (16-bit), colour
    disk = count * px * frames * (3 * (1 + (plate == "removal")) + 3 + per_object * objects)
    check_space(out, disk)


@click.command("synth")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True,
              help="Clip folder to write (with --count: a folder of clips 00000/, 00001/, ...).")
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True,
              help="Random seed (clip i uses seed + i; the default is every command's).")
@click.option("--frames", type=click.IntRange(1, 10000), default=21, show_default=True,
              help="Frames per clip (1-10000).")
@click.option("--size", default="128x96", show_default=True, help="Width x height.")
@click.option("--objects", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Foreground layers (mask_00 is the front-most).")
@click.option("--count", type=click.IntRange(1, 100000), default=None, help="Write this many clips.")
@click.option("--shadow-opacity", type=click.FloatRange(0.0, 1.0), default=None,
              help="Pseudo-shadow opacity (default: random in 0.3-0.7).")
@click.option("--no-shadow", is_flag=True, help="No pseudo-shadow (the same as --effect none).")
@click.option("--effect", "effects", type=click.Choice(EFFECT_KINDS), multiple=True,
              help="The effect of the next object (repeat: one per object, front to back, cycled). "
                   "shadow: a black pseudo-shadow on the ground below it (the default); reflection: the "
                   "object mirrored below its base at 30-50% opacity; light: a blurred warm-white pool of "
                   "light around its base at 30-50% opacity; none: no effect.")
@click.option("--plate", type=click.Choice(PLATES), default="exact", show_default=True,
              help="removal: also write truth/background_removal/, an imperfect plate as an object-removal "
                   "model gives it: the true plate drifted by a smooth sub-pixel field (0.5 px at 480 px "
                   "height, slowly changing), blurred (sigma 0.6 px at 480 px), a gain of 0.97-1.03 per "
                   "channel for the whole clip and noise of sigma 1.5/255 fresh each frame.")
@click.option("--fg-source", type=click.Path(path_type=Path), default=None,
              help="Foreground clips with alpha: a folder with fgr/ and pha/ (VideoMatte240K layout).")
@click.option("--bg-source", type=click.Path(path_type=Path), default=None,
              help="Background: a video, a frame folder, or a folder of them.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def synth(out, seed, frames, size, objects, count, shadow_opacity, no_shadow, effects, plate, fg_source, bg_source,
          overwrite, quiet):
    """Write a synthetic clip: textured shapes (or your foreground clips)
    moving along eased affine paths over a slowly panning background, each
    with an effect (a pseudo-shadow unless --effect says otherwise); truth/
    holds the clean background and, per object, the alpha with the effect,
    the effect alone, the object alone and the colour (16-bit PNG alpha,
    lossless); meta.json lists the effects and the plate.

    \b
    Examples:
      mlx-omnimatte synth -o clips/synth0 --seed 0 --frames 24 --size 160x96
      mlx-omnimatte synth -o data/train --count 1000 --objects 2
      mlx-omnimatte synth -o clips/person --fg-source VideoMatte240K/train --bg-source backgrounds/
      mlx-omnimatte synth -o clips/mixed --objects 2 --effect shadow --effect reflection --plate removal
    """
    check_output(out, overwrite)
    if shadow_opacity is not None and not math.isfinite(shadow_opacity):
        raise OmnimatteError(f"--shadow-opacity {shadow_opacity}: must be a number in [0, 1]")
    _check_size(out, parse_size(size), frames, objects, count or 1, plate)
    source = Source(fg_source, bg_source) if (fg_source or bg_source) else None
    if no_shadow and "shadow" in effects:
        raise click.UsageError("--no-shadow and --effect shadow contradict each other")
    kwargs = dict(frames=frames, size=parse_size(size), objects=objects, shadow=not no_shadow, source=source,
                  shadow_opacity=shadow_opacity, effects=list(effects) or None, plate=plate)
    if count is None:
        write_clip(make_clip(seed, **kwargs), out, overwrite=overwrite, meta={"seed": seed})
    else:
        progress = Progress(enabled=not quiet)
        write_dataset(out, count, seed=seed, overwrite=overwrite, report=progress.report, **kwargs)
    click.echo(f"wrote {out}")

