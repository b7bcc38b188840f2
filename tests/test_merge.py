"""Base-model LoRAs merged into the transformer at conversion (`--lora`,
`--transformer-lora`): every layout gives W + scale * alpha/rank * B @ A on
every linear it names; a LoRA that does not fit is refused in one line."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import save_file

from mlx_omnimatte.models.wan.transformer import Config, Model
from mlx_omnimatte.weights import load_model
from helpers import run_cli
from tiny_models import DIT, dit_state, write_fun_folder

RANK, ALPHA = 4, 2.0
# original -> diffusers module names, for the PEFT form of the same LoRA
DIFFUSERS = [("self_attn.q", "attn1.to_q"), ("self_attn.k", "attn1.to_k"), ("self_attn.v", "attn1.to_v"),
             ("self_attn.o", "attn1.to_out.0"), ("cross_attn.q", "attn2.to_q"), ("cross_attn.k", "attn2.to_k"),
             ("cross_attn.v", "attn2.to_v"), ("cross_attn.o", "attn2.to_out.0"), ("cross_attn.k_img", "attn2.add_k_proj"),
             ("cross_attn.v_img", "attn2.add_v_proj"), ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2")]


def linears(cfg=None) -> dict[str, tuple]:
    model = Model(Config(**(cfg or DIT)))
    return {p: tuple(m.weight.shape) for p, m in model.named_modules() if isinstance(m, nn.Linear)}


def random_lora(shapes: dict, seed: int = 5, rank: int = RANK) -> dict[str, tuple]:
    rng = np.random.default_rng(seed)
    return {p: ((rng.standard_normal((rank, i)) / np.sqrt(i)).astype(np.float32),
                (rng.standard_normal((o, rank)) * 0.1).astype(np.float32)) for p, (o, i) in shapes.items()}


def lora_keys(lora: dict, fmt: str, alpha: float | None = ALPHA) -> dict[str, np.ndarray]:
    sd = {}
    for path, (a, b) in lora.items():
        if fmt == "videox":  # kohya layout as VideoX-Fun writes it
            base = "lora_unet__" + path.replace(".", "_")
            sd[f"{base}.lora_down.weight"], sd[f"{base}.lora_up.weight"] = a, b
        elif fmt == "peft":  # diffusers names
            name = path
            for orig, diff in DIFFUSERS:
                name = name.replace(f".{orig}", f".{diff}") if name.endswith(f".{orig}") else name
            base = f"transformer.{name}"
            sd[f"{base}.lora_A.weight"], sd[f"{base}.lora_B.weight"] = a, b
        elif fmt == "diffsynth":
            base = f"pipe.dit.{path}"
            sd[f"{base}.lora_A.default.weight"], sd[f"{base}.lora_B.default.weight"] = a, b
        if alpha is not None and fmt != "diffsynth":
            sd[f"{base}.alpha"] = np.array(alpha, np.float32)
    return sd


def run(*args) -> int:
    return run_cli(args)[0]


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    state = dit_state(0)
    save_file(state, str(root / "dit.safetensors"))
    block_linears = {p: s for p, s in linears().items() if p.startswith("blocks.")}
    return root / "dit.safetensors", state, block_linears


def expected(state, terms) -> dict[str, np.ndarray]:
    """Reference merge in float64: {weight name: W + sum scale * B @ A}."""
    out = {}
    for lora, scale in terms:
        for path, (a, b) in lora.items():
            name = f"{path}.weight"
            out[name] = out.get(name, state[name].astype(np.float64)) + scale * (b.astype(np.float64) @ a)
    return out


def test_every_layout_merges_the_same(dit, tmp_path):
    path, state, shapes = dit
    lora = random_lora({**shapes, "text_embedding.0": linears()["text_embedding.0"]})
    want = expected(state, [(lora, 0.5 * ALPHA / RANK)])
    merged = {}
    for fmt in ("videox", "peft", "diffsynth"):
        src = tmp_path / f"{fmt}.safetensors"
        save_file(lora_keys(lora, fmt), str(src))
        scale = 0.5 if fmt != "diffsynth" else 0.5 * ALPHA / RANK  # DiffSynth: scale 1 per unit
        assert run("convert", path, "--lora", f"{src}:{scale}", "-o", tmp_path / fmt, "--dtype", "float32") == 0
        merged[fmt] = dict(tree_flatten(load_model(tmp_path / fmt).parameters()))
        cfg = json.loads((tmp_path / fmt / "config.json").read_text())
        assert cfg["merged_loras"][0]["scale"] == scale and cfg["merged_loras"][0]["modules"] == len(lora)
    for name, w in want.items():
        for fmt, params in merged.items():
            np.testing.assert_allclose(np.array(params[name]), w, rtol=1e-5, atol=1e-6, err_msg=f"{fmt} {name}")
    untouched = "blocks.0.modulation"
    np.testing.assert_array_equal(np.array(merged["peft"][untouched]), state[untouched])
    assert float(np.abs(want["blocks.1.ffn.2.weight"] - state["blocks.1.ffn.2.weight"]).max()) > 1e-2


def test_two_loras_sum_and_bf16_cast_after(dit, tmp_path):
    path, state, shapes = dit
    one, two = random_lora(shapes, 1), random_lora({"blocks.0.self_attn.q": shapes["blocks.0.self_attn.q"]}, 2)
    save_file(lora_keys(one, "videox"), str(tmp_path / "one.safetensors"))
    save_file(lora_keys(two, "peft", alpha=None), str(tmp_path / "two.safetensors"))
    assert run("convert", path, "--lora", tmp_path / "one.safetensors", "--lora",
               f"{tmp_path / 'two.safetensors'}:-1.5", "-o", tmp_path / "out") == 0
    params = dict(tree_flatten(load_model(tmp_path / "out").parameters()))
    want = expected(state, [(one, ALPHA / RANK), (two, -1.5)])  # two has no alpha: alpha = rank
    name = "blocks.0.self_attn.q.weight"
    got = np.array(params[name].astype(mx.float32))
    assert params[name].dtype.size == 2  # bfloat16, cast after the float32 merge
    np.testing.assert_allclose(got, want[name], rtol=1e-2, atol=2e-3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_fun_folder(tmp_path_factory.mktemp("fun"))


def test_bundle_merges_and_records(folder, tmp_path, capsys):
    lora = random_lora({"blocks.1.cross_attn.k": linears()["blocks.1.cross_attn.k"]})
    src = tmp_path / "casper_lora.safetensors"
    save_file(lora_keys(lora, "videox"), str(src))
    assert run("convert", folder, "--transformer-lora", f"{src}:0.75", "-o", tmp_path / "b") == 0
    manifest = json.loads((tmp_path / "b/manifest.json").read_text())
    rec = manifest["source"]["transformer_loras"]
    assert [(r["file"], r["scale"], r["format"], r["alpha_source"]) for r in rec] == [
        (str(src.resolve()), 0.75, "kohya", "alpha tensors")]
    params = dict(tree_flatten(load_model(tmp_path / "b/transformer", dtype="float32").parameters()))
    state = dit_state(0)
    name = "blocks.1.cross_attn.k.weight"
    want = expected(state, [(lora, 0.75 * ALPHA / RANK)])[name]
    np.testing.assert_allclose(np.array(params[name]), want, rtol=1e-2, atol=2e-3)


# --------------------------------------------------------------------------- refused


def refused(capsys, out, *args, contains=()):
    code = run(*args, "-o", out)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    for c in contains:
        assert c in err, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))
    return err


def test_lora_for_another_width_or_depth(dit, tmp_path, capsys):
    path, _, _ = dit
    wide = random_lora({"blocks.0.self_attn.q": (512, 512)})
    save_file(lora_keys(wide, "videox"), str(tmp_path / "wide.safetensors"))
    refused(capsys, tmp_path / "o1", "convert", path, "--lora", tmp_path / "wide.safetensors",
            contains=["lora_unet__blocks_0_self_attn_q", "512 -> 512", "256 -> 256"])
    deep = random_lora({"blocks.5.ffn.0": (DIT["ffn_dim"], DIT["dim"])})
    save_file(lora_keys(deep, "peft"), str(tmp_path / "deep.safetensors"))
    refused(capsys, tmp_path / "o2", "convert", path, "--lora", tmp_path / "deep.safetensors",
            contains=["block 5", "2 blocks"])


def test_lora_keys_that_match_nothing(dit, tmp_path, capsys):
    path, _, shapes = dit
    sd = lora_keys(random_lora({"blocks.0.self_attn.q": shapes["blocks.0.self_attn.q"]}), "videox")
    sd["lora_unet__vace_blocks_0_proj.lora_down.weight"] = np.zeros((RANK, 256), np.float32)
    sd["lora_unet__vace_blocks_0_proj.lora_up.weight"] = np.zeros((256, RANK), np.float32)
    save_file(sd, str(tmp_path / "other.safetensors"))
    refused(capsys, tmp_path / "o", "convert", path, "--lora", tmp_path / "other.safetensors",
            contains=["lora_unet__vace_blocks_0_proj", "matches no linear"])
    save_file({"text_encoder.layers.0.q.lora_A.weight": np.zeros((4, 8), np.float32)}, str(tmp_path / "te.safetensors"))
    refused(capsys, tmp_path / "o", "convert", path, "--lora", tmp_path / "te.safetensors",
            contains=["text_encoder.layers.0.q", "matches no linear"])


def test_lora_and_transformer_swapped(dit, folder, tmp_path, capsys):
    path, _, shapes = dit
    lora = tmp_path / "lora.safetensors"
    save_file(lora_keys(random_lora({"blocks.0.ffn.2": shapes["blocks.0.ffn.2"]}), "videox"), str(lora))
    refused(capsys, tmp_path / "o", "convert", path, "--lora", path, contains=["not a LoRA file", "transformer"])
    refused(capsys, tmp_path / "o", "convert", lora, "--lora", lora, contains=["--lora", "this is an expert"])
    refused(capsys, tmp_path / "o", "convert", folder, "--transformer", lora,
            contains=["not a transformer checkpoint"])
    refused(capsys, tmp_path / "o", "convert", folder, "--transformer-lora", path, contains=["not a LoRA file"])


def test_scale_not_a_number_and_quantized_vae(dit, folder, tmp_path, capsys):
    path, _, shapes = dit
    lora = tmp_path / "lora.safetensors"
    save_file(lora_keys(random_lora({"blocks.0.ffn.2": shapes["blocks.0.ffn.2"]}), "videox"), str(lora))
    refused(capsys, tmp_path / "o", "convert", path, "--lora", f"{lora}:half", contains=["'half' is not a number"])
    refused(capsys, tmp_path / "o", "convert", folder / "Wan2.1_VAE.pth", "--quantize", "8",
            contains=["vae cannot be stored quantized"])
    refused(capsys, tmp_path / "o", "convert", folder, "--quantize", "vae=8",
            contains=["vae cannot be stored quantized"])
