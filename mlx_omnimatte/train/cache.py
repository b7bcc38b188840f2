"""The latent cache: every training sample encoded once.

    CACHE/cache.json             format, version, the encoders' identities,
                                 the grid, the samples, complete: true|false
    CACHE/samples/NNNNN.safetensors   one sample (one object of one clip):
      cond     [F, h, w, 20]  mask channels (4) + condition latent (16)
      alpha    [F, h, w, 16]  the target alpha's latent (3 equal channels in [-1, 1])
      bg       [F, h, w, 16]  the clean background's latent (that object removed)
      context  [L, text_dim]  the caption's embedding (its tokens only)
      clip     [257, 1280]    CLIP features of frame 0
      alpha_px, object_px, effect_px  float16 [T, H, W] on the model grid:
                              the truth for validation (alpha errors by region)

Sample files are written one at a time, each atomically, so an interrupted
`prepare` resumes where it stopped; `cache.json` says complete only at the end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import OmnimatteError
from ..io.writers import save_safetensors
from ..jsonfile import read_json
from ..weights import fingerprint

FORMAT = "mlx-omnimatte-latent-cache"
VERSION = 1
MANIFEST = "cache.json"
ENCODERS = ("vae", "t5", "clip")  # the components a cache's contents depend on
TRAIN_KEYS = ("cond", "alpha", "bg", "context", "clip")


def bundle_identity(bundle) -> dict[str, str]:
    return {c: fingerprint(bundle.path(c)) for c in ENCODERS if c in bundle.remover.components}


def sample_file(root: Path, index: int) -> Path:
    return Path(root) / "samples" / f"{index:05d}.safetensors"


def write_sample(root: Path, index: int, arrays: dict, meta: dict) -> None:
    path = sample_file(root, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.safetensors")
    save_safetensors(tmp, arrays, {k: str(v) for k, v in meta.items()})
    os.replace(tmp, path)


def write_manifest(root: Path, manifest: dict) -> None:
    tmp = Path(root) / f".{MANIFEST}.{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, Path(root) / MANIFEST)


def read_manifest(root) -> dict:
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise OmnimatteError(f"{root}: no such latent cache (make one with `mlx-omnimatte prepare`)")
    if not path.is_file():
        raise OmnimatteError(f"{root}: not a latent cache (no {MANIFEST}; make one with `mlx-omnimatte prepare`)")
    manifest = read_json(path)
    if manifest.get("format") != FORMAT:
        raise OmnimatteError(f"{path}: not a latent cache of mlx-omnimatte")
    if manifest.get("version") != VERSION:
        raise OmnimatteError(f"{path}: cache version {manifest.get('version')}, this version reads {VERSION}")
    return manifest


class LatentCache:
    """Read side: ``len(cache)`` samples; ``cache[i]`` -> dict of numpy arrays
    (read from its file on each access: a process touches only the samples
    it trains on)."""

    def __init__(self, root, bundle=None):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        if not self.manifest.get("complete"):
            raise OmnimatteError(f"{self.root}: the cache is incomplete (an interrupted prepare); "
                                 "run the same `mlx-omnimatte prepare` again to finish it")
        self.samples = self.manifest.get("samples") or []
        if not self.samples:
            raise OmnimatteError(f"{self.root}: the cache holds no samples")
        if bundle is not None:
            self.check_bundle(bundle)

    def check_bundle(self, bundle) -> None:
        mine = bundle_identity(bundle)
        for c in mine:
            if self.manifest.get("encoders", {}).get(c) != mine[c]:
                raise OmnimatteError(f"{self.root}: made with another bundle (its {c} differs from "
                                     f"{bundle.root}'s); run `mlx-omnimatte prepare` with this bundle")

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int, keys=TRAIN_KEYS) -> dict:
        """The arrays ``keys`` of sample ``index`` (None: all, the validation truth too)."""
        path = sample_file(self.root, index)
        try:
            arrays = mx.load(str(path))
        except (RuntimeError, ValueError, OSError):
            raise OmnimatteError(f"{path}: missing or unreadable cache sample") from None
        keys = arrays if keys is None else keys
        return {k: np.array(arrays[k].astype(mx.float32)) for k in keys if k in arrays}

    def __getitem__(self, index: int) -> dict:
        return self.read(int(index))

    @property
    def latent_shape(self) -> tuple:
        return tuple(self.samples[0]["shape"])
