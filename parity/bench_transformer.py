"""Seconds per forward and peak memory of the Wan2.1 DiT: MLX vs diffusers,
same machine, same dtype, same architecture and token grid (random weights).

    python parity/bench_transformer.py --dim 1.3b --layers 2 --frames 4 --height 32 --width 48
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python parity/bench_transformer.py

Each backend runs in its own subprocess so that peak memory is its own: MLX
reports `mx.get_peak_memory()` (reset before the timed forwards) and the
process's max RSS; torch reports max RSS. Frames/height/width are latent sizes
(tokens = frames * height/2 * width/2).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np

PRESETS = {"1.3b": "fun-inp-1.3b", "14b": "i2v-14b", "1.3b-t2v": "t2v-1.3b", "14b-t2v": "t2v-14b"}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", default="1.3b", choices=sorted(PRESETS), help="width preset (1.3b = Fun-InP-1.3B)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--width", type=int, default=48)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=2, help="timed forwards after one warm-up")
    p.add_argument("--backend", default="both", choices=["both", "mlx", "torch"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="torch's device (auto: cuda when torch sees one); MLX runs on its default device")
    return p.parse_args(argv)


def config(args):
    from mlx_omnimatte.models.wan.transformer import PRESETS as CFGS

    return replace(CFGS[PRESETS[args.dim]], num_layers=args.layers)


def inputs(cfg, args):
    rng = np.random.default_rng(0)
    ctx = np.zeros((1, cfg.text_len, cfg.text_dim), np.float32)
    ctx[:, :24] = rng.standard_normal((1, 24, cfg.text_dim))
    d = {"x": rng.standard_normal((1, args.frames, args.height, args.width, cfg.in_dim)).astype(np.float32),
         "t": np.array([700.0], np.float32), "context": ctx}
    if cfg.image_dim:
        d["clip_fea"] = rng.standard_normal((1, 257, cfg.image_dim)).astype(np.float32)
    return d


def max_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def bench_mlx(args) -> dict:
    import mlx.core as mx

    from mlx_omnimatte.models.wan.transformer import Model

    cfg = config(args)
    model = Model(cfg)
    model.set_dtype(getattr(mx, args.dtype))
    mx.eval(model.parameters())
    d = inputs(cfg, args)
    a = [mx.array(d["x"]).astype(getattr(mx, args.dtype)), mx.array(d["t"]), mx.array(d["context"]),
         mx.array(d["clip_fea"]) if "clip_fea" in d else None]
    mx.eval(model(*a))  # warm-up (compiles the elementwise kernels)
    mx.reset_peak_memory()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        mx.eval(model(*a))
        times.append(time.perf_counter() - t0)
    return {"backend": "mlx", "device": str(mx.default_device()), "s_per_forward": min(times), "times": times,
            "peak_gb": mx.get_peak_memory() / 2**30, "max_rss_gb": max_rss_gb()}


def bench_torch(args) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(__file__))
    from wan_reference import diffusers_kwargs
    from diffusers import WanTransformer3DModel

    cfg = config(args)
    dtype = getattr(torch, args.dtype)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        model = WanTransformer3DModel(**diffusers_kwargs(cfg)).eval().to(dtype)
        keep = model._keep_in_fp32_modules  # what from_pretrained(torch_dtype=...) keeps in fp32
        for name, mod in model.named_modules():
            if any(k in name.split(".") for k in keep):
                mod.float()
        model.to(device)
        d = inputs(cfg, args)
        x = torch.from_numpy(d["x"]).permute(0, 4, 1, 2, 3).to(device, dtype)
        ctx = torch.from_numpy(d["context"]).to(device, dtype)
        img = torch.from_numpy(d["clip_fea"]).to(device, dtype) if "clip_fea" in d else None
        t = torch.from_numpy(d["t"]).to(device)
        model(x, t, ctx, img, return_dict=False)
        sync()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model(x, t, ctx, img, return_dict=False)
            sync()
            times.append(time.perf_counter() - t0)
    r = {"backend": "torch", "device": device, "threads": torch.get_num_threads(), "s_per_forward": min(times),
         "times": times, "max_rss_gb": max_rss_gb()}
    if device == "cuda":
        r["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return r


def main(argv=None):
    args = parse(argv)
    cfg = config(args)
    tokens = args.frames * (args.height // cfg.patch_size[1]) * (args.width // cfg.patch_size[2])
    if args.backend != "both":
        res = bench_mlx(args) if args.backend == "mlx" else bench_torch(args)
        print("RESULT " + json.dumps(res))
        return
    print(f"dim {cfg.dim}, heads {cfg.num_heads}, ffn {cfg.ffn_dim}, layers {cfg.num_layers}, in {cfg.in_dim}, "
          f"grid {args.frames}x{args.height}x{args.width} -> {tokens} tokens, {args.dtype}, "
          f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}, load {os.getloadavg()[0]:.2f}")
    for backend in ("mlx", "torch"):
        cmd = [sys.executable, __file__, "--backend", backend] + [
            f"--{k}={v}" for k, v in vars(args).items() if k != "backend"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            print(f"{backend}: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(line[0][7:])
        mem = f"peak {r['peak_gb']:.2f} GB ({backend} device), " if "peak_gb" in r else ""
        print(f"{backend:6s} on {r.get('device', 'cpu')}: {r['s_per_forward']:.2f} s/forward (runs {', '.join(f'{t:.2f}' for t in r['times'])}); "
              f"{mem}max RSS {r['max_rss_gb']:.2f} GB")


if __name__ == "__main__":
    main()
