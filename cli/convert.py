"""`mlx-omnimatte convert`: PyTorch checkpoints -> converted MLX directories.

One checkpoint gives one component directory; a Wan / Wan-Fun model folder
(or its hub id) gives a whole bundle."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_omnimatte.convert.bundle import build_bundle, is_hub_id, is_model_folder, resolve_source
from mlx_omnimatte.convert.core import DTYPES, SPEC_MODULES, convert as run_convert, detect
from mlx_omnimatte.convert.readers import read_checkpoint
from mlx_omnimatte.convert.writer import check_output, write_converted
from mlx_omnimatte.errors import OmnimatteError

EXPERT_KINDS = ("effect", "quality")


def _expert_pairs(values) -> dict[str, Path]:
    experts = {}
    for v in values:
        kind, sep, path = v.partition("=")
        if not sep or kind not in EXPERT_KINDS or not path:
            raise OmnimatteError(f"--expert {v}: expected effect=FILE or quality=FILE")
        experts[kind] = Path(path)
    return experts


@click.command()
@click.argument("src")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--component", type=click.Choice(list(SPEC_MODULES)), default=None,
              help="What the checkpoint holds (detected from its keys by default).")
@click.option("--format", "fmt", default=None, help="Source key layout (detected by default).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
              help="Weight dtype (default: bfloat16; float32 for the VAE).")
@click.option("--transformer", type=click.Path(path_type=Path), default=None,
              help="Bundle: a DiT checkpoint (e.g. Casper) replacing the folder's own.")
@click.option("--expert", "experts", multiple=True, metavar="KIND=FILE",
              help="Bundle: an expert LoRA, KIND effect or quality (repeatable).")
@click.option("--expert-kind", type=click.Choice(EXPERT_KINDS), default=None,
              help="Single expert file: which expert it is (default: from its manifest or name).")
@click.option("--k", "k", type=int, default=None, help="Effect expert: LoRA on the last K blocks (default 10 of 30).")
@click.option("--mask-type", type=click.Choice(["A", "B", "C"]), default=None,
              help="Expert attention type (default: B for effect, C for quality).")
@click.option("--num-layers", type=int, default=None, help="Expert: depth of the model it was trained on.")
@click.option("--manifest", type=click.Path(path_type=Path), default=None,
              help="Expert: JSON manifest (kind, rank, alpha, targets, k, mask_type, tau_default...).")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None,
              help="Text encoder: store 4- or 8-bit weights (8 recommended).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def convert(src, out, component, fmt, dtype, transformer, experts, expert_kind, k, mask_type, num_layers,
            manifest, quantize, overwrite):
    """Convert PyTorch checkpoints (safetensors, sharded safetensors, or
    .pth/.pt/.bin zip pickles, read without torch and without running any
    code from them) into MLX.

    SRC is a checkpoint file, a folder holding one, or a Wan / Wan-Fun model
    folder or hub id (then OUT is a bundle with every component).

    \b
    Examples:
      mlx-omnimatte convert alibaba-pai/Wan2.1-Fun-1.3B-InP --transformer casper.safetensors \\
          --expert effect=effect.safetensors --expert quality=quality.safetensors -o models/omnimatte-1.3b
      mlx-omnimatte convert Wan2.1_VAE.pth -o models/vae
      mlx-omnimatte convert diffusion_pytorch_model.safetensors -o models/transformer --dtype float32
      mlx-omnimatte convert effect_lora.safetensors -o models/effect --component expert --expert-kind effect
      mlx-omnimatte convert models_t5_umt5-xxl-enc-bf16.pth -o models/t5-8bit --quantize 8

    The text encoder's tokenizer is taken from google/umt5-xxl/ beside the
    checkpoint (or $MLX_OMNIMATTE_T5_TOKENIZER) and copied into OUT/tokenizer/.
    """
    check_output(out, overwrite)
    path = Path(src).expanduser()
    if is_model_folder(path) or (not path.exists() and is_hub_id(src)):
        folder = resolve_source(src)
        build_bundle(folder, out, transformer, _expert_pairs(experts), dtype, overwrite,
                     int(quantize) if quantize else None, log=click.echo)
        click.echo(f"bundle -> {out}")
        return
    if transformer or experts:
        raise OmnimatteError(f"{src}: --transformer/--expert need a Wan model folder or hub id as SRC")
    ckpt = read_checkpoint(path)
    spec, fmt = detect(ckpt, component, fmt)
    dtype = dtype or ("float32" if spec.component == "vae" else "bfloat16")
    given = {"kind": expert_kind, "k": k, "mask_type": mask_type, "num_layers": num_layers, "manifest": manifest}
    given = {key: v for key, v in given.items() if v is not None}
    if given and spec.component != "expert":
        raise OmnimatteError(f"{src}: --{next(iter(given)).replace('_', '-')} applies to expert LoRA files, "
                             f"this is a {spec.component}")
    options = given
    if quantize:
        if spec.component != "t5":
            raise OmnimatteError(f"{src}: --quantize applies to the text encoder, this is a {spec.component}")
        options["quantize"] = int(quantize)
    converted = run_convert(ckpt, spec, fmt, dtype, **options)
    meta = {"source": str(path.resolve()), "source_format": fmt, "file_format": ckpt.file_format,
            "converter": "mlx-omnimatte"}
    write_converted(out, converted, meta, overwrite)
    n_ignored = len(converted.ignored)
    click.echo(f"converted {spec.component} ({fmt}, {ckpt.file_format}) -> {out} [{dtype}]"
               + (f"; ignored {n_ignored} keys" if n_ignored else ""))
