"""`mlx-omnimatte analyze`: which blocks of the frozen DiT attend to an
object's effects, and the K it recommends for the Effect expert."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_omnimatte.analysis.report import summary_text, write_report
from mlx_omnimatte.analysis.run import DEFAULT_T, check_t, run_analysis
from mlx_omnimatte.bundle import open_bundle
from mlx_omnimatte.io.writers import check_output
from mlx_omnimatte.pipelines.settings import Settings
from mlx_omnimatte.progress import Progress
from mlx_omnimatte.sampling import DEFAULT_SEED
from mlx_omnimatte.weights import BUNDLE_COMPONENTS


@click.command("analyze")
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="Converted model bundle.")
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="A folder of synthetic clips (or one clip) with truth/effect_00/.")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Report folder.")
@click.option("--t", "t", type=float, default=DEFAULT_T, show_default=True,
              help="Noise level in [0, 1] of the one forward per clip (timestep 1000 t).")
@click.option("--clips", type=int, default=None, help="Analyze only the first N clips.")
@click.option("--size", default=None, help="Model grid WxH, multiples of 16 (default: ~480x832 area).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True, help="DiT weight/matmul precision.")
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True, help="Seed of the noise (the reference's).")
@click.option("--cache-dir", default=None, help="Prompt-embedding cache (env MLX_OMNIMATTE_CACHE).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def analyze(bundle, data, out, t, clips, size, dtype, seed, cache_dir, overwrite, quiet):
    """Measure, block by block, how much of the object's self-attention the
    frozen DiT puts on the object's effects (shadows, reflections), over
    synthetic clips whose effect is known; split the blocks into stages at
    the curve's troughs and recommend K, the number of last blocks the Effect
    expert's LoRA goes on (`train --expert effect --k K`, `convert --k K`).

    Writes OUT/scores.csv, OUT/contribution.png, OUT/maps/, OUT/summary.txt
    and OUT/summary.json; prints the summary.

    \b
    Examples:
      mlx-omnimatte synth --count 16 -o data/synth
      mlx-omnimatte analyze --bundle models/casper-1.3b --data data/synth -o out/analysis
      mlx-omnimatte analyze --bundle models/casper-1.3b --data data/synth -o out/analysis --t 0.6 --clips 8
    """
    check_t(t)
    check_output(out, overwrite)
    settings = Settings(size=size, dtype=dtype, seed=seed, cache_dir=cache_dir)
    b = open_bundle(bundle, need=BUNDLE_COMPONENTS)
    progress = Progress(enabled=not quiet)
    analysis = run_analysis(data, b, t, clips, settings, report=progress.report,
                            say=lambda line: click.echo(line, err=True))
    write_report(analysis, out, overwrite, report=progress.report)
    if not quiet:
        click.echo(progress.summary(), err=True)
    click.echo(summary_text(analysis))
    click.echo(f"wrote {out}: scores.csv, contribution.png, maps/, summary.txt, summary.json")
