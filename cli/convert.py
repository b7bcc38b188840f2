"""`mlx-omnimatte convert`: PyTorch checkpoints -> converted MLX directories.

One checkpoint gives one component directory; a Wan / Wan-Fun model folder
(or its hub id) gives a whole bundle."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_omnimatte.branch.experts import KINDS
from mlx_omnimatte.convert.bundle import (
    BundlePlan,
    build_bundle,
    bundle_quantize,
    is_hub_id,
    is_model_folder,
    parse_quantize,
    resolve_source,
    source_remover,
)
from mlx_omnimatte.convert.core import convert as run_convert, detect
from mlx_omnimatte.convert.merge import convert_transformer, parse_lora_arg
from mlx_omnimatte.convert.prechecks import check_bundle_inputs
from mlx_omnimatte.convert.quantize import GROUP_SIZES
from mlx_omnimatte.convert.readers import read_checkpoint
from mlx_omnimatte.convert.writer import write_converted
from mlx_omnimatte.errors import OmnimatteError, article
from mlx_omnimatte.io.writers import check_output
from mlx_omnimatte.models.base import DTYPES
from mlx_omnimatte.weights import COMPONENTS


def _expert_pairs(values) -> dict[str, Path]:
    experts = {}
    for v in values:
        kind, sep, path = v.partition("=")
        if not sep or kind not in KINDS or not path:
            raise OmnimatteError(f"--expert {v}: expected effect=FILE or quality=FILE")
        experts[kind] = Path(path)
    return experts


def _bundle(src: str, out: Path, options: dict, overwrite: bool) -> None:
    if options["loras"]:
        raise OmnimatteError("--lora merges into a single transformer checkpoint; "
                             "for a bundle use --transformer-lora FILE[:SCALE]")
    loras = [parse_lora_arg(v) for v in options["transformer_loras"]]
    experts = _expert_pairs(options["experts"])
    quantize = bundle_quantize(parse_quantize(options["quantize"]))
    remover = source_remover(src, options["remover"])
    # the user's own files first: a hub id may mean tens of GB to download
    check_bundle_inputs(src, options["transformer"], loras, experts, remover)
    plan = BundlePlan(resolve_source(src, remover), options["transformer"], loras, experts, options["dtype"],
                      quantize, options["group_size"], remover)
    build_bundle(plan, out, overwrite, log=click.echo)
    click.echo(f"bundle -> {out}")


def _single(src: str, out: Path, options: dict, overwrite: bool) -> None:
    path = Path(src).expanduser()
    if options["transformer"] or options["experts"] or options["transformer_loras"] or options["remover"]:
        raise OmnimatteError(f"{src}: --transformer/--transformer-lora/--expert/--remover need a Wan model folder "
                             "or hub id as SRC")
    ckpt = read_checkpoint(path)
    spec, fmt = detect(ckpt, options["component"], options["fmt"])
    dtype = options["dtype"] or ("float32" if spec.component == "vae" else "bfloat16")
    given = {key: options[key] for key in ("kind", "k", "mask_type", "num_layers", "manifest")
             if options[key] is not None}
    if given and spec.component != "expert":
        flag = "expert-kind" if next(iter(given)) == "kind" else next(iter(given)).replace("_", "-")
        raise OmnimatteError(f"{src}: --{flag} applies to expert LoRA files, this is {article(spec.component)}")
    if options["loras"] and spec.component != "transformer":
        raise OmnimatteError(f"{src}: --lora merges into a transformer checkpoint, "
                             f"this is {article(spec.component)}")
    bits = parse_quantize(options["quantize"])
    if set(bits) - {None}:
        raise OmnimatteError(f"{src}: --quantize COMPONENT=BITS is for bundles; give --quantize BITS")
    q = {"quantize": bits.get(None), "group_size": options["group_size"]}
    if spec.component == "transformer":
        loras = [parse_lora_arg(v) for v in options["loras"]]
        converted = convert_transformer(ckpt, spec, fmt, dtype, loras, **q)
    else:
        converted = run_convert(ckpt, spec, fmt, dtype, **q, **given)
    meta = {"source": str(path.resolve()), "source_format": fmt, "file_format": ckpt.file_format,
            "converter": "mlx-omnimatte"}
    for note in converted.notes:
        click.echo(note)
    write_converted(out, converted, meta, overwrite)
    n_ignored = len(converted.ignored)
    extra = f", {q['quantize']}-bit" if q["quantize"] else ""
    click.echo(f"converted {spec.component} ({fmt}, {ckpt.file_format}) -> {out} [{dtype}{extra}]"
               + (f"; ignored {n_ignored} keys" if n_ignored else ""))


@click.command()
@click.argument("src")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--component", type=click.Choice(list(COMPONENTS)), default=None,
              help="What the checkpoint holds (detected from its keys by default).")
@click.option("--format", "fmt", default=None, help="Source key layout (detected by default).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
              help="Weight dtype (default: bfloat16; float32 for the VAE, float16 for CLIP in a bundle).")
@click.option("--transformer", type=click.Path(path_type=Path), default=None,
              help="Bundle: a DiT checkpoint (e.g. Casper 1.3B) replacing the folder's own.")
@click.option("--remover", type=click.Choice(["casper", "rose", "minimax"]), default=None,
              help="Bundle: the removal model --transformer holds (casper by default: ROSE's keys are Casper's, "
                   "only you know which it is); MiniMax-Remover is recognised from its own folder.")
@click.option("--transformer-lora", "transformer_loras", multiple=True, metavar="FILE[:SCALE]",
              help="Bundle: a LoRA merged into the DiT (e.g. Casper 14B), scale 1 by default (repeatable).")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
              help="Single transformer checkpoint: a LoRA merged into it (repeatable).")
@click.option("--expert", "experts", multiple=True, metavar="KIND=FILE",
              help="Bundle: an expert LoRA, KIND effect or quality (repeatable).")
@click.option("--expert-kind", "kind", type=click.Choice(KINDS), default=None,
              help="Single expert file: which expert it is (default: from its manifest or name).")
@click.option("--k", "k", type=int, default=None, help="Effect expert: LoRA on the last K blocks (default 10 of 30).")
@click.option("--mask-type", type=click.Choice(["A", "B", "C"]), default=None,
              help="Expert attention type (default: B for effect, C for quality).")
@click.option("--num-layers", type=int, default=None, help="Expert: depth of the model it was trained on.")
@click.option("--manifest", type=click.Path(path_type=Path), default=None,
              help="Expert: JSON manifest (kind, rank, alpha, targets, k, mask_type, tau_default...).")
@click.option("--quantize", multiple=True, metavar="BITS|COMPONENT=BITS",
              help="Store 4- or 8-bit weights: a transformer or text encoder file; in a bundle BITS means "
                   "the transformer and the text encoder, COMPONENT=BITS one of them (repeatable).")
@click.option("--group-size", type=click.Choice([str(g) for g in GROUP_SIZES]), default="64",
              help="Quantization group size (default 64).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def convert(src, out, overwrite, **options):
    """Convert PyTorch checkpoints (safetensors, sharded safetensors, or
    .pth/.pt/.bin zip pickles, read without torch and without running any
    code from them) into MLX.

    SRC is a checkpoint file, a folder holding one, or a Wan / Wan-Fun model
    folder or hub id, or MiniMax-Remover's folder or hub id (then OUT is a
    bundle with every component its removal model uses).

    \b
    Examples:
      mlx-omnimatte convert alibaba-pai/Wan2.1-Fun-1.3B-InP --transformer casper.safetensors \\
          --expert effect=effect.safetensors --expert quality=quality.safetensors -o models/omnimatte-1.3b
      mlx-omnimatte convert alibaba-pai/Wan2.1-Fun-14B-InP --transformer-lora casper_14b_lora.safetensors \\
          --quantize 8 -o models/casper-14b
      mlx-omnimatte convert alibaba-pai/Wan2.1-Fun-1.3B-InP --transformer rose.safetensors --remover rose \\
          -o models/rose-1.3b
      mlx-omnimatte convert zibojia/minimax-remover -o models/minimax-remover
      mlx-omnimatte convert Wan2.1_VAE.pth -o models/vae
      mlx-omnimatte convert diffusion_pytorch_model.safetensors -o models/transformer --dtype float32
      mlx-omnimatte convert dit.safetensors --lora style.safetensors:0.8 --quantize 4 -o models/dit-4bit
      mlx-omnimatte convert effect_lora.safetensors -o models/effect --component expert --expert-kind effect
      mlx-omnimatte convert models_t5_umt5-xxl-enc-bf16.pth -o models/t5-8bit --quantize 8

    With a model folder or hub id, the files given with --transformer,
    --transformer-lora and --expert are checked first (readable, the right
    component, the base model's width), before anything is downloaded.

    The text encoder's tokenizer is taken from google/umt5-xxl/ beside the
    checkpoint (or $MLX_OMNIMATTE_T5_TOKENIZER) and copied into OUT/tokenizer/.
    LoRA scales (alpha) are read from the file, its metadata or an
    adapter_config.json beside it; without one alpha = rank, and a line says so.
    """
    check_output(out, overwrite)
    options["group_size"] = int(options["group_size"])
    path = Path(src).expanduser()
    if is_model_folder(path) or (not path.exists() and is_hub_id(src)):
        _bundle(src, out, options, overwrite)
    else:
        _single(src, out, options, overwrite)
