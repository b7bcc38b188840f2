"""A diffusers scheduler config (`scheduler/scheduler_config.json`) read into
the sampler this project runs: MiniMax-Remover ships one, and its sampler
and shift become the bundle's defaults.

Supported: `UniPCMultistepScheduler` with flow sigmas and flow prediction,
bh2, order 2 (what `sampling.py` matches step for step), and
`FlowMatchEulerDiscreteScheduler`; anything else is refused in one line.
"""

from __future__ import annotations

from pathlib import Path

from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.jsonfile import read_json

SCHEDULER_FILE = "scheduler_config.json"
# (key, value diffusers assumes when the file leaves it out, the value we implement)
_UNIPC = (("prediction_type", "epsilon", "flow_prediction"), ("use_flow_sigmas", False, True),
          ("solver_type", "bh2", "bh2"), ("solver_order", 2, 2), ("predict_x0", True, True),
          ("lower_order_final", True, True), ("final_sigmas_type", "zero", "zero"))


def scheduler_file(folder: Path) -> Path:
    """The scheduler config of a diffusers folder (or the file itself)."""
    path = Path(folder)
    for candidate in (path, path / SCHEDULER_FILE, path / "scheduler" / SCHEDULER_FILE):
        if candidate.is_file():
            return candidate
    raise OmnimatteError(f"{folder}: no scheduler config (scheduler/{SCHEDULER_FILE}); MiniMax-Remover's "
                         "sampler comes from it (download its scheduler/ folder too)")


def read_scheduler(folder: Path) -> dict:
    """{"sampler": "unipc" | "euler", "shift": float} from the scheduler config."""
    path = scheduler_file(folder)
    c = read_json(path)
    name = c.get("_class_name")
    if name == "UniPCMultistepScheduler":
        for key, default, want in _UNIPC:
            if c.get(key, default) != want:
                raise OmnimatteError(f"{path}: {key} = {c.get(key, default)!r}; only flow UniPC "
                                     "(flow_prediction, use_flow_sigmas, bh2, order 2) is supported")
        return {"sampler": "unipc", "shift": _shift(c.get("flow_shift", 1.0), path)}
    if name == "FlowMatchEulerDiscreteScheduler":
        if c.get("use_dynamic_shifting"):
            raise OmnimatteError(f"{path}: use_dynamic_shifting is not supported")
        return {"sampler": "euler", "shift": _shift(c.get("shift", 1.0), path)}
    raise OmnimatteError(f"{path}: scheduler {name!r} is not supported "
                         "(UniPCMultistepScheduler or FlowMatchEulerDiscreteScheduler)")


def _shift(v, path) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise OmnimatteError(f"{path}: shift {v!r} must be a positive number")
    return float(v)
