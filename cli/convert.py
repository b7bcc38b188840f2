"""`mlx-omnimatte convert`: a PyTorch checkpoint -> a converted MLX directory."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_omnimatte.convert.core import DTYPES, SPEC_MODULES, convert as run_convert, detect
from mlx_omnimatte.convert.readers import read_checkpoint
from mlx_omnimatte.convert.writer import check_output, write_converted


@click.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--component", type=click.Choice(list(SPEC_MODULES)), default=None,
              help="What the checkpoint holds (detected from its keys by default).")
@click.option("--format", "fmt", default=None, help="Source key layout (detected by default).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
              help="Weight dtype of the output (default: bfloat16; float32 for the VAE).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def convert(src, out, component, fmt, dtype, overwrite):
    """Convert a PyTorch checkpoint (safetensors, sharded safetensors, or a
    .pth/.pt/.bin zip pickle, read without torch) into an MLX model directory.

    \b
    Examples:
      mlx-omnimatte convert diffusion_pytorch_model.safetensors -o out/transformer
      mlx-omnimatte convert Wan2.1_VAE.pth -o out/vae --dtype float32
      mlx-omnimatte convert effect_lora.safetensors -o out/effect --component expert
    """
    check_output(out, overwrite)
    ckpt = read_checkpoint(src)
    spec, fmt = detect(ckpt, component, fmt)
    dtype = dtype or ("float32" if spec.component == "vae" else "bfloat16")
    converted = run_convert(ckpt, spec, fmt, dtype)
    meta = {"source": str(Path(src).resolve()), "source_format": fmt, "file_format": ckpt.file_format,
            "converter": "mlx-omnimatte"}
    write_converted(out, converted, meta, overwrite)
    n_ignored = len(converted.ignored)
    click.echo(f"converted {spec.component} ({fmt}, {ckpt.file_format}) -> {out} [{dtype}]"
               + (f"; ignored {n_ignored} keys" if n_ignored else ""))
