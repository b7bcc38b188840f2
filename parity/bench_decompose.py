"""What a two-object decomposition of 81 frames at 480x832 costs, at true
shapes: DiT forwards and seconds per stage for `decompose --method
two-stage` (the default), `--fast` and `--solo`, and `remove` with `--cache`
at two thresholds each against none, side by side; and an estimate for an
M-series Mac by FLOPs.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python parity/bench_decompose.py
    python parity/bench_decompose.py --forward-json forward.json   # a forward measured by bench_dit_gemm.py

How each figure is made (say so when quoting them):

* The DiT forward is measured, not estimated: one forward of 2 blocks of
  Fun-InP-1.3B (dim 1536, 12 heads, FFN 8960, CLIP branch, random weights,
  float32) over 32,760 tokens (21 latent frames of 60x104: one 81-frame
  window at 480x832), as `bench_dit_gemm.py` runs it (its `after` variant,
  inside `memory.buffer_cache()` as the pipelines run the DiT; `--forward-json`
  reuses a measurement it wrote). A 30-block forward is its embeddings and
  head plus 15 times its 2 blocks' time. float32: the run's default dtype is
  bfloat16, which this CPU's MLX runs at the rate the probe prints.
* Forwards per run: trajectories x steps x windows, and for a step cache the
  plan's expected computed count (`step_cache.expected_forwards`: MagCache's
  rule on the published ratios, TeaCache at the published skip rate).
* The other stages (reading, VAE, image encoder, loading, the layer solver,
  writing) are the run planner's estimates (`pipelines/cost.py`) from this
  machine's probed rates and the stages' FLOPs at the real architecture's
  sizes (`--dry-run` prints the same figures for a real bundle).
* M-series: the DiT and the VAE by FLOPs at the rate implied by a published
  figure, mlx-examples' Wan2.1-T2V-1.3B at 480p, 81 frames: ~90 s a step on
  an M4 Max with classifier-free guidance, i.e. two forwards' FLOPs per step
  (not measured here: no Mac). Reading, solving and writing are left at this
  CPU's figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dit_gemm import run_variant  # noqa: E402

from mlx_omnimatte.io.grid import plan_grid  # noqa: E402
from mlx_omnimatte.models import clip as clip_model  # noqa: E402
from mlx_omnimatte.models.wan import transformer as wan  # noqa: E402
from mlx_omnimatte.models.wan import vae as wan_vae  # noqa: E402
from mlx_omnimatte.pipelines import cost  # noqa: E402
from mlx_omnimatte.pipelines.optimize import OptimizeSettings  # noqa: E402
from mlx_omnimatte.pipelines.settings import Mode  # noqa: E402
from mlx_omnimatte.step_cache import expected_forwards, parse_cache  # noqa: E402

OBJECTS = 2
LAYERS = 30
M4_MAX_STEP = 90.0  # seconds a step, mlx-examples' Wan2.1-T2V-1.3B, 480p, 81 frames, guidance
M4_MAX_FORWARDS_PER_STEP = 2  # conditional and unconditional


@dataclass(frozen=True)
class Run:
    label: str
    mode: Mode
    trajectories: int
    sampler: str = "euler"
    steps: int = 50
    cache: str = "none"


RUNS = [
    Run("decompose (default)", Mode.TWO_STAGE, 1),
    Run("decompose --fast", Mode.TWO_STAGE, 1, "unipc", 25, "teacache:0.05"),
    Run("decompose --solo", Mode.TWO_STAGE, OBJECTS + 1),
    Run("remove", Mode.REMOVE, OBJECTS + 1),
    Run("remove teacache:0.05", Mode.REMOVE, OBJECTS + 1, cache="teacache:0.05"),
    Run("remove teacache:0.1", Mode.REMOVE, OBJECTS + 1, cache="teacache:0.1"),
    Run("remove magcache:0.12", Mode.REMOVE, OBJECTS + 1, cache="magcache:0.12"),
    Run("remove magcache:0.24", Mode.REMOVE, OBJECTS + 1, cache="magcache:0.24"),
]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--forward-json", default=None, help="a forward measured by bench_dit_gemm.py --json")
    p.add_argument("--grid", default="21x30x52", help="token grid of the measured forward (FxHxW)")
    return p.parse_args(argv)


def parameter_bytes(model, itemsize: int) -> int:
    """Bytes of a model's parameters (shapes only: MLX builds them lazily)."""
    return sum(v.size for _, v in tree_flatten(model.parameters())) * itemsize


def forward_seconds(measured: dict) -> tuple[float, float]:
    """(seconds of a 30-block forward, of its 2 measured blocks) from the
    measured 2-block forward's sections."""
    s = measured["sections"]
    ends = sum(s[k]["wall"] for k in ("embed", "head") if k in s)
    blocks = measured["seconds"] - ends
    return ends + blocks * LAYERS / measured["layers"], blocks


def run_stages(run: Run, grid, cfg, sizes, rates, per_forward: float, vae_base: int):
    """[(stage, work, seconds)] of one run on this machine, the denoise stage
    at the measured forward."""
    windows, tokens = 1, grid.latent_frames * (grid.latent_size[1] // 2) * (grid.latent_size[0] // 2)
    spec = parse_cache(run.cache)
    expect = expected_forwards(spec, run.steps, None, run.sampler, 5.0)
    share = expect.computed / expect.steps
    model = cost.model_costs(run.mode, grid, OBJECTS, cfg, sizes, run.steps, windows, tokens, run.trajectories,
                             "float32", rates, True, vae_base, share)
    forwards = run.trajectories * run.steps * windows
    computed = forwards * share
    model = [replace(c, seconds=computed * per_forward) if c.name == "denoise" else c for c in model]
    read, write = cost.io_costs(grid, 1 + OBJECTS, run.trajectories if run.mode is Mode.REMOVE else OBJECTS, rates)
    solve = [cost.solver_cost(grid, OBJECTS, rates, "fast", OptimizeSettings())] if run.mode is Mode.TWO_STAGE else []
    return [read, *model, *solve, write], forwards, computed


def m_series(computed: float, decodes: int, cfg: dict, tokens: int, grid, vae_base: int) -> tuple:
    """(rate, FLOPs a forward, seconds of the DiT and VAE stages on an M4 Max)
    by FLOPs at the rate the published step time implies."""
    forward = cost.dit_forward_flops(cfg, tokens)
    rate = M4_MAX_FORWARDS_PER_STEP * forward / M4_MAX_STEP
    px = grid.width * grid.height * grid.frames
    vae = px * (cost.vae_flops_per_pixel(vae_base) + decodes * cost.vae_flops_per_pixel(vae_base, decode=True))
    return rate, forward, (computed * forward + vae) / rate


def main(argv=None):
    args = parse(argv)
    if args.forward_json:
        measured = json.loads(Path(args.forward_json).read_text())
    else:
        measured = run_variant(argparse.Namespace(grid=args.grid, layers=2, variant="after", json=None))
    per_forward, blocks = forward_seconds(measured)
    grid = plan_grid(832, 480, 81)
    tokens = measured["tokens"]
    cfg30 = wan.PRESETS["fun-inp-1.3b"]
    cfg = {"dim": cfg30.dim, "ffn_dim": cfg30.ffn_dim, "num_layers": cfg30.num_layers}
    vae_cfg = wan_vae.Config()
    sizes = {"transformer": parameter_bytes(wan.Model(cfg30), 2), "vae": parameter_bytes(wan_vae.Model(vae_cfg), 4),
             "clip": parameter_bytes(clip_model.Model(clip_model.Config()), 2)}
    rates = cost.machine_rates(("plate", "flops"))
    print(f"grid {grid.width}x{grid.height}, {grid.frames} frames, {OBJECTS} objects; {tokens} tokens a forward "
          f"(measured forward: {measured['layers']} blocks at {measured['tokens']} tokens, float32, "
          f"{measured['seconds']:.1f} s, blocks {blocks:.1f} s, load {measured.get('load', 0):.1f})")
    print(f"30-block forward on this CPU: {per_forward:.1f} s (embeddings + head + "
          f"{LAYERS // measured['layers']} x the {measured['layers']} measured); matmul probe "
          f"float32 {rates.flops('float32') / 1e9:.0f}, bfloat16 {rates.flops('bfloat16') / 1e9:.0f} GFLOP/s")
    table, totals = {}, {}
    for run in RUNS:
        stages, forwards, computed = run_stages(run, grid, cfg, sizes, rates, per_forward, vae_cfg.base_dim)
        table[run.label] = {c.name: c.seconds for c in stages}
        table[run.label]["DiT forwards"] = f"{computed:.0f}/{forwards}"
        totals[run.label] = sum(c.seconds for c in stages)
        rate, flops, seconds = m_series(computed, run.trajectories, cfg, tokens, grid, vae_cfg.base_dim)
        table[run.label]["M4 Max est. (DiT+VAE)"] = seconds
    show(table, totals)
    print(f"M4 Max estimate: DiT + VAE FLOPs at {rate / 1e12:.1f} TFLOP/s, the rate implied by ~{M4_MAX_STEP:.0f} s "
          f"a step of {M4_MAX_FORWARDS_PER_STEP} forwards of {flops / 1e12:.0f} TFLOP each "
          "(mlx-examples' published Wan2.1-1.3B figure; no Mac measured); other stages not included")


def show(table: dict, totals: dict) -> None:
    """One row per run, one column per stage (seconds on this CPU)."""
    names = []
    for row in table.values():
        names += [n for n in row if n not in names]
    short = {n: n.replace("image encoder", "image enc").replace("load models", "load").replace("solve layers", "solve")
             .replace("read video", "read").replace("M4 Max est. (DiT+VAE)", "M4 Max DiT+VAE") for n in names}
    print(f"{'run':<22}" + "".join(f"{short[n]:>15}" for n in names) + f"{'total here':>12}")
    for label, row in table.items():
        cells = [row.get(n, "-") for n in names]
        print(f"{label:<22}" + "".join(f"{c if isinstance(c, str) else _fmt(c):>15}" for c in cells)
              + f"{_fmt(totals[label]):>12}")


def _fmt(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


if __name__ == "__main__":
    main()
