"""Benchmark of the MLX Wan2.1 VAE: seconds and peak memory of encode and decode
versus frame count and resolution, and a predicted peak for 81 x 480 x 832.

    python parity/bench_vae.py                       # default cases
    python parity/bench_vae.py --cases 9x64x96 17x64x96 --dtype bfloat16
    python parity/bench_vae.py --tile 64x64          # tiled peaks too

Random weights (full Wan2.1 config); the numbers do not depend on the values.
Peak = mx.get_peak_memory() after mx.reset_peak_memory() per stage; it counts
MLX buffers only: the numpy output buffer decode writes into (`out=`) is not
included (it is T*H*W*3*4 bytes). The model for the prediction: the per-stage
peak does not depend on the frame count (chunks are evaluated one by one; the
output is written to numpy), so

    peak(H, W) = weights + input video (encode only) + k_stage * H * W

with k_stage fitted from the two largest resolutions measured; a tiled run
costs the same with H * W replaced by the tile's pixels.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import numpy as np

from mlx_omnimatte.models.wan.vae import Config, Model
from mlx_omnimatte.models.wan.vae_tiling import Tiling

from mlx_omnimatte.models.base import DTYPES  # noqa: E402


def parse_case(s: str) -> tuple[int, int, int]:
    t, h, w = (int(v) for v in s.split("x"))
    return t, h, w


def run_case(model: Model, t: int, h: int, w: int, tiling=False) -> dict:
    rng = np.random.default_rng(0)
    video = mx.array(rng.uniform(-1, 1, (1, t, h, w, 3)).astype(np.float32))
    mx.eval(video)
    video_bytes = video.nbytes
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    t0 = time.perf_counter()
    z = model.encode(video, tiling=tiling)
    mx.eval(z)
    enc_s = time.perf_counter() - t0
    enc_peak = mx.get_peak_memory()
    del video
    out = np.empty(model.video_shape(z.shape), np.float32)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    model.decode(z, tiling=tiling, out=out)
    dec_s = time.perf_counter() - t0
    dec_peak = mx.get_peak_memory()
    return dict(t=t, h=h, w=w, enc_s=enc_s, dec_s=dec_s, enc_peak=enc_peak, dec_peak=dec_peak,
                base=base, video_bytes=video_bytes, out_bytes=out.nbytes)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", default=["9x64x96", "17x64x96", "33x64x96", "81x64x96",
                                                  "9x128x224", "17x128x224"])
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--tile", default=None, help="also run tiled, tiles HxW pixels (overlap 16)")
    ap.add_argument("--tiled-only", action="store_true", help="with --tile: skip the untiled runs")
    args = ap.parse_args()

    model = Model(Config(dtype=args.dtype))
    mx.eval(model.parameters())
    wbytes = model.weights_bytes
    print(f"device {mx.default_device()}, dtype {args.dtype}, weights {wbytes / 2**20:.0f} MiB")
    print(f"{'frames':>6} {'HxW':>9} {'tiled':>7} | {'enc s':>7} {'enc peak MiB':>12} | "
          f"{'dec s':>7} {'dec peak MiB':>12} | {'out MiB':>7}")
    rows = []
    variants = [False]
    if args.tile:
        th, tw = (int(v) for v in args.tile.split("x"))
        variants = [Tiling(th, tw, 16)] + ([] if args.tiled_only else variants)
    for case in args.cases:
        t, h, w = parse_case(case)
        for tl in variants:
            r = run_case(model, t, h, w, tl)
            r["tiling"] = tl
            rows.append(r)
            tag = "no" if tl is False else f"{tl.height}x{tl.width}"
            print(f"{t:>6} {h:>4}x{w:<4} {tag:>7} | {r['enc_s']:>7.1f} {r['enc_peak'] / 2**20:>12.0f} | "
                  f"{r['dec_s']:>7.1f} {r['dec_peak'] / 2**20:>12.0f} | {r['out_bytes'] / 2**20:>7.0f}", flush=True)

    # Per-pixel fit from the untiled rows at the two largest resolutions.
    untiled = [r for r in rows if r["tiling"] is False]
    by_px = sorted({(r["h"] * r["w"]) for r in untiled})
    if len(by_px) >= 2:
        lo, hi = by_px[-2], by_px[-1]
        def peak_at(px, key, minus_video):
            vals = [r[key] - (r["video_bytes"] if minus_video else 0) for r in untiled if r["h"] * r["w"] == px]
            return max(vals)
        print("\nper-pixel model (fit on the two largest resolutions measured):")
        for stage, key, mv in (("encode", "enc_peak", True), ("decode", "dec_peak", False)):
            k = (peak_at(hi, key, mv) - peak_at(lo, key, mv)) / (hi - lo)
            c = peak_at(hi, key, mv) - k * hi
            full = c + k * 480 * 832
            video = 81 * 480 * 832 * 3 * 4 if stage == "encode" else 0
            tile = c + k * 256 * 256
            print(f"  {stage}: {k / 1024:.1f} KiB/pixel + {c / 2**20:.0f} MiB fixed -> "
                  f"81x480x832 untiled {(full + video) / 2**30:.1f} GiB, "
                  f"tiled 256x256 {(tile + video) / 2**30:.1f} GiB"
                  + (" (+ the 81-frame input video 0.4 GiB included)" if video else
                     " (+ 0.4 GiB numpy output buffer, not MLX)"))


if __name__ == "__main__":
    main()
