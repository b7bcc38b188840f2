"""Quantized transformers against float32 diffusers, 1.3B width, 2 layers.

A random Fun-1.3B-InP-width DiT (diffusers, every parameter random) is
converted by `mlx-omnimatte convert` to float32, bfloat16, 8-bit and 4-bit
(group sizes 64 and 32); each MLX model runs the same inputs as diffusers in
float32. Printed per row: relative max and rms error of the velocity, bytes
of the converted weights, seconds per forward on this machine, and the
extrapolated size of the full 1.3B (30 blocks) and 14B (40 blocks) models,
counted from the converter's own rules (what is quantized, what stays
float32), checked against the measured bytes at 2 layers.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python parity/bench_quantize.py [--grid 4 32 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wan_reference import build_reference, make_inputs, reference_forward  # noqa: E402

from mlx_omnimatte.cli.main import main  # noqa: E402
from mlx_omnimatte.convert import transformer as dit_converter  # noqa: E402
from mlx_omnimatte.models.wan.transformer import PRESETS, Model  # noqa: E402
from mlx_omnimatte.weights import load_model  # noqa: E402

ROWS = {  # name -> convert flags, (bits, group size) or None
    "float32": (["--dtype", "float32"], None),
    "bfloat16": ([], None),
    "8-bit g64": (["--quantize", "8", "--group-size", "64"], (8, 64)),
    "4-bit g64": (["--quantize", "4", "--group-size", "64"], (4, 64)),
    "4-bit g32": (["--quantize", "4", "--group-size", "32"], (4, 32)),
}


def convert(src: Path, out: Path, flags: list[str]) -> None:
    try:
        main(["convert", str(src), "-o", str(out), *flags])
    except SystemExit as e:
        if e.code:
            raise


def predicted_bytes(cfg, name: str) -> int:
    """Bytes the converter writes for `cfg` in row `name` (no weights built)."""
    flags, q = ROWS[name]
    model = Model(cfg)  # parameters stay unevaluated: only shapes are read
    keep = [re.compile(p) for p in dit_converter.SPEC.keep_fp32]
    quantized = {f"{p}.weight" for p, m in model.named_modules()
                 if q and p and dit_converter.quantizable(p, m, q[1])}
    size = 4 if name == "float32" else 2
    total = 0
    for key, p in tree_flatten(model.parameters()):
        n = int(np.prod(p.shape))
        if key in quantized:
            total += n * q[0] // 8 + 2 * size * (n // q[1])  # packed weight + a scale and bias per group
        else:
            total += n * (4 if any(r.fullmatch(key) for r in keep) else size)
    return total


def seconds_per_forward(model, args, repeats: int) -> float:
    mx.eval(model(*args))  # warm-up (compiles the elementwise kernels)
    t = time.perf_counter()
    for _ in range(repeats):
        mx.eval(model(*args))
    return (time.perf_counter() - t) / repeats


def row(name: str, out: Path, inputs: dict, ref: np.ndarray, cfg, repeats: int) -> str:
    model = load_model(out)
    args = (mx.array(inputs["x"]), mx.array(inputs["t"]), mx.array(inputs["context"]), mx.array(inputs["clip_fea"]))
    y = np.array(model(*args), np.float64)
    d = y - ref
    rel_max = np.abs(d).max() / np.abs(ref).max()
    rel_rms = np.sqrt((d ** 2).mean() / (ref ** 2).mean())
    secs = seconds_per_forward(model, args, repeats)
    measured = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    pred = predicted_bytes(cfg, name)
    full = [predicted_bytes(replace(PRESETS[p], num_layers=n), name) / 1e9
            for p, n in (("fun-inp-1.3b", 30), ("i2v-14b", 40))]
    return (f"| {name} | {rel_max:.2e} | {rel_rms:.2e} | {measured / 1e6:.1f} MB (predicted {pred / 1e6:.1f}) "
            f"| {secs:.3f} | {full[0]:.2f} GB | {full[1]:.2f} GB |")


def run(grid, repeats: int) -> None:
    cfg = replace(PRESETS["fun-inp-1.3b"], num_layers=2)
    ref_model = build_reference(cfg, seed=1)
    inputs = make_inputs(cfg, *grid, t=(700.0,), seed=2)
    ref = reference_forward(ref_model, inputs).astype(np.float64)
    tokens = grid[0] * grid[1] * grid[2] // 4
    print(f"Fun-InP 1.3B width, 2 layers, {tokens} tokens, MLX {mx.__version__} on {mx.default_device()}; "
          "errors of the velocity against diffusers float32")
    print("| weights | rel max err | rel rms err | weight bytes | s / forward | full 1.3B | full 14B |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "dit"
        ref_model.save_pretrained(str(src), safe_serialization=True)
        del ref_model
        for name, (flags, _) in ROWS.items():
            out = Path(tmp) / name.replace(" ", "-")
            convert(src / "diffusion_pytorch_model.safetensors", out, flags + ["--overwrite"])
            print(row(name, out, inputs, ref, cfg, repeats), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", type=int, nargs=3, default=(4, 32, 40), metavar=("F", "H", "W"))
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    run(tuple(a.grid), a.repeats)
