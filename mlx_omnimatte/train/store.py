"""Training checkpoints (exact resume) and the trained expert directory.

A checkpoint is a folder: ``state.safetensors`` (the LoRA and the AdamW
moments and step, float32) and ``state.json`` (step, settings, losses, the
identities of the base model and of the cache). It is written beside and
renamed over the previous one, so an interrupt leaves the last complete one.

The expert is written by the converter's own path (`convert.lora` +
`convert.writer`) from the LoRA in PEFT layout, so it is exactly what
``mlx-omnimatte convert LORA --component expert`` writes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..convert.lora import convert_lora
from ..convert.readers import Checkpoint, LazyTensor
from ..convert.writer import write_converted_into
from ..errors import OmnimatteError
from ..io.writers import save_safetensors
from .trainer import TrainSettings, TrainState, make_optimizer

STATE_FILE = "state.safetensors"
META_FILE = "state.json"
SEP = "|"  # module names hold dots: a separator they never contain


def _flatten(tree: dict, prefix: str = "") -> dict[str, mx.array]:
    out = {}
    for key, val in tree.items():
        name = f"{prefix}{SEP}{key}" if prefix else key
        out.update(_flatten(val, name) if isinstance(val, dict) else {name: val})
    return out


def _unflatten(flat: dict[str, mx.array]) -> dict:
    tree: dict = {}
    for name, val in flat.items():
        *path, last = name.split(SEP)
        node = tree
        for p in path:
            node = node.setdefault(p, {})
        node[last] = val
    return tree


def save_checkpoint(folder: Path, state: TrainState, settings: TrainSettings, identity: dict) -> Path:
    """Write ``folder`` atomically (a sibling renamed over it)."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arrays = {**_flatten({"lora": state.lora}), **_flatten({"optimizer": state.optimizer.state})}
    save_safetensors(tmp / STATE_FILE, {k: v.astype(mx.float32) if v.dtype != mx.float32 else v
                                        for k, v in arrays.items()})
    meta = {"step": state.step, "settings": asdict(settings), "losses": state.losses, **identity}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def read_meta(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / META_FILE).read_text())
    except (OSError, ValueError):
        raise OmnimatteError(f"{folder}: not a training checkpoint (no readable {META_FILE})") from None


def load_checkpoint(folder: Path, settings: TrainSettings) -> TrainState:
    """The state saved in ``folder``, with an optimizer of ``settings``."""
    meta = read_meta(folder)
    try:
        tree = _unflatten(mx.load(str(Path(folder) / STATE_FILE)))
    except (RuntimeError, ValueError, OSError):
        raise OmnimatteError(f"{folder}: unreadable {STATE_FILE}") from None
    opt = make_optimizer(settings)
    opt_state = tree["optimizer"]
    opt_state["step"] = opt_state["step"].astype(mx.uint64)
    opt.state = opt_state
    opt.init(tree["lora"])
    return TrainState(int(meta["step"]), tree["lora"], opt, list(meta.get("losses", [])))


def lora_checkpoint(lora: dict, source: Path):
    """The LoRA as a PEFT-layout checkpoint the expert converter reads."""
    items = {}
    for name, p in lora.items():
        for role, key in (("a", "lora_A"), ("b", "lora_B")):
            arr = np.array(p[role].astype(mx.float32))
            items[f"{name}.{key}.weight"] = LazyTensor(arr.shape, "F32", lambda a=arr: a)
    return Checkpoint(items, Path(source), "safetensors")


def write_expert_into(folder: Path, lora: dict, settings: TrainSettings, model_config, identity: dict,
                      dtype: str = "float32") -> None:
    """The expert directory in ``folder`` (an empty staged folder)."""
    ckpt = lora_checkpoint(lora, Path(folder) / "trained-lora.safetensors")
    conv = convert_lora(ckpt, "peft", dtype, kind=settings.kind, k=settings.k, mask_type=settings.mask_type,
                        tau=settings.tau, num_layers=model_config.num_layers, dim=model_config.dim,
                        alpha=float(settings.alpha))
    meta = {"trainer": "mlx-omnimatte train", "format": "peft", **identity,
            "base_dim": model_config.dim, "base_num_layers": model_config.num_layers,
            "base_in_dim": model_config.in_dim, "steps": settings.steps}
    write_converted_into(Path(folder), conv, meta)
