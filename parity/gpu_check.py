"""The Python side of scripts/gpu_check.sh (run that, not this).

    python parity/gpu_check.py mode                      # gpu | cpu: where this run goes
    python parity/gpu_check.py meta OUT.json             # machine, libraries, devices
    python parity/gpu_check.py branch --layers 30 --grid 21x60x104 --dtype bfloat16
    python parity/gpu_check.py fixtures OUT_DIR --device cuda
    python parity/gpu_check.py summary RESULTS_DIR       # results.json from the steps' records

`branch`: one dual-branch forward (2 x tokens, LoRA on the replica half) of
the Fun-InP-1.3B architecture with random weights and random experts, for
the Effect expert (rank 128 on the last 10 blocks, mask B) and the Quality
expert (rank 64 on all blocks, mask C), after one warm-up each.

`fixtures`: parity/make_fixtures.py's reference written into OUT_DIR on the
given torch device, and its output compared with the committed CPU fixture.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "parity"))

from mlx_omnimatte.branch.experts import Expert, LoRA  # noqa: E402
from mlx_omnimatte.branch.forward import branch_forward  # noqa: E402
from mlx_omnimatte.models.base import DTYPES  # noqa: E402
from mlx_omnimatte.models.wan import transformer as wan  # noqa: E402

EXPERTS = {"effect": (128, "B", 10), "quality": (64, "C", None)}  # rank, mask, last K blocks (None: all)
TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o")


def torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def mlx_cuda() -> bool:
    """MLX's default device is a GPU of its CUDA backend (not Metal)."""
    if mx.default_device().type != mx.DeviceType.gpu:
        return False
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and hasattr(cuda, "is_available"):
        return bool(cuda.is_available())
    metal = getattr(mx, "metal", None)
    return not (metal is not None and metal.is_available())


def mode() -> str:
    """gpu when MLX runs on its CUDA backend and torch sees CUDA; else cpu (the tiny run)."""
    return "gpu" if mlx_cuda() and torch_cuda() else "cpu"


def meta() -> dict:
    out = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": socket.gethostname(),
           "platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
           "mlx": mx.__version__, "mlx_device": str(mx.default_device()), "mode": mode(),
           "ld_preload": os.environ.get("LD_PRELOAD", "")}
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip()
    except OSError:
        pass
    try:
        import torch

        out["torch"] = torch.__version__
        out["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
            out["gpu_memory_gb"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    except ImportError:
        out["torch"] = None
    return out


def random_expert(kind: str, cfg, seed: int) -> Expert:
    rank, mask, k = EXPERTS[kind]
    blocks = range(cfg.num_layers - min(k, cfg.num_layers) if k else 0, cfg.num_layers)
    key = mx.random.key(seed)
    lora = {}
    for i in blocks:
        for target in TARGETS:
            key, ka, kb = mx.random.split(key, 3)
            lora[f"blocks.{i}.{target}"] = LoRA(mx.random.normal((rank, cfg.dim), key=ka) * 0.01,
                                                mx.random.normal((cfg.dim, rank), key=kb) * 0.01)
    return Expert(kind, lora, rank, float(rank), cfg.dim, cfg.num_layers, mask, k)


def branch(args) -> dict:
    f, h, w = (int(v) for v in args.grid.split("x"))
    cfg = replace(wan.PRESETS["fun-inp-1.3b"], num_layers=args.layers)
    model = wan.Model(cfg)
    model.set_dtype(DTYPES[args.dtype])
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((1, f, 2 * h, 2 * w, cfg.in_dim)).astype(np.float32))
    cond = x[..., 16:]
    context = mx.array(rng.standard_normal((1, 24, cfg.text_dim)).astype(np.float32))
    clip = mx.array(rng.standard_normal((1, 257, cfg.image_dim)).astype(np.float32))
    mx.eval(model.parameters())
    ctx = model.embed_context(context.astype(DTYPES[args.dtype]), clip.astype(DTYPES[args.dtype]))
    out = {"layers": args.layers, "grid": [f, h, w], "tokens": 2 * f * h * w, "dtype": args.dtype,
           "device": str(mx.default_device())}
    for i, kind in enumerate(EXPERTS):
        expert = random_expert(kind, cfg, i)
        expert.lora = {k: LoRA(v.a.astype(DTYPES[args.dtype]), v.b.astype(DTYPES[args.dtype])) for k, v in
                       expert.lora.items()}

        def run():
            v_bg, v_alpha = branch_forward(model, expert, x[..., :16], x[..., :16], mx.array([700.0]), cond=cond,
                                           ctx=ctx)
            mx.eval(v_bg, v_alpha)
            return v_bg, v_alpha

        run()
        mx.synchronize()
        mx.reset_peak_memory()
        start = time.perf_counter()
        v_bg, v_alpha = run()
        seconds = time.perf_counter() - start
        finite = bool(mx.all(mx.isfinite(v_bg)).item() and mx.all(mx.isfinite(v_alpha)).item())
        out[kind] = {"seconds": seconds, "peak_gb": mx.get_peak_memory() / 2**30, "finite": finite,
                     "rank": expert.rank, "mask": expert.mask_type, "blocks": len(expert.blocks)}
        print(f"{kind}: dual-branch forward {seconds:.2f} s, peak {out[kind]['peak_gb']:.2f} GB, "
              f"{out['tokens']} tokens, {args.layers} blocks, {args.dtype}, finite {finite}", flush=True)
        if not finite:
            raise SystemExit(f"{kind}: the dual-branch forward is not finite")
    return out


def fixtures(args) -> dict:
    import make_fixtures

    out = Path(args.out)
    import torch

    torch.set_grad_enabled(False)
    make_fixtures.main(out, args.device)
    got = np.load(out / "inputs.npz")["output"]
    want = np.load(make_fixtures.OUT / "inputs.npz")["output"]
    diff = float(np.abs(got - want).max())
    scale = float(np.abs(want).max())
    res = {"device": args.device, "max_abs_diff_vs_cpu_fixture": diff, "max_abs_ref": scale,
           "within_bound": diff <= 1e-4 * scale}
    print(f"fixture on {args.device}: max|out - committed CPU fixture| = {diff:.2e} (bound {1e-4 * scale:.2e})")
    return res


def summary(folder: Path) -> dict:
    """results.json: the metadata, each step's record and its figures."""
    steps = []
    for line in (folder / "steps.txt").read_text().splitlines():
        name, rc, seconds = line.split()
        steps.append({"step": name, "rc": int(rc.split("=")[1]), "seconds": int(seconds.split("=")[1]),
                      "log": f"{name}.txt"})
    figures = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))
               if p.name not in ("results.json", "meta.json")}
    res = {"meta": json.loads((folder / "meta.json").read_text()), "steps": steps, "figures": figures,
           "ok": all(s["rc"] == 0 for s in steps)}
    (folder / "results.json").write_text(json.dumps(res, indent=1))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("mode")
    m = sub.add_parser("meta")
    m.add_argument("out")
    b = sub.add_parser("branch")
    b.add_argument("--layers", type=int, default=30)
    b.add_argument("--grid", default="21x30x52", help="token grid FxHxW of one half")
    b.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    b.add_argument("--json", default=None)
    f = sub.add_parser("fixtures")
    f.add_argument("out")
    f.add_argument("--device", default="cpu")
    f.add_argument("--json", default=None)
    s = sub.add_parser("summary")
    s.add_argument("folder", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "mode":
        print(mode())
    elif args.cmd == "meta":
        Path(args.out).write_text(json.dumps(meta(), indent=1))
    elif args.cmd == "summary":
        res = summary(args.folder)
        print(f"{args.folder}/results.json: {sum(s['rc'] == 0 for s in res['steps'])}/{len(res['steps'])} steps "
              f"passed")
        if not res["ok"]:
            raise SystemExit(1)
    else:
        res = branch(args) if args.cmd == "branch" else fixtures(args)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
