"""UMT5 encoder and its converter, torch-free: tiny random weights written in
the Hugging Face (safetensors) and Wan (.pth zip pickle) layouts."""

import json

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file

from ckpt_utils import save_torch_zip
from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.models import t5
from mlx_omnimatte.encoders.text import load_text_encoder
from mlx_omnimatte.weights import load_model
from helpers import invoke, run_cli
from encoder_utils import hf_weights, make_tokenizer, to_wan

CFG = dict(vocab_size=300, d_model=64, d_kv=16, d_ff=96, num_heads=4, num_layers=2)


def convert(*args):
    return invoke(["convert", *args])


@pytest.fixture
def hf_src(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    save_file(hf_weights(), str(d / "model.safetensors"))
    make_tokenizer(d)
    return d / "model.safetensors"


@pytest.fixture
def wan_src(tmp_path):
    d = tmp_path / "wan"
    d.mkdir()
    save_torch_zip(d / "models_t5_umt5-xxl-enc-bf16.pth", to_wan(hf_weights()))
    make_tokenizer(d / "google" / "umt5-xxl")
    return d / "models_t5_umt5-xxl-enc-bf16.pth"


def ids_mask(lengths, total, vocab=300, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (len(lengths), total)).astype(np.int32)
    mask = (np.arange(total)[None] < np.array(lengths)[:, None]).astype(np.int32)
    return mx.array(np.where(mask, ids, 0)), mx.array(mask)


# --------------------------------------------------------------------------- model


def test_relative_buckets_known_values():
    b = t5.relative_buckets(3, 32, 128)
    np.testing.assert_array_equal(b, [[0, 17, 18], [1, 0, 17], [2, 1, 0]])
    far = t5.relative_buckets(400, 32, 128)
    # exact up to 7, then log-spaced; 8 starts the log range, >=128 shares the last bucket
    assert far[0, 7] == 16 + 7 and far[0, 8] == 16 + 8 and far[0, 399] == 31 and far[399, 0] == 15
    assert far[0, 20] == 16 + 10 and far[0, 50] == 16 + 13 and far[20, 0] == 10 and far[0, 128] == 31
    assert np.all(np.diff(far[0, :200]) >= 0)


def test_padding_does_not_change_prompt_rows():
    model = t5.Model(t5.Config(**CFG))
    ids, mask = ids_mask([7, 20], 20)
    out = model(ids, mask)
    assert out.shape == (2, 20, 64) and out.dtype == mx.float32
    # other pad ids and a longer padding leave the first 7 rows as they are
    ids2 = mx.concatenate([ids, mx.full((2, 9), 5)], axis=1)
    mask2 = mx.concatenate([mask, mx.zeros((2, 9), mx.int32)], axis=1)
    out2 = model(ids2, mask2)
    assert mx.abs(out2[0, :7] - out[0, :7]).max().item() < 1e-5
    # while an unmasked key does change them
    mask3 = mx.array(np.where(np.arange(29) < 8, 1, 0)[None].repeat(2, 0).astype(np.int32))
    assert mx.abs(model(ids2, mask3)[0, :7] - out[0, :7]).max().item() > 1e-3


def _np_reference(model, ids, mask):
    """One-layer UMT5 in numpy, written from the T5 definition: RMS norm, no
    q.k scaling, per-layer relative bias, gated tanh-GELU."""
    p = {k: np.array(v, np.float64) for k, v in __import__("mlx.utils").utils.tree_flatten(model.parameters())}

    def rms(x, w):
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * w

    x = p["token_embedding.weight"][ids]
    L, H = ids.shape[1], model.config.num_heads
    h = rms(x, p["blocks.0.norm1.weight"])
    q, k, v = (h @ p[f"blocks.0.attn.{n}.weight"].T for n in "qkv")
    q, k, v = (a.reshape(1, L, H, -1).transpose(0, 2, 1, 3) for a in (q, k, v))
    bias = p["blocks.0.pos_embedding.embedding.weight"][t5.relative_buckets(L, 32, 128)].transpose(2, 0, 1)
    s = q @ k.transpose(0, 1, 3, 2) + bias + np.where(mask[:, None, None, :] > 0, 0, -1e9)
    s = np.exp(s - s.max(-1, keepdims=True))
    a = (s / s.sum(-1, keepdims=True)) @ v
    x = x + a.transpose(0, 2, 1, 3).reshape(1, L, -1) @ p["blocks.0.attn.o.weight"].T
    h = rms(x, p["blocks.0.norm2.weight"])
    g = h @ p["blocks.0.ffn.gate.weight"].T
    g = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
    x = x + (g * (h @ p["blocks.0.ffn.fc1.weight"].T)) @ p["blocks.0.ffn.fc2.weight"].T
    return rms(x, p["norm.weight"])


def test_matches_numpy_reference():
    model = t5.Model(t5.Config(**{**CFG, "num_layers": 1}))
    model.blocks[0].pos_embedding.embedding.weight = mx.random.normal((32, 4), key=mx.random.key(1)) * 3
    ids, mask = ids_mask([150], 160)
    ref = _np_reference(model, np.array(ids), np.array(mask))
    out = np.array(model(ids, mask))
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


# --------------------------------------------------------------------------- converter


def test_convert_hf_and_wan_layouts_agree(hf_src, wan_src, tmp_path):
    r1 = convert(hf_src, "-o", tmp_path / "a", "--dtype", "float32")
    r2 = convert(wan_src, "-o", tmp_path / "b", "--dtype", "float32")
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert {k: cfg[k] for k in CFG} == CFG and cfg["component"] == "t5" and cfg["num_buckets"] == 32
    assert json.loads((tmp_path / "b" / "config.json").read_text())["source"]["source_format"] == "wan"
    assert (tmp_path / "b" / "tokenizer" / "tokenizer.json").is_file()
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    ids, mask = ids_mask([12, 30], 30)
    oa, ob = a(ids, mask), b(ids, mask)
    assert mx.array_equal(oa, ob)
    # the weights landed where the HF names say: rebuild by hand and compare
    w = hf_weights()
    ref = t5.Model(t5.Config(**CFG))
    ref.token_embedding.weight = mx.array(w["shared.weight"])
    ref.norm.weight = mx.array(w["encoder.final_layer_norm.weight"])
    for i, blk in enumerate(ref.blocks):
        p = f"encoder.block.{i}.layer."
        for n in "qkvo":
            setattr(getattr(blk.attn, n), "weight", mx.array(w[f"{p}0.SelfAttention.{n}.weight"]))
        blk.pos_embedding.embedding.weight = mx.array(w[f"{p}0.SelfAttention.relative_attention_bias.weight"])
        blk.norm1.weight = mx.array(w[f"{p}0.layer_norm.weight"])
        blk.norm2.weight = mx.array(w[f"{p}1.layer_norm.weight"])
        blk.ffn.gate.weight = mx.array(w[f"{p}1.DenseReluDense.wi_0.weight"])
        blk.ffn.fc1.weight = mx.array(w[f"{p}1.DenseReluDense.wi_1.weight"])
        blk.ffn.fc2.weight = mx.array(w[f"{p}1.DenseReluDense.wo.weight"])
    assert mx.array_equal(ref(ids, mask), oa)


def test_convert_tied_embedding_and_decoder_keys(tmp_path):
    w = hf_weights()
    w["encoder.embed_tokens.weight"] = w["shared.weight"]
    w["decoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((4, 4), np.float32)
    w["lm_head.weight"] = np.zeros((4, 4), np.float32)
    d = tmp_path / "src"
    d.mkdir()
    save_file(w, str(d / "model.safetensors"))
    make_tokenizer(d)
    res = convert(d / "model.safetensors", "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert "ignored 2 keys" in res.output
    model = load_model(tmp_path / "out")
    assert model.blocks[0].attn.q.weight.dtype == mx.bfloat16
    assert model.blocks[0].pos_embedding.embedding.weight.dtype == mx.float32  # kept exact


def test_missing_tokenizer_is_one_line_error(tmp_path, capsys):
    d = tmp_path / "src"
    d.mkdir()
    save_file(hf_weights(), str(d / "model.safetensors"))
    code = run_cli(["convert", str(d / "model.safetensors"), "-o", str(tmp_path / "out")])[0]
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "tokenizer.json" in err and "MLX_OMNIMATTE_T5_TOKENIZER" in err
    assert not (tmp_path / "out").exists()


def test_tokenizer_env_override(tmp_path, monkeypatch):
    d = tmp_path / "src"
    d.mkdir()
    save_file(hf_weights(), str(d / "model.safetensors"))
    make_tokenizer(tmp_path / "elsewhere")
    monkeypatch.setenv("MLX_OMNIMATTE_T5_TOKENIZER", str(tmp_path / "elsewhere" / "tokenizer.json"))
    assert convert(d / "model.safetensors", "-o", tmp_path / "out").exit_code == 0
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").is_file()


def test_t5_v11_shared_bias_rejected(tmp_path, capsys):
    w = hf_weights()
    del w["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"]
    d = tmp_path / "src"
    d.mkdir()
    save_file(w, str(d / "model.safetensors"))
    make_tokenizer(d)
    code = run_cli(["convert", str(d / "model.safetensors"), "-o", str(tmp_path / "out")])[0]
    assert code == 2 and "not UMT5" in capsys.readouterr().err


# toy weights amplify error (bf16 alone: 2e-2 here); XXL-width numbers are in parity/
@pytest.mark.parametrize("bits,tol", [(8, 0.15), (4, 0.6)])
def test_quantized_conversion(hf_src, tmp_path, bits, tol):
    from mlx_omnimatte.convert.core import convert as run_convert, detect
    from mlx_omnimatte.convert.readers import read_checkpoint
    from mlx_omnimatte.convert.writer import write_converted

    ckpt = read_checkpoint(hf_src)
    spec, fmt = detect(ckpt)
    assert spec.component == "t5" and fmt == "hf"
    write_converted(tmp_path / "full", run_convert(ckpt, spec, fmt, "float32"), {})
    write_converted(tmp_path / "q", run_convert(ckpt, spec, fmt, "bfloat16", quantize=bits), {})
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"] == {"bits": bits, "group_size": 64}
    full, q = load_model(tmp_path / "full"), load_model(tmp_path / "q")
    assert isinstance(q.blocks[0].ffn.fc1, __import__("mlx.nn").nn.QuantizedLinear)
    ids, mask = ids_mask([25], 25)
    ref = full(ids, mask)
    err = (mx.abs(q(ids, mask) - ref).max() / mx.abs(ref).max()).item()
    assert 0 < err < tol
    with pytest.raises(OmnimatteError, match="requantize"):
        load_text_encoder(tmp_path / "q", quantize=12 - bits)


def test_quantize_rejects_other_bits():
    with pytest.raises(OmnimatteError, match="3 bits"):
        t5.quantize(t5.Model(t5.Config(**CFG)), 3)
