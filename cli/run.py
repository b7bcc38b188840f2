"""`mlx-omnimatte remove`, `decompose` and `composite`."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from mlx_omnimatte.bundle import COMPONENTS, open_bundle
from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.io.inputs import find_clip_files, read_caption
from mlx_omnimatte.io.video import probe_video, read_rgba, read_video
from mlx_omnimatte.io.writers import check_output, write_video
from mlx_omnimatte.progress import Progress

# shared options of the two generating commands
_COMMON = [
    click.argument("input", type=click.Path(path_type=Path)),
    click.option("--mask", "masks", multiple=True, type=click.Path(path_type=Path),
                 help="Object mask video or frame folder (repeat per object). Not needed for a clip folder."),
    click.option("--caption", default=None, help="Caption of the clean background (default: prompt.json)."),
    click.option("--bundle", type=click.Path(path_type=Path), required=True, help="Converted model bundle."),
    click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output folder."),
    click.option("--steps", type=int, default=50, show_default=True, help="Denoising steps."),
    click.option("--seed", type=int, default=43, show_default=True),
    click.option("--shift", type=float, default=5.0, show_default=True, help="Flow-matching sigma shift."),
    click.option("--sampler", type=click.Choice(["euler", "unipc"]), default="euler", show_default=True),
    click.option("--size", default=None, help="Model grid WxH, multiples of 16 (default: ~480x832 area)."),
    click.option("--frames", type=int, default=None, help="Use only the first N frames."),
    click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
                 show_default=True, help="DiT weight/matmul precision."),
    click.option("--background", "bg_format", type=click.Choice(["mp4", "png"]), default="mp4",
                 show_default=True, help="Background as H.264 or PNG frames."),
    click.option("--cache-dir", default=None, help="Prompt-embedding cache (env MLX_OMNIMATTE_CACHE)."),
    click.option("--dry-run", is_flag=True, help="Print the plan and predicted memory, then exit."),
    click.option("--overwrite", is_flag=True, help="Replace OUT if it exists."),
    click.option("--quiet", is_flag=True, help="No progress bars."),
]


def common_options(f):
    for option in reversed(_COMMON):
        f = option(f)
    return f


def _clip_info(input: Path, masks, caption, frames):
    """(video info, number of objects, caption) without decoding the video."""
    if masks:
        video, mask_paths, prompt = input, list(masks), None
    elif input.is_dir():
        video, mask_paths, prompt = find_clip_files(input)
    else:
        raise OmnimatteError(f"{input}: give at least one object mask (--mask)")
    info = probe_video(video)
    if caption is None and prompt is not None:
        caption = read_caption(prompt)
    for m in mask_paths:
        probe_video(m)
    if frames is not None:
        if frames < 1:
            raise OmnimatteError(f"--frames {frames}: must be at least 1")
        info = type(info)(info.path, info.fps, min(frames, info.frames), info.width, info.height)
    return info, len(mask_paths), caption


def _prepare(mode, input, masks, caption, bundle, out, frames, dry_run, overwrite, tau=None, **settings):
    """Check everything that can be checked without reading frames or
    weights: output, settings, inputs, bundle; then plan the run."""
    from mlx_omnimatte.io.grid import plan_grid
    from mlx_omnimatte.pipelines.api import settings_from
    from mlx_omnimatte.pipelines.omnimatte import experts_needed
    from mlx_omnimatte.memory import machine_memory
    from mlx_omnimatte.pipelines.plan import plan_run

    if not dry_run:
        check_output(out, overwrite)
        _refuse_overwriting_inputs(out, [input, *masks])
    s = settings_from(tau=tau, **settings)
    info, n_objects, caption = _clip_info(input, masks, caption, frames)
    b = open_bundle(bundle, COMPONENTS, experts_needed(s.tau) if mode == "decompose" else ())
    grid = plan_grid(info.width, info.height, info.frames, size=s.size, min_frames=s.min_frames)
    return s, b, plan_run(mode, grid, n_objects, b, s), machine_memory()


def _refuse_overwriting_inputs(out: Path, inputs) -> None:
    target = out.resolve()
    for p in inputs:
        p = Path(p).resolve()
        if target == p or target in p.parents:
            raise OmnimatteError(f"{out}: the output would replace the input {p}")


def _read(input, masks, caption, frames):
    from mlx_omnimatte.pipelines.api import read_clip

    clip = read_clip(input, list(masks) or None, caption)
    if frames is not None and frames < clip.num_frames:
        clip.frames = clip.frames[:frames]
        clip.masks = [m[:frames] for m in clip.masks]
    return clip


@click.command()
@common_options
@click.option("--objects", type=click.Choice(["all", "each", "both"]), default="both", show_default=True,
              help="Remove all objects at once, each object alone (others kept), or both.")
def remove(input, masks, caption, bundle, out, frames, dry_run, overwrite, quiet, bg_format, objects, **settings):
    """Remove objects and their effects (shadows, reflections): the Casper
    background layer.

    \b
    Examples:
      mlx-omnimatte remove clips/boys-beach --bundle models/casper-1.3b -o out/beach
      mlx-omnimatte remove video.mp4 --mask dog.mp4 --caption "a lawn" --bundle models/casper-1.3b -o out/lawn
      mlx-omnimatte remove clips/boys-beach --bundle models/casper-1.3b -o out/x --dry-run
    """
    from mlx_omnimatte.pipelines.outputs import write_removal
    from mlx_omnimatte.pipelines.removal import removal_targets, run_removal

    def generate(clip, b, s, progress):
        targets = removal_targets(clip.names, per_object=objects != "all", all_objects=objects != "each")
        return run_removal(clip, b, s, progress, targets)

    def write(clip, backgrounds):
        write_removal(out, clip, backgrounds, bg_format, overwrite)

    _execute("remove", generate, write, input, masks, caption, bundle, out, frames, dry_run, overwrite, quiet,
             **settings)


@click.command()
@common_options
@click.option("--tau", type=float, default=None,
              help="Expert switch in [0, 1]: Effect while t > tau, Quality after (default: the experts').")
@click.option("--layer-format", "formats", multiple=True, type=click.Choice(["png", "prores", "webm"]),
              help="RGBA layer as PNG frames (default), ProRes 4444 .mov, or VP9 .webm (repeatable).")
@click.option("--no-preview", is_flag=True, help="Skip the side-by-side preview video.")
def decompose(input, masks, caption, bundle, out, frames, dry_run, overwrite, quiet, bg_format, tau, formats,
              no_preview, **settings):
    """Split a video into per-object layers: alpha with the object's effects,
    foreground colour, and the clean background.

    \b
    Examples:
      mlx-omnimatte decompose clips/boys-beach --bundle models/omnimatte-1.3b -o out/beach
      mlx-omnimatte decompose video.mp4 --mask cat.mp4 --bundle models/omnimatte-1.3b -o out/cat \\
          --tau 0.5 --steps 30 --layer-format prores --layer-format webm
    """
    from mlx_omnimatte.pipelines.omnimatte import run_decompose
    from mlx_omnimatte.pipelines.outputs import write_decomposition

    def write(clip, layers):
        write_decomposition(out, clip, layers, formats or ("png",), bg_format, not no_preview, overwrite)

    _execute("decompose", run_decompose, write, input, masks, caption, bundle, out, frames, dry_run, overwrite,
             quiet, tau=tau, **settings)


def _execute(mode, generate, write, input, masks, caption, bundle, out, frames, dry_run, overwrite, quiet,
             **settings):
    """Plan; print the plan (dry run) or check it fits; read; generate; write."""
    from mlx_omnimatte.pipelines.plan import check_fits

    s, b, run, machine = _prepare(mode, input, masks, caption, bundle, out, frames, dry_run, overwrite, **settings)
    if dry_run:
        click.echo(run.render(machine))
        return
    check_fits(run, machine)
    clip = _read(input, masks, caption, frames)
    progress = Progress(enabled=not quiet)
    result = generate(clip, b, s, progress)
    with progress.stage("write", total=1, unit="folder") as bar:
        write(clip, result)
        bar.update()
    _finish(out, progress, quiet)


def _finish(out: Path, progress: Progress, quiet: bool) -> None:
    from mlx_omnimatte.pipelines.outputs import listing

    if not quiet:
        click.echo(progress.summary(), err=True)
    click.echo(f"wrote {out}:")
    for line in listing(out):
        click.echo(f"  {line}")


@click.command()
@click.argument("layers", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--background", "background", type=click.Path(path_type=Path), required=True,
              help="New background: an image or a video.")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output video (.mp4).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def composite(layers, background, out, overwrite):
    """Put foreground layers (RGBA PNG folders, .mov or .webm; back to front)
    over a new background image or video, at the layers' fps.

    \b
    Example:
      mlx-omnimatte composite out/beach/object_00/layer out/beach/object_01/layer \\
          --background sunset.jpg -o out/sunset.mp4
    """
    from PIL import Image, UnidentifiedImageError

    from mlx_omnimatte.compositing import composite as put_over

    check_output(out, overwrite)
    pairs, fps = [], None
    for path in layers:
        frames, info = read_rgba(path)
        fps = fps or info.fps
        pairs.append((frames[..., 3], frames[..., :3]))
    if background.is_file() and background.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        try:
            bg = np.asarray(Image.open(background).convert("RGB"))
        except (OSError, UnidentifiedImageError):
            raise OmnimatteError(f"{background}: not a readable image") from None
    else:
        bg, _ = read_video(background)
    write_video(out, put_over(pairs, bg), fps, overwrite)
    click.echo(f"wrote {out}")
