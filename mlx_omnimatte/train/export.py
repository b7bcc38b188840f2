"""An expert directory in formats other tools load.

* peft: ``adapter_model.safetensors`` (``base_model.model.blocks.N.attn1.to_q.lora_A.weight``,
  diffusers' module names, as PEFT saves a LoRA of diffusers'
  ``WanTransformer3DModel``) and ``adapter_config.json`` (r, lora_alpha, the
  exact target module names);
* diffusers: ``pytorch_lora_weights.safetensors`` with the ``transformer.``
  prefix (what ``pipe.load_lora_weights`` reads), alpha in its metadata.

Beside each file a manifest (``<file stem>.json``: kind, k, mask type, tau,
width, depth, alpha) that `mlx-omnimatte convert` reads, so an export
converts back to the same expert.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from ..errors import OmnimatteError
from ..io.writers import atomic_output, save_safetensors
from ..weights import load_model

FILES = {"peft": "adapter_model.safetensors", "diffusers": "pytorch_lora_weights.safetensors"}
PREFIX = {"peft": "base_model.model.", "diffusers": "transformer."}
# MLX (original Wan) target -> diffusers module name
DIFFUSERS_NAMES = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
                   "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.o": "attn2.to_out.0"}


def module_name(name: str) -> str:
    """blocks.3.self_attn.q -> blocks.3.attn1.to_q"""
    _, i, target = name.split(".", 2)
    return f"blocks.{i}.{DIFFUSERS_NAMES[target]}"


def lora_tensors(expert, fmt: str) -> dict[str, mx.array]:
    out = {}
    for name, lora in expert.lora.items():
        key = PREFIX[fmt] + module_name(name)
        out[f"{key}.lora_A.weight"] = lora.a
        out[f"{key}.lora_B.weight"] = lora.b
        if lora.bias is not None:
            out[f"{key}.lora_B.bias"] = lora.bias
    return out


def manifest(expert) -> dict:
    return {"component": "expert", "kind": expert.kind, "k": expert.k, "mask_type": expert.mask_type,
            "tau_default": expert.tau_default, "dim": expert.dim, "num_layers": expert.num_layers,
            "alpha": float(expert.alpha), "rank": expert.rank}


def peft_config(expert) -> dict:
    return {"peft_type": "LORA", "r": expert.rank, "lora_alpha": float(expert.alpha),
            "target_modules": [module_name(n) for n in expert.lora], "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "base_model_name_or_path": None, "task_type": None}


def export_expert(expert_dir, fmt: str, out, overwrite: bool = False) -> Path:
    if fmt not in FILES:
        raise OmnimatteError(f"export format {fmt!r}: one of {', '.join(FILES)}")
    expert = load_model(expert_dir, "expert")
    if expert.domain_embedding is not None:
        raise OmnimatteError(f"{expert_dir}: has a domain embedding, which {fmt} LoRA files cannot hold")
    name = FILES[fmt]
    with atomic_output(out, overwrite, directory=True) as tmp:
        meta = {"format": "pt"}
        if fmt == "diffusers":
            meta["lora_adapter_metadata"] = json.dumps({"transformer": peft_config(expert)})
        save_safetensors(tmp / name, lora_tensors(expert, fmt), meta)
        (tmp / name.replace(".safetensors", ".json")).write_text(json.dumps(manifest(expert), indent=2))
        if fmt == "peft":
            (tmp / "adapter_config.json").write_text(json.dumps(peft_config(expert), indent=2))
    return Path(out)
