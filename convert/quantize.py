"""Weights stored quantized at conversion (MLX affine quantization).

A quantized layer is stored as `weight` (packed), `scales` and `biases`, and
config.json records `quantization: {bits, group_size}`; the loader
(`weights.load_model`) quantizes exactly the layers that have `.scales`.
What may be quantized is the component's choice (`ComponentSpec.quantizable`,
by module path and module): linears whose input splits into whole groups;
norms, modulation tables, embeddings and convolutions stay as converted.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn

from mlx_omnimatte.errors import OmnimatteError

if TYPE_CHECKING:
    from .core import ComponentSpec, Converted

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)


def check_quantize(spec: "ComponentSpec", bits: int, group_size: int) -> None:
    if spec.quantizable is None:
        raise OmnimatteError(f"--quantize: the {spec.component} cannot be stored quantized "
                             "(only the transformer and the text encoder can)")
    if bits not in BITS:
        raise OmnimatteError(f"--quantize: {bits} bits is not supported (4 or 8)")
    if group_size not in GROUP_SIZES:
        raise OmnimatteError(f"--group-size: {group_size} is not supported (32, 64 or 128)")


def quantized_weights(model: nn.Module, quantizable, group_size: int) -> set[str]:
    """Names of the `.weight` tensors to store quantized."""
    return {f"{path}.weight" for path, m in model.named_modules()
            if path and quantizable(path, m, group_size)}


def quantize_converted(conv: "Converted", model: nn.Module, quantizable, bits: int,
                       group_size: int = 64) -> "Converted":
    """The same conversion with the selected weights affine-quantized, one
    tensor at a time as they stream to the writer."""
    targets = quantized_weights(model, quantizable, group_size)
    inner = conv.tensors

    def tensors():
        for name, arr in inner():
            if name not in targets:
                yield name, arr
                continue
            w, scales, biases = mx.quantize(arr, group_size=group_size, bits=bits)
            base = name[: -len(".weight")]
            yield name, w
            yield f"{base}.scales", scales
            yield f"{base}.biases", biases

    config = {**conv.config, "quantization": {"bits": bits, "group_size": group_size}}
    return dataclasses.replace(conv, config=config, tensors=tensors)


def linear_in_groups(module: nn.Module, group_size: int) -> bool:
    """An unquantized linear whose rows split into whole groups."""
    return isinstance(module, nn.Linear) and module.weight.shape[-1] % group_size == 0
