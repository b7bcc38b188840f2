"""`--quantize 4|8` for the transformer (and whole bundles): block linears
stored quantized, the rest as converted; the loader rebuilds the quantized
layers, the branch experts run on them."""

import json
import re

import mlx.core as mx
import mlx.nn as nn
import pytest
from safetensors.numpy import save_file

from branch_utils import convert_expert, inputs
from helpers import rel_err, run_cli
from mlx_omnimatte.branch import branch_forward
from mlx_omnimatte.weights import load_model, load_weights
from tiny_models import dit_state, lora_state, write_fun_folder

BLOCK_LINEAR = re.compile(r"blocks\.\d+\.(?:self_attn\.[qkvo]|cross_attn\.(?:[qkvo]|k_img|v_img)|ffn\.[02])"
                          r"\.(?:weight|scales|biases)")


def run(*args) -> int:
    return run_cli(args)[0]



@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    save_file(dit_state(0), str(root / "dit.safetensors"))
    outs = {"fp32": ["--dtype", "float32"], "bf16": [], "q8": ["--quantize", "8"],
            "q4": ["--quantize", "4", "--group-size", "32"]}
    for name, flags in outs.items():
        assert run("convert", root / "dit.safetensors", "-o", root / name, *flags) == 0
    return root


def test_layout_and_config(converted):
    cfg = json.loads((converted / "q4/config.json").read_text())
    assert cfg["quantization"] == {"bits": 4, "group_size": 32} and cfg["dtype"] == "bfloat16"
    model = load_model(converted / "q4")
    blk = model.blocks[1]
    for layer in (blk.self_attn.q, blk.cross_attn.k_img, blk.ffn[0], blk.ffn[2]):
        assert isinstance(layer, nn.QuantizedLinear) and (layer.bits, layer.group_size) == (4, 32)
    # embeddings, head, norms and modulation stay as converted
    assert type(model.text_embedding[0]) is nn.Linear and type(model.head.head) is nn.Linear
    assert type(model.time_projection[1]) is nn.Linear and model.blocks[0].modulation.dtype == mx.float32
    assert blk.norm3.weight.dtype == mx.float32 and blk.self_attn.norm_q.weight.dtype == mx.bfloat16
    # bytes of the block linears: bits/16 of bfloat16, plus a bf16 scale and bias per group
    size = {n: sum(v.nbytes for k, v in load_weights(converted / n).items() if BLOCK_LINEAR.fullmatch(k))
            for n in ("bf16", "q8", "q4")}
    assert size["q8"] / size["bf16"] == pytest.approx(8 / 16 + 2 / 64)
    assert size["q4"] / size["bf16"] == pytest.approx(4 / 16 + 2 / 32)


def test_quantized_forward_close_to_float(converted):
    models = {n: load_model(converted / n) for n in ("fp32", "q8", "q4")}
    x = inputs(models["fp32"])
    xin = mx.concatenate([x["z_bg"], x["cond"]], axis=-1)
    t = mx.array([700.0])
    v = {n: m(xin, t, x["context"], x["clip_fea"]) for n, m in models.items()}
    err8, err4 = rel_err(v["q8"], v["fp32"]), rel_err(v["q4"], v["fp32"])
    assert err8 < 0.02 and err4 < 0.2 and err8 < err4 / 4, (err8, err4)


def test_expert_on_quantized_layers(converted, tmp_path):
    src = tmp_path / "quality.safetensors"
    save_file(lora_state(12, range(2)), str(src))
    expert = convert_expert(src, tmp_path / "expert", kind="quality", num_layers=2)
    full, q8 = load_model(converted / "fp32"), load_model(converted / "q8")
    x = inputs(full)
    t = mx.array([300.0])

    def alpha_v(model, e):
        return branch_forward(model, e, x["z_bg"], x["z_alpha"], t, x["context"], x["clip_fea"],
                              mask_type="C", cond=x["cond"])[1]

    with_f, with_q, without_q = alpha_v(full, expert), alpha_v(q8, expert), alpha_v(q8, None)
    assert rel_err(with_q, with_f) < 0.02
    assert rel_err(with_q, without_q) > 10 * rel_err(with_q, with_f)  # the expert still acts
    assert isinstance(q8.blocks[0].self_attn.q, nn.QuantizedLinear)  # wrappers were removed after the run


def test_bundle_quantize_defaults(tmp_path):
    folder = write_fun_folder(tmp_path / "src")
    assert run("convert", folder, "--quantize", "8", "-o", tmp_path / "b") == 0
    cfg = {c: json.loads((tmp_path / "b" / c / "config.json").read_text()) for c in ("transformer", "t5", "clip", "vae")}
    assert cfg["transformer"]["quantization"] == {"bits": 8, "group_size": 64}
    assert cfg["t5"]["quantization"] == {"bits": 8, "group_size": 64}
    assert "quantization" not in cfg["clip"] and cfg["clip"]["dtype"] == "float16"
    assert "quantization" not in cfg["vae"] and cfg["vae"]["dtype"] == "float32"
    manifest = json.loads((tmp_path / "b/manifest.json").read_text())
    assert manifest["source"]["quantization"] == {"transformer": {"bits": 8, "group_size": 64},
                                                  "t5": {"bits": 8, "group_size": 64}}
    assert run("convert", folder, "--quantize", "transformer=4", "-o", tmp_path / "b4") == 0
    assert json.loads((tmp_path / "b4/transformer/config.json").read_text())["quantization"]["bits"] == 4
    assert "quantization" not in json.loads((tmp_path / "b4/t5/config.json").read_text())
