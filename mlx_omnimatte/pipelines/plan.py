"""What a run will do and how much memory each stage will need, computed
from sizes alone (no weights loaded): `--dry-run` prints it, and a run
predicted not to fit stops before loading anything.

The activation models are simple and conservative (float32 where the code
computes in float32); the VAE's comes from `models.wan.vae_tiling.estimate_peak_bytes`
(fitted by `parity/bench_vae.py`), with the tiles the run would choose.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from ..bundle import Bundle
from ..errors import OmnimatteError
from ..io.grid import GridPlan
from ..memory import DEFAULT_ATTENTION_BUDGET, GB, fused_attention
from ..models.wan import vae_tiling
from ..weights import read_config
from .settings import Mode, Settings, num_windows, vae_budget
FIT_FRACTION = 0.85  # of the machine's memory a run may plan to use


@dataclass
class StagePlan:
    name: str
    weights: int
    activations: int

    @property
    def peak(self) -> int:
        return self.weights + self.activations


@dataclass
class RunPlan:
    mode: Mode
    grid: GridPlan
    objects: int
    windows: int
    steps: int
    tokens: int  # per DiT forward
    stages: list[StagePlan] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(s.peak for s in self.stages)

    def render(self, machine: int) -> str:
        g = self.grid
        lines = [
            f"mode: {self.mode.value}, {self.objects} object(s)",
            f"source: {g.src_width}x{g.src_height}, {g.src_frames} frames -> model grid {g.width}x{g.height}, "
            f"{g.frames} frames ({g.latent_frames} latent frames, {g.pad_frames} padded)",
            f"denoising: {self.steps} steps x {self.windows} window(s) per trajectory, "
            f"{self.tokens} tokens per forward",
            f"{'stage':<28} {'weights GB':>10} {'activ. GB':>10} {'peak GB':>8}",
        ]
        for s in self.stages:
            lines.append(f"{s.name:<28} {s.weights / GB:>10.2f} {s.activations / GB:>10.2f} {s.peak / GB:>8.2f}")
        lines.append(f"predicted peak {self.peak / GB:.2f} GB of {machine / GB:.1f} GB on this machine "
                     f"({'fits' if self.fits(machine) else 'does NOT fit'})")
        return "\n".join(lines)

    def fits(self, machine: int) -> bool:
        return self.peak <= FIT_FRACTION * machine


def _dit_activations(cfg: dict, tokens: int, dtype_bytes: int) -> int:
    dim, ffn, heads = cfg["dim"], cfg["ffn_dim"], cfg["num_heads"]
    stream = tokens * dim * 4 * 8  # residual, norms, q, k, v, attention out (float32)
    ffn_hidden = tokens * ffn * max(dtype_bytes, 2) * 2
    if fused_attention():
        scores = 0
    else:
        scores = min(DEFAULT_ATTENTION_BUDGET, tokens * tokens * heads * (dtype_bytes + 4))
    return stream + ffn_hidden + scores


def plan_run(mode: Mode, grid: GridPlan, objects: int, bundle: Bundle, settings: Settings,
             prompt_cached: bool = False) -> RunPlan:
    cfg = read_config(bundle.path("transformer"))
    lat_w, lat_h = grid.latent_size
    window_frames = min(grid.latent_frames, settings.window)
    halves = mode.halves
    tokens = halves * window_frames * (lat_h // 2) * (lat_w // 2)
    dtype_bytes = 4 if settings.dtype == "float32" else 2
    dit_weights = bundle.weight_bytes("transformer")
    if settings.dtype == "float32" and cfg.get("dtype") != "float32" and not cfg.get("quantization"):
        dit_weights *= 2  # cast up at load (packed quantized weights stay as they are)
    pixels = grid.width * grid.height
    vae_cfg = read_config(bundle.path("vae"))
    vae_weights = bundle.weight_bytes("vae")
    latent_bytes = grid.latent_frames * lat_h * lat_w * 16 * 4 * (3 + 3 * halves)
    out_bytes = grid.frames * pixels * 3 * 4 * (1 + halves)
    run = RunPlan(mode, grid, objects, num_windows(grid.latent_frames, settings), settings.steps, tokens)
    run.stages = [
        StagePlan("text encoder", 0 if prompt_cached else bundle.weight_bytes("t5"), 0 if prompt_cached else GB // 2),
        StagePlan("image encoder", bundle.weight_bytes("clip"), GB // 8),
        _vae_stage("encode", grid, vae_cfg, vae_weights, settings, grid.frames * pixels * 3 * 4),
        StagePlan("denoise", dit_weights + vae_weights, _dit_activations(cfg, tokens, dtype_bytes) + latent_bytes),
        _vae_stage("decode", grid, vae_cfg, vae_weights, settings, out_bytes),
    ]
    return run


def _vae_stage(stage: str, grid: GridPlan, cfg: dict, weights: int, settings: Settings, buffers: int) -> StagePlan:
    """Peak of one VAE pass over a frame (or the tile the run would pick)."""
    dtype = mx.float32 if cfg.get("dtype", "float32") == "float32" else mx.bfloat16
    base = cfg.get("base_dim", 96)

    def estimate(h, w):
        return vae_tiling.estimate_peak_bytes(stage, h, w, dtype, base, weights)

    h, w = grid.height, grid.width
    name = f"vae {stage}"
    if settings.vae_tiling or (settings.vae_tiling is None and estimate(h, w) > vae_budget(settings)):
        tiles = vae_tiling.choose_tiling(h, w, vae_budget(settings), estimate)
        h, w = min(h, tiles.height), min(w, tiles.width)
        name += f" ({w}x{h} tiles)"
    return StagePlan(name, weights, estimate(h, w) - weights + buffers)


def check_fits(run: RunPlan, machine: int, settings: Settings) -> None:
    if not run.fits(machine):
        worst = max(run.stages, key=lambda s: s.peak)
        advice = ["lower --size", "shorten the clip (--frames)"]
        if settings.dtype == "float32":
            advice.insert(1, "use --dtype bfloat16")
        raise OmnimatteError(
            f"predicted peak {run.peak / GB:.1f} GB ({worst.name}) exceeds {FIT_FRACTION:.0%} of this "
            f"machine's {machine / GB:.1f} GB: {', '.join(advice[:-1])} or {advice[-1]}")
