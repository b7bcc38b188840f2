"""EasyOmnimatte experts: LoRA tensors plus a manifest, and their routing.

* Effect expert: LoRA on the last K blocks (default K = 10 of 30, the last
  third), attention mask B, rank 128; used at high noise (t > tau).
* Quality expert: LoRA on all blocks, mask C, rank 64; used at low noise
  (t <= tau).

t is the normalized timestep ``timestep / 1000`` in [0, 1]; tau = 0 runs the
Effect expert only, tau = 1 the Quality expert only (the first Euler step has
t = 1.0 exactly, and 1.0 > 1 is false).

A converted expert directory (``mlx-omnimatte convert LORA --component
expert``) holds ``model.safetensors`` with ``blocks.{i}.{target}.lora_a``
``(rank, in)``, ``.lora_b`` ``(out, rank)``, optional ``.lora_bias`` ``(out,)``
and an optional ``domain_embedding`` ``(dim,)``, plus ``config.json``:
component "expert", kind, rank, alpha, targets, blocks, k, mask_type,
tau_default, dim, num_layers, source_format. Targets are module paths inside
a block, in the MLX (original Wan) names: ``self_attn.{q,k,v,o}``,
``cross_attn.{q,o}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx

from ..errors import OmnimatteError
from .attention import check_mask_type

KINDS = ("effect", "quality")
DEFAULT_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o")
# Targets that act on branch tokens only, so a replica-only delta is defined.
# cross_attn.k/v (and k_img/v_img) act on the text/image tokens that both
# halves share; the FFN stays frozen in EasyOmnimatte.
SUPPORTED_TARGETS = DEFAULT_TARGETS
DEFAULT_MASK = {"effect": "B", "quality": "C"}
DEFAULT_TAU = 0.5
# Wan widths -> number of blocks (DESIGN.md sec. 4), for LoRA files that do not say
LAYERS_BY_DIM = {1536: 30, 5120: 40}


def check_tau(tau) -> float:
    try:
        t = float(tau)
    except (TypeError, ValueError):
        raise OmnimatteError(f"tau {tau!r}: must be a number in [0, 1]") from None
    if not (0.0 <= t <= 1.0) or math.isnan(t):
        raise OmnimatteError(f"tau {tau!r}: must lie in [0, 1] (0 = Effect expert only, 1 = Quality only)")
    return t


def route(timestep: float, tau: float) -> str:
    """Which expert runs at a model timestep in [0, 1000]: "effect" while
    timestep / 1000 > tau, else "quality"."""
    return "effect" if float(timestep) / 1000.0 > check_tau(tau) else "quality"


class LoRA(NamedTuple):
    a: mx.array  # (rank, in)
    b: mx.array  # (out, rank)
    bias: mx.array | None = None  # (out,), PEFT lora_bias


@dataclass
class Expert:
    kind: str
    lora: dict[str, LoRA]  # "blocks.{i}.{target}" -> LoRA
    rank: int
    alpha: float
    dim: int
    num_layers: int
    mask_type: str
    k: int | None = None
    tau_default: float = DEFAULT_TAU
    domain_embedding: mx.array | None = None  # (dim,), added to the replica tokens
    source_format: str = ""
    path: str = ""
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise OmnimatteError(f"{self.where}: expert kind {self.kind!r} unknown (effect or quality)")
        self.mask_type = check_mask_type(self.mask_type)
        self.tau_default = check_tau(self.tau_default)

    @property
    def where(self) -> str:
        return self.path or f"{self.kind} expert"

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.rank)

    @property
    def blocks(self) -> tuple[int, ...]:
        return tuple(sorted({int(name.split(".")[1]) for name in self.lora}))

    @property
    def targets(self) -> tuple[str, ...]:
        found = {name.split(".", 2)[2] for name in self.lora}
        return tuple(t for t in SUPPORTED_TARGETS if t in found)

    def check_model(self, dim: int, num_layers: int) -> None:
        """Raise unless this expert fits a transformer of that width and depth."""
        if self.dim != dim:
            raise OmnimatteError(f"{self.where}: expert for model width {self.dim}, "
                                 f"the transformer has width {dim}")
        if self.blocks and self.blocks[-1] >= num_layers:
            raise OmnimatteError(f"{self.where}: LoRA on block {self.blocks[-1]}, "
                                 f"the transformer has {num_layers} blocks")


def resolve_tau(tau, effect: Expert | None, quality: Expert | None) -> float:
    """tau given, else the Effect expert's default, else the Quality's, else 0.5."""
    if tau is None:
        tau = next((e.tau_default for e in (effect, quality) if e is not None), DEFAULT_TAU)
    return check_tau(tau)


def select(timestep: float, tau: float, effect: Expert | None, quality: Expert | None) -> Expert:
    kind = route(timestep, tau)
    expert = effect if kind == "effect" else quality
    if expert is None:
        raise OmnimatteError(f"the {kind} expert is needed at timestep {timestep:.1f} with tau {tau} "
                             f"but none was given")
    return expert


def _manifest_int(config: dict, key: str, path) -> int:
    v = config.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise OmnimatteError(f"{path}: config field {key!r} must be a positive integer, got {v!r}")
    return v


def load(path, config: dict, weights: dict) -> Expert:
    """Build an expert from a converted directory's config and tensors
    (called by `weights.load_model`)."""
    path = Path(path)
    where = str(path)
    lora, domain = {}, None
    for name, arr in weights.items():
        if name == "domain_embedding":
            domain = arr.reshape(-1).astype(mx.float32)
            continue
        parts = name.rsplit(".", 1)
        if len(parts) != 2 or parts[1] not in ("lora_a", "lora_b", "lora_bias") or not name.startswith("blocks."):
            raise OmnimatteError(f"{path}: unexpected tensor {name} in an expert directory")
        lora.setdefault(parts[0], {})[parts[1]] = arr
    dim = _manifest_int(config, "dim", where)
    pairs = {}
    for module in sorted(lora, key=_module_order):
        t = lora[module]
        if module.split(".", 2)[-1] not in SUPPORTED_TARGETS:
            raise OmnimatteError(f"{path}: LoRA on {module}: not a supported target "
                                 f"({', '.join(SUPPORTED_TARGETS)})")
        if "lora_a" not in t or "lora_b" not in t:
            raise OmnimatteError(f"{path}: {module} lacks lora_a or lora_b")
        a, b = t["lora_a"], t["lora_b"]
        if a.shape[0] != b.shape[1]:
            raise OmnimatteError(f"{path}: {module} ranks differ (lora_a {a.shape}, lora_b {b.shape})")
        if a.shape[1] != dim or b.shape[0] != dim:
            raise OmnimatteError(f"{path}: {module} maps {a.shape[1]} -> {b.shape[0]}, "
                                 f"the expert's model width is {dim}")
        pairs[module] = LoRA(a, b, t.get("lora_bias"))
    if not pairs:
        raise OmnimatteError(f"{path}: expert holds no LoRA tensors")
    if domain is not None and domain.shape[0] != dim:
        raise OmnimatteError(f"{path}: domain_embedding has {domain.shape[0]} values, model width is {dim}")
    return Expert(
        kind=config.get("kind"),
        lora=pairs,
        rank=_manifest_int(config, "rank", where),
        alpha=float(config.get("alpha") or config["rank"]),
        dim=dim,
        num_layers=_manifest_int(config, "num_layers", where),
        mask_type=config.get("mask_type") or DEFAULT_MASK.get(config.get("kind"), "A"),
        k=config.get("k"),
        tau_default=config.get("tau_default", DEFAULT_TAU),
        domain_embedding=domain,
        source_format=config.get("source_format", ""),
        path=where,
    )


def _module_order(module: str):
    """blocks.{i}.{target}: by block, then in the order of SUPPORTED_TARGETS."""
    _, i, target = module.split(".", 2)
    rank = SUPPORTED_TARGETS.index(target) if target in SUPPORTED_TARGETS else len(SUPPORTED_TARGETS)
    return int(i), rank, target
