"""`mlx-omnimatte prepare`, `train` and `export`: make an Effect or Quality
expert from a data set of clips with truth."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.io.grid import parse_size
from mlx_omnimatte.train.prepare import prepare as prepare_cache
from mlx_omnimatte.progress import Progress
from mlx_omnimatte.train.export import export_expert
from mlx_omnimatte.train.session import CHECKPOINT, run_training, work_dir
from mlx_omnimatte.train.store import read_meta
from mlx_omnimatte.train.trainer import TrainSettings
from mlx_omnimatte.train.validate import ValidationSettings


@click.command("prepare")
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="Converted model bundle.")
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="A folder of clip folders with truth/ (from `mlx-omnimatte synth`).")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Latent cache folder.")
@click.option("--size", default=None, help="Model grid WxH, multiples of 16 (default: each clip's size).")
@click.option("--cache-dir", default=None, help="Prompt-embedding cache (env MLX_OMNIMATTE_CACHE).")
@click.option("--overwrite", is_flag=True, help="Replace OUT (start afresh) instead of resuming it.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def prepare(bundle, data, out, size, cache_dir, overwrite, quiet):
    """Encode every object of every clip of DATA once into a latent cache
    (condition latent, mask channels, alpha and clean-background latents,
    CLIP features, caption embedding). Run it again to resume an interrupted
    one; a finished cache is left as it is (--overwrite starts afresh).

    \b
    Examples:
      mlx-omnimatte synth --count 64 -o data/synth
      mlx-omnimatte prepare --bundle models/casper-1.3b --data data/synth -o cache/synth
    """
    if size is not None:
        parse_size(size)  # a bad size fails before any weight loads
    progress = Progress(enabled=not quiet)
    prepare_cache(bundle, data, out, size=size, cache_dir=cache_dir, report=progress.report, overwrite=overwrite)
    if not quiet:
        click.echo(progress.summary(), err=True)
    click.echo(f"wrote {out}")


@click.command("train")
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="Converted model bundle.")
@click.option("--cache", type=click.Path(path_type=Path), required=True, help="Latent cache from `prepare`.")
@click.option("--expert", "kind", type=click.Choice(["effect", "quality"]), required=True,
              help="effect: LoRA on the last K blocks, used while t > tau; quality: on all blocks, after.")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Expert directory to write.")
@click.option("--steps", type=int, default=TrainSettings.steps, show_default=True,
              help="Optimizer steps in all (with --resume: the total to reach).")
@click.option("--rank", type=int, default=None, help="LoRA rank [default: 128 effect, 64 quality].")
@click.option("--alpha", type=float, default=None, help="LoRA alpha [default: the rank].")
@click.option("--k", type=int, default=None, help="Effect: LoRA on the last K blocks [default: a third].")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="AdamW learning rate.")
@click.option("--batch", type=int, default=1, show_default=True, help="Samples per micro-batch per process.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per step.")
@click.option("--shift", type=float, default=5.0, show_default=True, help="Sigma shift of the timestep draw.")
@click.option("--seed", type=int, default=TrainSettings.seed, show_default=True,
              help="Seed of the LoRA's initial weights and of each step's samples, timesteps and noise.")
@click.option("--checkpoint-every", type=int, default=500, show_default=True,
              help="Steps between checkpoints (what an interrupted run resumes from).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True, help="Frozen DiT precision (the LoRA trains in float32).")
@click.option("--no-grad-checkpoint", is_flag=True, help="Keep activations instead of recomputing them.")
@click.option("--val-cache", type=click.Path(path_type=Path), default=None,
              help="Latent cache of held-out clips: alpha errors at every checkpoint.")
@click.option("--val-steps", type=int, default=4, show_default=True, help="Denoising steps of the validation.")
@click.option("--val-shift", type=float, default=5.0, show_default=True, help="Sigma shift of the validation.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run (or a finished one to more steps).")
@click.option("--overwrite", is_flag=True,
              help="Start afresh: replace OUT, and an interrupted run's checkpoint, when this run completes.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def train(bundle, cache, kind, out, steps, rank, alpha, k, lr, batch, grad_accum, shift, seed, checkpoint_every,
          dtype, no_grad_checkpoint, val_cache, val_steps, val_shift, resume, overwrite, quiet):
    """Train an Effect or Quality expert (LoRA on the replica tokens of the
    frozen DiT, flow matching on the alpha latent) and write it as an
    expert directory, usable at once with `decompose --expert KIND=OUT` or
    in a bundle. Checkpoints every --checkpoint-every steps; an interrupted
    run continues with --resume. Data parallel under `mlx.launch`.

    \b
    Examples:
      mlx-omnimatte train --bundle models/casper-1.3b --cache cache/synth --expert effect -o experts/effect
      mlx-omnimatte train --bundle models/casper-1.3b --cache cache/synth --expert quality -o experts/quality \\
          --steps 2000 --batch 2 --grad-accum 4 --resume
      mlx.launch --hosts mac1,mac2 -- mlx-omnimatte train --bundle B --cache C --expert effect -o OUT
    """
    settings = TrainSettings(kind=kind, rank=rank, alpha=alpha, k=k, steps=steps, lr=lr, batch=batch,
                             grad_accum=grad_accum, shift=shift, seed=seed, checkpoint_every=checkpoint_every,
                             grad_checkpoint=not no_grad_checkpoint)
    progress = Progress(enabled=not quiet)
    try:
        run_training(bundle, cache, out, settings, resume=resume, dtype=dtype, report=progress.report,
                     say=lambda line: click.echo(line, err=True), val_cache=val_cache,
                     val=ValidationSettings(steps=val_steps, shift=val_shift), overwrite=overwrite)
    except BaseException as e:  # Ctrl-C or a signal: say what is kept and how to go on
        if not isinstance(e, Exception):
            _note_checkpoint(e, out)
        raise
    if not quiet:
        click.echo(progress.summary(), err=True)
    click.echo(f"wrote {out}")


def _note_checkpoint(e: BaseException, out: Path) -> None:
    """An interrupted run keeps its last checkpoint: the interrupt's line
    (`cli.main`) says so instead of "nothing was written"."""
    folder = work_dir(out) / CHECKPOINT
    try:
        step = read_meta(folder).get("step")
    except OmnimatteError:  # no checkpoint yet: nothing was written
        return
    e.kept = f"{out} not written; the checkpoint at step {step} is kept in {folder.parent} (continue with --resume)"


@click.command("export")
@click.argument("expert", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["peft", "diffusers"]), required=True,
              help="peft: adapter_model.safetensors + adapter_config.json; diffusers: pytorch_lora_weights.")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def export(expert, fmt, out, overwrite):
    """Write an expert directory as a PEFT adapter folder
    (adapter_model.safetensors + adapter_config.json) or a diffusers LoRA
    (pytorch_lora_weights.safetensors, `transformer.` prefix), each with a
    manifest beside it so `mlx-omnimatte convert` reads it back unchanged.

    \b
    Examples:
      mlx-omnimatte export experts/effect --format peft -o experts/effect-peft
      mlx-omnimatte export experts/quality --format diffusers -o experts/quality-diffusers
    """
    export_expert(expert, fmt, out, overwrite)
    click.echo(f"wrote {out}")
