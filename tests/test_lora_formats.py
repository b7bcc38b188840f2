"""LoRA files in each trainer's layout -> the same expert; bad files -> one clear error."""

import json

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file

from mlx_omnimatte.branch import branch_forward
from mlx_omnimatte.convert import lora as L
from mlx_omnimatte.convert.readers import read_checkpoint
from mlx_omnimatte.errors import OmnimatteError
from branch_utils import adapter_keys, convert_expert, inputs, random_adapter, tiny_model, write_lora

RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def adapter():
    return random_adapter(range(4), rank=RANK)


def _variants(tmp, adapter):
    """(name, path) of the same adapter in every layout / naming / prefix."""
    quality = {"kind": "quality", "num_layers": 4}
    return [
        ("peft-diffusers-names", write_lora(tmp / "a/peft.safetensors",
                                            adapter_keys(adapter, "peft", ALPHA, "transformer.", True), quality)),
        ("peft-original-names", write_lora(tmp / "b/peft.safetensors",
                                           adapter_keys(adapter, "peft", ALPHA, "diffusion_model."), quality)),
        ("peft-base-model", write_lora(tmp / "c/adapter.safetensors",
                                       adapter_keys(adapter, "peft", ALPHA, "base_model.model."), quality)),
        ("kohya", write_lora(tmp / "d/kohya.safetensors", adapter_keys(adapter, "kohya", ALPHA), quality)),
        ("kohya-diffusers-names", write_lora(tmp / "e/kohya.safetensors",
                                             adapter_keys(adapter, "kohya", ALPHA, diffusers_names=True), quality)),
        # DiffSynth files carry no alpha: it comes from the manifest beside the file
        ("diffsynth", write_lora(tmp / "f/ds.safetensors", adapter_keys(adapter, "diffsynth"),
                                 {**quality, "alpha": ALPHA})),
    ]


def test_detect_formats(tmp_path, adapter):
    want = {"peft": "peft", "kohya": "kohya", "diffsynth": "diffsynth"}
    for name, path in _variants(tmp_path, adapter):
        assert L.detect(read_checkpoint(path)) == want[name.split("-")[0]], name
    # a DiT checkpoint is not a LoRA
    plain = tmp_path / "dit.safetensors"
    save_file({"blocks.0.self_attn.q.weight": np.zeros((4, 4), np.float32)}, str(plain))
    assert L.detect(read_checkpoint(plain)) is None


def test_all_formats_same_expert_and_output(tmp_path, adapter):
    model = tiny_model()
    x = inputs(model)
    experts = {name: convert_expert(path, tmp_path / f"out-{name}")
               for name, path in _variants(tmp_path, adapter)}
    ref_name, ref = next(iter(experts.items()))
    assert ref.kind == "quality" and ref.mask_type == "C" and ref.rank == RANK and ref.alpha == ALPHA
    assert ref.blocks == (0, 1, 2, 3) and ref.targets == tuple(L.SUPPORTED_TARGETS) and ref.dim == 64
    # tensors equal the adapter itself, in MLX names
    for module, (a, b) in adapter.items():
        np.testing.assert_array_equal(np.array(ref.lora[module].a), a)
        np.testing.assert_array_equal(np.array(ref.lora[module].b), b)
    t = mx.array([600.0])
    v_ref = branch_forward(model, ref, x["z_bg"], x["z_alpha"], t, x["context"], x["clip_fea"], cond=x["cond"])[1]
    v_plain = branch_forward(model, None, x["z_bg"], x["z_alpha"], t, x["context"], x["clip_fea"],
                             mask_type="C", cond=x["cond"])[1]
    assert float(mx.abs(v_ref - v_plain).max()) > 1e-2  # the adapter matters
    for name, e in experts.items():
        assert (e.rank, e.alpha, e.kind, e.mask_type, e.blocks) == (ref.rank, ref.alpha, ref.kind, ref.mask_type,
                                                                   ref.blocks), name
        assert e.source_format == name.split("-")[0]
        for module in adapter:
            np.testing.assert_array_equal(np.array(e.lora[module].a), np.array(ref.lora[module].a))
            np.testing.assert_array_equal(np.array(e.lora[module].b), np.array(ref.lora[module].b))
        v = branch_forward(model, e, x["z_bg"], x["z_alpha"], t, x["context"], x["clip_fea"], cond=x["cond"])[1]
        assert float(mx.abs(v - v_ref).max()) == 0.0, name


def test_manifest_written(tmp_path, adapter):
    src = write_lora(tmp_path / "q.safetensors", adapter_keys(adapter, "peft", ALPHA),
                     {"kind": "quality", "num_layers": 4, "tau_default": 0.3})
    convert_expert(src, tmp_path / "out", dtype="bfloat16")
    cfg = json.loads((tmp_path / "out/config.json").read_text())
    assert cfg["component"] == "expert" and cfg["kind"] == "quality" and cfg["rank"] == RANK
    assert cfg["alpha"] == ALPHA and cfg["blocks"] == [0, 1, 2, 3] and cfg["mask_type"] == "C"
    assert cfg["tau_default"] == 0.3 and cfg["dim"] == 64 and cfg["num_layers"] == 4
    assert cfg["targets"] == list(L.SUPPORTED_TARGETS) and cfg["source_format"] == "peft"
    assert cfg["dtype"] == "bfloat16" and cfg["k"] is None


def test_effect_kind_inferred_from_tail_blocks(tmp_path):
    ad = random_adapter([2, 3], rank=8)
    src = write_lora(tmp_path / "e.safetensors", adapter_keys(ad, "kohya"), {"num_layers": 4})
    e = convert_expert(src, tmp_path / "out")
    assert (e.kind, e.mask_type, e.k, e.blocks, e.rank, e.alpha) == ("effect", "B", 2, (2, 3), 8, 8.0)
    # explicit options (the CLI's --expert-kind/--k/--mask-type) win over the manifest
    e2 = convert_expert(src, tmp_path / "out2", kind="effect", k=3, mask_type="a")
    assert (e2.k, e2.mask_type) == (3, "A")
    with pytest.raises(OmnimatteError, match="block 2, outside the last K=1 of 4"):
        convert_expert(src, tmp_path / "out3", k=1)
    # blocks neither all nor a tail: the kind must be given
    mid = write_lora(tmp_path / "m.safetensors", adapter_keys(random_adapter([1]), "peft"), {"num_layers": 4})
    with pytest.raises(OmnimatteError, match="pass --expert-kind"):
        convert_expert(mid, tmp_path / "out4")


def test_per_module_alpha_is_folded(tmp_path):
    ad = random_adapter([0, 1], rank=4, targets=("self_attn.q",))
    sd = adapter_keys(ad, "kohya", alpha=4.0)
    sd["lora_unet_blocks_1_self_attn_q.alpha"] = np.array(2.0, np.float32)  # half the scale there
    e = convert_expert(write_lora(tmp_path / "k.safetensors", sd, {"num_layers": 2}), tmp_path / "o")
    assert e.alpha == 4.0 and e.scale == 1.0
    np.testing.assert_allclose(np.array(e.lora["blocks.1.self_attn.q"].b), ad["blocks.1.self_attn.q"][1] * 0.5)
    np.testing.assert_array_equal(np.array(e.lora["blocks.0.self_attn.q"].b), ad["blocks.0.self_attn.q"][1])


def test_domain_embedding_and_lora_bias(tmp_path):
    ad = random_adapter([0, 1], targets=("self_attn.q",))
    sd = adapter_keys(ad, "peft", prefix="transformer.")
    sd["transformer.blocks.0.self_attn.q.lora_B.bias"] = np.full(64, 0.5, np.float32)
    sd["domain_embedding"] = np.arange(64, dtype=np.float32).reshape(1, 1, 64)
    e = convert_expert(write_lora(tmp_path / "p.safetensors", sd, {"num_layers": 2}), tmp_path / "o")
    np.testing.assert_array_equal(np.array(e.domain_embedding), np.arange(64))
    np.testing.assert_array_equal(np.array(e.lora["blocks.0.self_attn.q"].bias), np.full(64, 0.5))
    assert e.lora["blocks.1.self_attn.q"].bias is None


# --------------------------------------------------------------------------- bad files


def _bad(tmp_path, sd, match, **manifest):
    src = write_lora(tmp_path / "bad.safetensors", sd, manifest or None)
    with pytest.raises(OmnimatteError, match=match) as info:
        convert_expert(src, tmp_path / "out")
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_pair(tmp_path):
    sd = adapter_keys(random_adapter([0, 1]), "peft")
    del sd["blocks.1.self_attn.v.lora_B.weight"]
    msg = _bad(tmp_path, sd, r"blocks\.1\.self_attn\.v\.lora_A\.weight: LoRA blocks\.1\.self_attn\.v has no B")
    assert "missing pair" in msg
    sd = adapter_keys(random_adapter([0]), "kohya")
    del sd["lora_unet_blocks_0_self_attn_o.lora_down.weight"]
    _bad(tmp_path, sd, r"lora_unet_blocks_0_self_attn_o\.lora_up\.weight: LoRA blocks\.0\.self_attn\.o has no A")


def test_alpha_without_matrices(tmp_path):
    sd = adapter_keys(random_adapter([0]), "kohya")
    sd["lora_unet_blocks_0_self_attn_q_x.alpha"] = np.array(4.0, np.float32)
    _bad(tmp_path, sd, "unknown module self_attn_q_x")
    sd = adapter_keys(random_adapter([0], targets=("self_attn.q",)), "kohya")
    sd["lora_unet_blocks_0_self_attn_k.alpha"] = np.array(4.0, np.float32)
    _bad(tmp_path, sd, r"lora_unet_blocks_0_self_attn_k\.alpha: no LoRA matrices for blocks\.0\.self_attn\.k")


def test_rank_mismatch(tmp_path):
    sd = adapter_keys(random_adapter([0, 1]), "peft")
    sd["blocks.0.cross_attn.q.lora_B.weight"] = np.zeros((64, 3), np.float32)
    _bad(tmp_path, sd, r"blocks\.0\.cross_attn\.q: rank mismatch.*\(4, 64\).*\(64, 3\)")


def test_wrong_width(tmp_path):
    sd = adapter_keys(random_adapter([0]), "peft")
    sd["blocks.0.self_attn.k.lora_B.weight"] = np.zeros((32, 4), np.float32)
    _bad(tmp_path, sd, r"blocks\.0\.self_attn\.k: maps 64 -> 32 features, the model width is 64")
    # the manifest's width against the file's
    _bad(tmp_path, adapter_keys(random_adapter([0]), "peft"), r"blocks\.0\.self_attn\.q: maps 64 -> 64 .* 1536",
         dim=1536)


def test_unsupported_and_unknown_modules(tmp_path):
    sd = adapter_keys(random_adapter([0]), "peft", diffusers_names=True)
    sd["blocks.0.attn2.to_k.lora_A.weight"] = np.zeros((4, 64), np.float32)
    _bad(tmp_path, sd, "attn2.to_k is not supported .*share")
    sd = adapter_keys(random_adapter([0]), "peft")
    sd["blocks.0.ffn.0.lora_A.weight"] = np.zeros((4, 64), np.float32)
    _bad(tmp_path, sd, "ffn.0 is not supported .*frozen")
    sd = adapter_keys(random_adapter([0]), "peft")
    sd["text_encoder.layer.lora_A.weight"] = np.zeros((4, 64), np.float32)
    _bad(tmp_path, sd, "unexpected key text_encoder.layer.lora_A.weight")


def test_bad_settings(tmp_path):
    sd = adapter_keys(random_adapter([0]), "peft")
    _bad(tmp_path, sd, r"bad\.json: tau 1\.5: must lie in", tau_default=1.5)
    _bad(tmp_path, sd, "expert kind 'medium' unknown", kind="medium")
    _bad(tmp_path, sd, "attention mask type 'D'", mask_type="D")


def _cli(argv, capsys):
    from mlx_omnimatte.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    out = capsys.readouterr()
    return info.value.code, out.out + out.err


def test_cli_converts_and_exits_2_on_bad_lora(tmp_path, capsys):
    src = write_lora(tmp_path / "q.safetensors", adapter_keys(random_adapter(range(4)), "kohya"), {"num_layers": 4})
    code, out = _cli(["convert", str(src), "-o", str(tmp_path / "ok"), "--dtype", "float32"], capsys)
    assert code == 0, out
    assert json.loads((tmp_path / "ok/config.json").read_text())["kind"] == "quality"
    sd = adapter_keys(random_adapter([0]), "peft")
    sd["blocks.0.self_attn.q.lora_B.weight"] = np.zeros((64, 5), np.float32)
    bad = write_lora(tmp_path / "bad/x.safetensors", sd)
    code, out = _cli(["convert", str(bad), "-o", str(tmp_path / "no")], capsys)
    assert code == 2
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "rank mismatch" in lines[0], out
    assert not (tmp_path / "no").exists()


def test_explicit_manifest_option(tmp_path):
    src = write_lora(tmp_path / "lora/x.safetensors", adapter_keys(random_adapter([3]), "peft"))
    m = tmp_path / "elsewhere.json"
    m.write_text(json.dumps({"kind": "effect", "k": 2, "num_layers": 4, "tau_default": 0.4}))
    e = convert_expert(src, tmp_path / "out", manifest=str(m))
    assert (e.kind, e.k, e.num_layers, e.tau_default, e.blocks) == ("effect", 2, 4, 0.4, (3,))
    with pytest.raises(OmnimatteError, match="nope.json: expert manifest not found"):
        convert_expert(src, tmp_path / "out2", manifest=str(tmp_path / "nope.json"))
    with pytest.raises(OmnimatteError, match="unknown option 'rank'"):
        convert_expert(src, tmp_path / "out3", rank=4)
