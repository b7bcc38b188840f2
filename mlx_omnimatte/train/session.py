"""A training run on disk: bundle + cache in, expert directory out.

While training, checkpoints live in a hidden sibling of the output,
``.OUT.train/checkpoint/``; OUT itself appears only when the run completes
(written through a staged folder and renamed), holding the expert and, in
``OUT/training/``, its last checkpoint. So an interrupted run leaves no OUT,
and ``--resume`` continues from the work folder's checkpoint, or from
``OUT/training/`` to train a finished expert further (to a larger --steps).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..bundle import open_bundle
from ..errors import OmnimatteError
from ..io.writers import atomic_output, check_output
from ..progress import Report
from ..weights import fingerprint, load_model
from . import distributed
from .cache import ENCODERS, LatentCache
from .store import load_checkpoint, read_meta, save_checkpoint, write_expert_into
from .trainer import TrainSettings, TrainState, train, trained_expert
from .validate import ValidationSettings, validate

CHECKPOINT = "checkpoint"
TRAINING = "training"
# settings that must not change across a resume (the rest may: steps, lr, ...)
FIXED = ("kind", "rank", "alpha", "k", "seed")


def work_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.train")


def resume_point(out: Path, resume: bool, overwrite: bool = False) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuses what
    would lose or overwrite work unless ``overwrite`` (a fresh run that
    replaces OUT and an interrupted run's checkpoint)."""
    work = work_dir(out) / CHECKPOINT
    if resume and overwrite:
        raise OmnimatteError("--resume continues a run and --overwrite starts afresh: give one of them")
    if not resume:
        if work.is_dir() and not overwrite:
            step = read_meta(work).get("step")
            raise OmnimatteError(f"{out}: an interrupted run left a checkpoint at step {step} in {work.parent}; "
                                 "add --resume to continue it (or --overwrite to start afresh)")
        check_output(out, overwrite)  # "exists": add --resume to train it further, or --overwrite
        return None
    for cand in (work, out / TRAINING):
        if cand.is_dir():
            return cand
    raise OmnimatteError(f"{out}: nothing to resume (no checkpoint in {work.parent} or {out / TRAINING})")


def check_resumable(meta: dict, settings: TrainSettings, identity: dict, where: Path) -> None:
    old = meta.get("settings", {})
    for key in FIXED:
        if old.get(key) != getattr(settings, key):
            raise OmnimatteError(f"{where}: checkpoint has {key}={old.get(key)!r}, this run {getattr(settings, key)!r}")
    for key, value in identity.items():
        if meta.get(key) != value:
            raise OmnimatteError(f"{where}: checkpoint made with another {key.replace('_', ' ')}")


def check_batch(cache: LatentCache, settings: TrainSettings) -> None:
    shapes = {tuple(row["shape"]) for row in cache.samples}
    if settings.batch > 1 and len(shapes) > 1:
        raise OmnimatteError(f"{cache.root}: samples of {len(shapes)} latent shapes cannot share a batch; "
                             "use --batch 1 with --grad-accum, or prepare with one --size")


def run_training(bundle_path, cache_path, out, settings: TrainSettings, resume: bool = False,
                 dtype: str | None = None, report: Report = None, say=print, val_cache=None,
                 val: ValidationSettings | None = None, overwrite: bool = False) -> Path:
    """Train an expert into ``out``; ``say`` gets one-line notices (resume,
    validation errors at each checkpoint when ``val_cache`` is given);
    ``overwrite``: a fresh run that replaces ``out`` when it completes."""
    out = Path(out)
    bundle = open_bundle(bundle_path, need=("transformer", *ENCODERS))
    cache = LatentCache(cache_path, bundle)
    held_out = LatentCache(val_cache, bundle) if val_cache is not None else None
    settings = settings.resolve(bundle.config("transformer")["num_layers"])
    check_batch(cache, settings)
    start = resume_point(out, resume, overwrite)
    identity = {"base_model": fingerprint(bundle.path("transformer")), "cache": cache.manifest["encoders"]}
    state = None
    if start is not None:
        check_resumable(read_meta(start), settings, identity, start)
        state = load_checkpoint(start, settings)
        say(f"resuming from {start} at step {state.step} of {settings.steps}")
    # every check above runs before any weight loads
    vae = load_model(bundle.path("vae"), "vae") if held_out is not None else None
    model = load_model(bundle.path("transformer"), "transformer", dtype=dtype)
    size, rank = distributed.world()
    work = work_dir(out)
    if start is None and rank == 0:
        shutil.rmtree(work, ignore_errors=True)  # an interrupted run's checkpoint that --overwrite replaces

    def checkpoint(s: TrainState) -> None:
        if rank != 0:
            return
        save_checkpoint(work / CHECKPOINT, s, settings, identity)
        if held_out is not None:
            errors = validate(model, held_out, val or ValidationSettings(),
                              **{settings.kind: trained_expert(s, model, settings)}, vae=vae)
            say(f"step {s.step}: validation " + ", ".join(f"{k} {v:.4g}" for k, v in errors.items()))

    state = train(model, cache, settings, state, report, checkpoint, world=size, rank=rank)
    if rank == 0:
        write_output(out, state, settings, model.config, identity, overwrite=resume or overwrite)
        shutil.rmtree(work, ignore_errors=True)
    return out


def write_output(out: Path, state: TrainState, settings: TrainSettings, model_config, identity: dict,
                 overwrite: bool) -> None:
    with atomic_output(out, overwrite=overwrite, directory=True) as tmp:
        write_expert_into(tmp, state.lora, settings, model_config, {**identity, "trained_steps": state.step})
        save_checkpoint(tmp / TRAINING, state, settings, identity)
