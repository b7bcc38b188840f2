"""A tiny random Wan2.1-Fun-InP model folder in the real source formats,
written without torch, for end-to-end tests through the real converter.

The folder mimics what `alibaba-pai/Wan2.1-Fun-1.3B-InP` holds:
`diffusion_pytorch_model.safetensors` + `config.json` (original names),
`Wan2.1_VAE.pth`, `models_t5_umt5-xxl-enc-bf16.pth` + `google/umt5-xxl/`,
`models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` (Wan's names, text
tower included); plus a Casper-like lone `.safetensors` and expert LoRAs in
PEFT format. Source names are produced from the MLX parameter names by the
reverse rename tables below, so a wrong table fails the conversion loudly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
from safetensors.numpy import save_file

from branch_utils import adapter_keys, random_adapter
from helpers import random_params
from ckpt_utils import save_torch_zip
from mlx_omnimatte import synth
from mlx_omnimatte.cli.main import main
from mlx_omnimatte.convert.core import conv_weight_names
from encoder_utils import hf_weights, make_tokenizer, to_wan

TEXT_DIM = 64
DIT = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=36, out_dim=16, text_dim=TEXT_DIM,
           image_dim=1280)
VAE = dict(base_dim=8, z_dim=16)
CLIP = dict(width=1280, layers=2, heads=16, mlp_dim=256)
LORA_RANK = 4

# MLX name -> source name, first match wins (identity when none matches)
VAE_TO_ORIGINAL = [
    (r"(encoder|decoder)\.conv_in\.(.+)", r"\1.conv1.\2"),
    (r"(encoder|decoder)\.norm_out\.gamma", r"\1.head.0.gamma"),
    (r"(encoder|decoder)\.conv_out\.(.+)", r"\1.head.2.\2"),
    (r"quant_conv\.(.+)", r"conv1.\1"),
    (r"post_quant_conv\.(.+)", r"conv2.\1"),
    (r"(.+)\.norm1\.gamma", r"\1.residual.0.gamma"),
    (r"(.+)\.conv1\.(weight|bias)", r"\1.residual.2.\2"),
    (r"(.+)\.norm2\.gamma", r"\1.residual.3.gamma"),
    (r"(.+)\.conv2\.(weight|bias)", r"\1.residual.6.\2"),
    (r"(.+)\.conv_shortcut\.(.+)", r"\1.shortcut.\2"),
]
CLIP_TO_WAN = [
    (r"(patch_embedding\.weight|cls_embedding|pos_embedding|pre_norm\..+)", r"visual.\1"),
    (r"blocks\.(\d+)\.norm([12])\.(.+)", r"visual.transformer.\1.norm\2.\3"),
    (r"blocks\.(\d+)\.attn\.qkv\.(.+)", r"visual.transformer.\1.attn.to_qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(.+)", r"visual.transformer.\1.attn.proj.\2"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(.+)", r"visual.transformer.\1.mlp.0.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(.+)", r"visual.transformer.\1.mlp.2.\2"),
]


def _rename(name: str, table) -> str:
    for pattern, repl in table:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name)
    return name


def source_state(model, table=(), seed: int = 0, scale: float = 1.0) -> dict[str, np.ndarray]:
    """Random weights for every parameter of `model`, in torch layout, named
    by `table`."""
    convs = conv_weight_names(model)
    out = {}
    for name, a in random_params(model, seed, scale=scale).items():
        if name in convs and a.ndim >= 3:
            a = np.moveaxis(a, -1, 1)  # MLX (O, *k, I) -> torch (O, I, *k)
        out[_rename(name, table)] = a
    return out


def dit_state(seed: int = 0) -> dict[str, np.ndarray]:
    from mlx_omnimatte.models.wan import transformer

    model = transformer.Model(transformer.Config(**DIT))
    state = source_state(model, seed=seed)
    # modulation tables are O(1) offsets in trained models
    for k in state:
        if k.endswith("modulation"):
            state[k] = (0.1 * np.random.default_rng(seed).standard_normal(state[k].shape)).astype(np.float32)
    return state


def vae_state(seed: int = 1) -> dict[str, np.ndarray]:
    from mlx_omnimatte.models.wan import vae

    return source_state(vae.Model(vae.Config(**VAE)), VAE_TO_ORIGINAL, seed)


def clip_state(seed: int = 2) -> dict[str, np.ndarray]:
    from mlx_omnimatte.models import clip

    state = source_state(clip.Model(clip.Config(**CLIP)), CLIP_TO_WAN, seed)
    # Wan's module keeps these with leading singleton axes
    state["visual.cls_embedding"] = state["visual.cls_embedding"].reshape(1, 1, -1)
    state["visual.pos_embedding"] = state["visual.pos_embedding"].reshape(1, *state["visual.pos_embedding"].shape[-2:])
    w = CLIP["width"]
    state["visual.post_norm.weight"] = np.ones(w, np.float32)  # ignored by the converter
    state["visual.post_norm.bias"] = np.zeros(w, np.float32)
    state["textual.token_embedding.weight"] = np.zeros((8, 16), np.float32)  # the text tower: left out
    return state


def lora_state(seed: int, blocks, dim: int = DIT["dim"]) -> dict[str, np.ndarray]:
    """A PEFT LoRA (diffusers module names, `transformer.` prefix) on
    self-attn q,k,v,o and cross-attn q,o of `blocks`."""
    adapter = random_adapter(blocks, dim, LORA_RANK, seed, scale=0.5)
    return adapter_keys(adapter, "peft", prefix="transformer.", diffusers_names=True)


def write_fun_folder(root: Path) -> Path:
    """The tiny model folder (what a user downloads), plus `casper.safetensors`
    and `effect.safetensors` / `quality.safetensors` beside it."""
    root = Path(root)
    folder = root / "Wan2.1-Fun-tiny-InP"
    folder.mkdir(parents=True)
    save_file(dit_state(0), str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "i2v",
                                                     "dim": DIT["dim"], "ffn_dim": DIT["ffn_dim"],
                                                     "num_heads": DIT["num_heads"], "num_layers": DIT["num_layers"],
                                                     "in_dim": DIT["in_dim"], "out_dim": DIT["out_dim"],
                                                     "text_len": 512, "freq_dim": 256, "eps": 1e-6}))
    save_torch_zip(folder / "Wan2.1_VAE.pth", vae_state())
    t5 = to_wan(hf_weights(seed=3, vocab=256, d=TEXT_DIM, inner=TEXT_DIM, ff=96, heads=4, layers=2))
    save_torch_zip(folder / "models_t5_umt5-xxl-enc-bf16.pth", t5)
    make_tokenizer(folder / "google" / "umt5-xxl")
    save_torch_zip(folder / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
                   {k: v.astype(np.float16) for k, v in clip_state().items()})
    save_file(dit_state(7), str(root / "casper.safetensors"))  # the removal fine-tune
    layers = DIT["num_layers"]
    save_file(lora_state(11, [layers - 1]), str(root / "effect.safetensors"))
    save_file(lora_state(12, range(layers)), str(root / "quality.safetensors"))
    return folder


def poison(component_dir: Path, name_part: str = "head.head.weight") -> None:
    """Put a NaN into one weight of a converted component (for NaN tests)."""
    f = Path(component_dir) / "model.safetensors"
    weights = mx.load(str(f))
    key = next(k for k in weights if name_part in k)
    w = np.array(weights[key].astype(mx.float32))
    w.flat[0] = np.nan
    weights[key] = mx.array(w).astype(weights[key].dtype)
    mx.save_safetensors(str(f), weights)


def tiny_bundle(root: Path, experts: bool = True) -> Path:
    """The tiny model folder converted by the real CLI into root/bundle: the
    Casper-like DiT, with the two expert LoRAs unless `experts` is False."""
    folder = write_fun_folder(root)
    bundle = root / "bundle"
    args = ["convert", folder, "--transformer", root / "casper.safetensors", "-o", bundle]
    if experts:
        args += ["--expert", f"effect={root / 'effect.safetensors'}", "--expert",
                 f"quality={root / 'quality.safetensors'}"]
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        assert e.code == 0, e.code
    return bundle


TINY_CLIPS = dict(frames=5, size=(64, 48))  # latent 2 x 6 x 8: 24 tokens per half


def tiny_dataset(root: Path, count: int = 2) -> Path:
    """`count` synthetic clips in root/data (the training tests' data set)."""
    return synth.write_dataset(root / "data", count, seed=5, **TINY_CLIPS)
