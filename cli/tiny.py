"""`mlx-omnimatte tiny-bundle`: a tiny random-weight bundle, to try the
model commands without any download."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_omnimatte.convert.tiny import write_tiny_bundle
from mlx_omnimatte.io.writers import check_output


@click.command("tiny-bundle")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Bundle folder to write.")
@click.option("--experts", is_flag=True, help="Also two random expert LoRAs (effect, quality).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="Only the last line.")
def tiny_bundle(out, experts, overwrite, quiet):
    """Write a tiny bundle of random weights (a 2-block, 256-wide DiT, VAE,
    text and image encoders) in the released source formats, converted by
    the real converter. Its outputs MEAN NOTHING: it is for trying the
    commands (remove, decompose, analyze, prepare, train) in seconds and for
    CI checks of the conversion and the pipelines. About 45 MB.

    \b
    Examples:
      mlx-omnimatte tiny-bundle -o models/tiny --experts
      mlx-omnimatte synth -o clips/synth --frames 9 --size 64x48
      mlx-omnimatte decompose clips/synth --bundle models/tiny -o out/tiny --steps 2 --size 64x48
    """
    check_output(out, overwrite)
    write_tiny_bundle(out, experts, overwrite, log=(lambda line: None) if quiet else click.echo)
    click.echo(f"wrote {out} (random weights: its outputs mean nothing)")
