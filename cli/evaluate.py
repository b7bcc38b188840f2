"""`mlx-omnimatte evaluate`: measure a decomposition against its input clip
and, for synthetic clips, against the truth."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_omnimatte.io.writers import atomic_output, check_output
from mlx_omnimatte.evaluation.evaluate import evaluate


@click.command("evaluate")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--clip", type=click.Path(path_type=Path), required=True,
              help="The input clip folder (input_video, mask_00, ...).")
@click.option("--truth", type=click.Path(path_type=Path), default=None,
              help="Synthetic truth: the clip's truth/ folder (or the synthetic clip folder).")
@click.option("--json", "json_file", type=click.Path(path_type=Path), default=None,
              help="Also write the figures as JSON to this file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing JSON file.")
def evaluate_cmd(out, clip, truth, json_file, overwrite):
    """Measure the decompose output OUT: recomposition of each layer over its
    background against the input (PSNR in dB, SSIM); with --truth, alpha
    MAE/MSE on the object region and on the effect region (truth effect >
    0.05 outside the object mask dilated by 5 px), IoU of alpha at 0.5 and
    the background's PSNR.

    \b
    Examples:
      mlx-omnimatte evaluate out/beach --clip clips/boys-beach
      mlx-omnimatte evaluate out/synth0 --clip clips/synth0 --truth clips/synth0/truth --json scores.json
    """
    if json_file is not None:
        check_output(json_file, overwrite)
    result = evaluate(out, clip, truth)
    click.echo(result.table())
    if json_file is not None:
        with atomic_output(json_file, overwrite) as tmp:
            tmp.write_text(result.to_json())
        click.echo(f"wrote {json_file}")
