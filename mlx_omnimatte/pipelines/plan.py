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
from ..io.preview import PANELS, panel_size
from ..memory import DEFAULT_ATTENTION_BUDGET, GB, format_bytes, fused_attention
from ..models.wan import vae_tiling
from .settings import Mode, Settings, num_windows, vae_budget
FIT_FRACTION = 0.85  # of the machine's memory a run may plan to use
TEXT_TOKENS = 512  # the caption is encoded to this many tokens
SCORE_PEAK = 1.25  # attention peak / one chunk's score elements x itemsize (measured, memory.py)


# Host RAM outside MLX, from parity/bench_memory.py (1080p and 640x384
# sources, tiny bundle): the process with its libraries, and per source
# pixel what a frame costs while it is read (decoded uint8, area-resize
# temporaries) or written (float alpha, background, colour, RGBA, preview),
# and what one open H.264 encoder holds (x264's lookahead frames).
BASE_HOST = 200 * 2 ** 20  # with the models' libraries in use
READ_BASE = 80 * 2 ** 20  # before any model runs
READ_BYTES_PER_PIXEL = 64
WRITE_BYTES_PER_PIXEL = 128
H264_BYTES_PER_PIXEL = 90  # with writers.X264_MEMORY
SOLVER_BYTES_PER_PIXEL = 400  # the fast solver's float32 temporaries for one frame
UNET_BYTES_PER_PIXEL = 3000  # U-Net activations, gradients and compiled buffers per frame pixel
# Output size per source pixel and frame, on the high side (PNG: raw size).
DISK_BYTES_PER_PIXEL = {"png_rgba": 4.0, "png_rgb": 3.0, "h264": 0.3, "prores": 1.6, "webm": 0.5}


@dataclass
class StagePlan:
    name: str
    weights: int
    activations: int
    host: int = 0  # numpy buffers, decoders and encoders: host RAM outside MLX

    @property
    def mlx(self) -> int:
        return self.weights + self.activations

    @property
    def peak(self) -> int:
        """On unified memory MLX and the host share one RAM: fit is judged on the sum."""
        return self.mlx + self.host


@dataclass
class Outputs:
    """What the run writes (the planner counts its encoders and disk space)."""

    formats: tuple[str, ...] = ("png",)  # RGBA layer: png, prores, webm
    background: str = "mp4"  # or png
    preview: bool = True


@dataclass
class RunPlan:
    mode: Mode
    grid: GridPlan
    objects: int
    windows: int
    steps: int
    tokens: int  # per DiT forward
    stages: list[StagePlan] = field(default_factory=list)
    disk: int = 0  # predicted size of the outputs

    @property
    def peak(self) -> int:
        return max(s.peak for s in self.stages)

    def render(self, machine: int) -> str:
        g = self.grid
        if self.mode is Mode.PLATE:
            lines = [f"mode: clean-plate, {self.objects} object(s), no model weights",
                     f"source: {g.src_width}x{g.src_height}, {g.src_frames} frames -> working grid "
                     f"{g.width}x{g.height}"]
        else:
            lines = [
                f"mode: {self.mode.value}, {self.objects} object(s)",
                f"source: {g.src_width}x{g.src_height}, {g.src_frames} frames -> model grid {g.width}x{g.height}, "
                f"{g.frames} frames ({g.latent_frames} latent frames, {g.pad_frames} padded)",
                f"denoising: {self.steps} steps x {self.windows} window(s) per trajectory, "
                f"{self.tokens} tokens per forward",
            ]
        lines += [
            f"{'stage':<28} {'weights GB':>10} {'activ. GB':>10} {'MLX GB':>8} {'host GB':>8} {'sum GB':>8}",
        ]
        for s in self.stages:
            lines.append(f"{s.name:<28} {s.weights / GB:>10.2f} {s.activations / GB:>10.2f} {s.mlx / GB:>8.2f} "
                         f"{s.host / GB:>8.2f} {s.peak / GB:>8.2f}")
        lines.append(f"predicted peak {self.peak / GB:.2f} GB (MLX + host) of {machine / GB:.1f} GB on this "
                     f"machine ({'fits' if self.fits(machine) else 'does NOT fit'})")
        if self.disk:
            lines.append(f"outputs: about {format_bytes(self.disk)} on disk")
        return "\n".join(lines)

    def fits(self, machine: int) -> bool:
        return self.peak <= FIT_FRACTION * machine


def _dit_activations(cfg: dict, tokens: int, dtype_bytes: int) -> int:
    dim, ffn, heads = cfg["dim"], cfg["ffn_dim"], cfg["num_heads"]
    stream = tokens * dim * 4 * 8  # residual, norms, q, k, v, attention out (float32)
    ffn_hidden = tokens * ffn * max(dtype_bytes, 2) * 2
    if fused_attention():
        scores = 0
    else:  # query chunks sized to the budget; the peak holds ~1.25x the chunk's scores in the input dtype
        full = tokens * tokens * heads * (dtype_bytes + 4)
        scores = int(min(DEFAULT_ATTENTION_BUDGET, full) * SCORE_PEAK * dtype_bytes / (dtype_bytes + 4))
    return stream + ffn_hidden + scores


def _encoder_activations(cfg: dict, tokens: int, width: str, heads: str, ffn: str) -> int:
    """One transformer encoder's inference peak in float32: a few residual-
    stream tensors, the MLP's hidden layer and one layer's attention scores."""
    return 4 * tokens * (cfg[width] * 12 + cfg[ffn] * 2) + 8 * cfg[heads] * tokens * tokens


def kept_videos(mode: Mode, objects: int, trajectories: int = 1) -> tuple[int, int]:
    """(RGB, alpha) model-grid videos a run keeps until it writes: one
    background per removal trajectory (a clean plate: one)."""
    if mode is Mode.EXPERTS:
        return objects, objects
    return trajectories, objects if mode in (Mode.TWO_STAGE, Mode.PLATE) else 0


def encoders(mode: Mode, grid: GridPlan, objects: int, outputs: Outputs, trajectories: int = 1) -> float:
    """Video encoders open at once while writing, in source-size units (a
    preview counts by its own size)."""
    if mode is Mode.REMOVE:
        return kept_videos(mode, objects, trajectories)[0] * (outputs.background != "png")
    pw, ph = panel_size(grid.src_width, grid.src_height)
    preview = PANELS * pw * ph / (grid.src_width * grid.src_height) if outputs.preview else 0.0
    return objects * (1 + (outputs.background != "png") + preview + sum(f != "png" for f in outputs.formats))


def host_bytes(mode: Mode, grid: GridPlan, objects: int, outputs: Outputs, trajectories: int = 1) -> dict[str, int]:
    """Host RAM per stage: the model-grid clip (kept for the run), the
    conditioning arrays, the kept results, and the per-frame buffers of
    reading and writing at the source's size."""
    src, px = grid.src_width * grid.src_height, grid.width * grid.height
    frames = grid.src_frames * px * (3 + objects)  # the model-grid clip, kept for the run
    clip = BASE_HOST + frames
    cond = grid.frames * px * (3 * 4 + objects)  # float32 video, bool masks, padded
    rgb, alpha = kept_videos(mode, objects, trajectories)
    kept = grid.src_frames * px * (3 * rgb + 4 * alpha)
    writing = src * (WRITE_BYTES_PER_PIXEL * objects
                     + H264_BYTES_PER_PIXEL * encoders(mode, grid, objects, outputs, trajectories))
    return {"read": READ_BASE + frames + src * READ_BYTES_PER_PIXEL, "model": clip + cond,
            "decode": clip + cond + kept + grid.frames * px * 3 * 4, "write": clip + kept + int(writing)}


def disk_bytes(mode: Mode, grid: GridPlan, objects: int, outputs: Outputs, trajectories: int = 1) -> int:
    """The outputs' size, on the high side."""
    frame = grid.src_width * grid.src_height * grid.src_frames
    bpp = DISK_BYTES_PER_PIXEL
    background = bpp["png_rgb"] if outputs.background == "png" else bpp["h264"]
    if mode is Mode.REMOVE:
        return int(frame * background * kept_videos(mode, objects, trajectories)[0])
    layer = sum(bpp["png_rgba" if f == "png" else f] for f in outputs.formats)
    return int(frame * objects * (layer + bpp["h264"] * (1 + outputs.preview) + background))


def plan_plate(grid: GridPlan, objects: int, solver: str, opt, outputs: Outputs | None = None) -> RunPlan:
    """A clean-plate run: no model; the clip, plate and alphas on the working
    grid, the solver's per-frame buffers (or the U-Net's float copies and
    activations), and the writers."""
    outputs = outputs or Outputs()
    host = host_bytes(Mode.PLATE, grid, objects, outputs)
    px, frames = grid.width * grid.height, grid.src_frames
    plate = frames * px * 3
    if solver == "fast":
        solve, mlx_bytes = plate + px * SOLVER_BYTES_PER_PIXEL, 0
    else:  # float32 copies of the clip and plate, masks and priors
        solve = plate + frames * px * 4 * (6 + 2 * objects)
        mlx_bytes = min(opt.batch_frames, frames) * px * UNET_BYTES_PER_PIXEL * objects
    run = RunPlan(Mode.PLATE, grid, objects, 0, 0, 0, disk=disk_bytes(Mode.PLATE, grid, objects, outputs))
    run.stages = [StagePlan("read video", 0, 0, host["read"] + plate),
                  StagePlan("solve layers" if solver == "fast" else "optimize", 0, mlx_bytes, host["write"] + solve),
                  StagePlan("write", 0, 0, host["write"] + plate)]
    return run


def plan_run(mode: Mode, grid: GridPlan, objects: int, bundle: Bundle, settings: Settings,
             prompt_cached: bool = False, outputs: Outputs | None = None, trajectories: int = 1) -> RunPlan:
    cfg = bundle.config("transformer")
    lat_w, lat_h = grid.latent_size
    window_frames = min(grid.latent_frames, settings.window)
    halves = mode.halves
    tokens = halves * window_frames * (lat_h // 2) * (lat_w // 2)
    dtype_bytes = 4 if settings.dtype == "float32" else 2
    dit_weights = bundle.weight_bytes("transformer")
    if settings.dtype == "float32" and cfg.get("dtype") != "float32" and not cfg.get("quantization"):
        dit_weights *= 2  # cast up at load (packed quantized weights stay as they are)
    vae_cfg = bundle.config("vae")
    vae_weights = bundle.weight_bytes("vae")
    latent_bytes = grid.latent_frames * lat_h * lat_w * 16 * 4 * (3 + 3 * halves)
    # a step cache keeps one float32 residual of the block stack per window
    residuals = num_windows(grid.latent_frames, settings) * tokens * cfg["dim"] * 4 if settings.cache != "none" else 0
    outputs = outputs or Outputs()
    encoders = bundle.remover.encoders  # a remover without text or image branch loads no encoder for it
    host = host_bytes(mode, grid, objects, outputs, trajectories)
    run = RunPlan(mode, grid, objects, num_windows(grid.latent_frames, settings), settings.steps, tokens,
                  disk=disk_bytes(mode, grid, objects, outputs, trajectories))
    run.stages = [
        StagePlan("read video", 0, 0, host["read"]),
        *_encoder_stages(bundle, encoders, prompt_cached, host["model"]),
        _vae_stage("encode", grid, vae_cfg, vae_weights, settings, 0, host["model"]),
        StagePlan("denoise", dit_weights + vae_weights,
                  _dit_activations(cfg, tokens, dtype_bytes) + latent_bytes + residuals, host["model"]),
        _vae_stage("decode", grid, vae_cfg, vae_weights, settings, 0, host["decode"]),
        StagePlan("write", 0, 0, host["write"]),
    ]
    return run


def _encoder_stages(bundle: Bundle, encoders: tuple, prompt_cached: bool, host: int) -> list[StagePlan]:
    """The text and image encoder stages of the encoders the remover uses."""
    out = []
    if "t5" in encoders:
        t5_cfg = bundle.config("t5")
        out.append(StagePlan("text encoder", 0 if prompt_cached else bundle.weight_bytes("t5"),
                             0 if prompt_cached else _encoder_activations(t5_cfg, TEXT_TOKENS, "d_model",
                                                                          "num_heads", "d_ff"), host))
    if "clip" in encoders:
        clip_cfg = bundle.config("clip")
        clip_tokens = (clip_cfg["image_size"] // clip_cfg["patch_size"]) ** 2 + 1
        out.append(StagePlan("image encoder", bundle.weight_bytes("clip"),
                             _encoder_activations(clip_cfg, clip_tokens, "width", "heads", "mlp_dim"), host))
    return out


def _vae_stage(stage: str, grid: GridPlan, cfg: dict, weights: int, settings: Settings, buffers: int,
               host: int) -> StagePlan:
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
    return StagePlan(name, weights, estimate(h, w) - weights + buffers, host)


def check_fits(run: RunPlan, machine: int, settings: Settings) -> None:
    if not run.fits(machine):
        worst = max(run.stages, key=lambda s: s.peak)
        advice = ["lower --size", "shorten the clip (--frames)"]
        if settings.dtype == "float32":
            advice.insert(1, "use --dtype bfloat16")
        raise OmnimatteError(
            f"predicted peak {run.peak / GB:.1f} GB ({worst.name}) exceeds {FIT_FRACTION:.0%} of this "
            f"machine's {machine / GB:.1f} GB: {', '.join(advice[:-1])} or {advice[-1]}")
