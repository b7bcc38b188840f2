"""`mlx-omnimatte remove` and `decompose`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from mlx_omnimatte.encoders.text import TEXT_LEN, prompt_tokens
from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.io.compose import FIT_MODES
from mlx_omnimatte.io.outputs import listing, write_decomposition, write_removal
from mlx_omnimatte.io.writers import check_not_input, check_output, check_space
from mlx_omnimatte.pipelines.api import (METHOD_ALIASES, METHODS, REMOVE_TARGETS, Request, check_plan,
                                          decompose_request, execute, prepare, remove_request)
from mlx_omnimatte.pipelines.conditioning import remover_prompt
from mlx_omnimatte.pipelines.cost import format_seconds, long_run_advice
from mlx_omnimatte.pipelines.optimize import PLATE_MILESTONES, OptimizeSettings
from mlx_omnimatte.pipelines.plan import Outputs
from mlx_omnimatte.pipelines.settings import Mode
from mlx_omnimatte.pipelines.two_stage import SOLVERS
from mlx_omnimatte.progress import Progress
from mlx_omnimatte.sampling import DEFAULT_SEED

# shared options of the two generating commands
_COMMON = [
    click.argument("input", type=click.Path(path_type=Path)),
    click.option("--mask", "masks", multiple=True,
                 help="Object mask video or frame folder, as PATH or NAME=PATH (repeat per object); the "
                      "outputs are OUT/object_NAME/, NAME by default the file's name (mask_NN: NN). "
                      "Not needed for a clip folder."),
    click.option("--caption", default=None, help="Caption of the clean background (default: prompt.json)."),
    click.option("--bundle", type=click.Path(path_type=Path), default=None, help="Converted model bundle."),
    click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output folder."),
    click.option("--steps", type=int, default=None,
                 help="Denoising steps (default: the bundle's removal model's: 50 for Casper and ROSE, 12 for "
                      "MiniMax-Remover)."),
    click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True,
                 help="Seed of the starting noise, an integer in [0, 2^64) (the reference's): the same seed "
                      "gives the same result."),
    click.option("--shift", type=float, default=None,
                 help="Flow-matching sigma shift (default: the bundle's removal model's, 5 for Casper and ROSE)."),
    click.option("--sampler", type=click.Choice(["euler", "unipc"]), default=None,
                 help="Flow-matching sampler (default: the bundle's removal model's: euler, the reference's, for "
                      "Casper and ROSE; unipc, order 2, for MiniMax-Remover)."),
    click.option("--size", default=None, help="Model grid WxH, multiples of 16 (default: ~480x832 area)."),
    click.option("--frames", type=int, default=None, help="Use only the first N frames."),
    click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
                 show_default=True, help="DiT weight/matmul precision."),
    click.option("--background-format", "bg_format", type=click.Choice(["mp4", "png"]), default="mp4",
                 show_default=True, help="Write backgrounds as H.264 or PNG frames."),
    click.option("--cache-dir", default=None, help="Prompt-embedding cache (env MLX_OMNIMATTE_CACHE)."),
    click.option("--dry-run", is_flag=True, help="Run every check, print the plan and predicted memory, then exit."),
    click.option("--overwrite", is_flag=True, help="Replace OUT if it exists."),
    click.option("-q", "--quiet", is_flag=True, help="No progress bars."),
    click.option("--cache", default=None, metavar="none|teacache[:T]|magcache[:T]",
                 help="DiT step cache: skip a forward while the estimated change since the last computed one "
                      "stays under T (teacache 0.05, magcache 0.12 if not given; default none). The bundle's "
                      "own figures from `calibrate-cache` when it has them, else the published Wan2.1-1.3B ones."),
    click.option("--fast", is_flag=True,
                 help="Preset: --sampler unipc --steps 25 --cache teacache:0.05 for those left at their defaults "
                      "(at most 25 DiT forwards a window instead of 50)."),
]


def common_options(f):
    for option in reversed(_COMMON):
        f = option(f)
    return f


def _refuse_overwriting_inputs(out: Path, request: Request) -> None:
    """No output may be, or contain, anything the run reads."""
    spec = request.clip
    check_not_input(out, [spec.source, spec.video, *spec.masks, request.plate, request.bundle,
                          *request.expert_dirs.values()])


# options that only some methods read: method -> {parameter: why it is refused}
_MODEL_ONLY = ("bundle", "method", "steps", "shift", "sampler", "dtype", "tau", "expert_args", "solo", "cache", "fast")
_UNET_ONLY = ("iterations", "batch_frames", "lr")


def _unused_options(request: Request, given: dict[str, str]) -> None:
    """The method is what the user asked for, or an error: an option the
    chosen method would ignore is refused in one line."""
    def refuse(names, why):
        hit = [n for n in names if n in given]
        if hit:
            raise OmnimatteError(f"{given[hit[0]]}: {why}")

    if request.mode is Mode.PLATE:
        refuse(_MODEL_ONLY, "a clean-plate run uses no model (drop it, or drop --clean-plate)")
    if request.mode is Mode.TWO_STAGE:
        refuse(("tau", "expert_args"), "only the experts method uses experts (this run is two-stage: the bundle "
                                        "has no experts, or --method two-stage was asked)")
    if request.mode is Mode.EXPERTS:
        refuse(("solver", "solo", "fit") + _UNET_ONLY, "only the two-stage and clean-plate methods use it "
                                                      "(this run uses the experts)")
    elif request.solver == "fast":
        refuse(_UNET_ONLY, "only --layer-solver unet optimizes (the fast solver has no iterations)")
    if request.plate is None:
        refuse(("fit",), "only a clean plate is fitted (give --clean-plate)")
    for kind in request.expert_dirs:
        if request.mode is Mode.EXPERTS and kind not in request.experts:
            raise OmnimatteError(f"--expert {kind}=...: --tau {request.settings.tau} never runs the {kind} expert")


def _given(ctx: click.Context) -> dict[str, str]:
    """The parameters set on the command line (not defaults): name -> flag."""
    flags = {p.name: max(p.opts, key=len) for p in ctx.command.params}
    return {name: flags[name] for name in ctx.params
            if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)}


def _execute(request: Request, out: Path, dry_run: bool, overwrite: bool, quiet: bool, write) -> None:
    """Check (output, inputs, settings, bundle, plan), then run and write;
    `--dry-run` runs the same checks and prints the plan."""
    check_output(out, overwrite)
    _refuse_overwriting_inputs(out, request)
    prepared = prepare(request)
    check_space(out, prepared.plan.disk)
    for note in prepared.notes:
        click.echo(note, err=True)
    spec = request.clip
    _say_cut_caption(prepared)  # a warning, also under --quiet
    if not quiet:
        if spec.caption_from == "none" and spec.source != spec.video and request.mode is not Mode.PLATE:
            click.echo(f"{spec.source}: no prompt.json and no --caption: an empty caption is used", err=True)
        if request.mode is not Mode.REMOVE:
            click.echo(f"decompose method: {method_line(request)}", err=True)
    if dry_run:
        click.echo(prepared.render())
    check_plan(prepared)  # a run that would not fit is refused, with --dry-run too
    if dry_run:
        return
    if not quiet:
        click.echo(f"estimated time on this machine: {format_seconds(prepared.seconds)} (an estimate; "
                   f"--dry-run shows it per stage)", err=True)
        if prepared.cache:
            click.echo(prepared.cache, err=True)
    advice = long_run_advice(prepared.seconds, request.mode, request.solver, request.solo)
    if advice:
        click.echo(advice, err=True)
    progress = Progress(enabled=not quiet)
    result = execute(prepared, progress)
    write(result, progress)
    if not quiet:
        click.echo(progress.summary(), err=True)
    click.echo(f"wrote {out}:")
    for line in listing(out):
        click.echo(f"  {line}")


@click.command()
@common_options
@click.option("--objects", type=click.Choice(REMOVE_TARGETS), default="both", show_default=True,
              help="Remove all objects at once, each object alone (others kept), or both.")
def remove(input, masks, caption, bundle, out, frames, dry_run, overwrite, quiet, bg_format, objects, **settings):
    """Remove objects and their effects (shadows, reflections): the clean
    background from the bundle's removal model (Casper, ROSE or
    MiniMax-Remover; its steps and sampler unless given).

    \b
    Examples:
      mlx-omnimatte remove clips/boys-beach --bundle models/casper-1.3b -o out/beach
      mlx-omnimatte remove video.mp4 --mask dog=dog.mp4 --caption "a lawn" --bundle models/casper-1.3b -o out/lawn
      mlx-omnimatte remove clips/boys-beach --bundle models/casper-1.3b -o out/x --dry-run
      mlx-omnimatte remove clips/boys-beach --bundle models/minimax-remover -o out/fast   # 12 steps
    """
    if bundle is None:
        raise OmnimatteError("remove: give --bundle (a converted model bundle with a removal model)")
    request = remove_request(input, masks, bundle=bundle, caption=caption, frames=frames, objects=objects,
                             outputs=Outputs(background=bg_format), **settings)

    def write(backgrounds, progress):
        write_removal(out, request.clip, backgrounds, bg_format, overwrite, report=progress)

    _execute(request, out, dry_run, overwrite, quiet, write)


@click.command()
@common_options
@click.option("--tau", type=float, default=None,
              help="Expert switch in [0, 1]: Effect while t > tau, Quality after (default: the experts').")
@click.option("--layer-format", "formats", multiple=True, type=click.Choice(["png", "prores", "webm"]),
              help="RGBA layer as PNG frames (default), ProRes 4444 .mov, or VP9 .webm (repeatable).")
@click.option("--no-preview", is_flag=True, help="Skip the side-by-side preview video.")
@click.option("--method", type=click.Choice(METHODS + tuple(METHOD_ALIASES)), default=None,
              help="experts: the dual-expert method; two-stage (alias optimize): one removal pass gives the "
                   "background, then the layer solver fits the layers over it (default: experts when the "
                   "bundle has them, else two-stage).")
@click.option("--layer-solver", "solver", type=click.Choice(SOLVERS), default="fast", show_default=True,
              help="two-stage and clean plate: fast = closed-form layers from the background difference "
                   "(seconds a clip); unet = Generative Omnimatte's per-layer U-Net optimization "
                   "(--iterations, minutes to hours).")
@click.option("--solo", is_flag=True,
              help="two-stage: also one removal pass per object (it kept, the others removed), each layer "
                   "fitted against its own; for scenes where one object's effect falls on another.")
@click.option("--expert", "expert_args", multiple=True, metavar="KIND=DIR",
              help="Use this expert directory (e.g. one from `mlx-omnimatte train`) instead of the bundle's "
                   "(repeatable: effect=DIR, quality=DIR).")
@click.option("--clean-plate", "plate", type=click.Path(path_type=Path), default=None,
              help="The clean background (a video, frame folder or image): no model runs, no --bundle needed.")
@click.option("--fit", type=click.Choice(FIT_MODES), default=None,
              help="Fit a clean plate of another size or length: stretch, crop or loop.")
@click.option("--iterations", type=click.IntRange(0), default=OptimizeSettings.iterations, show_default=True,
              help="U-Net optimization steps (--layer-solver unet). Two-stage: the reference's schedule "
                   "(lr x0.1 at 1/12, 1/6, 1/3; mask supervision for the first 1/6) scales with it; clean "
                   f"plate: lr x0.1 at {' and '.join(f'{round(100 * f)}%' for f in PLATE_MILESTONES)}, "
                   "supervision towards the plate's least alpha throughout.")
@click.option("--batch-frames", type=click.IntRange(1), default=OptimizeSettings.batch_frames, show_default=True,
              help="Consecutive frames per optimization step.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=OptimizeSettings.lr, show_default=True,
              help="AdamW learning rate of the optimization.")
def decompose(input, masks, caption, bundle, out, frames, dry_run, overwrite, quiet, bg_format, formats,
              no_preview, method, solver, solo, expert_args, plate, fit, iterations, batch_frames, lr, **settings):
    """Split a video into per-object layers: alpha with the object's effects,
    foreground colour, and the clean background.

    \b
    Examples:
      mlx-omnimatte decompose clips/boys-beach --bundle models/omnimatte-1.3b -o out/beach
      mlx-omnimatte decompose clips/boys-beach --bundle models/casper-1.3b --method two-stage -o out/beach
      mlx-omnimatte decompose clips/synth --clean-plate clips/synth/truth/background -o out/synth
      mlx-omnimatte decompose clips/synth --clean-plate clips/synth/truth/background --layer-solver unet \\
          --iterations 300 -o out/synth-unet
      mlx-omnimatte decompose clips/synth --bundle models/casper-1.3b --expert quality=experts/quality \\
          --tau 1 -o out/trained
      mlx-omnimatte decompose video.mp4 --mask cat.mp4 --bundle models/omnimatte-1.3b -o out/cat \\
          --tau 0.5 --steps 30 --layer-format prores --layer-format webm
    """
    request = decompose_request(input, masks, bundle=bundle, caption=caption, frames=frames, method=method,
                                experts=dict(_kind_dir(a) for a in expert_args), clean_plate=plate, fit=fit,
                                iterations=iterations, batch_frames=batch_frames, lr=lr, layer_solver=solver,
                                solo=solo, outputs=Outputs(tuple(formats) or ("png",), bg_format, not no_preview),
                                **settings)
    _unused_options(request, _given(click.get_current_context()))
    _fit_batch(request, quiet)

    def write(layers, progress):
        o = request.outputs
        write_decomposition(out, request.clip, layers, o.formats, o.background, o.preview, overwrite, report=progress)

    _execute(request, out, dry_run, overwrite, quiet, write)


def _fit_batch(request: Request, quiet: bool) -> None:
    """U-Net windows longer than the clip are clamped to it, and said so."""
    opt, frames = request.optimize, request.clip.info.frames
    if request.solver == "unet" and opt.batch_frames > frames:
        if not quiet:
            click.echo(f"--batch-frames {opt.batch_frames}: the clip has {frames} frames; using {frames}", err=True)
        request.optimize = replace(opt, batch_frames=frames)


def _say_cut_caption(prepared) -> None:
    """A caption longer than the text encoder reads is cut: one line says so."""
    if prepared.bundle is None:
        return
    caption = remover_prompt(prepared.bundle.remover, prepared.request.clip.caption)
    if not caption:  # none given, or a removal model prompted with "" or not at all
        return
    n = prompt_tokens(prepared.bundle.path("t5"), caption)
    if n > TEXT_LEN:
        spec = prepared.request.clip
        where = "--caption" if spec.caption_from == "given" else spec.source / spec.caption_from
        click.echo(f"{where}: {n} tokens ({len(caption)} characters); only the first {TEXT_LEN} are used "
                   "(the text encoder's limit)", err=True)


def method_line(request: Request) -> str:
    """What runs, for the run header: the method and its layer solver."""
    if request.mode is Mode.EXPERTS:
        return "experts"
    solver = request.solver if request.solver == "fast" else f"unet, {request.optimize.iterations} iterations"
    if request.mode is Mode.PLATE:
        return f"clean-plate (layer solver: {solver})"
    passes = "one removal pass per object and one for all" if request.solo else "one removal pass for all objects"
    return f"two-stage ({passes}, then layer solver: {solver})"


def _kind_dir(arg: str) -> tuple[str, Path]:
    kind, sep, path = arg.partition("=")
    if not sep or not path:
        raise OmnimatteError(f"--expert {arg}: expected KIND=DIR, e.g. quality=experts/quality")
    return kind, Path(path)
