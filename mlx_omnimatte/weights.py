"""Load a converted model directory (config.json + safetensors) as an MLX module."""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .errors import OmnimatteError, article
from .jsonfile import read_json
from .models.base import DTYPES, float32_scales, quantize_like

@dataclass(frozen=True)
class Component:
    """Where a component's code lives (module names: loading one imports
    only what it needs)."""

    model: str  # defines `Config` (with `from_dict`) and `Model(config)`, or `load(path, config, weights)`
    converter: str  # defines its conversion `SPEC`
    in_bundle: bool = True  # one of a bundle's components (experts sit beside them)


# The one registry of components. `convert` detects a checkpoint by trying
# them in this order: an expert's LoRA keys before the transformer's.
COMPONENTS = {
    "expert": Component("mlx_omnimatte.branch.experts", "mlx_omnimatte.convert.lora", in_bundle=False),
    "transformer": Component("mlx_omnimatte.models.wan.transformer", "mlx_omnimatte.convert.transformer"),
    "vae": Component("mlx_omnimatte.models.wan.vae", "mlx_omnimatte.convert.vae"),
    "t5": Component("mlx_omnimatte.models.t5", "mlx_omnimatte.convert.t5"),
    "clip": Component("mlx_omnimatte.models.clip", "mlx_omnimatte.convert.clip"),
}
BUNDLE_COMPONENTS = tuple(name for name, c in COMPONENTS.items() if c.in_bundle)


def read_config(path) -> dict:
    path = Path(path)
    cfg_path = path / "config.json"
    if not path.is_dir() or not cfg_path.exists():
        raise OmnimatteError(f"{path}: not a converted model directory (no config.json); "
                             "run `mlx-omnimatte convert` first")
    config = read_json(cfg_path)
    if config.get("component") not in COMPONENTS:
        raise OmnimatteError(f"{cfg_path}: unknown component {config.get('component')!r}")
    return config


def read_weight_map(index) -> dict[str, str]:
    """tensor name -> shard file name, from a `*.safetensors.index.json`."""
    index = Path(index)
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError):
        raise OmnimatteError(f"{index}: not a safetensors index (no weight_map)") from None
    if not isinstance(weight_map, dict):
        raise OmnimatteError(f"{index}: not a safetensors index (weight_map is not a table)")
    return weight_map


def weight_files(path) -> list[Path]:
    """The safetensors files of a converted directory (its shards when indexed)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    names = sorted(set(read_weight_map(index).values())) if index.exists() else ["model.safetensors"]
    return [path / n for n in names]


def fingerprint(path, extra=(), salt: str = "") -> str:
    """A cheap identity of a converted directory's weights: `salt`, its
    config, the files `extra` (relative paths, e.g. a tokenizer), and per
    weight file its name, size and first/last MiB (the header and a sample of
    values: a re-conversion changes it). What is derived from the weights
    (prompt embeddings, latent caches, step-cache calibrations) is keyed by it."""
    path = Path(path)
    h = hashlib.sha256(salt.encode())
    for f in [path / "config.json", *(path / e for e in extra)]:
        if not f.is_file():
            raise OmnimatteError(f"{f}: missing (not a converted model directory?)")
        h.update(f.read_bytes())
    for f in weight_files(path):
        try:
            size = f.stat().st_size
            with open(f, "rb") as fh:
                head = fh.read(1 << 20)
                fh.seek(max(0, size - (1 << 20)))
                tail = fh.read()
        except OSError:
            raise OmnimatteError(f"{f}: missing weight file") from None
        h.update(f"{f.name}:{size}".encode() + head + tail)
    return h.hexdigest()[:24]


def load_weights(path) -> dict[str, mx.array]:
    """All tensors of a converted directory (sharded or not)."""
    weights = {}
    for f in weight_files(path):
        if not f.exists():
            raise OmnimatteError(f"{f}: missing weight file")
        try:
            weights.update(mx.load(str(f)))
        except (RuntimeError, ValueError) as e:
            raise OmnimatteError(f"{f}: unreadable ({e})") from None
    return weights


def load_model(path, component: str | None = None, dtype: str | None = None):
    """Build the MLX module of a converted directory and load its weights.

    `component` checks that the directory holds what the caller expects;
    `dtype` casts floating weights (default: as stored; quantized weights
    keep their bits, only their scales and the other tensors are cast).
    """
    path = Path(path)
    config = read_config(path)
    if component is not None and config["component"] != component:
        raise OmnimatteError(f"{path}: holds {article(config['component'])}, not {article(component)}")
    module = importlib.import_module(COMPONENTS[config["component"]].model)
    if hasattr(module, "load"):
        return module.load(path, config, load_weights(path))
    model = module.Model(module.Config.from_dict(config))
    weights = load_weights(path)
    if dtype is not None:
        target = DTYPES[dtype]
        weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v
                   for k, v in weights.items()}
    quantize_like(model, config, weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise OmnimatteError(f"{path}: weights do not fit the model ({e})") from None
    if config.get("quantization"):
        float32_scales(model)
    model.eval()
    return model
