"""The conversion driver shared by every component.

A component (transformer, vae, t5, clip, expert) declares a `ComponentSpec`:
its key maps (one per source format), how to recognise a format from the
keys, how to read the architecture, and how to build the MLX model whose
parameter names and shapes the converted weights must fill exactly.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_omnimatte.errors import OmnimatteError, article
from mlx_omnimatte.models.base import DTYPES
from mlx_omnimatte.weights import COMPONENTS

from .keymap import KeyMap, check_complete, plan_renames, strip_prefix, to_channels_last, torch_shape_to_mlx
from .quantize import check_quantize, quantize_converted
from .readers import Checkpoint



@dataclass
class ComponentSpec:
    component: str
    formats: dict[str, KeyMap]
    # checkpoint -> format name, or None when it is not this component
    detect: Callable[[Checkpoint], str | None]
    # (checkpoint, format, source path) -> architecture config (JSON-able dict);
    # None for a custom converter that needs no model (LoRA experts)
    config_for: Callable[[Checkpoint, str, Path], dict] | None = None
    # config -> MLX module (parameters may stay unevaluated: only shapes are read)
    build: Callable[[dict], nn.Module] | None = None
    # source keys to keep out of the conversion before renaming (e.g. CLIP's text tower)
    select: Callable[[str], bool] = lambda key: True
    # (target name, numpy array) -> numpy array, after the conv layout change
    transform: Callable[[str, np.ndarray], np.ndarray] | None = None
    # target names kept in float32 whatever the chosen dtype
    keep_fp32: tuple[str, ...] = ()
    # source path -> [(file to copy, name inside the output directory)]
    extra_files: Callable[[Path], list[tuple[Path, str]]] | None = None
    # a custom converter replaces the generic rename-and-check path (LoRA experts)
    custom: Callable[..., "Converted"] | None = None
    # (module path, module, group size) -> whether `--quantize` stores its
    # weight quantized (see quantize.py); None: this component is never quantized
    quantizable: Callable[[str, nn.Module, int], bool] | None = None


@dataclass
class Converted:
    config: dict
    tensors: Callable[[], Iterator[tuple[str, mx.array]]]
    ignored: dict = field(default_factory=dict)
    extra_files: list = field(default_factory=list)
    extra_json: dict = field(default_factory=dict)  # name -> JSON-able object to write beside
    notes: list[str] = field(default_factory=list)  # one line each, for the user (e.g. an assumed alpha)


def load_spec(component: str) -> ComponentSpec:
    if component not in COMPONENTS:
        raise OmnimatteError(f"unknown component {component!r} (one of {', '.join(COMPONENTS)})")
    return importlib.import_module(COMPONENTS[component].converter).SPEC


def detect(ckpt: Checkpoint, component: str | None = None, fmt: str | None = None) -> tuple[ComponentSpec, str]:
    """Which component and source format the checkpoint holds."""
    found = []
    for name in COMPONENTS:  # in the registry's order: the detection order
        try:
            spec = load_spec(name)
        except ImportError:
            continue
        f = spec.detect(Checkpoint({k: v for k, v in ckpt.items() if spec.select(k)}, ckpt.source, ckpt.file_format))
        if f is not None:
            found.append((spec, f))
    if component is not None:
        spec = load_spec(component)
        match = [f for s, f in found if s.component == component]
        if fmt is None and not match:
            others = ", ".join(s.component for s, _ in found)
            hint = f"it looks like {article(others)} checkpoint" if others else "its keys match no known layout"
            raise OmnimatteError(f"{ckpt.source}: not {article(component)} checkpoint ({hint})")
        fmt = fmt or match[0]
        if fmt not in spec.formats:
            raise OmnimatteError(f"{ckpt.source}: unknown format {fmt!r} for {component} ({', '.join(spec.formats)})")
        return spec, fmt
    if not found:
        raise OmnimatteError(f"{ckpt.source}: not a known checkpoint (no component matches its keys)")
    spec, f = found[0]
    return spec, fmt or f


def conv_weight_names(model: nn.Module) -> set[str]:
    """Parameter names of conv weights, whose layout differs from torch's."""
    names = set()
    for path, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or getattr(module, "torch_conv_layout", False):
            names.add(f"{path}.weight" if path else "weight")
    return names


def convert(ckpt: Checkpoint, spec: ComponentSpec, fmt: str, dtype: str = "bfloat16",
            quantize: int | None = None, group_size: int = 64, **options) -> Converted:
    """`options` go to a custom converter (e.g. the expert kind of a LoRA);
    `quantize` (4 or 8 bits) stores what `spec.quantizable` selects quantized."""
    if dtype not in DTYPES:
        raise OmnimatteError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
    if quantize is not None:
        check_quantize(spec, quantize, group_size)
    conv = spec.custom(ckpt, fmt, dtype, **options) if spec.custom is not None else _generic(ckpt, spec, fmt, dtype)
    if not quantize:
        return conv
    return quantize_converted(conv, spec.build(conv.config), spec.quantizable, quantize, group_size)


def _generic(ckpt: Checkpoint, spec: ComponentSpec, fmt: str, dtype: str) -> Converted:
    source = ckpt.source
    keys = [k for k in ckpt if spec.select(k)]
    prefix = strip_prefix(keys)
    mapping, ignored = plan_renames(keys, spec.formats[fmt], source, prefix)
    ignored.update({k: "not part of this component" for k in ckpt if not spec.select(k)})
    config = spec.config_for(ckpt, fmt, Path(source))
    model = spec.build(config)
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    convs = conv_weight_names(model)
    shapes = {
        t: torch_shape_to_mlx(ckpt[s].shape) if t in convs and len(ckpt[s].shape) >= 3 else ckpt[s].shape
        for t, s in mapping.items()
    }
    check_complete(mapping, expected, shapes, source)
    keep = [re.compile(p) for p in spec.keep_fp32]
    target_dtype = DTYPES[dtype]

    def tensors():
        for target, key in mapping.items():
            a = ckpt[key].load()
            if target in convs and a.ndim >= 3:
                a = to_channels_last(a)
            if spec.transform is not None:
                a = spec.transform(target, a)
            arr = mx.array(np.ascontiguousarray(a))
            if mx.issubdtype(arr.dtype, mx.floating):
                fp32 = any(p.fullmatch(target) for p in keep)
                arr = arr.astype(mx.float32 if fp32 else target_dtype)
            yield target, arr

    config = {**config, "component": spec.component, "dtype": dtype}
    extra = spec.extra_files(Path(source)) if spec.extra_files else []
    return Converted(config, tensors, ignored, extra)
