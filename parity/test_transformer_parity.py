"""Wan2.1 DiT parity: MLX against diffusers `WanTransformer3DModel`, float32.

Every parameter is random (also those diffusers initializes to 0 or 1). The
weights reach MLX only through the real path: written by torch in each source
key layout (original, diffusers, diffsynth) as .safetensors and as .pth,
converted by the `mlx-omnimatte convert` CLI, loaded with `load_model`.
Bound: max|mlx - ref| <= 1e-4 * max|ref|.

    pytest parity/test_transformer_parity.py -m "not slow" -s   # tiny configs
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        pytest parity/test_transformer_parity.py -m slow -s       # 1.3B width
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mlx.core as mx  # noqa: E402
from wan_reference import (  # noqa: E402
    FILE_TYPES, FORMATS, build_reference, load_bf16_reference, make_inputs, reference_forward, write_format)

from helpers import rel_err, run_cli  # noqa: E402
from mlx_omnimatte.models.wan.transformer import PRESETS, Config  # noqa: E402
from mlx_omnimatte.weights import load_model  # noqa: E402

pytestmark = pytest.mark.torch

BOUND = 1e-4
TINY = {
    "i2v": Config(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=36, image_dim=1280),
    "t2v": Config(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=16),
}
# Fun-InP-1.3B width, 2 layers, 4 x 32 x 40 latent -> 1280 tokens
WIDE = replace(PRESETS["fun-inp-1.3b"], num_layers=2)
WIDE_GRID = (4, 32, 40)


def convert_cli(src, out, dtype="float32"):
    assert run_cli(["convert", str(src), "-o", str(out), "--dtype", dtype])[0] == 0
    return json.loads((out / "config.json").read_text())


def mlx_forward(model, inputs) -> np.ndarray:
    clip = mx.array(inputs["clip_fea"]) if "clip_fea" in inputs else None
    y = model(mx.array(inputs["x"]), mx.array(inputs["t"]), mx.array(inputs["context"]), clip)
    return np.array(y.astype(mx.float32))



class Case:
    """A random reference model, its inputs and output, and checkpoint files
    written on demand (one folder per layout and file type)."""

    def __init__(self, cfg, grid, folder, batch, t):
        self.cfg, self.folder = cfg, folder
        self.model = build_reference(cfg, seed=1)
        self.inputs = make_inputs(cfg, *grid, batch=batch, t=t, seed=2)
        self.ref = reference_forward(self.model, self.inputs)
        # outputs O(1) and not degenerate
        assert 0.3 < np.abs(self.ref).max() < 30 and self.ref.std() > 0.1

    def check(self, fmt, file_type, dtype="float32"):
        src = write_format(self.model, self.folder, fmt, file_type)
        out = self.folder / f"mlx-{fmt}-{file_type}-{dtype}"
        config = convert_cli(src, out, dtype)
        assert config["source"]["source_format"] == fmt
        assert config["dim"] == self.cfg.dim and config["num_heads"] == self.cfg.num_heads
        assert config["image_dim"] == self.cfg.image_dim and config["in_dim"] == self.cfg.in_dim
        y = mlx_forward(load_model(out, component="transformer"), self.inputs)
        if fmt != "diffusers" or file_type != "safetensors":  # keep the save_pretrained folder (bf16 test)
            shutil.rmtree(src.parent)
        shutil.rmtree(out)
        return y


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cases = {}

    def get(kind):
        if kind not in cases:
            cases[kind] = Case(TINY[kind], (3, 8, 12), tmp_path_factory.mktemp(f"tiny-{kind}"), batch=2,
                               t=(700.0, 250.0))
        return cases[kind]

    return get


@pytest.mark.parametrize("file_type", FILE_TYPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["i2v", "t2v"])
def test_tiny_parity(tiny, kind, fmt, file_type):
    case = tiny(kind)
    err = rel_err(case.check(fmt, file_type), case.ref)
    print(f"\ntiny {kind} {fmt} {file_type}: max|mlx-ref|/max|ref| = {err:.2e}")
    assert err <= BOUND


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return Case(WIDE, WIDE_GRID, tmp_path_factory.mktemp("wide"), batch=1, t=(700.0,))


@pytest.mark.slow
@pytest.mark.parametrize("file_type", FILE_TYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_wide_parity(wide, fmt, file_type):
    tokens = WIDE_GRID[0] * WIDE_GRID[1] // 2 * WIDE_GRID[2] // 2
    assert 1000 <= tokens <= 1600
    err = rel_err(wide.check(fmt, file_type), wide.ref)
    print(f"\n1.3B-width 2 layers {tokens} tokens {fmt} {file_type}: max|mlx-ref|/max|ref| = {err:.2e}")
    assert err <= BOUND


@pytest.mark.slow
def test_wide_bf16(wide):
    """MLX with bfloat16 weights stays within 3x of diffusers' own bf16-vs-fp32
    error (diffusers bf16 via from_pretrained(torch_dtype=bfloat16), CPU)."""
    src = write_format(wide.model, wide.folder, "diffusers", "safetensors")  # save_pretrained folder
    ref16 = reference_forward(load_bf16_reference(src.parent), wide.inputs, dtype=torch.bfloat16)
    out = wide.folder / "mlx-bf16"
    convert_cli(src.parent, out, "bfloat16")
    model = load_model(out)
    blk = model.blocks[0]
    assert blk.self_attn.q.weight.dtype == mx.bfloat16 and blk.ffn[0].weight.dtype == mx.bfloat16
    assert blk.modulation.dtype == mx.float32  # kept float32 by the converter
    y16 = mlx_forward(model, wide.inputs)
    err_ref, err_mlx = rel_err(ref16, wide.ref), rel_err(y16, wide.ref)
    print(f"\nbf16 vs fp32 reference: diffusers bf16 {err_ref:.2e}, mlx bf16 {err_mlx:.2e} (of max|ref|)")
    assert err_mlx <= 3 * err_ref
