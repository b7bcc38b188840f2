"""UMT5 text encoder converter: Wan's original `models_t5_umt5-xxl-enc-bf16.pth`
(Wan's own module names) or a Hugging Face `UMT5EncoderModel` / `UMT5Model`
state dict -> `mlx_omnimatte.models.t5`.

The tokenizer (`tokenizer.json`, with its config files when present) is
copied into `<out>/tokenizer/`. It is looked for beside the checkpoint, in
the places the Wan / diffusers folders keep it (see `tokenizer_dirs`), or
where `$MLX_OMNIMATTE_T5_TOKENIZER` points.

Optional weight quantization at conversion (`convert(..., quantize=4|8)`,
see `convert/quantize.py`): the Linear layers and the token table become MLX
affine-quantized tensors (`weight`, `scales`, `biases`) and config.json
records `quantization`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.models import t5 as t5_model

from .core import ComponentSpec, Converted, convert as generic_convert
from .keymap import KeyMap, strip_prefix
from .readers import Checkpoint

TOKENIZER_ENV = "MLX_OMNIMATTE_T5_TOKENIZER"
TOKENIZER_REQUIRED = "tokenizer.json"
TOKENIZER_OPTIONAL = ("tokenizer_config.json", "special_tokens_map.json", "spiece.model")

_B = r"blocks\.(\d+)\."
_HB = r"encoder\.block\.(\d+)\.layer\."

FORMATS = {
    # Wan2.1 wan/modules/t5.py (T5Encoder with shared_pos=False)
    "wan": KeyMap(
        renames=[
            (r"token_embedding\.weight", r"token_embedding.weight"),
            (_B + r"norm([12])\.weight", r"blocks.\1.norm\2.weight"),
            (_B + r"attn\.([qkvo])\.weight", r"blocks.\1.attn.\2.weight"),
            (_B + r"ffn\.gate\.0\.weight", r"blocks.\1.ffn.gate.weight"),
            (_B + r"ffn\.(fc1|fc2)\.weight", r"blocks.\1.ffn.\2.weight"),
            (_B + r"pos_embedding\.embedding\.weight", r"blocks.\1.pos_embedding.embedding.weight"),
            (r"norm\.weight", r"norm.weight"),
        ],
    ),
    # transformers UMT5EncoderModel (and the encoder half of UMT5Model)
    "hf": KeyMap(
        renames=[
            (r"(?:shared|encoder\.embed_tokens)\.weight", r"token_embedding.weight"),
            (_HB + r"0\.SelfAttention\.([qkvo])\.weight", r"blocks.\1.attn.\2.weight"),
            (_HB + r"0\.SelfAttention\.relative_attention_bias\.weight", r"blocks.\1.pos_embedding.embedding.weight"),
            (_HB + r"0\.layer_norm\.weight", r"blocks.\1.norm1.weight"),
            (_HB + r"1\.DenseReluDense\.wi_0\.weight", r"blocks.\1.ffn.gate.weight"),
            (_HB + r"1\.DenseReluDense\.wi_1\.weight", r"blocks.\1.ffn.fc1.weight"),
            (_HB + r"1\.DenseReluDense\.wo\.weight", r"blocks.\1.ffn.fc2.weight"),
            (_HB + r"1\.layer_norm\.weight", r"blocks.\1.norm2.weight"),
            (r"encoder\.final_layer_norm\.weight", r"norm.weight"),
        ],
        ignored={
            r"decoder\..*": "decoder: Wan uses the encoder only",
            r"lm_head\.weight": "decoder head: Wan uses the encoder only",
        },
    ),
}


def _bare(ckpt: Checkpoint) -> dict:
    prefix = strip_prefix(ckpt)
    return {k[len(prefix):]: v for k, v in ckpt.items()}


def detect(ckpt: Checkpoint) -> str | None:
    keys = _bare(ckpt)
    if "token_embedding.weight" in keys and "blocks.0.attn.q.weight" in keys and "blocks.0.ffn.gate.0.weight" in keys:
        return "wan"
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in keys:
        return "hf"
    return None


def _hf_config(src: Path) -> dict:
    """The architecture file beside a Hugging Face checkpoint, if any."""
    folder = src if src.is_dir() else src.parent
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def config_for(ckpt: Checkpoint, fmt: str, src: Path) -> dict:
    keymap = FORMATS[fmt]
    shapes = {}
    for key, t in _bare(ckpt).items():
        target = keymap.target(key)
        if target is not None:
            shapes[target] = t.shape
    need = ["token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight"]
    for name in need:
        if name not in shapes:
            raise OmnimatteError(f"{src}: missing weight for {name} (incomplete UMT5 checkpoint?)")
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k)))
    bias = [f"blocks.{i}.pos_embedding.embedding.weight" in shapes for i in range(layers)]
    if bias[0] and not all(bias[1:]):
        raise OmnimatteError(f"{src}: only the first layer has a relative position bias: a T5 (v1.1) "
                             "encoder, not UMT5; Wan needs umt5-xxl")
    if not bias[0]:
        raise OmnimatteError(f"{src}: missing weight for blocks.0.pos_embedding.embedding.weight")
    vocab, d_model = shapes["token_embedding.weight"]
    num_buckets, heads = shapes["blocks.0.pos_embedding.embedding.weight"]
    config = {
        "vocab_size": vocab, "d_model": d_model, "d_kv": shapes["blocks.0.attn.q.weight"][0] // heads,
        "d_ff": shapes["blocks.0.ffn.fc1.weight"][0], "num_heads": heads, "num_layers": layers,
        "num_buckets": num_buckets, "max_distance": 128, "eps": 1e-6,
    }
    if fmt == "hf":
        hf = _hf_config(src)
        act = hf.get("feed_forward_proj", "gated-gelu")
        if act != "gated-gelu":
            raise OmnimatteError(f"{src}: feed_forward_proj {act!r}; UMT5 uses 'gated-gelu'")
        config["max_distance"] = hf.get("relative_attention_max_distance", 128)
        config["eps"] = hf.get("layer_norm_epsilon", 1e-6)
    return config


def build(config: dict):
    return t5_model.Model(t5_model.Config.from_dict(config))


# --------------------------------------------------------------------------- tokenizer


def tokenizer_dirs(src: Path) -> list[Path]:
    """Where the tokenizer may sit: Wan folders keep it in google/umt5-xxl/
    beside the .pth, Hugging Face folders beside the weights, diffusers folders
    in a sibling tokenizer/."""
    env = os.environ.get(TOKENIZER_ENV)
    if env:
        p = Path(env).expanduser()
        return [p.parent if p.is_file() else p]
    base = src if src.is_dir() else src.parent
    return [base / "google" / "umt5-xxl", base / "tokenizer", base, base.parent / "tokenizer",
            base.parent / "google" / "umt5-xxl"]


def tokenizer_files(src: Path) -> list[tuple[Path, str]]:
    dirs = tokenizer_dirs(Path(src))
    for d in dirs:
        if (d / TOKENIZER_REQUIRED).is_file():
            files = [d / TOKENIZER_REQUIRED] + [d / f for f in TOKENIZER_OPTIONAL if (d / f).is_file()]
            return [(f, f"tokenizer/{f.name}") for f in files]
    where = ", ".join(str(d) for d in dirs)
    raise OmnimatteError(f"{src}: no {TOKENIZER_REQUIRED} for the text encoder (looked in {where}); "
                         f"set {TOKENIZER_ENV} to the folder that holds it (e.g. google/umt5-xxl)")


# --------------------------------------------------------------------------- custom driver


def _untie(ckpt: Checkpoint) -> Checkpoint:
    """HF files may hold both `shared.weight` and its tied copy
    `encoder.embed_tokens.weight`: keep one."""
    keys = _bare(ckpt)
    if "shared.weight" in keys and "encoder.embed_tokens.weight" in keys:
        prefix = strip_prefix(ckpt)
        drop = prefix + "encoder.embed_tokens.weight"
        return Checkpoint({k: v for k, v in ckpt.items() if k != drop}, ckpt.source, ckpt.file_format,
                          ckpt.metadata)
    return ckpt


def convert(ckpt: Checkpoint, fmt: str, dtype: str, **_options) -> Converted:
    return generic_convert(_untie(ckpt), dataclasses.replace(SPEC, custom=None), fmt, dtype)


SPEC = ComponentSpec(
    component="t5",
    formats=FORMATS,
    detect=detect,
    config_for=config_for,
    build=build,
    # the position-bias tables and norms are tiny: keep them exact
    keep_fp32=(r".*pos_embedding\.embedding\.weight", r".*norm\d?\.weight"),
    extra_files=tokenizer_files,
    custom=convert,
    quantizable=t5_model.quantizable,
)
