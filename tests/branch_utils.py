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
from mlx_omnimatte.models.wan.transformer import Config, Model
from mlx_omnimatte.pipelines.stages import Trajectory, sample_trajectory
from mlx_omnimatte.sampling import make_sampler

TINY = dict(dim=64, ffn_dim=96, num_heads=2, num_layers=4, in_dim=36, out_dim=16, text_dim=48,
            image_dim=32, text_len=16)
TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o")
DIFFUSERS_NAMES = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
                   "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.o": "attn2.to_out.0"}


def tiny_model(seed: int = 0, **overrides) -> Model:
    """Tiny DiT; every parameter random and O(1) (norm weights near 1)."""
    model = Model(Config(**{**TINY, **overrides}))
    params = random_params(model, seed, norm=0.1, bias=0.05, modulation=TINY["dim"] ** -0.5)
    model.update(tree_unflatten([(k, mx.array(v)) for k, v in params.items()]))
    model.eval()
    return model


def random_adapter(blocks, dim: int = 64, rank: int = 4, seed: int = 1, targets=TARGETS, scale: float = 0.3):
    """{"blocks.i.target": (A (rank, dim), B (dim, rank))} in float32."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in blocks:
        for t in targets:
            a = (rng.standard_normal((rank, dim)) / np.sqrt(dim)).astype(np.float32)
            b = (scale * rng.standard_normal((dim, rank)) / np.sqrt(rank)).astype(np.float32)
            out[f"blocks.{i}.{t}"] = (a, b)
    return out


def adapter_keys(adapter: dict, fmt: str, alpha: float | None = None, prefix: str = "",
                 diffusers_names: bool = False) -> dict[str, np.ndarray]:
    """The adapter as a state dict in a trainer's layout."""
    sd = {}
    for module, (a, b) in adapter.items():
        _, i, target = module.split(".", 2)
        name = DIFFUSERS_NAMES[target] if diffusers_names else target
        if fmt == "peft":
            base = f"{prefix}blocks.{i}.{name}"
            sd[f"{base}.lora_A.weight"], sd[f"{base}.lora_B.weight"] = a, b
        elif fmt == "diffsynth":
            base = f"{prefix}blocks.{i}.{name}"
            sd[f"{base}.lora_A.default.weight"], sd[f"{base}.lora_B.default.weight"] = a, b
        elif fmt == "kohya":
            base = f"lora_unet_blocks_{i}_{name.replace('.', '_')}"
            sd[f"{base}.lora_down.weight"], sd[f"{base}.lora_up.weight"] = a, b
        else:
            raise ValueError(fmt)
        if alpha is not None:
            sd[f"{base}.alpha"] = np.array(alpha, np.float32)
    return sd


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
