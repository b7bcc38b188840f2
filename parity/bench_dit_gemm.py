"""The DiT forward's share of this CPU's GEMM rate at real size: a forward of
2 blocks at the 1.3B width (Fun-InP-1.3B: dim 1536, 12 heads, FFN 8960,
CLIP branch) over 32,760 tokens (81 frames of 480x832), float32, random
weights, against `mx.matmul` of the forward's own GEMM shapes.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python parity/bench_dit_gemm.py
    python parity/bench_dit_gemm.py --grid 21x15x26 --layers 1        # a quicker look (8,190 tokens)
    python parity/bench_dit_gemm.py --variant after --json forward.json  # reused by bench_decompose.py

Two variants, each in its own process (the allocator's state is per process):

* before: MLX's CPU buffer cache at its default (32 MiB): every attention
  chunk's scores and every FFN hidden are fresh pages.
* after: inside `memory.buffer_cache()` (MLX keeps freed buffers for reuse)
  and `memory.kept_heap()` (glibc keeps its heap: no page handed back to
  the kernel and taken again zeroed), as the pipelines run the DiT.

Both run the model's attention (`models.base.sdpa`: MLX's SDPA per query
chunk; its CPU fallback is matmul, softmax, matmul). `--exp` also times, on
one self-attention chunk, MLX's softmax against the GEMMs around it and
against a fused polynomial exp (what a custom softmax could save).

The GEMM rate: every matmul of the forward (the linears at the block's token
count, the attention's two per query chunk) timed once on its own at the
same K and N, the linears on a 4,096-row slice (the rate does not change with
more rows); the forward's GEMM FLOPs over the seconds they take at those
rates. The fraction: that GEMM-only time over the forward's time. The forward
is timed once, instrumented: each piece of a block evaluated on its own, so
its time splits into GEMMs, attention and the elementwise rest, with the
process's system time and page faults; the instrumented block is checked
against `Block.__call__` on a small grid first (bit for bit).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import replace

import mlx.core as mx
import numpy as np

from mlx_omnimatte.memory import attention_chunk, blas_threads, buffer_cache, kept_heap
from mlx_omnimatte.models import base
from mlx_omnimatte.models.wan import transformer as wan

SLICE = 4096  # rows of the linears' rate measurement


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="21x30x52", help="token grid FxHxW (latent frames, latent H/2, W/2)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--variant", default="both", choices=["both", "before", "after"])
    p.add_argument("--json", default=None, help="write the (last) variant's figures here")
    return p.parse_args(argv)


class Clock:
    """Wall, user and system seconds and minor page faults per named section."""

    def __init__(self):
        self.sections = defaultdict(lambda: np.zeros(4))

    @staticmethod
    def now():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return np.array([time.perf_counter(), r.ru_utime, r.ru_stime, r.ru_minflt])

    def run(self, name, fn, *args):
        start = self.now()
        out = fn(*args)
        mx.eval(out)
        self.sections[name] += self.now() - start
        return out


def attention(clock, q, k, v, name):
    """`base.sdpa`'s chunking and head-group streams, each chunk timed as one
    attention section."""
    b, h, lq, d = q.shape
    chunk, groups = attention_chunk(h, k.shape[2], lq, q.dtype, b), base.head_groups(h)
    if chunk >= lq:
        return clock.run(name, lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=d ** -0.5))
    with blas_threads(1) if len(groups) > 1 else nullcontext():
        outs = [clock.run(name, lambda s: base.chunk_attention(q, k, v, d ** -0.5, slice(s, s + chunk), groups), s)
                for s in range(0, lq, chunk)]
    return mx.concatenate(outs, axis=2)


def profiled_block(block, x, e6, ctx, rope, clock):
    """`Block.__call__` piece by piece (float32 weights: no casts)."""
    sa, ca, n = block.self_attn, block.cross_attn, block.self_attn.num_heads
    split = wan._split_heads
    shift, scale, gate, c_shift, c_scale, c_gate = mx.split(block.modulation + e6, 6, axis=1)
    h = clock.run("elementwise", wan._modulate, x, shift, scale, block.eps)
    q, k, v = (clock.run("linear", lin, h) for lin in (sa.q, sa.k, sa.v))
    q = clock.run("elementwise", lambda: wan.apply_rope(split(sa.norm_q(q), n), *rope))
    k = clock.run("elementwise", lambda: wan.apply_rope(split(sa.norm_k(k), n), *rope))
    out = attention(clock, q, k, split(v, n), "self-attention")
    y = clock.run("linear", sa.o, wan._merge_heads(out))
    x = clock.run("elementwise", wan._gated_add, x, gate, y)
    h = clock.run("elementwise", block.norm3, x)
    cq = clock.run("linear", ca.q, h)
    cq = clock.run("elementwise", lambda: split(ca.norm_q(cq), n))
    n_img = ctx.shape[1] - ca.text_len
    txt, img = ctx[:, n_img:], ctx[:, :n_img]
    kt = clock.run("cross k/v", lambda: split(ca.norm_k(ca.k(txt)), n))
    vt = clock.run("cross k/v", lambda: split(ca.v(txt), n))
    ki = clock.run("cross k/v", lambda: split(ca.norm_k_img(ca.k_img(img)), n))
    vi = clock.run("cross k/v", lambda: split(ca.v_img(img), n))
    out = attention(clock, cq, kt, vt, "cross-attention") + attention(clock, cq, ki, vi, "cross-attention")
    y = clock.run("linear", ca.o, wan._merge_heads(out))
    x = clock.run("elementwise", lambda: x + y)
    h = clock.run("elementwise", wan._modulate, x, c_shift, c_scale, block.eps)
    h = clock.run("linear", block.ffn[0], h)
    h = clock.run("elementwise", wan.gelu_tanh, h)
    h = clock.run("linear", block.ffn[2], h)
    return clock.run("elementwise", wan._gated_add, x, c_gate, h)


LOG2E, LN2_HI, LN2_LO = 1.4426950408889634, 0.693359375, -2.12194440e-4


@mx.compile
def poly_exp(s, m):
    """exp(s - m), s <= m: 2^n * exp(r), |r| <= ln2 / 2, Taylor to r^7 (1e-7 relative)."""
    x = mx.maximum(s - m, -87.0)
    n = mx.floor(x * LOG2E + 0.5)
    r = (x - n * LN2_HI) - n * LN2_LO
    p = 1.0 / 5040
    for i in range(6, -1, -1):
        p = p * r + 1.0 / float(np.prod(np.arange(1, i + 1)))
    return p * ((n.astype(mx.int32) + 127) << 23).view(mx.float32)


def chunk_profile(cfg, tokens: int) -> dict:
    """One self-attention query chunk step by step: seconds, user seconds and
    MLX peak bytes beyond the scores of each step."""
    heads, hd = cfg.num_heads, cfg.head_dim
    rows = min(attention_chunk(heads, tokens, tokens, mx.float32), tokens)
    q, k, v = (mx.random.normal((1, heads, n, hd)) for n in (rows, tokens, tokens))
    s = q @ k.swapaxes(-1, -2)
    m = s.max(axis=-1, keepdims=True)
    mx.eval(q, k, v, s, m)
    steps = {"q @ k^T": lambda: q @ k.swapaxes(-1, -2), "softmax": lambda: mx.softmax(s, axis=-1, precise=True),
             "exp alone": lambda: mx.exp(s - m), "fused polynomial exp": lambda: poly_exp(s, m),
             "p @ v": lambda: s @ v, "whole SDPA": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.1)}
    out = {"rows": rows, "keys": tokens}
    for name, fn in steps.items():
        mx.eval(fn())
        mx.synchronize()
        mx.reset_peak_memory()
        active = mx.get_active_memory()
        start = Clock.now()
        mx.eval(fn())
        wall, user = (Clock.now() - start)[:2]
        out[name] = {"wall": float(wall), "user": float(user),
                     "extra_bytes_per_score": (mx.get_peak_memory() - active) / s.size}
    return out


def gemm_shapes(cfg, tokens: int, ctx_lens=(512, 257)) -> list[tuple[int, int, int, int]]:
    """(batch, M, K, N) of every matmul in one block's forward."""
    d, f, heads, hd = cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.head_dim
    shapes = [(1, tokens, d, d)] * 5 + [(1, tokens, d, f), (1, tokens, f, d)]  # q k v o, cross q o; ffn
    for keys in (tokens, *ctx_lens):
        chunk = attention_chunk(heads, keys, tokens, mx.float32)
        for start in range(0, tokens, chunk):
            rows = min(chunk, tokens - start)
            shapes += [(heads, rows, hd, keys), (heads, rows, keys, hd)]
    shapes += [(1, n, d, d) for n in ctx_lens for _ in range(2)]  # cross k, v (text, image)
    return shapes


def gemm_seconds(shapes) -> tuple[float, float]:
    """(FLOPs, seconds at mx.matmul's rate of each shape), each distinct
    shape timed once (at most SLICE rows for the linears)."""
    rates, flops, seconds = {}, 0.0, 0.0
    for b, m, k, n in shapes:
        rows = m if b > 1 else min(m, SLICE)
        key = (b, rows, k, n)
        if key not in rates:
            a, w = mx.random.normal((b, rows, k)), mx.random.normal((b, k, n))
            mx.eval(a, w, a @ w)
            start = time.perf_counter()
            mx.eval(a @ w)
            rates[key] = 2.0 * b * rows * k * n / (time.perf_counter() - start)
        flops += 2.0 * b * m * k * n
        seconds += 2.0 * b * m * k * n / rates[key]
    return flops, seconds


def inputs(cfg, grid):
    f, h, w = grid
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((1, f, 2 * h, 2 * w, cfg.in_dim)).astype(np.float32))
    ctx = mx.array(rng.standard_normal((1, 24, cfg.text_dim)).astype(np.float32))
    clip = mx.array(rng.standard_normal((1, 257, cfg.image_dim)).astype(np.float32))
    return x, ctx, clip


def forward(model, grid, clock):
    x, context, clip = inputs(model.config, grid)
    ctx = clock.run("embed", model.embed_context, context, clip)
    tokens, g = model.patchify(x)
    tokens = clock.run("embed", lambda: tokens)
    temb, e6 = clock.run("embed", model.embed_time, mx.array([700.0]))
    rope = model.rope(g)
    for block in model.blocks:
        tokens = profiled_block(block, tokens, e6, ctx, rope, clock)
    return clock.run("head", lambda: model.unpatchify(model.head(tokens, temb), g))


def check_profile(model) -> None:
    """The instrumented block is the block, on a small grid."""
    x, context, clip = inputs(model.config, (3, 4, 5))
    ctx = model.embed_context(context, clip)
    tokens, g = model.patchify(x)
    _, e6 = model.embed_time(mx.array([700.0]))
    rope = model.rope(g)
    want = model.blocks[0](tokens, e6, ctx, rope)
    got = profiled_block(model.blocks[0], tokens, e6, ctx, rope, Clock())
    assert np.array_equal(np.array(want), np.array(got)), "the instrumented block differs from Block.__call__"


def run_variant(args) -> dict:
    f, h, w = (int(v) for v in args.grid.split("x"))
    cfg = replace(wan.PRESETS["fun-inp-1.3b"], num_layers=args.layers)
    mx.random.seed(0)
    model = wan.Model(cfg)
    mx.eval(model.parameters())
    check_profile(model)
    tokens, after = f * h * w, args.variant == "after"
    with kept_heap() if after else nullcontext(), buffer_cache() if after else nullcontext():
        chunk = chunk_profile(cfg, tokens)
        gemm_flops, gemm_s = gemm_seconds(gemm_shapes(cfg, tokens) * args.layers)
        clock = Clock()
        forward(model, (1, 4, 5), Clock())  # compiles the elementwise kernels
        start = Clock.now()
        forward(model, (f, h, w), clock)
        total = Clock.now() - start
    sections = {k: dict(zip(("wall", "user", "sys", "faults"), map(float, v))) for k, v in clock.sections.items()}
    return {"variant": args.variant, "grid": [f, h, w], "tokens": tokens, "layers": args.layers,
            "seconds": float(total[0]), "user": float(total[1]), "sys": float(total[2]), "faults": float(total[3]),
            "gemm_flops": gemm_flops, "gemm_seconds": gemm_s, "gemm_rate": gemm_flops / gemm_s,
            "fraction": gemm_s / float(total[0]), "sections": sections, "chunk": chunk, "load": os.getloadavg()[0],
            "device": str(mx.default_device()), "blas": os.environ.get("LD_PRELOAD", "")}


def show(r: dict) -> None:
    print(f"{r['variant']}: {r['layers']} blocks at {r['tokens']} tokens: {r['seconds']:.1f} s "
          f"(user {r['user']:.1f}, system {r['sys']:.1f}, {r['faults']:.0f} page faults; load {r['load']:.1f})")
    print(f"  GEMM rate of its shapes {r['gemm_rate'] / 1e9:.1f} GFLOP/s: its {r['gemm_flops'] / 1e12:.2f} TFLOP "
          f"take {r['gemm_seconds']:.1f} s -> {100 * r['fraction']:.0f}% of the GEMM rate")
    for name, s in sorted(r["sections"].items(), key=lambda kv: -kv[1]["wall"]):
        print(f"  {name:<16} {s['wall']:8.1f} s  user {s['user']:7.1f}  sys {s['sys']:6.1f}  faults {s['faults']:9.0f}")
    c = r["chunk"]
    print(f"  one self-attention chunk ({c['rows']} queries x {c['keys']} keys), step by step:")
    for name, s in c.items():
        if isinstance(s, dict):
            print(f"    {name:<22} {s['wall']:6.2f} s  user {s['user']:5.2f}  "
                  f"MLX memory beyond the scores {s['extra_bytes_per_score']:4.1f} B/score")


def main(argv=None):
    args = parse(argv)
    if args.variant != "both":
        r = run_variant(args)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(r, fh, indent=1)
        print("RESULT " + json.dumps(r))
        return
    results = []
    for variant in ("before", "after"):
        cmd = [sys.executable, __file__, "--variant", variant, "--grid", args.grid, "--layers", str(args.layers)]
        if args.json:
            cmd += ["--json", args.json]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            print(f"{variant}: failed\n{out.stderr[-3000:]}")
            continue
        results.append(json.loads(line[0][7:]))
        show(results[-1])
    if len(results) == 2:
        print(f"GEMM-rate fraction: before {100 * results[0]['fraction']:.0f}%, after "
              f"{100 * results[1]['fraction']:.0f}%; forward {results[0]['seconds']:.1f} s -> "
              f"{results[1]['seconds']:.1f} s")


if __name__ == "__main__":
    main()
