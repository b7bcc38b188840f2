"""`mlx-omnimatte mask`: object masks from a few words, a click or a box
(SAM3 through mlx-vlm), written as a clip folder for `decompose` and `remove`."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import click

from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.io.hygiene import Hygiene
from mlx_omnimatte.io.video import probe_video
from mlx_omnimatte.io.writers import check_not_input, check_output, check_space
from mlx_omnimatte.models.sam3 import mlx_vlm_module
from mlx_omnimatte.pipelines.cost import machine_rates
from mlx_omnimatte.pipelines.masking import (MaskRequest, Prompt, check_prompts, disk_bytes, dry_run_lines,
                                             make_masks, object_names, resolve_model)
from mlx_omnimatte.progress import Progress

DEFAULT_MODEL = "facebook/sam3"
NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"


def parse_at(arg: str, option: str, count: int) -> tuple[tuple[float, ...], int]:
    """``X,Y[@FRAME]`` / ``X0,Y0,X1,Y1[@FRAME]`` -> (numbers, frame)."""
    pattern = ",".join([NUMBER] * count) + r"(?:@\s*(\d+)\s*)?"
    m = re.fullmatch(pattern, arg)
    if not m:
        shape = "X,Y" if count == 2 else "X0,Y0,X1,Y1"
        raise OmnimatteError(f"{option} {arg}: expected {shape}[@FRAME] in source pixels, e.g. "
                             f"{'320,200@0' if count == 2 else '100,80,300,360@0'}")
    return tuple(float(v) for v in m.groups()[:count]), int(m.group(count + 1) or 0)


def gather_prompts(texts, points, boxes, names) -> list[Prompt]:
    """Objects in the order text, point, box prompts; ``--name`` in that order."""
    prompts = [Prompt("text", t.strip()) for t in texts]
    prompts += [Prompt("point", *parse_at(p, "--point", 2)) for p in points]
    prompts += [Prompt("box", *parse_at(b, "--box", 4)) for b in boxes]
    if names and len(names) != len(prompts):
        raise OmnimatteError(f"--name: {len(names)} names for {len(prompts)} objects (name all or none)")
    if names:
        prompts = [Prompt(p.kind, p.value, p.frame, n) for p, n in zip(prompts, names)]
    return prompts


@click.command("mask")
@click.argument("video", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Clip folder to write.")
@click.option("--text", "texts", multiple=True, help='A few words naming one object, e.g. "a dog": its best match on the frame (repeatable; for '
                   'two alike objects click each with --point).')
@click.option("--point", "points", multiple=True, metavar="X,Y[@FRAME]",
              help="A click on one object, in source pixels, on frame FRAME (default 0) (repeatable).")
@click.option("--box", "boxes", multiple=True, metavar="X0,Y0,X1,Y1[@FRAME]",
              help="A box around one object, in source pixels (repeatable).")
@click.option("--name", "names", multiple=True,
              help="Name the objects, in the order text, point, box (mask_00_NAME, ...).")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="A SAM3 model folder, or its hub id (downloaded once into the hub cache).")
@click.option("--caption", default="", help="Caption of the clean background for prompt.json (default empty).")
@click.option("--dilate", type=click.IntRange(0), default=0, show_default=True,
              help="Grow each mask by a square of N pixels.")
@click.option("--erode", type=click.IntRange(0), default=0, show_default=True,
              help="Shrink each mask by a square of N pixels (before --dilate).")
@click.option("--raw", is_flag=True, help="The segmenter's masks as they are: no hole filling, speck removal "
                                          "or temporal smoothing.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="--text: the least detection score that counts as found.")
@click.option("--frames", type=click.IntRange(1), default=None, help="Use only the first N frames.")
@click.option("--dry-run", is_flag=True, help="Run every check, print memory and time per frame, then exit.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def mask(video, out, texts, points, boxes, names, model, caption, dilate, erode, raw, threshold, frames, dry_run,
         overwrite, quiet):
    """Make one mask video per object from prompts, with SAM3 (mlx-vlm):
    writes OUT as a clip folder (input_video, mask_00/, ..., prompt.json)
    that `decompose` and `remove` read, with masks_preview.mp4 to check it.

    Masks cover the object only, never its shadow or reflection: the
    decomposition finds the effects itself. Holes are filled, specks
    dropped and flicker smoothed over 3 frames (off with --raw). An object
    is tracked forwards from its prompt's frame (empty before it, and
    wherever it is absent). Needs the extra: pip install "mlx-omnimatte[masks]".

    \b
    Examples:
      mlx-omnimatte mask beach.mp4 --point 200,220 --point 430,210 --name left --name right -o clips/beach
      mlx-omnimatte mask dog.mp4 --point 320,200 --box 40,60,200,300@12 --model models/sam3 -o clips/dog
      mlx-omnimatte mask dog.mp4 --text "a dog" --dilate 5 -o clips/dog --dry-run
      mlx-omnimatte decompose clips/dog --bundle models/casper-1.3b -o out/dog
    """
    check_output(out, overwrite)
    info = probe_video(video)
    whole = frames is None or frames >= info.frames
    if not whole:
        info = replace(info, frames=frames)
    prompts = gather_prompts(texts, points, boxes, names)
    check_prompts(prompts, info)
    object_names(prompts)
    folder, cfg = resolve_model(model)  # a hub id: its config.json only
    check_not_input(out, [video, folder])
    request = MaskRequest(video, info, prompts, model, Hygiene(dilate=dilate, erode=erode, raw=raw), caption,
                          threshold)
    check_space(out, disk_bytes(request))
    mlx_vlm_module("models.sam3")  # the extra, before any weight
    if dry_run:
        rates = machine_rates(("flops",))
        for line in dry_run_lines(request, folder, cfg, rates):
            click.echo(line)
        return
    progress = Progress(enabled=not quiet)
    present = make_masks(out, request, whole, overwrite, report=progress)
    if not quiet:
        click.echo(progress.summary(), err=True)
    click.echo(f"wrote {out}:")
    for name, n in present.items():
        click.echo(f"  {name}/  ({info.frames} PNG frames, the object in {n})")
    click.echo("  masks_preview.mp4  (each mask tinted over the video)")
