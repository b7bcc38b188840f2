"""Wan2.1 DiT in MLX and its converter, without torch: tiny random models
written as original-layout safetensors with numpy."""

from __future__ import annotations

import json
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from safetensors.numpy import save_file

from mlx_omnimatte.convert.readers import Checkpoint, LazyTensor
from mlx_omnimatte.convert.transformer import detect
from mlx_omnimatte.models.wan.transformer import Config, Model, rope_tables, sdpa
from mlx_omnimatte.weights import load_model
from helpers import run_cli as cli

CFG = Config(dim=256, ffn_dim=384, num_heads=2, num_layers=3, in_dim=36, out_dim=16, text_dim=64,
             image_dim=64)


def original_state(cfg: Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights under the original Wan names (torch conv layout)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, p in tree_flatten(Model(cfg).parameters()):
        shape = p.shape
        if name == "patch_embedding.weight":  # MLX (O, kt, kh, kw, I) -> torch (O, I, kt, kh, kw)
            shape = (shape[0], shape[-1], *shape[1:-1])
        scale = 1 / np.sqrt(np.prod(shape[1:])) if len(shape) > 1 and "modulation" not in name else 0.1
        out[name] = (rng.standard_normal(shape) * scale).astype(np.float32)
    return out


def run_cli(*args) -> int:
    return cli(args)[0]


def expect_error(capsys, *args, contains=()):
    code = run_cli(*args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    for c in contains:
        assert c in err, err
    return err


@pytest.fixture
def ckpt(tmp_path):
    state = original_state(CFG)
    path = tmp_path / "casper.safetensors"
    save_file(state, str(path))
    return path, state


# --------------------------------------------------------------------------- converter


def test_infers_architecture_from_lone_safetensors(tmp_path, ckpt):
    path, state = ckpt
    out = tmp_path / "mlx"
    assert run_cli("convert", path, "-o", out, "--dtype", "float32") == 0
    cfg = json.loads((out / "config.json").read_text())
    want = {"dim": 256, "num_heads": 2, "num_layers": 3, "ffn_dim": 384, "in_dim": 36, "out_dim": 16,
            "text_dim": 64, "freq_dim": 256, "image_dim": 64, "patch_size": [1, 2, 2], "cross_attn_norm": True}
    assert {k: cfg[k] for k in want} == want
    assert cfg["component"] == "transformer" and cfg["source"]["source_format"] == "original"
    model = load_model(out)
    params = dict(tree_flatten(model.parameters()))
    assert set(params) == set(state)
    np.testing.assert_array_equal(np.array(params["patch_embedding.weight"]),
                                  state["patch_embedding.weight"].transpose(0, 2, 3, 4, 1))
    np.testing.assert_array_equal(np.array(params["blocks.2.cross_attn.k_img.weight"]),
                                  state["blocks.2.cross_attn.k_img.weight"])


def test_bf16_conversion_keeps_modulation_fp32(tmp_path, ckpt):
    path, _ = ckpt
    out = tmp_path / "mlx"
    assert run_cli("convert", path, "-o", out) == 0  # default dtype bfloat16
    model = load_model(out)
    blk = model.blocks[0]
    assert blk.self_attn.q.weight.dtype == mx.bfloat16 and blk.ffn[2].weight.dtype == mx.bfloat16
    assert blk.modulation.dtype == mx.float32 and model.head.modulation.dtype == mx.float32
    assert model.time_projection[1].weight.dtype == mx.float32
    x = mx.random.normal((1, 2, 4, 4, 36))
    y = model(x, mx.array([500.0]), mx.random.normal((1, 8, 64)), mx.random.normal((1, 257, 64)))
    assert y.dtype == mx.float32 and y.shape == (1, 2, 4, 4, 16)
    assert np.isfinite(np.array(y)).all()


def test_missing_block(tmp_path, capsys, ckpt):
    path, state = ckpt
    save_file({k: v for k, v in state.items() if not k.startswith("blocks.1.")}, str(path))
    out = tmp_path / "mlx"
    expect_error(capsys, "convert", path, "-o", out, contains=["blocks.1.", str(path)])
    assert not out.exists() and not list(tmp_path.glob(".mlx*"))


def test_missing_single_key(tmp_path, capsys, ckpt):
    path, state = ckpt
    del state["blocks.2.cross_attn.norm_k_img.weight"]
    save_file(state, str(path))
    expect_error(capsys, "convert", path, "-o", tmp_path / "mlx",
                 contains=["blocks.2.cross_attn.norm_k_img.weight"])
    assert not (tmp_path / "mlx").exists()


def test_conflicting_shapes(tmp_path, capsys, ckpt):
    path, state = ckpt
    state["blocks.1.ffn.0.weight"] = np.zeros((500, 256), np.float32)
    save_file(state, str(path))
    err = expect_error(capsys, "convert", path, "-o", tmp_path / "mlx", contains=["blocks.1.ffn.0.weight"])
    assert "(500, 256)" in err and "(384, 256)" in err
    assert not (tmp_path / "mlx").exists()


def test_config_json_conflict(tmp_path, capsys, ckpt):
    path, _ = ckpt
    (tmp_path / "config.json").write_text(json.dumps(
        {"_class_name": "WanModel", "dim": 512, "num_heads": 4, "num_layers": 3, "in_dim": 36, "model_type": "i2v"}))
    expect_error(capsys, "convert", path, "-o", tmp_path / "mlx", contains=["config.json", "dim"])


def test_config_json_heads(tmp_path, ckpt):
    """A config.json beside the weights overrides what shapes cannot tell (heads)."""
    path, _ = ckpt
    (tmp_path / "config.json").write_text(json.dumps(
        {"_class_name": "WanTransformer3DModel", "num_attention_heads": 4, "attention_head_dim": 64,
         "in_channels": 36, "out_channels": 16, "ffn_dim": 384, "num_layers": 3, "text_dim": 64,
         "image_dim": 64, "added_kv_proj_dim": 256}))
    assert run_cli("convert", path, "-o", tmp_path / "mlx") == 0
    cfg = json.loads((tmp_path / "mlx" / "config.json").read_text())
    assert cfg["num_heads"] == 4 and cfg["dim"] == 256


def test_lora_file_is_not_a_transformer(tmp_path, capsys):
    rng = np.random.default_rng(0)
    lora = {}
    for i in range(2):
        for m in ("q", "k", "v", "o"):
            lora[f"diffusion_model.blocks.{i}.self_attn.{m}.lora_A.weight"] = rng.standard_normal((8, 256), np.float32)
            lora[f"diffusion_model.blocks.{i}.self_attn.{m}.lora_B.weight"] = rng.standard_normal((256, 8), np.float32)
    path = tmp_path / "effect_lora.safetensors"
    save_file(lora, str(path))
    expect_error(capsys, "convert", path, "-o", tmp_path / "mlx", "--component", "transformer",
                 contains=["not a transformer checkpoint", str(path)])
    assert not (tmp_path / "mlx").exists()


def test_truncated_safetensors(tmp_path, capsys, ckpt):
    path, _ = ckpt
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4096])
    expect_error(capsys, "convert", path, "-o", tmp_path / "mlx", contains=["truncated", str(path)])
    assert not (tmp_path / "mlx").exists()


def _fake(keys):
    return Checkpoint({k: LazyTensor((1,), "F32", lambda: np.zeros(1, np.float32)) for k in keys}, "x", "safetensors")


def test_detect_formats():
    orig = ["patch_embedding.weight", "time_embedding.0.weight", "blocks.0.self_attn.q.weight"]
    diff = ["patch_embedding.weight", "condition_embedder.time_embedder.linear_1.weight", "blocks.0.attn1.to_q.weight"]
    assert detect(_fake(orig)) == "original"
    assert detect(_fake("model.diffusion_model." + k for k in orig)) == "original"
    assert detect(_fake("pipe.dit." + k for k in orig)) == "diffsynth"
    assert detect(_fake(diff)) == "diffusers"
    assert detect(_fake(orig + ["blocks.0.self_attn.q.lora_down.weight"])) is None
    assert detect(_fake(["encoder.conv1.weight", "decoder.conv1.weight", "conv1.weight"])) is None  # VAE
    assert detect(_fake(["visual.patch_embedding.weight", "visual.transformer.0.attn.in_proj_weight"])) is None
    assert detect(_fake(["token_embedding.weight", "blocks.0.attn.q.weight", "norm.weight"])) is None  # T5


# --------------------------------------------------------------------------- model pieces


@pytest.fixture(scope="module")
def small():
    cfg = replace(CFG, num_layers=2)
    mx.random.seed(3)
    model = Model(cfg)
    # random modulation/bias everywhere so no piece is a no-op
    model.update(tree_map(lambda p: p + 0.1 * mx.random.normal(p.shape), model.parameters()))
    rng = np.random.default_rng(4)
    inputs = (mx.array(rng.standard_normal((2, 2, 4, 6, 36)), mx.float32), mx.array([900.0, 100.0]),
              mx.array(rng.standard_normal((2, 10, 64)), mx.float32),
              mx.array(rng.standard_normal((2, 257, 64)), mx.float32))
    return model, inputs


def test_context_is_zero_padded_inside(small):
    model, (x, t, ctx, clip) = small
    padded = mx.concatenate([ctx, mx.zeros((2, 502, 64))], axis=1)
    a, b = model(x, t, ctx, clip), model(x, t, padded, clip)
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)
    with pytest.raises(ValueError):
        model(x, t, mx.zeros((2, 513, 64)), clip)
    with pytest.raises(ValueError):
        model(x, t, ctx)  # image model without clip_fea


def test_pieces_over_2n_tokens(small):
    """The branch machinery's use: both halves with the same RoPE tables and a
    block-diagonal attn_fn give back the single-pass output on each half."""
    model, (x, t, ctx, clip) = small
    ref = model(x, t, ctx, clip)
    tokens, grid = model.patchify(x)
    n = tokens.shape[1]
    assert grid == (2, 2, 3) and n == 12
    temb, e6 = model.embed_time(t)
    c = model.embed_context(ctx, clip)
    cos, sin = model.rope(grid)
    assert cos.shape == (n, model.config.head_dim // 2) and cos.dtype == mx.float32
    rope2 = (mx.concatenate([cos, cos]), mx.concatenate([sin, sin]))
    seen = []

    def block_diagonal(q, k, v):
        seen.append(q.shape)
        return mx.concatenate([sdpa(q[:, :, :n], k[:, :, :n], v[:, :, :n]),
                               sdpa(q[:, :, n:], k[:, :, n:], v[:, :, n:])], axis=2)

    h = mx.concatenate([tokens, tokens], axis=1)
    for block in model.blocks:
        h = block(h, e6, c, rope2, attn_fn=block_diagonal)
    y = model.head(h, temb)
    assert seen == [(2, 2, 2 * n, 128)] * 2
    for half in (y[:, :n], y[:, n:]):
        np.testing.assert_allclose(np.array(model.unpatchify(half, grid)), np.array(ref), atol=1e-5)
    # the same hook through __call__
    seen.clear()
    y = model(x, t, ctx, clip, attn_fn=lambda q, k, v: (seen.append(q.shape), sdpa(q, k, v))[1])
    assert seen == [(2, 2, n, 128)] * 2
    np.testing.assert_array_equal(np.array(y), np.array(ref))


def test_projection_can_be_wrapped(small):
    model, (x, t, ctx, clip) = small
    ref = model(x, t, ctx, clip)

    class Shifted(nn.Module):  # what a LoRA wrapper looks like to the block
        def __init__(self, base):
            super().__init__()
            self.base = base

        def __call__(self, h):
            return self.base(h) + 1.0

    blk = model.blocks[1]
    orig = blk.self_attn.o
    blk.self_attn.o = Shifted(orig)
    try:
        moved = model(x, t, ctx, clip)
    finally:
        blk.self_attn.o = orig
    assert float(mx.abs(moved - ref).max()) > 1e-3
    np.testing.assert_array_equal(np.array(model(x, t, ctx, clip)), np.array(ref))


def test_rope_tables_match_definition():
    cos, sin = rope_tables((3, 4, 5), 128)
    # token (f=2, h=1, w=3); pair 0 is t (theta^0), pair 22 is h's first, pair 43 w's first
    i = 2 * 20 + 1 * 5 + 3
    np.testing.assert_allclose(np.array(cos[i, [0, 22, 43]]), np.cos([2.0, 1.0, 3.0]), rtol=1e-6)
    np.testing.assert_allclose(float(sin[i, 1]), np.sin(2 * 10000 ** (-2 / 44)), rtol=1e-6)
    np.testing.assert_allclose(float(sin[i, 23]), np.sin(1 * 10000 ** (-2 / 42)), rtol=1e-6)


def test_scalar_timestep_broadcasts(small):
    model, (x, t, ctx, clip) = small
    a = model(x, 900.0, ctx, clip)
    b = model(x, mx.array([900.0, 900.0]), ctx, clip)
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-6)
