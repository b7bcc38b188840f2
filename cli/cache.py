"""`mlx-omnimatte calibrate-cache`: a bundle's own step-cache figures."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_omnimatte.pipelines.api import check_plan, prepare, read_input, remove_request
from mlx_omnimatte.pipelines.removal import ALL, dit_velocity
from mlx_omnimatte.pipelines.stages import ModeSpec, Trajectory, run_calibration
from mlx_omnimatte.progress import Progress
from mlx_omnimatte.sampling import DEFAULT_SEED, SAMPLERS
from mlx_omnimatte.step_cache import CALIBRATED, PUBLISHED, Calibration, make_policy, parse_cache, schedule

# what the summary predicts: the default threshold of each cache
_PREDICTED = ("teacache", "magcache")


def predicted_forwards(calibration: Calibration) -> list[str]:
    """Forwards a window computes on the calibrated schedule, per cache and
    source of figures (both rules read only e0's change, which the
    calibration measured)."""
    changes = [None] + [x for x, _ in calibration.tea_points]
    lines = []
    for kind in _PREDICTED:
        spec = parse_cache(kind)
        for cal, source in ((calibration, CALIBRATED), (None, PUBLISHED)):
            computed = sum(schedule(make_policy(spec, calibration.steps, cal)[0], changes))
            lines.append(f"  --cache {spec}: {computed}/{calibration.steps} forwards a window ({source})")
    return lines


@click.command("calibrate-cache")
@click.argument("input", type=click.Path(path_type=Path))
@click.option("--mask", "masks", multiple=True, help="Object mask video or frame folder (repeat per object).")
@click.option("--caption", default=None, help="Caption of the clean background (default: prompt.json).")
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="Converted model bundle.")
@click.option("--steps", type=int, default=None, help="Denoising steps of the reference run (default: the bundle "
              "removal model's, e.g. 50 for Casper and ROSE, 12 for MiniMax-Remover).")
@click.option("--sampler", type=click.Choice(SAMPLERS), default=None,
              help="Sampler of the reference run (default: the removal model's).")
@click.option("--shift", type=float, default=None, help="Flow-matching sigma shift (default: the removal model's).")
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True,
              help="Seed of the starting noise (the reference's).")
@click.option("--size", default=None, help="Model grid WxH, multiples of 16 (default: ~480x832 area).")
@click.option("--frames", type=int, default=None, help="Use only the first N frames.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True, help="DiT weight/matmul precision.")
@click.option("--cache-dir", default=None, help="Prompt-embedding cache (env MLX_OMNIMATTE_CACHE).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def calibrate_cache(input, masks, caption, bundle, frames, quiet, **settings):
    """Run one removal trajectory with every DiT forward computed and store
    the bundle's own step-cache figures in BUNDLE/transformer/step_cache.json:
    MagCache's per-step residual magnitude ratios and a TeaCache polynomial
    fitted to this model's velocity changes. `remove` and `decompose` with
    --cache use them from then on (and say so); delete the file to go back to
    the published Wan2.1-T2V-1.3B figures.

    \b
    Examples:
      mlx-omnimatte calibrate-cache clips/boys-beach --bundle models/casper-1.3b
      mlx-omnimatte calibrate-cache clips/boys-beach --bundle models/casper-1.3b --sampler unipc --steps 25
    """
    request = remove_request(input, masks, bundle=bundle, caption=caption, frames=frames, objects="all", **settings)
    prepared = prepare(request)
    check_plan(prepared)
    progress = Progress(enabled=not quiet)
    clip = read_input(prepared, progress)
    spec = ModeSpec([Trajectory(ALL, None)], dit_velocity)
    calibration = run_calibration(clip, prepared.bundle, spec, request.settings, progress)
    path = calibration.save(prepared.bundle.path("transformer"))
    if not quiet:
        click.echo(progress.summary(), err=True)
    ratios = calibration.mag_ratios
    click.echo(f"wrote {path}: {calibration.steps} {calibration.sampler} steps; magnitude ratios "
               f"{min(ratios):.4f}..{max(ratios):.4f}; TeaCache fit on {len(calibration.tea_points)} steps")
    click.echo("predicted on this schedule:")
    for line in predicted_forwards(calibration):
        click.echo(line)
