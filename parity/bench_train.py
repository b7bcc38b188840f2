"""Seconds per expert training step and peak memory: MLX vs torch + PEFT,
same machine, same model width, LoRA, loss and token grid (random weights);
and the predicted peak memory of full-depth training.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python parity/bench_train.py
    python parity/bench_train.py --layers 2 --frames 6 --height 32 --width 32 --dtype float32 --kind quality
    python parity/bench_train.py --few-step 200     # tiny experts: validation error at 2, 4, 8, 50 steps

Defaults: the 1.3B width (1536, 12 heads, FFN 8960), 2 layers, a latent grid
of 6 x 32 x 32 (1,536 tokens per half), rank 128 (Effect, K = all layers
here) / 64 (Quality). Each (backend, kind, dtype) runs in its own subprocess
so that peak memory is its own: MLX reports `mx.get_peak_memory()` over the
timed steps, torch the process's max RSS (and so does MLX, for comparison).
MLX checkpoints each LoRA block (`mx.checkpoint`); torch runs the same loss
without checkpointing (diffusers' checkpointing does not cover the branch
reference), so its memory is an upper reference, its time a lower one. The
torch Effect reference runs in float32 only (the branch reference mixes a
float32 LoRA into bfloat16 matmuls).

The prediction (`predict_peak`) counts what training at depth L holds at
once: the frozen weights, the LoRA with its gradient and AdamW moments, the
per-block checkpoint (the replica tokens' residual, float32) and, under mask
B, every block's inpaint keys and values, plus one block's recomputed
activations and the attention scores of one query chunk. It is printed next
to the measured MLX peak at the benchmarked depth, and for the full 30-layer
1.3B model at 49x320x576 and 81x480x832.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

GB = 1 << 30
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
RANK = {"effect": 128, "quality": 64}
BLOCK_WIDTHS = 72


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--frames", type=int, default=6, help="latent frames")
    p.add_argument("--height", type=int, default=32, help="latent height")
    p.add_argument("--width", type=int, default=32, help="latent width")
    p.add_argument("--dtype", action="append", choices=sorted(ITEMSIZE), help="frozen DiT dtype (repeatable)")
    p.add_argument("--kind", action="append", choices=sorted(RANK), help="expert (repeatable)")
    p.add_argument("--backend", action="append", choices=["mlx", "torch"], help="(repeatable)")
    p.add_argument("--repeats", type=int, default=1, help="timed steps after one warm-up")
    p.add_argument("--few-step", type=int, default=None, metavar="TRAIN_STEPS",
                   help="instead: train tiny experts for TRAIN_STEPS and print validation errors at 2/4/8/50 steps")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one subprocess run
    return p.parse_args(argv)


def config(layers: int):
    from mlx_omnimatte.models.wan.transformer import PRESETS

    return replace(PRESETS["fun-inp-1.3b"], num_layers=layers)


def batch_data(cfg, grid):
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)
    return [{"cond": f32(*grid, 20), "alpha": f32(*grid, 16), "bg": f32(*grid, 16),
             "context": f32(24, cfg.text_dim), "clip": f32(257, cfg.image_dim)}]


def max_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


def bench_mlx(kind: str, dtype: str, args) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_map

    from mlx_omnimatte.models.wan.transformer import Model
    from mlx_omnimatte.train.trainer import TrainSettings, make_grad_fn, new_state, train_step

    cfg = config(args.layers)
    model = Model(cfg)
    model.update(tree_map(lambda p: p.astype(getattr(mx, dtype)), model.parameters()))
    mx.eval(model.parameters())
    s = TrainSettings(kind=kind, rank=RANK[kind], k=args.layers, steps=10**6).resolve(args.layers)
    data = batch_data(cfg, (args.frames, args.height, args.width))
    state, fn = new_state(model, s), make_grad_fn(model, s)
    train_step(state, model, data, s, fn)  # warm-up
    mx.synchronize()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        train_step(state, model, data, s, fn)
    mx.synchronize()
    return {"seconds": (time.perf_counter() - t0) / args.repeats, "peak_gb": mx.get_peak_memory() / GB,
            "rss_gb": max_rss_gb(), "loss": state.losses[-1]}


def bench_torch(kind: str, dtype: str, args) -> dict:
    import torch

    import train_reference as tr
    from wan_reference import build_reference

    torch.set_grad_enabled(True)
    cfg = config(args.layers)
    model = build_reference(cfg, seed=0).to(getattr(torch, dtype))
    rank = RANK[kind]
    rng = np.random.default_rng(1)
    lora = {f"blocks.{i}.{t}": ((rng.standard_normal((rank, cfg.dim)) / cfg.dim**0.5).astype(np.float32),
                                np.zeros((cfg.dim, rank), np.float32))
            for i in range(cfg.num_layers) for t in tr.DIFFUSERS}
    params = tr.peft_quality(model, lora, rank, float(rank)) if kind == "quality" else tr.effect_params(lora)
    for p in params.values():
        p.data = p.data.float()
    opt = torch.optim.AdamW(list(params.values()), lr=1e-3)
    d = batch_data(cfg, (args.frames, args.height, args.width))[0]
    ctx = np.zeros((1, cfg.text_len, cfg.text_dim), np.float32)
    ctx[0, :24] = d["context"]
    dt = getattr(torch, dtype)
    cond, z0 = tr.cf(d["cond"][None]), tr.cf(d["alpha"][None])
    x = lambda z: torch.cat([z, cond], 1).to(dt)
    t, c, img = torch.tensor([500.0]), torch.from_numpy(ctx).to(dt), torch.from_numpy(d["clip"][None]).to(dt)

    def step():
        opt.zero_grad()
        noise = torch.randn_like(z0)
        z = 0.5 * z0 + 0.5 * noise
        if kind == "quality":
            v = tr.quality_velocity(model, x(z), t, c, img)
        else:
            v = tr.effect_velocity(model, params, 1.0, x(0.5 * tr.cf(d["bg"][None]) + 0.5 * noise), x(z), t, c, img)
        loss = torch.mean((v.float() - (noise - z0)) ** 2)
        loss.backward()
        opt.step()
        return float(loss.detach())

    step()
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        loss = step()
    return {"seconds": (time.perf_counter() - t0) / args.repeats, "peak_gb": None, "rss_gb": max_rss_gb(),
            "loss": loss}


def predict_peak(layers: int, tokens: int, kind: str, dtype: str, k: int | None = None,
                 attention_budget: int = 1 << 30) -> float:
    """Predicted peak bytes / GB of MLX expert training with per-block checkpointing."""
    cfg = config(layers)
    D, ffn, it = cfg.dim, cfg.ffn_dim, ITEMSIZE[dtype]
    per_block = 8 * D * D + 2 * D * ffn  # self q,k,v,o; cross q,k,v,o (+ image k, v below)
    weights = (layers * (per_block + 2 * D * D) + 4096 * D + D * D + 1280 * 1280 + 1280 * D + 6 * D * D) * it
    lora_blocks = layers if kind == "quality" else (k or max(1, layers // 3))
    lora = lora_blocks * 6 * 2 * D * RANK[kind] * 4 * 4  # param, grad, m, v (float32)
    saved = lora_blocks * tokens * D * 4
    kv = layers * 2 * tokens * D * it if kind == "effect" else 0
    keys = 2 * tokens if kind == "effect" else tokens
    # one block's recomputed forward and its backward: BLOCK_WIDTHS D-wide float32 and 3 FFN-wide
    # activations per token (BLOCK_WIDTHS fitted to a measured 2-layer 1.3B-width run, see the README)
    block = tokens * (BLOCK_WIDTHS * D * 4 + 3 * ffn * it) + min(attention_budget, cfg.num_heads * tokens * keys * (it + 4))
    ctx = 769 * D * 4 * 3
    return (weights + lora + saved + kv + block + ctx) / GB


def few_step(train_steps: int) -> None:
    """Tiny bundle and synthetic clips (the tests' builders): train both
    experts on 4 clips, validate on 2 held-out ones at 2, 4, 8, 50 steps."""
    import tempfile

    import mlx_omnimatte as mo
    from mlx_omnimatte.train.prepare import prepare
    from mlx_omnimatte.train.cache import LatentCache
    from mlx_omnimatte.train.trainer import TrainSettings, new_state, train, trained_expert
    from mlx_omnimatte.train.validate import ValidationSettings, validate
    from mlx_omnimatte import synth
    from tiny_models import TINY_CLIPS as CLIPS, tiny_bundle as make_bundle

    root = Path(tempfile.mkdtemp(prefix="fewstep-"))
    bundle = make_bundle(root)
    for name, count, seed in (("train", 4, 100), ("val", 2, 200)):
        synth.write_dataset(root / name, count, seed=seed, **CLIPS)
        prepare(bundle, root / name, root / f"cache-{name}", cache_dir=root / "prompts")
    model = mo.load_model(bundle / "transformer", "transformer", dtype="float32")
    vae = mo.load_model(bundle / "vae", "vae")
    data, held = LatentCache(root / "cache-train"), LatentCache(root / "cache-val")
    experts, untrained = {}, {}
    for kind in ("effect", "quality"):
        s = TrainSettings(kind=kind, rank=16, k=1, steps=train_steps, lr=1e-3).resolve(2)
        t0 = time.perf_counter()
        untrained[kind] = trained_expert(new_state(model, s), model, s)
        state = train(model, data, s)
        experts[kind] = trained_expert(state, model, s)
        print(f"{kind}: {train_steps} steps in {time.perf_counter() - t0:.0f} s, loss {np.mean(state.losses[:10]):.3f}"
              f" -> {np.mean(state.losses[-10:]):.3f}")
    print(f"{'experts':<16} {'shift':>5} {'tau':>4} {'steps':>5} {'latent MSE':>10} {'object MSE':>10} {'effect MSE':>10}")
    for label, kw, tau in (("effect+quality", experts, 0.5), ("quality only", {"quality": experts["quality"]}, 1.0),
                           ("untrained e+q", untrained, 0.5)):
        for shift in (5.0, 1.0):
            for steps in (2, 4, 8, 50):
                e = validate(model, held, ValidationSettings(steps=steps, shift=shift, tau=tau), vae=vae, **kw)
                print(f"{label:<16} {shift:>5.1f} {tau:>4.1f} {steps:>5} {e['latent_mse']:>10.4f} "
                      f"{e['object_mse']:>10.4f} {e['effect_mse']:>10.4f}")


def run_one(spec: str, args) -> dict:
    backend, kind, dtype = spec.split(":")
    return (bench_mlx if backend == "mlx" else bench_torch)(kind, dtype, args)


def main(argv=None):
    args = parse(argv)
    if args.few_step:
        few_step(args.few_step)
        return
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)))
        return
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    print(f"1.3B width, {args.layers} layers, latent {args.frames}x{args.height}x{args.width}: "
          f"{tokens} tokens per half; {args.repeats} timed step(s) after a warm-up")
    print(f"{'kind':<8} {'dtype':<9} {'backend':<6} {'s/step':>8} {'MLX peak GB':>11} {'max RSS GB':>10} "
          f"{'predicted GB':>12} {'torch/mlx':>9}")
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    for kind in args.kind or ["quality", "effect"]:
        for dtype in args.dtype or ["float32", "bfloat16"]:
            rows = {}
            for backend in args.backend or ["mlx", "torch"]:
                cmd = [sys.executable, __file__, *forwarded, "--one", f"{backend}:{kind}:{dtype}"]
                out = subprocess.run(cmd, capture_output=True, text=True)
                line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
                if line is None:
                    print(f"{kind:<8} {dtype:<9} {backend:<6} failed: {out.stderr.strip().splitlines()[-1:]}")
                    continue
                rows[backend] = json.loads(line[7:])
            for backend, r in rows.items():
                pred = predict_peak(args.layers, tokens, kind, dtype, args.layers) if backend == "mlx" else None
                ratio = rows["torch"]["seconds"] / rows["mlx"]["seconds"] if len(rows) == 2 and backend == "mlx" else None
                print(f"{kind:<8} {dtype:<9} {backend:<6} {r['seconds']:>8.2f} "
                      f"{r['peak_gb'] if r['peak_gb'] is not None else float('nan'):>11.2f} {r['rss_gb']:>10.2f} "
                      f"{pred if pred is not None else float('nan'):>12.2f} "
                      f"{ratio if ratio is not None else float('nan'):>9.2f}")
    print("\npredicted peak with per-block checkpointing, full 1.3B (30 layers), bf16 weights, batch 1:")
    for frames, h, w in ((49, 320, 576), (81, 480, 832)):
        n = ((frames - 1) // 4 + 1) * (h // 16) * (w // 16)
        print(f"  {frames}x{h}x{w} ({n} tokens per half): Quality {predict_peak(30, n, 'quality', 'bfloat16'):.1f} GB,"
              f" Effect K=10 {predict_peak(30, n, 'effect', 'bfloat16', 10):.1f} GB")


if __name__ == "__main__":
    main()
