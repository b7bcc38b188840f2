"""Load a converted model directory (config.json + safetensors) as an MLX module."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import mlx.core as mx

from .errors import OmnimatteError, article
from .models.base import DTYPES, float32_scales, quantize_like

# component -> module defining `Config` (with `from_dict`) and `Model(config)`,
# or `load(path, config, weights)` for components that are not a single module.
COMPONENTS = {
    "transformer": "mlx_omnimatte.models.wan.transformer",
    "vae": "mlx_omnimatte.models.wan.vae",
    "t5": "mlx_omnimatte.models.t5",
    "clip": "mlx_omnimatte.models.clip",
    "expert": "mlx_omnimatte.branch.experts",
}


def read_config(path) -> dict:
    path = Path(path)
    cfg_path = path / "config.json"
    if not path.is_dir() or not cfg_path.exists():
        raise OmnimatteError(f"{path}: not a converted model directory (no config.json); "
                             "run `mlx-omnimatte convert` first")
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError:
        raise OmnimatteError(f"{cfg_path}: not valid JSON") from None
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


def load_weights(path) -> dict[str, mx.array]:
    """All tensors of a converted directory (sharded or not)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = sorted(set(read_weight_map(index).values())) if index.exists() else ["model.safetensors"]
    weights = {}
    for f in files:
        if not (path / f).exists():
            raise OmnimatteError(f"{path / f}: missing weight file")
        try:
            weights.update(mx.load(str(path / f)))
        except (RuntimeError, ValueError) as e:
            raise OmnimatteError(f"{path / f}: unreadable ({e})") from None
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
    module = importlib.import_module(COMPONENTS[config["component"]])
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
