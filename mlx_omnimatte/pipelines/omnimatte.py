"""Dual-expert omnimatte decomposition (EasyOmnimatte).

Per object: one trajectory steps (z_bg, z_alpha) together; each step is one
DiT forward over 2N tokens (frozen Casper path -> background, LoRA'd replica
-> alpha), by the Effect expert while t > tau and the Quality expert after.
The background run removes that object and keeps the others. Alpha leaves
the VAE as 3 equal channels in [-1, 1] and is averaged back to [0, 1]
(a setting of ours: the method does not state it). The foreground is solved
in closed form on the source grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..branch.experts import KINDS, Expert, resolve_tau, route, select
from ..branch.forward import branch_forward, check_experts
from ..bundle import Bundle
from ..compositing import as_float, solve_foreground, to_uint8
from ..errors import OmnimatteError
from ..io.grid import GridVideo
from ..io.inputs import Clip
from ..progress import Report, stage
from ..sampling import make_sampler
from ..weights import load_model
from .settings import Settings
from .stages import ModeSpec, Trajectory, run_stages


@dataclass
class Layers:
    """One object's layers on the source grid as whole arrays (the Python API)."""

    alpha: np.ndarray  # float32 [T, H, W] in [0, 1], effects included
    foreground: np.ndarray  # float32 [T, H, W, 3]
    background: np.ndarray  # float32 [T, H, W, 3]

    def __len__(self) -> int:
        return int(self.alpha.shape[0])

    def frame(self, t: int, source: np.ndarray) -> tuple:
        return self.alpha[t], self.foreground[t], self.background[t]


@dataclass
class LayerVideos:
    """One object's result as a run keeps it: alpha and background on the
    model grid. Source-grid frames, the foreground solved in closed form
    against the source frame, are made one at a time as they are written."""

    alpha: GridVideo  # [T, h, w] float32
    background: GridVideo  # [T, h, w, 3]

    def __len__(self) -> int:
        return len(self.alpha)

    def frame(self, t: int, source: np.ndarray) -> tuple:
        a, bg = self.alpha.frame(t), as_float(self.background.frame(t))
        return a, solve_foreground(source, a, bg), bg

    def materialize(self, source: np.ndarray) -> Layers:
        """Whole source-grid arrays, given the source frames [T, H, W, 3]."""
        a, bg = self.alpha.full(), as_float(self.background.full())
        return Layers(a, solve_foreground(source, a, bg), bg)


@dataclass
class DualExpert:
    """The Effect/Quality pair and its switch: what the decomposition mode adds
    to the shared stages."""

    effect: Optional[Expert]
    quality: Optional[Expert]
    tau: float

    @classmethod
    def of(cls, experts: dict, tau: float | None) -> "DualExpert":
        effect, quality = experts.get("effect"), experts.get("quality")
        if effect is None and quality is None:
            raise OmnimatteError("omnimatte sampling needs an Effect or a Quality expert")
        return cls(effect, quality, resolve_tau(tau, effect, quality))

    def check_schedule(self, settings: Settings) -> None:
        """Fail before the first step when a step needs a missing expert."""
        for t in make_sampler(settings.sampler, settings.steps, settings.shift).timesteps:
            select(float(t), self.tau, self.effect, self.quality)

    def check(self, dit) -> None:
        check_experts(dit, self.effect, self.quality)

    def describe(self, t) -> str:
        return f"{route(t, self.tau)} expert"

    def velocity(self, dit, y, ctx):
        def window_velocity(x, t, span):
            s, e = span
            expert = select(t, self.tau, self.effect, self.quality)
            v_bg, v_alpha = branch_forward(dit, expert, x[0], x[1], t, cond=y[:, s:e], ctx=ctx)
            return [v_bg, v_alpha]

        return window_velocity

    def spec(self, trajectories: list[Trajectory]) -> ModeSpec:
        return ModeSpec(trajectories, self.velocity, self.check, self.describe)


def load_experts(bundle: Bundle, kinds, report: Report = None) -> dict:
    with stage(report, "load experts", len(kinds)) as tick:
        experts = {}
        for kind in kinds:
            experts[kind] = load_model(bundle.expert(kind), "expert")
            tick()
    return experts


def run_decompose(clip: Clip, bundle: Bundle, settings: Settings, report: Report = None,
                  objects: list[int] | None = None, kinds=KINDS) -> dict[str, Layers]:
    """object name -> LayerVideos; `kinds`: the experts to load."""
    objects = list(range(len(clip.names))) if objects is None else objects
    dual = DualExpert.of(load_experts(bundle, kinds, report), settings.tau)
    dual.check_schedule(settings)
    trajectories = [Trajectory(clip.names[i], [i], latents=2) for i in objects]
    plan, decoded = run_stages(clip, bundle, dual.spec(trajectories), settings, report,
                               decode_as=("background", "alpha"))
    layers = {}
    for name, videos in decoded.items():
        alpha = np.clip(videos["alpha"].mean(-1), 0.0, 1.0)
        layers[name] = LayerVideos(GridVideo.of(alpha, plan), GridVideo.of(to_uint8(videos["background"]), plan))
    return layers
