"""Removal by the bundle's removal model (Casper, ROSE or MiniMax-Remover,
`removers.py`; its conditioning is built in `stages.encode_conditioning`):
the clean background with the objects (and, for Casper and ROSE, their
effects) removed.

Targets: "all" (every object removed) and, per object, that object removed
with the others kept. (The reference's "solo" runs are the converse -- keep
one object, remove the rest; `two_stage.solo_targets` builds those.)
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..branch.attention import make_attn_fn
from ..bundle import Bundle
from ..compositing import to_uint8
from ..io.grid import GridVideo
from ..io.inputs import Clip
from ..progress import Report
from .conditioning import model_input
from .settings import Settings
from .stages import ModeSpec, Trajectory, run_stages

ALL = "all"


def removal_targets(names: list[str], per_object: bool = True, all_objects: bool = True) -> list[Trajectory]:
    """One trajectory per background: "all" removes every object,
    "without_<name>" removes that object and keeps the others."""
    targets = [Trajectory(ALL, None)] if all_objects or len(names) == 1 else []
    if per_object and len(names) > 1:
        targets += [Trajectory(f"without_{name}", [i]) for i, name in enumerate(names)]
    return targets


def dit_velocity(dit, y: mx.array, ctx: mx.array):
    """Velocity of one temporal window for the plain (removal) DiT; `ctx` is
    the embedded prompt, computed once per run, and self-attention is
    query-chunked to the memory budget where SDPA is not fused."""
    attn_fn = make_attn_fn("A")

    def velocity(x, t, span):
        s, e = span
        return dit.forward(model_input(x, y[:, s:e]), mx.array([t], dtype=mx.float32), ctx, attn_fn)

    return velocity


def run_removal(clip: Clip, bundle: Bundle, settings: Settings, report: Report = None,
                targets: list[Trajectory] | None = None) -> dict[str, np.ndarray]:
    """label -> background (uint8 model-grid frames standing for the source grid)."""
    spec = ModeSpec(targets or removal_targets(clip.names), dit_velocity)
    plan, decoded = run_stages(clip, bundle, spec, settings, report, decode_as=("",))
    return {label: GridVideo.of(to_uint8(videos[""]), plan) for label, videos in decoded.items()}
