"""The LoRA scale from wherever each trainer stores it: diffusers metadata,
PEFT adapter_config.json, kohya/musubi `.alpha` tensors, DiffSynth's
convention, a manifest; a file without any says so in one line."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from branch_utils import adapter_keys, convert_expert, random_adapter, write_lora
from mlx_omnimatte.errors import OmnimatteError
from helpers import run_cli

RANK, ALPHA = 4, 2.0  # scale 0.5
OPTS = {"kind": "quality", "num_layers": 4}


@pytest.fixture(scope="module")
def adapter():
    return random_adapter(range(4), rank=RANK)


def _delta(expert, module):
    lora = expert.lora[module]
    return expert.scale * (np.array(lora.b) @ np.array(lora.a))


def _written(tmp, adapter):
    """name -> (path, alpha source expected) of the same LoRA in every trainer's form."""
    d = tmp / "diffusers"
    d.mkdir()
    meta = json.dumps({"transformer.r": RANK, "transformer.lora_alpha": ALPHA, "transformer.use_dora": False})
    save_file(adapter_keys(adapter, "peft", prefix="transformer."), str(d / "pytorch_lora_weights.safetensors"),
              metadata={"lora_adapter_metadata": meta})
    old = tmp / "diffusers-old"
    old.mkdir()
    save_file(adapter_keys(adapter, "peft", prefix="transformer.", diffusers_names=True),
              str(old / "lora.safetensors"),
              metadata={"transformer_lora_adapter_metadata": json.dumps({"r": RANK, "lora_alpha": ALPHA})})
    peft = write_lora(tmp / "peft/adapter_model.safetensors", adapter_keys(adapter, "peft", prefix="base_model.model."))
    (peft.parent / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA, "peft_type": "LORA"}))
    kohya = write_lora(tmp / "kohya/k.safetensors", adapter_keys(adapter, "kohya", alpha=ALPHA))
    # DiffSynth's loader adds B @ A unscaled: the same delta has B scaled in
    halved = {m: (a, b * ALPHA / RANK) for m, (a, b) in adapter.items()}
    ds = write_lora(tmp / "ds/ds.safetensors", adapter_keys(halved, "diffsynth"))
    return {"diffusers": (d / "pytorch_lora_weights.safetensors", "metadata lora_adapter_metadata"),
            "diffusers-old": (old / "lora.safetensors", "metadata transformer_lora_adapter_metadata"),
            "peft": (peft, str(peft.parent / "adapter_config.json")),
            "kohya": (kohya, "alpha tensors"),
            "diffsynth": (ds, "DiffSynth convention (scale 1)")}


def test_every_trainer_same_delta(tmp_path, adapter):
    experts = {}
    for name, (path, source) in _written(tmp_path, adapter).items():
        experts[name] = convert_expert(path, tmp_path / f"out-{name}", **OPTS)
        cfg = json.loads((tmp_path / f"out-{name}" / "config.json").read_text())
        assert cfg["alpha_source"] == source, name
    for name in ("diffusers", "diffusers-old", "peft", "kohya"):
        assert (experts[name].alpha, experts[name].rank, experts[name].scale) == (ALPHA, RANK, 0.5), name
    assert experts["diffsynth"].scale == 1.0
    for module, (a, b) in adapter.items():
        want = 0.5 * b @ a
        for name, e in experts.items():
            np.testing.assert_allclose(_delta(e, module), want, rtol=1e-6, atol=1e-7, err_msg=name)


def test_manifest_overrides_the_file(tmp_path, adapter):
    path, _ = _written(tmp_path, adapter)["peft"]
    e = convert_expert(path, tmp_path / "out", alpha=8.0, **OPTS)
    assert e.alpha == 8.0 and e.scale == 2.0
    cfg = json.loads((tmp_path / "out/config.json").read_text())
    assert cfg["alpha_source"] == "option alpha"
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({**OPTS, "alpha": 1.0}))
    e = convert_expert(path, tmp_path / "out2", manifest=str(manifest))
    assert e.scale == 0.25
    assert json.loads((tmp_path / "out2/config.json").read_text())["alpha_source"] == f"manifest {manifest}"


def test_rslora_and_alpha_pattern(tmp_path, adapter):
    path = write_lora(tmp_path / "p/adapter_model.safetensors", adapter_keys(adapter, "peft"))
    (path.parent / "adapter_config.json").write_text(json.dumps(
        {"r": RANK, "lora_alpha": ALPHA, "use_rslora": True, "alpha_pattern": {"blocks.1.self_attn.q": 6.0}}))
    e = convert_expert(path, tmp_path / "out", **OPTS)
    # rsLoRA: scale alpha / sqrt(rank) = 1.0 everywhere, 3.0 on the patterned module
    assert e.scale == pytest.approx(ALPHA / np.sqrt(RANK))
    a, b = adapter["blocks.0.self_attn.q"]
    np.testing.assert_allclose(_delta(e, "blocks.0.self_attn.q"), 1.0 * b @ a, rtol=1e-6, atol=1e-7)
    a, b = adapter["blocks.1.self_attn.q"]
    np.testing.assert_allclose(_delta(e, "blocks.1.self_attn.q"), 3.0 * b @ a, rtol=1e-6, atol=1e-7)


def test_no_alpha_prints_one_fallback_line(tmp_path, adapter, capsys):
    path = write_lora(tmp_path / "bare.safetensors", adapter_keys(adapter, "peft"))
    code = run_cli(["convert", path, "-o", tmp_path / "out", "--expert-kind", "quality", "--num-layers", "4"])[0]
    out = capsys.readouterr().out
    assert code == 0, out
    lines = [ln for ln in out.splitlines() if "alpha = rank" in ln]
    assert lines == ["bare.safetensors: no LoRA alpha in the file or beside it: using alpha = rank (scale 1.0)"]
    cfg = json.loads((tmp_path / "out/config.json").read_text())
    assert (cfg["alpha"], cfg["rank"], cfg["alpha_source"]) == (RANK, RANK, "none (alpha = rank)")


def test_partial_alpha_tensors_refused(tmp_path, adapter):
    sd = adapter_keys(adapter, "kohya", alpha=ALPHA)
    del sd["lora_unet_blocks_2_self_attn_v.alpha"]
    with pytest.raises(OmnimatteError, match="blocks_2_self_attn_v has no .alpha"):
        convert_expert(write_lora(tmp_path / "k.safetensors", sd), tmp_path / "out", **OPTS)
