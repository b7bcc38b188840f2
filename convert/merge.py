"""Base-model LoRAs merged into the transformer at conversion.

`W' = W + sum_i scale_i * (alpha_i / rank_i) * B_i @ A_i`, computed in float32
for one weight at a time as the converter streams the checkpoint, then cast
to the output dtype (and quantized after, when asked). So the merge adds one
float32 weight, its delta and that module's A and B to the converter's
memory: for the 14B model's largest linear (FFN, 13824 x 5120) about 0.9 GB
(W, B @ A and the sum at 283 MB each, plus A and B), whatever the depth.

Every LoRA module must name a linear of the transformer with the same
shape: a LoRA for another model (width, depth or architecture) is refused
before anything is written, with the key that does not fit. Layouts and
alpha: see `lora_files`; module names may be original Wan / VideoX-Fun /
DiffSynth names, diffusers names, or kohya's underscored original names.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.nn as nn
import numpy as np

from mlx_omnimatte.errors import OmnimatteError

from . import lora_files as lf
from .core import ComponentSpec, Converted, convert, detect
from .readers import Checkpoint, read_checkpoint
from .transformer import DIFFUSERS, ORIGINAL


def parse_lora_arg(value: str) -> tuple[Path, float]:
    """`FILE[:SCALE]` -> (path, scale); a path that exists as given wins."""
    head, sep, tail = str(value).rpartition(":")
    if not sep or Path(value).exists() or "/" in tail:
        return Path(value), 1.0
    try:
        scale = float(tail)
    except ValueError:
        raise OmnimatteError(f"--lora {value}: scale {tail!r} is not a number (FILE[:SCALE])") from None
    if not math.isfinite(scale):
        raise OmnimatteError(f"--lora {value}: scale {tail!r} is not a finite number")
    return Path(head), scale


@dataclass
class _Term:
    ckpt: Checkpoint
    roles: dict
    scale: float  # user scale * alpha / rank


@dataclass
class Merge:
    """The deltas to add, by MLX weight name, and what was merged."""

    terms: dict[str, list[_Term]] = field(default_factory=dict)
    record: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    applied: set = field(default_factory=set)

    def apply(self, target: str, a: np.ndarray) -> np.ndarray:
        """`ComponentSpec.transform`: the weight (or bias) with its deltas."""
        if target not in self.terms:
            return a
        out = a.astype(np.float32)
        for t in self.terms[target]:
            if target.endswith(".bias"):
                out = out + t.scale * t.ckpt[t.roles["lora_bias"]].load().astype(np.float32)
            else:
                b, a_ = lf.load_matrix(t.ckpt, t.roles["lora_b"]), lf.load_matrix(t.ckpt, t.roles["lora_a"])
                out = out + t.scale * (b @ a_)
        self.applied.add(target)
        return out

    def check_applied(self, source) -> None:
        missing = sorted(set(self.terms) - self.applied)
        if missing:
            raise OmnimatteError(f"{source}: LoRA deltas for {missing[0]} were never applied")


def _linears(model: nn.Module) -> dict[str, tuple]:
    return {path: tuple(m.weight.shape) for path, m in model.named_modules() if isinstance(m, nn.Linear)}


def _target(module: str, fmt: str, linears: dict, underscored: dict) -> str | None:
    """The MLX linear a LoRA module names, or None."""
    if fmt == "kohya":
        return underscored.get(module)
    for keymap in (ORIGINAL, DIFFUSERS):
        t = keymap.target(f"{module}.weight")
        if t is not None and t.endswith(".weight") and t[: -len(".weight")] in linears:
            return t[: -len(".weight")]
    return None


def _unmatched(ckpt: Checkpoint, key: str, module: str, num_layers: int) -> OmnimatteError:
    m = re.match(r"blocks[._](\d+)[._]", module)
    if m and int(m.group(1)) >= num_layers:
        return OmnimatteError(f"{ckpt.source}: {key}: LoRA on block {m.group(1)}, "
                              f"the transformer has {num_layers} blocks")
    return OmnimatteError(f"{ckpt.source}: {key}: {module} matches no linear of the transformer "
                          "(a LoRA for another model?)")


def open_lora(path: Path) -> tuple[Checkpoint, str]:
    ckpt = read_checkpoint(path)
    fmt = lf.detect(ckpt)
    if fmt is None:
        try:
            what = f"it looks like a {detect(ckpt)[0].component} checkpoint"
        except OmnimatteError:
            what = "no LoRA A/B tensors"
        raise OmnimatteError(f"{path}: not a LoRA file ({what})")
    return ckpt, fmt


def _add_lora(merge: Merge, path: Path, scale: float, linears: dict, num_layers: int) -> None:
    ckpt, fmt = open_lora(path)
    modules = lf.group(ckpt, fmt)
    ranks, targets = {}, {}
    underscored = {p.replace(".", "_"): p for p in linears}
    for module, roles in modules.items():
        key = next(iter(roles.values()))
        target = _target(module, fmt, linears, underscored)
        if target is None:
            raise _unmatched(ckpt, key, module, num_layers)
        a, b = lf.check_pair(ckpt, module, roles)
        if (b[0], a[1]) != linears[target]:
            raise OmnimatteError(f"{ckpt.source}: {key}: LoRA {module} maps {a[1]} -> {b[0]} features, the "
                                 f"transformer's {target} is {linears[target][1]} -> {linears[target][0]} "
                                 "(a LoRA for another width?)")
        ranks[module], targets[module] = a[0], target
    alphas = lf.resolve_alpha(ckpt, fmt, modules, ranks)
    for module, roles in modules.items():
        term = _Term(ckpt, roles, scale * alphas.values[module] / ranks[module])
        merge.terms.setdefault(f"{targets[module]}.weight", []).append(term)
        if "lora_bias" in roles:
            merge.terms.setdefault(f"{targets[module]}.bias", []).append(term)
    merge.notes += [alphas.note] if alphas.note else []
    merge.record.append({"file": str(Path(path).resolve()), "scale": scale, "format": fmt,
                         "alpha_source": alphas.source, "modules": len(modules)})


def plan_merge(loras: list[tuple[Path, float]], model: nn.Module) -> Merge:
    """Read and check every LoRA against the transformer (shapes only)."""
    merge = Merge()
    linears = _linears(model)
    for path, scale in loras:
        _add_lora(merge, Path(path), scale, linears, model.config.num_layers)
    return merge


def with_merge(spec, merge: Merge):
    """The transformer spec whose conversion adds the merge's deltas."""
    return dataclasses.replace(spec, transform=merge.apply)


def convert_transformer(ckpt: Checkpoint, spec: ComponentSpec, fmt: str, dtype: str,
                        loras: list[tuple[Path, float]] = (), quantize: int | None = None,
                        group_size: int = 64) -> Converted:
    """The transformer conversion with `loras` (path, scale) merged in; every
    LoRA is read and checked here, before any tensor is written."""
    if not loras:
        return convert(ckpt, spec, fmt, dtype, quantize=quantize, group_size=group_size)
    merge = plan_merge(list(loras), spec.build(spec.config_for(ckpt, fmt, Path(ckpt.source))))
    conv = convert(ckpt, with_merge(spec, merge), fmt, dtype, quantize=quantize, group_size=group_size)
    inner = conv.tensors

    def tensors():
        yield from inner()
        merge.check_applied(ckpt.source)

    return dataclasses.replace(conv, config={**conv.config, "merged_loras": merge.record}, tensors=tensors,
                               notes=conv.notes + merge.notes)
