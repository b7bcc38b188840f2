"""The tiny random Wan2.1-Fun-InP model of the package (`convert/tiny.py`:
the released source formats, converted by the real converter) as the tests
use it, plus a NaN poisoner and the training tests' data set."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_omnimatte import synth
from mlx_omnimatte.convert.tiny import (CLIP, DIT, LORA_RANK, TEXT_DIM, VAE, clip_state,  # noqa: F401 (shared)
                                        convert_sources, dit_state, lora_state, source_state, vae_state,
                                        write_fun_folder)


def poison(component_dir: Path, name_part: str = "head.head.weight") -> None:
    """Put a NaN into one weight of a converted component (for NaN tests)."""
    f = Path(component_dir) / "model.safetensors"
    weights = mx.load(str(f))
    key = next(k for k in weights if name_part in k)
    w = np.array(weights[key].astype(mx.float32))
    w.flat[0] = np.nan
    weights[key] = mx.array(w).astype(weights[key].dtype)
    mx.save_safetensors(str(f), weights)


def tiny_bundle(root: Path, experts: bool = True) -> Path:
    """The tiny model folder written into root and converted by the real
    converter into root/bundle: the Casper-like DiT, with the two expert
    LoRAs unless `experts` is False."""
    write_fun_folder(root)
    return convert_sources(root, Path(root) / "bundle", experts, log=lambda line: None)


TINY_CLIPS = dict(frames=5, size=(64, 48))  # latent 2 x 6 x 8: 24 tokens per half


def tiny_dataset(root: Path, count: int = 2) -> Path:
    """`count` synthetic clips in root/data (the training tests' data set)."""
    return synth.write_dataset(root / "data", count, seed=5, **TINY_CLIPS)
