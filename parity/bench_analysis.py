"""Seconds and peak memory per block of the effect analysis at the 1.3B width
(random weights, Fun-InP-1.3B architecture with --layers blocks) on a
480x832-class grid, against the plain forward of the same blocks, and the
probe's key-mass kernel against the same computation in torch.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python parity/bench_analysis.py [--layers 2] [--frames 3] [--height 60] [--width 104] \
            [--object 0.1] [--dtype float32] [--budget-mib 1024] [--no-torch]

Frames/height/width are latent sizes (60 x 104 = 480 x 832 pixels; tokens =
frames * 30 * 52). The object's queries are a centred rectangle of --object
of the tokens. Per block: the plain block (query-chunked SDPA, what inference
runs), the probed block (`analysis.block_scores`: SDPA plus the object rows'
softmax in chunks), their peak MLX memory (including the weights and the
tokens held, and above what was held when the block started). The kernel
rows: `analysis.key_mass` alone, and torch doing the same chunked
softmax-and-sum on the same q, k (in a subprocess). Wall seconds per block
and, for each pass, this process's CPU seconds (the fairer figure on a
shared machine).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--frames", type=int, default=3, help="latent frames (3 = 9 video frames)")
    p.add_argument("--height", type=int, default=60)
    p.add_argument("--width", type=int, default=104)
    p.add_argument("--object", type=float, default=0.1, help="share of the tokens that are object queries")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--budget-mib", type=int, default=1024, help="attention memory budget")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--torch-kernel", default=None, help=argparse.SUPPRESS)  # ROWS:CHUNK, in the subprocess
    return p.parse_args(argv)


def token_masks(grid, share: float):
    """A centred rectangle of about `share` of each frame's tokens (objects)
    and the row band under it (the effect)."""
    f, h, w = grid
    side = np.sqrt(share)
    hh, ww = max(1, round(h * side)), max(1, round(w * side))
    r0, c0 = (h - hh) // 2, (w - ww) // 2
    objects = np.zeros(grid, bool)
    objects[:, r0:r0 + hh, c0:c0 + ww] = True
    effect = np.zeros(grid, np.float32)
    effect[:, min(h - 1, r0 + hh):min(h, r0 + hh + 2), c0:c0 + ww] = 1.0
    return objects, effect


def build(args):
    import mlx.core as mx
    from mlx.utils import tree_map

    from mlx_omnimatte.models.base import DTYPES
    from mlx_omnimatte.models.wan.transformer import PRESETS, Model

    cfg = replace(PRESETS["fun-inp-1.3b"], num_layers=args.layers)
    mx.random.seed(0)
    model = Model(cfg)
    dt = DTYPES[args.dtype]
    model.update(tree_map(lambda p: p.astype(dt), model.parameters()))
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((1, args.frames, args.height, args.width, cfg.in_dim)).astype(np.float32))
    context = mx.array(rng.standard_normal((1, 24, cfg.text_dim)).astype(np.float32))
    clip_fea = mx.array(rng.standard_normal((1, 257, cfg.image_dim)).astype(np.float32))
    ctx = model.embed_context(context, clip_fea)
    mx.eval(model.parameters(), x, ctx)
    return model, x, ctx


def plain_blocks(model, x, ctx, budget: int) -> list[tuple[float, int, int]]:
    """(seconds, peak, peak above the memory held) per block of the plain forward."""
    import mlx.core as mx

    from mlx_omnimatte.branch.attention import make_attn_fn

    attn_fn = make_attn_fn("A", budget_bytes=budget)
    tokens, grid = model.patchify(x)
    _, e6 = model.embed_time(mx.array([800.0]))
    rope = model.rope(grid)
    out = []
    for block in model.blocks:
        mx.eval(tokens)
        held = mx.get_active_memory()
        mx.reset_peak_memory()
        start = time.perf_counter()
        tokens = block(tokens, e6, ctx, rope, attn_fn)
        mx.eval(tokens)
        out.append((time.perf_counter() - start, mx.get_peak_memory(), mx.get_peak_memory() - held))
    return out


def kernel_inputs(args, rows: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    L = args.frames * (args.height // 2) * (args.width // 2)
    q = rng.standard_normal((1, 12, L, 128)).astype(np.float32)
    k = rng.standard_normal((1, 12, L, 128)).astype(np.float32)
    idx = np.sort(rng.choice(L, rows, replace=False)).astype(np.int64)
    return q, k, idx


def mlx_kernel(args, rows: int, budget: int) -> tuple[float, int, int]:
    import mlx.core as mx

    from mlx_omnimatte.analysis.scores import key_mass, probe_chunk
    from mlx_omnimatte.models.base import DTYPES

    q, k, idx = kernel_inputs(args, rows)
    dt = DTYPES[args.dtype]
    q, k = mx.array(q).astype(dt), mx.array(k).astype(dt)
    chunk = probe_chunk(12, k.shape[2], rows, budget_bytes=budget)
    r = mx.array(idx.astype(np.uint32))
    mx.eval(q, k, r)
    held = mx.get_active_memory()
    mx.reset_peak_memory()
    start, cpu = time.perf_counter(), time.process_time()
    mx.eval(key_mass(q, k, r, chunk))
    return time.perf_counter() - start, time.process_time() - cpu, mx.get_peak_memory() - held, chunk


def torch_kernel(args, rows: int, chunk: int) -> dict:
    """The same chunked softmax-and-sum in torch (this process: the subprocess)."""
    import torch

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    q, k, idx = kernel_inputs(args, rows)
    q, k, idx = torch.from_numpy(q).to(dt), torch.from_numpy(k).to(dt), torch.from_numpy(idx)
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        total = torch.zeros(k.shape[2], dtype=torch.float32)
        for s in range(0, rows, chunk):
            scores = (q[:, :, idx[s:s + chunk]] * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
            total += scores.float().softmax(-1).sum(dim=(0, 1, 2))
    return {"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def run_torch(argv, rows: int, chunk: int) -> dict | None:
    cmd = [sys.executable, __file__, *argv, "--torch-kernel", f"{rows}:{chunk}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        print(f"torch kernel failed: {res.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def report(args, plain, probed, cpu, kernel, torch_res, rows: int) -> None:
    from mlx_omnimatte.memory import format_bytes

    L = args.frames * (args.height // 2) * (args.width // 2)
    print(f"1.3B width (1536, 12 heads), {args.layers} blocks, latent {args.frames}x{args.height}x{args.width} "
          f"({args.frames * 4 - 3} frames of {args.height * 8}x{args.width * 8}), {L} tokens, {rows} object "
          f"queries, {args.dtype}, budget {args.budget_mib} MiB")
    print(f"{'block':>5} {'plain s':>8} {'probed s':>9} {'plain peak':>11} {'probed peak':>12} "
          f"{'plain added':>12} {'probed added':>13}")
    for b, (p, s) in enumerate(zip(plain, zip(probed.seconds, probed.peak_bytes, probed.added_bytes))):
        print(f"{b:>5} {p[0]:>8.2f} {s[0]:>9.2f} {format_bytes(p[1]):>11} {format_bytes(s[1]):>12} "
              f"{format_bytes(p[2]):>12} {format_bytes(s[2]):>13}")
    print(f"CPU seconds per block: plain {cpu[0] / args.layers:.2f}, probed {cpu[1] / args.layers:.2f}")
    print(f"key_mass kernel (MLX): {kernel[0]:.2f} s ({kernel[1]:.2f} CPU s), peak above inputs "
          f"{format_bytes(kernel[2])}, chunk {kernel[3]} rows")
    if torch_res:
        print(f"key_mass kernel (torch {torch_res['torch']}, {torch_res['threads']} threads): "
              f"{torch_res['seconds']:.2f} s ({torch_res['cpu']:.2f} CPU s)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.torch_kernel:
        rows, chunk = (int(v) for v in args.torch_kernel.split(":"))
        print(json.dumps(torch_kernel(args, rows, chunk)))
        return
    from mlx_omnimatte.analysis.scores import block_scores

    budget = args.budget_mib << 20
    model, x, ctx = build(args)
    objects, effect = token_masks((args.frames, args.height // 2, args.width // 2), args.object)
    rows = int(objects.sum())
    plain_blocks(model, x, ctx, budget)  # warm-up: compiled kernels, allocator
    c0 = time.process_time()
    plain = plain_blocks(model, x, ctx, budget)
    c1 = time.process_time()
    probed = block_scores(model, x, 800.0, ctx, objects, effect, budget)
    cpu = (c1 - c0, time.process_time() - c1)
    del model
    kernel = mlx_kernel(args, rows, budget)
    torch_res = None if args.no_torch else run_torch(argv, rows, kernel[3])
    report(args, plain, probed, cpu, kernel, torch_res, rows)


if __name__ == "__main__":
    main()
