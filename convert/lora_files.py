"""LoRA files as trainers write them: key layouts and where the scale is kept.

Used by both the expert converter (`lora.py`) and the base-model merge
(`merge.py`). Layouts (detected from the keys; a wrapper prefix from
`PREFIXES` is stripped):

  peft       diffusers / PEFT: `<module>.lora_A.weight`, `.lora_B.weight`,
             optional `.lora_B.bias` (PEFT lora_bias) and `.alpha`
  kohya      kohya-ss / musubi-tuner / VideoX-Fun: `lora_unet_<module with _>`
             (VideoX-Fun writes `lora_unet__blocks_0_...`), `.lora_down.weight`,
             `.lora_up.weight`, `.alpha`
  diffsynth  DiffSynth-Studio: `<module>.lora_A.default.weight`, `.lora_B.default.weight`

The scale of module m is alpha_m / rank_m, alpha from the first source that
has it (`resolve_alpha`):

1. a manifest (or option) `alpha`, for every module;
2. `.alpha` tensors (kohya, musubi, VideoX-Fun; some PEFT exports), per module;
3. diffusers' safetensors metadata: `lora_adapter_metadata` (keys prefixed
   `transformer.`) or `transformer_lora_adapter_metadata`, a PEFT LoraConfig
   as JSON;
4. PEFT's `adapter_config.json` beside the file (or in its folder);
   for 3 and 4: `lora_alpha`, `alpha_pattern` / `rank_pattern` per module,
   and `use_rslora` (scale alpha / sqrt(rank));
5. DiffSynth-Studio's loader adds `alpha * B @ A` with alpha 1 by default
   (`GeneralLoRALoader.load`): scale 1, i.e. alpha = rank;
6. otherwise alpha = rank (scale 1), with a note saying so.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.jsonfile import parse_json, read_json

from .readers import Checkpoint

PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "model.",
            "pipe.dit.", "dit.")

# layout -> regex splitting a bare key into (module, role)
_ROLES = {
    "peft": re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|alpha)"),
    "diffsynth": re.compile(r"(.+)\.(lora_A(?:\.default)?\.weight|lora_B(?:\.default)?\.weight"
                            r"|lora_B(?:\.default)?\.bias|alpha)"),
    "kohya": re.compile(r"lora_unet_+(?:diffusion_model_|transformer_|model_)?(.+)\.(lora_down\.weight"
                        r"|lora_up\.weight|alpha)"),
}
FORMATS = tuple(_ROLES)
_ROLE_NAMES = {"lora_A": "lora_a", "lora_down": "lora_a", "lora_B": "lora_b", "lora_up": "lora_b"}
_LORA_KEY = re.compile(r"\.(?:lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight$")
METADATA_KEYS = ("lora_adapter_metadata", "transformer_lora_adapter_metadata")


def detect(ckpt: Checkpoint) -> str | None:
    """A layout name only for LoRA files (any key that is a LoRA A/B weight)."""
    keys = list(ckpt)
    if not any(_LORA_KEY.search(k) for k in keys):
        return None
    if any(".lora_down." in k or ".lora_up." in k for k in keys):
        return "kohya"
    if any(".default.weight" in k for k in keys):
        return "diffsynth"
    return "peft"


def strip(key: str) -> str:
    for p in PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def split_key(key: str, fmt: str) -> tuple[str, str] | None:
    """(source module, role) with role lora_a / lora_b / lora_bias / alpha."""
    m = _ROLES[fmt].fullmatch(strip(key))
    if m is None:
        return None
    module, role = m.groups()
    head = role.split(".")[0]
    role = "alpha" if role == "alpha" else "lora_bias" if role.endswith("bias") else _ROLE_NAMES[head]
    return module, role


def group(ckpt: Checkpoint, fmt: str, skip=lambda key: False) -> dict[str, dict[str, str]]:
    """{source module: {role: key}}; unknown keys and DoRA are errors."""
    modules: dict[str, dict[str, str]] = {}
    for key in ckpt:
        if skip(key):
            continue
        found = split_key(key, fmt)
        if found is None:
            if ".dora_scale" in key or "magnitude" in key:
                raise OmnimatteError(f"{ckpt.source}: {key}: DoRA adapters are not supported (plain LoRA only)")
            raise OmnimatteError(f"{ckpt.source}: unexpected key {key} (not a {fmt} LoRA tensor of the DiT)")
        module, role = found
        slot = modules.setdefault(module, {})
        if role in slot:
            raise OmnimatteError(f"{ckpt.source}: keys {slot[role]} and {key} are the same LoRA tensor")
        slot[role] = key
    if not modules:
        raise OmnimatteError(f"{ckpt.source}: no LoRA A/B pairs found")
    return modules


def check_pair(ckpt: Checkpoint, name: str, roles: dict) -> tuple[tuple, tuple]:
    """The (A, B) matrix shapes of one module, or an error naming the key."""
    src = ckpt.source
    if "lora_a" not in roles and "lora_b" not in roles:
        raise OmnimatteError(f"{src}: {next(iter(roles.values()))}: no LoRA matrices for {name} (missing pair)")
    if "lora_a" not in roles or "lora_b" not in roles:
        have, lack = ("lora_a", "B (up)") if "lora_a" in roles else ("lora_b", "A (down)")
        raise OmnimatteError(f"{src}: {roles[have]}: LoRA {name} has no {lack} matrix (missing pair)")
    a, b = matrix_shape(ckpt, roles["lora_a"]), matrix_shape(ckpt, roles["lora_b"])
    if a[0] != b[1]:
        raise OmnimatteError(f"{src}: {name}: rank mismatch, {roles['lora_a']} has shape {a} "
                             f"and {roles['lora_b']} {b}")
    return a, b


def matrix_shape(ckpt: Checkpoint, key: str) -> tuple[int, ...]:
    shape = tuple(ckpt[key].shape)
    if len(shape) == 4 and shape[2:] == (1, 1):  # kohya may store linears as 1x1 convs
        shape = shape[:2]
    if len(shape) != 2:
        raise OmnimatteError(f"{ckpt.source}: {key} has shape {tuple(ckpt[key].shape)}, a LoRA matrix is 2-D")
    return shape


def load_matrix(ckpt: Checkpoint, key: str) -> np.ndarray:
    a = ckpt[key].load().astype(np.float32)
    return a.reshape(a.shape[:2]) if a.ndim == 4 else a


def scalar(ckpt: Checkpoint, key: str) -> float:
    a = np.asarray(ckpt[key].load(), dtype=np.float64)
    if a.size != 1 or not np.isfinite(a).all() or float(a.reshape(-1)[0]) <= 0:
        raise OmnimatteError(f"{ckpt.source}: {key} must hold one positive number (the LoRA alpha)")
    return float(a.reshape(-1)[0])


# --------------------------------------------------------------------------- alpha


@dataclass
class Alphas:
    """alpha per source module (scale = alpha / rank) and where it came from."""

    values: dict[str, float]
    source: str
    note: str | None = None  # one line for the user when alpha was assumed


def resolve_alpha(ckpt: Checkpoint, fmt: str, modules: dict[str, dict], ranks: dict[str, int],
                  given: float | None = None, where: str = "manifest") -> Alphas:
    """See the module doc for the order; `given`: a manifest or option alpha."""
    if given is not None:
        return Alphas({m: float(given) for m in modules}, where)
    if any("alpha" in roles for roles in modules.values()):
        missing = [m for m, roles in modules.items() if "alpha" not in roles]
        if missing:
            raise OmnimatteError(f"{ckpt.source}: {missing[0]} has no .alpha while other modules have one")
        return Alphas({m: scalar(ckpt, r["alpha"]) for m, r in modules.items()}, "alpha tensors")
    found = peft_config(ckpt)
    if found is not None:
        config, where = found
        return Alphas({m: _peft_alpha(config, m, ranks[m], where) for m in modules}, where)
    if fmt == "diffsynth":
        return Alphas({m: float(r) for m, r in ranks.items()}, "DiffSynth convention (scale 1)")
    note = f"{Path(ckpt.source).name}: no LoRA alpha in the file or beside it: using alpha = rank (scale 1.0)"
    return Alphas({m: float(r) for m, r in ranks.items()}, "none (alpha = rank)", note)


def peft_config(ckpt: Checkpoint) -> tuple[dict, str] | None:
    """A PEFT LoraConfig from diffusers' metadata or an adapter_config.json beside the file."""
    for key in METADATA_KEYS:
        raw = ckpt.metadata.get(key)
        if raw:
            config = parse_json(raw, f"{ckpt.source}: metadata {key}")
            return {k.removeprefix("transformer."): v for k, v in config.items()}, f"metadata {key}"
    source = Path(ckpt.source)
    folder = source if source.is_dir() else source.parent
    path = folder / "adapter_config.json"
    if not path.is_file():
        return None
    return read_json(path), str(path)


def _pattern_value(patterns: dict, module: str):
    """PEFT's rule: a pattern applies when the module name ends with it."""
    for pattern, value in (patterns or {}).items():
        if re.search(rf"(?:^|\.)(?:{pattern})$", module):
            return value
    return None


def _peft_alpha(config: dict, module: str, rank: int, where: str) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), module)
    alpha = config.get("lora_alpha") if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise OmnimatteError(f"{where}: lora_alpha {alpha!r} must be a positive number")
    if config.get("use_rslora"):
        return float(alpha) * math.sqrt(rank)  # scale alpha / sqrt(rank), as alpha' / rank
    return float(alpha)
