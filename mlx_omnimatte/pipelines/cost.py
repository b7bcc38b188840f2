"""What a run will cost in time: each stage's work (frames, DiT forwards,
optimization iterations) and an estimate of its seconds on this machine.

The rates come from a short probe of this machine, run once and cached
(``~/.cache/mlx-omnimatte/rates.json``, or ``$MLX_OMNIMATTE_RATES``): the
clean-plate path itself on a small generated clip (reading, the fast
solver, writing every output, per pixel), a few U-Net iterations, and the
matmul rate of MLX's default device in float32 and bfloat16. Model stages
are estimated from their FLOPs at that matmul rate and an efficiency (what
a DiT forward or a convolution reaches of it): an estimate, said to be one.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from ..bundle import Bundle
from ..io.grid import GridPlan, GridVideo
from ..io.inputs import read_clip, resolve_clip
from ..io.outputs import write_decomposition
from ..layer_solver import solve_layers
from ..models.unet import DOWNSAMPLE
from ..synth import make_clip, write_clip
from .omnimatte import LayerVideos
from .optimize import OptimizeSettings, optimize_layers
from .settings import Mode

RATES_VERSION = 3  # bump when the probe changes: cached figures are then measured again
DIT_EFFICIENCY = 0.6  # of the matmul rate, a DiT forward at real size (parity/bench_transformer.py)
CONV_EFFICIENCY = 0.55  # of the matmul rate, the VAE's 3D convolutions (the tiny bundle's VAE here)
ENCODER_START = 1.0  # seconds an encoder stage costs beyond its FLOPs (load, preprocessing)
IMAGE_TOKENS = 257
LOAD_BYTES_PER_S = 1.0e9  # reading safetensors from disk
LONG_RUN = 30 * 60  # the header warns past this
TEXT_TOKENS = 512
CONTEXT_TOKENS = 512 + 257  # text and image tokens the DiT cross-attends to


@dataclass
class Rates:
    """Seconds per unit of work on this machine (probed as needed), and its
    matmul rates."""

    values: dict = field(default_factory=dict)

    def __getattr__(self, name):
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def flops(self, dtype: str) -> float:
        return self.values.get(f"flops_{dtype}") or self.values["flops_float32"]


# what each probe measures: read, solve, write (per pixel-frame, per object for
# the last two); unet (per padded pixel-frame of an iteration); matmul FLOP/s
PROBES = {
    "plate": ("read", "solve", "write"),
    "unet": ("unet", "unet_start"),
    "flops": ("flops_float32", "flops_bfloat16", "flops_float16"),
}


def machine_key() -> str:
    """The machine, MLX and its device, and a preloaded BLAS (Linux CPU runs
    differ tenfold with and without one)."""
    blas = Path(os.environ.get("LD_PRELOAD", "").split(":")[0]).name
    return (f"{platform.system()}-{platform.machine()}-{os.cpu_count()}cpu-mlx{mx.__version__}-{mx.default_device()}"
            + (f"-{blas}" if blas else ""))


def rates_file() -> Path:
    env = os.environ.get("MLX_OMNIMATTE_RATES")
    return Path(env) if env else Path.home() / ".cache" / "mlx-omnimatte" / "rates.json"


def _load_table(path: Path) -> dict:
    try:
        table = json.loads(path.read_text())
        return table if isinstance(table, dict) else {}
    except (OSError, ValueError):
        return {}


def machine_rates(probes=("plate",), report=None) -> Rates:
    """This machine's rates for ``probes``: cached, or measured now (a few
    seconds each) and cached."""
    path, key = rates_file(), f"{machine_key()}-v{RATES_VERSION}"
    table = _load_table(path)
    values = dict(table.get(key, {}))
    missing = [p for p in probes if not all(isinstance(values.get(n), (int, float)) for n in PROBES[p])]
    if not missing:
        return Rates(values)
    if report:
        report("measure this machine", 0, len(missing), "")
    for i, name in enumerate(missing):
        values.update(PROBE_FUNCTIONS[name]())
        if report:
            report("measure this machine", i + 1, len(missing), name)
    table[key] = values
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=2) + "\n")
        tmp.replace(path)
    except OSError:
        pass  # a cache that cannot be written costs a probe next time, not the run
    return Rates(values)


# --- the probes ---------------------------------------------------------------------


def matmul_rate(dtype, n: int = 512, repeats: int = 2) -> float:
    a = mx.random.normal((n, n)).astype(dtype)
    b = mx.random.normal((n, n)).astype(dtype)
    mx.eval(a @ b)
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    return 2.0 * n ** 3 * repeats / (time.perf_counter() - start)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def probe_plate(size=(640, 368), frames=(2, 5)) -> dict:
    """Read, solve and write rates from the clean-plate path itself on a
    generated two-object clip, as the difference between a short and a
    longer run (what a frame adds, not what a run costs once)."""
    per = {}
    with tempfile.TemporaryDirectory(prefix="mlx-omnimatte-probe-") as tmp:
        write_clip(make_clip(0, frames=frames[1], size=size, objects=2), Path(tmp) / "clip")
        times = [_plate_times(Path(tmp), n, size) for n in frames]
    px = size[0] * size[1] * (frames[1] - frames[0])
    for i, name in enumerate(("read", "solve", "write")):
        per[name] = max(times[1][i] - times[0][i], 1e-3) / (px * (3 if name == "read" else 2))
    return per


def _plate_times(folder: Path, n: int, size) -> tuple[float, float, float]:
    spec = resolve_clip(folder / "clip", (), None, n)
    clip = read_clip(spec, size)
    read = _timed(lambda: read_clip(spec, size))
    masks = [m >= 128 for m in clip.masks]
    alphas = []
    solve = _timed(lambda: alphas.extend(solve_layers(clip.frames, clip.frames, masks)))
    layers = {k: LayerVideos(GridVideo(a, size), GridVideo(clip.frames, size)) for k, a in zip(("00", "01"), alphas)}
    write = _timed(lambda: write_decomposition(folder / f"out{n}", spec, layers))
    return read, solve, write


def probe_unet(size=(128, 96), batch: int = 2, iterations: int = 2) -> dict:
    """Seconds per padded pixel-frame of an iteration and the compilation's
    seconds, at a size where the U-Net's deepest levels are not empty."""
    clip = make_clip(1, frames=batch, size=size)

    def run(n):
        optimize_layers(clip.video, clip.background, clip.masks, OptimizeSettings(batch_frames=batch).scaled(n))

    first = _timed(lambda: run(1))  # compiles
    more = _timed(lambda: run(1 + iterations))
    per_iteration = max(more - first, 1e-4) / iterations
    return {"unet": per_iteration / (batch * size[0] * size[1]), "unet_start": max(first - per_iteration, 0.0)}


def probe_flops() -> dict:
    return {f"flops_{name}": matmul_rate(dtype)
            for name, dtype in (("float32", mx.float32), ("bfloat16", mx.bfloat16), ("float16", mx.float16))}


PROBE_FUNCTIONS = {"plate": probe_plate, "unet": probe_unet, "flops": probe_flops}


# --- estimates ------------------------------------------------------------------------


@dataclass
class StageCost:
    name: str
    work: str  # what it does, in its own units
    seconds: float


def dit_forward_flops(cfg: dict, tokens: int) -> float:
    """One DiT forward over ``tokens`` tokens: the blocks' matmuls and attention."""
    d, f, n = cfg["dim"], cfg["ffn_dim"], tokens
    cross = cfg.get("cross_attn", True)  # MiniMax-Remover's blocks have none
    per_block = 2 * n * ((6 if cross else 4) * d * d + 2 * d * f) + 4 * n * n * d
    per_block += 4 * CONTEXT_TOKENS * (n + d) * d if cross else 0
    return cfg["num_layers"] * per_block


def vae_flops_per_pixel(base: int = 96, decode: bool = False) -> float:
    """3x3x3 convolutions per output (decode) or input (encode) pixel-frame
    of the Wan VAE: its levels at 1, 1/4, 1/16, 1/64 of the pixels, two (encode)
    or three (decode) residual blocks of two convolutions each."""
    dims = [base, 2 * base, 4 * base, 4 * base]
    blocks = 3 if decode else 2
    total = 0.0
    for level, dim in enumerate(dims):
        total += blocks * 2 * 27 * 2 * dim * dim / 4 ** level
    return total


def io_costs(grid: GridPlan, streams: int, outputs: int, rates: Rates) -> tuple[StageCost, StageCost]:
    """Reading ``streams`` source videos and writing ``outputs`` layers (or
    backgrounds), frame by frame."""
    src = grid.src_width * grid.src_height * grid.src_frames
    return (StageCost("read video", f"{grid.src_frames} frames x {streams} streams", src * streams * rates.read),
            StageCost("write", f"{grid.src_frames} frames x {outputs} outputs", src * outputs * rates.write))


def solver_cost(grid: GridPlan, objects: int, rates: Rates, solver: str, opt: OptimizeSettings) -> StageCost:
    px = grid.width * grid.height * grid.src_frames
    if solver == "fast":
        return StageCost("solve layers", f"{grid.src_frames} frames x {objects} layers", px * objects * rates.solve)
    padded = (-(-grid.width // DOWNSAMPLE) * DOWNSAMPLE) * (-(-grid.height // DOWNSAMPLE) * DOWNSAMPLE)
    batch = min(opt.batch_frames, grid.src_frames)
    seconds = opt.iterations * batch * padded * objects * rates.unet + rates.unet_start
    return StageCost("optimize", f"{opt.iterations} iterations x {batch} frames, {objects} U-Net(s)", seconds)


def model_costs(mode: Mode, grid: GridPlan, objects: int, cfg: dict, bundle_bytes: dict, steps: int, windows: int,
                tokens: int, trajectories: int, dtype: str, rates: Rates, prompt_cached: bool,
                vae_base: int = 96, encodes: int = 1, computed: float = 1.0) -> list[StageCost]:
    """The model stages of removal, two-stage and experts runs; `encodes`:
    videos the VAE encodes (MiniMax-Remover: two per trajectory); the image
    encoder only when `bundle_bytes` has one; `computed`: the share of DiT
    forwards a step cache is expected to compute."""
    rate = rates.flops(dtype)
    conv = rates.flops("float32") * CONV_EFFICIENCY
    px = grid.width * grid.height * grid.frames
    forwards = trajectories * steps * windows
    load = sum(bundle_bytes.values()) / LOAD_BYTES_PER_S
    out = [StageCost("load models", f"{sum(bundle_bytes.values()) / 1e9:.1f} GB", load)]
    if not prompt_cached:
        t5 = bundle_bytes.get("t5", 0) / 2  # bf16 parameters
        out.append(StageCost("text encoder", f"{TEXT_TOKENS} tokens", 2 * t5 * TEXT_TOKENS / rate + ENCODER_START))
    if "clip" in bundle_bytes:
        clip = bundle_bytes["clip"] / 2  # fp16 parameters
        out.append(StageCost("image encoder", f"{IMAGE_TOKENS} tokens", 2 * clip * IMAGE_TOKENS / rate + ENCODER_START))
    out.append(StageCost("vae encode", f"{encodes} x {grid.frames} frames" if encodes > 1 else f"{grid.frames} frames",
                         encodes * px * vae_flops_per_pixel(vae_base) / conv))
    seconds = forwards * computed * dit_forward_flops(cfg, tokens) / (rate * DIT_EFFICIENCY)
    cached = f", ~{forwards * computed:.0f} computed (step cache, expected)" if computed < 1 else ""
    out.append(StageCost("denoise", f"{forwards} DiT forwards{cached} ({trajectories} trajectories x {steps} "
                                    f"steps x {windows} windows, {tokens} tokens)", seconds))
    decodes = trajectories * (2 if mode is Mode.EXPERTS else 1)
    out.append(StageCost("vae decode", f"{decodes} x {grid.frames} frames",
                         decodes * px * vae_flops_per_pixel(vae_base, decode=True) / conv))
    return out


@dataclass
class CostRequest:
    """What the estimate needs to know of a run beyond its grid."""

    mode: Mode
    objects: int
    solver: str = "fast"
    optimize: OptimizeSettings = field(default_factory=OptimizeSettings)
    trajectories: int = 1  # removal trajectories (backgrounds, solo videos) or one per object (experts)
    plate_video: bool = False  # a clean plate that is read as a video


def probes_for(req: CostRequest) -> tuple[str, ...]:
    return ("plate",) + (("unet",) if req.solver == "unet" else ()) + (("flops",) if req.mode is not Mode.PLATE else ())


def run_costs(req: CostRequest, grid: GridPlan, rates: Rates, bundle: Bundle | None = None, settings=None,
              windows: int = 1, tokens: int = 0, prompt_cached: bool = True,
              computed: float = 1.0) -> list[StageCost]:
    """Every stage of the run, in order, with its work and estimated seconds
    (the first: the start-up this process has already spent, its imports);
    `computed`: the share of DiT forwards a step cache is expected to compute."""
    read, write = io_costs(grid, 1 + req.objects + req.plate_video,
                           req.trajectories if req.mode is Mode.REMOVE else req.objects, rates)
    solve = [solver_cost(grid, req.objects, rates, req.solver, req.optimize)] if req.solver in ("fast", "unet") else []
    start = StageCost("start-up", "imports (spent)", time.process_time())
    if req.mode is Mode.PLATE:
        return [start, read, *solve, write]
    remover = bundle.remover
    sizes = {c: bundle.weight_bytes(c) for c in remover.components}
    if prompt_cached:
        sizes.pop("t5", None)
    cfg = bundle.config("transformer")
    vae_base = bundle.config("vae").get("base_dim", 96)
    model = model_costs(req.mode, grid, req.objects, cfg, sizes, settings.steps, windows, tokens,
                        req.trajectories, settings.dtype, rates, prompt_cached, vae_base,
                        2 * req.trajectories if remover.condition == "grey-hole" else 1, computed)
    return [start, read, *model, *solve, write]


def render_costs(costs: list[StageCost]) -> list[str]:
    total = sum(c.seconds for c in costs)
    lines = [f"{'stage':<28} {'work':<58} {'est. s':>8}"]
    lines += [f"{c.name:<28} {c.work:<58} {c.seconds:>8.1f}" for c in costs]
    lines.append(f"estimated time on this machine: {format_seconds(total)} (an estimate from rates measured here)")
    return lines


def format_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def long_run_advice(total: float, mode: Mode, solver: str, solo: bool) -> str | None:
    """A line for the header when the estimate passes LONG_RUN."""
    if total <= LONG_RUN:
        return None
    tips = []
    if mode in (Mode.PLATE, Mode.TWO_STAGE) and solver == "unet":
        tips += ["--layer-solver fast", "fewer --iterations"]
    if mode is not Mode.PLATE:
        tips += ["fewer --steps"] + (["no --solo"] if solo else [])
    tips += ["a smaller --size", "fewer --frames"]
    return f"this run is estimated at {format_seconds(total)} (over 30 min); shorter: {', '.join(tips)}"
