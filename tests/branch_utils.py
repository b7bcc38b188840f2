"""Shared helpers for the branch and LoRA tests (no tests here; named test_* to
stay within the test_branch_* files): a tiny Wan DiT with random weights,
random LoRA adapters written in each trainer's key layout, and inputs."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from safetensors.numpy import save_file

from mlx.utils import tree_unflatten

from helpers import random_params
from mlx_omnimatte.convert.tiny import DIFFUSERS_NAMES, TARGETS, adapter_keys, random_adapter  # noqa: F401
from mlx_omnimatte.models.wan.transformer import Config, Model
from mlx_omnimatte.pipelines.stages import Trajectory, sample_trajectory
from mlx_omnimatte.sampling import make_sampler

TINY = dict(dim=64, ffn_dim=96, num_heads=2, num_layers=4, in_dim=36, out_dim=16, text_dim=48,
            image_dim=32, text_len=16)

WIDE = dict(num_layers=2, dim=256, ffn_dim=256)  # the tiny bundle's width (training tests)
LATENT = (2, 4, 4)  # F, h, w: 8 tokens per half


def tiny_model(seed: int = 0, **overrides) -> Model:
    """Tiny DiT; every parameter random and O(1) (norm weights near 1)."""
    model = Model(Config(**{**TINY, **overrides}))
    params = random_params(model, seed, norm=0.1, bias=0.05, modulation=TINY["dim"] ** -0.5)
    model.update(tree_unflatten([(k, mx.array(v)) for k, v in params.items()]))
    model.eval()
    return model


def write_lora(path: Path, sd: dict, manifest: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    if manifest is not None:
        path.with_suffix(".json").write_text(json.dumps(manifest))
    return path


def convert_expert(src: Path, out: Path, dtype: str = "float32", **options):
    """Through the real converter and loader: LoRA file -> Expert."""
    from mlx_omnimatte.convert.core import convert, detect
    from mlx_omnimatte.convert.readers import read_checkpoint
    from mlx_omnimatte.convert.writer import write_converted
    from mlx_omnimatte.weights import load_model

    ckpt = read_checkpoint(src)
    spec, fmt = detect(ckpt)
    assert spec.component == "expert"
    conv = convert(ckpt, spec, fmt, dtype, **options)
    write_converted(out, conv, {"source": str(src), "source_format": fmt})
    return load_model(out)


def inputs(model: Model, frames: int = 2, h: int = 4, w: int = 4, seed: int = 3):
    cfg = model.config
    rng = np.random.default_rng(seed)

    def r(*s):
        return mx.array(rng.standard_normal(s).astype(np.float32))

    ctx = np.zeros((1, cfg.text_len, cfg.text_dim), np.float32)
    ctx[:, :5] = rng.standard_normal((1, 5, cfg.text_dim))
    return dict(
        z_bg=r(1, frames, h, w, 16), z_alpha=r(1, frames, h, w, 16), cond=r(1, frames, h, w, cfg.in_dim - 16),
        context=mx.array(ctx), clip_fea=r(1, 257, cfg.image_dim) if cfg.image_dim else None,
    )


def sample_layers(model, dual, z_bg, z_alpha, y, ctx, settings, report=None):
    """The dual-expert trajectory as `decompose` samples it (schedule and
    experts checked first, then the stage runner's one trajectory): the
    background and alpha latents at sigma 0."""
    dual.check_schedule(settings)
    spec = dual.spec([Trajectory("", [0], latents=2)])
    spec.check(model)
    sampler = make_sampler(settings.sampler, settings.steps, settings.shift)
    return tuple(sample_trajectory(model, spec, y, ctx, [z_bg, z_alpha], settings, sampler, report))


def sample(cfg, seed: int = 0, latent=LATENT) -> dict:
    """One random training sample (numpy) for a DiT of config `cfg`."""
    rng = np.random.default_rng(seed)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return {"cond": f32(*latent, 20), "alpha": f32(*latent, 16), "bg": f32(*latent, 16),
            "context": f32(5, cfg.text_dim), "clip": f32(257, cfg.image_dim)}
