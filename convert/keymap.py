"""Key maps as data: renames from a source format's names to MLX parameter names.

A `KeyMap` is a list of (regex, replacement) rules tried in order (the first
full match wins) plus a table of keys ignored on purpose, each with its reason.
Every source key must be renamed or ignored; every model parameter must be
filled: anything else is an error that names the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from mlx_omnimatte.errors import OmnimatteError

# Wrappers that training and export tools put in front of module names.
COMMON_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.")


@dataclass
class KeyMap:
    renames: list[tuple[str, str]]
    ignored: dict[str, str] = field(default_factory=dict)  # regex -> reason

    def __post_init__(self):
        self._renames = [(re.compile(p), r) for p, r in self.renames]
        self._ignored = [(re.compile(p), why) for p, why in self.ignored.items()]

    def target(self, key: str) -> str | None:
        for pattern, repl in self._renames:
            if pattern.fullmatch(key):
                return pattern.sub(repl, key)
        return None

    def reason_ignored(self, key: str) -> str | None:
        for pattern, why in self._ignored:
            if pattern.fullmatch(key):
                return why
        return None


def strip_prefix(keys, prefixes=COMMON_PREFIXES) -> str:
    """The one wrapper prefix shared by all keys ('' when there is none)."""
    keys = list(keys)
    for p in prefixes:
        if keys and all(k.startswith(p) for k in keys):
            return p
    return ""


def plan_renames(keys, keymap: KeyMap, source, prefix: str = "") -> tuple[dict, dict]:
    """Returns ({target: source key}, {ignored source key: reason}).

    Raises on a key that is neither renamed nor ignored, and on two source
    keys landing on one target.
    """
    mapping, ignored = {}, {}
    for key in keys:
        bare = key[len(prefix):] if key.startswith(prefix) else key
        target = keymap.target(bare)
        if target is None:
            why = keymap.reason_ignored(bare)
            if why is None:
                raise OmnimatteError(f"{source}: unexpected key {key} (not part of this model)")
            ignored[key] = why
            continue
        if target in mapping:
            raise OmnimatteError(f"{source}: keys {mapping[target]} and {key} both map to {target}")
        mapping[target] = key
    return mapping, ignored


def check_complete(mapping: dict, expected: dict, shapes: dict, source) -> None:
    """`expected`: MLX parameter name -> shape; `shapes`: target -> converted shape."""
    for name in expected:
        if name not in mapping:
            raise OmnimatteError(f"{source}: missing weight for {name} (incomplete checkpoint?)")
    for name in mapping:
        if name not in expected:
            raise OmnimatteError(f"{source}: key {mapping[name]} maps to {name}, which the model lacks")
        if tuple(shapes[name]) != tuple(expected[name]):
            raise OmnimatteError(
                f"{source}: {mapping[name]} has shape {tuple(shapes[name])}, "
                f"the model expects {tuple(expected[name])}"
            )


def to_channels_last(w: np.ndarray) -> np.ndarray:
    """torch conv weight (O, I, *k) -> MLX (O, *k, I)."""
    return np.moveaxis(w, 1, -1)


def torch_shape_to_mlx(shape: tuple) -> tuple:
    return (shape[0], *shape[2:], shape[1])
