"""A tiny random-weight model in the released source formats, and its
bundle through the real converter: for trying every model command without
a download, and for CI checks of the conversion and the pipelines. Its
outputs mean nothing (the weights are random).

The folder mimics what `alibaba-pai/Wan2.1-Fun-1.3B-InP` holds:
`diffusion_pytorch_model.safetensors` + `config.json` (original names),
`Wan2.1_VAE.pth`, `models_t5_umt5-xxl-enc-bf16.pth` + `google/umt5-xxl/`,
`models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` (Wan's names, text
tower included); plus a Casper-like lone `.safetensors` and expert LoRAs in
PEFT format. Source names come from the MLX parameter names through the
reverse rename tables below, so a wrong table fails the conversion loudly.
Every value is a fixed function of its seed.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np
from mlx.utils import tree_flatten
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from ..models import clip
from ..models.wan import transformer, vae
from .bundle import BundlePlan, build_bundle
from .core import conv_weight_names
from .torch_zip import save_torch_zip

TEXT_DIM = 64
DIT = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=36, out_dim=16, text_dim=TEXT_DIM,
           image_dim=1280)
VAE = dict(base_dim=8, z_dim=16)
CLIP = dict(width=1280, layers=2, heads=16, mlp_dim=256)
T5 = dict(vocab=256, d=TEXT_DIM, inner=TEXT_DIM, ff=96, heads=4, layers=2)
LORA_RANK = 4
NORM = re.compile(r"(norm|gamma|ln_|pre_norm)|\.proj\.[04]\.weight$")
# the LoRA targets of the experts, and their diffusers module names
TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o")
DIFFUSERS_NAMES = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
                   "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.o": "attn2.to_out.0"}
# the tokenizer's training text (a few languages, as UMT5's)
CORPUS = ["A quiet street at dusk with parked cars and wet asphalt.", "Ein ruhiger Park im Herbst, Blätter fallen.",
          "海边的日落，波浪拍打沙滩。", "Une cuisine vide avec une table en bois.",
          "the empty room, sunlight through the window"]
# Hugging Face UMT5 name part -> Wan's
T5_WAN_NAMES = {
    "0.SelfAttention.q": "attn.q", "0.SelfAttention.k": "attn.k", "0.SelfAttention.v": "attn.v",
    "0.SelfAttention.o": "attn.o", "0.SelfAttention.relative_attention_bias": "pos_embedding.embedding",
    "0.layer_norm": "norm1", "1.layer_norm": "norm2", "1.DenseReluDense.wi_0": "ffn.gate.0",
    "1.DenseReluDense.wi_1": "ffn.fc1", "1.DenseReluDense.wo": "ffn.fc2",
}
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


def random_params(model, seed: int = 0, norm: float = 0.05, bias: float = 0.02,
                  modulation: float | None = None, scale: float = 1.0) -> dict[str, np.ndarray]:
    """Random float32 values for every parameter of an MLX `model` (MLX names
    and layout): norm gains near 1 and weights scaled by 1/sqrt(fan in), so
    activations stay O(1); `modulation` (when given) is the scale of the
    DiT's modulation tables, O(1) offsets in trained models."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, p in tree_flatten(model.parameters()):
        shape = tuple(p.shape)
        if NORM.search(name) and name.endswith(("weight", "gamma")):
            a = 1.0 + norm * rng.standard_normal(shape)
        elif name.endswith("bias"):
            a = bias * rng.standard_normal(shape)
        elif modulation is not None and "modulation" in name:
            a = modulation * rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[-1]
            a = scale * rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))
        out[name] = a.astype(np.float32)
    return out


def _rename(name: str, table) -> str:
    for pattern, repl in table:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name)
    return name


def source_state(model, table=(), seed: int = 0, scale: float = 1.0) -> dict[str, np.ndarray]:
    """Random weights for every parameter of `model`, in torch layout, named by `table`."""
    convs = conv_weight_names(model)
    out = {}
    for name, a in random_params(model, seed, scale=scale).items():
        if name in convs and a.ndim >= 3:
            a = np.moveaxis(a, -1, 1)  # MLX (O, *k, I) -> torch (O, I, *k)
        out[_rename(name, table)] = a
    return out


def dit_state(seed: int = 0) -> dict[str, np.ndarray]:
    state = source_state(transformer.Model(transformer.Config(**DIT)), seed=seed)
    # modulation tables are O(1) offsets in trained models
    for k in state:
        if k.endswith("modulation"):
            state[k] = (0.1 * np.random.default_rng(seed).standard_normal(state[k].shape)).astype(np.float32)
    return state


def vae_state(seed: int = 1) -> dict[str, np.ndarray]:
    return source_state(vae.Model(vae.Config(**VAE)), VAE_TO_ORIGINAL, seed)


def clip_state(seed: int = 2) -> dict[str, np.ndarray]:
    state = source_state(clip.Model(clip.Config(**CLIP)), CLIP_TO_WAN, seed)
    # Wan's module keeps these with leading singleton axes
    state["visual.cls_embedding"] = state["visual.cls_embedding"].reshape(1, 1, -1)
    state["visual.pos_embedding"] = state["visual.pos_embedding"].reshape(1, *state["visual.pos_embedding"].shape[-2:])
    w = CLIP["width"]
    state["visual.post_norm.weight"] = np.ones(w, np.float32)  # ignored by the converter
    state["visual.post_norm.bias"] = np.zeros(w, np.float32)
    state["textual.token_embedding.weight"] = np.zeros((8, 16), np.float32)  # the text tower: left out
    return state


def t5_hf_weights(seed=0, vocab=300, d=64, inner=64, ff=96, heads=4, layers=2) -> dict[str, np.ndarray]:
    """A random UMT5 encoder in the Hugging Face layout."""
    rng = np.random.default_rng(seed)

    def r(*shape, scale=None):
        return (rng.standard_normal(shape) * (scale or shape[-1] ** -0.5)).astype(np.float32)

    w = {"shared.weight": r(vocab, d, scale=1.0), "encoder.final_layer_norm.weight": 1 + r(d, scale=0.1)}
    for i in range(layers):
        p = f"encoder.block.{i}.layer."
        for n in "qkv":
            w[f"{p}0.SelfAttention.{n}.weight"] = r(inner, d)
        w[f"{p}0.SelfAttention.o.weight"] = r(d, inner)
        w[f"{p}0.SelfAttention.relative_attention_bias.weight"] = r(32, heads, scale=1.0)
        w[f"{p}0.layer_norm.weight"] = 1 + r(d, scale=0.1)
        w[f"{p}1.DenseReluDense.wi_0.weight"] = r(ff, d)
        w[f"{p}1.DenseReluDense.wi_1.weight"] = r(ff, d)
        w[f"{p}1.DenseReluDense.wo.weight"] = r(d, ff)
        w[f"{p}1.layer_norm.weight"] = 1 + r(d, scale=0.1)
    return w


def t5_to_wan(w: dict) -> dict:
    """Hugging Face UMT5 names -> the names of Wan's .pth."""
    out = {"token_embedding.weight": w["shared.weight"], "norm.weight": w["encoder.final_layer_norm.weight"]}
    for k, v in w.items():
        if k.startswith("encoder.block."):
            parts = k.split(".")
            out[f"blocks.{parts[2]}.{T5_WAN_NAMES['.'.join(parts[4:-1])]}.weight"] = v
    return out


def make_tokenizer(folder: Path) -> Path:
    """A tiny umt5-like tokenizer.json: Unigram, <pad>=0 </s>=1 <unk>=2,
    Metaspace pre-tokenizer, `$A </s>` post-processor."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(CORPUS * 20, trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
    return folder


def random_adapter(blocks, dim: int = 64, rank: int = 4, seed: int = 1, targets=TARGETS, scale: float = 0.3):
    """{"blocks.i.target": (A (rank, dim), B (dim, rank))} in float32."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in blocks:
        for t in targets:
            a = (rng.standard_normal((rank, dim)) / np.sqrt(dim)).astype(np.float32)
            b = (scale * rng.standard_normal((dim, rank)) / np.sqrt(rank)).astype(np.float32)
            out[f"blocks.{i}.{t}"] = (a, b)
    return out


def adapter_keys(adapter: dict, fmt: str, alpha: float | None = None, prefix: str = "",
                 diffusers_names: bool = False) -> dict[str, np.ndarray]:
    """The adapter as a state dict in a trainer's layout (peft, diffsynth or kohya)."""
    sd = {}
    for module, (a, b) in adapter.items():
        _, i, target = module.split(".", 2)
        name = DIFFUSERS_NAMES[target] if diffusers_names else target
        if fmt == "peft":
            base = f"{prefix}blocks.{i}.{name}"
            sd[f"{base}.lora_A.weight"], sd[f"{base}.lora_B.weight"] = a, b
        elif fmt == "diffsynth":
            base = f"{prefix}blocks.{i}.{name}"
            sd[f"{base}.lora_A.default.weight"], sd[f"{base}.lora_B.default.weight"] = a, b
        elif fmt == "kohya":
            base = f"lora_unet_blocks_{i}_{name.replace('.', '_')}"
            sd[f"{base}.lora_down.weight"], sd[f"{base}.lora_up.weight"] = a, b
        else:
            raise ValueError(fmt)
        if alpha is not None:
            sd[f"{base}.alpha"] = np.array(alpha, np.float32)
    return sd


def lora_state(seed: int, blocks, dim: int = DIT["dim"]) -> dict[str, np.ndarray]:
    """A PEFT LoRA (diffusers module names, `transformer.` prefix) on
    self-attn q,k,v,o and cross-attn q,o of `blocks`."""
    adapter = random_adapter(blocks, dim, LORA_RANK, seed, scale=0.5)
    return adapter_keys(adapter, "peft", prefix="transformer.", diffusers_names=True)


def _dit_config() -> dict:
    keys = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim")
    return {"_class_name": "WanModel", "model_type": "i2v", **{k: DIT[k] for k in keys},
            "text_len": 512, "freq_dim": 256, "eps": 1e-6}


def write_fun_folder(root: Path) -> Path:
    """The tiny model folder (what a user downloads), plus `casper.safetensors`
    and `effect.safetensors` / `quality.safetensors` beside it."""
    root = Path(root)
    folder = root / "Wan2.1-Fun-tiny-InP"
    folder.mkdir(parents=True)
    save_file(dit_state(0), str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(_dit_config()))
    save_torch_zip(folder / "Wan2.1_VAE.pth", vae_state())
    save_torch_zip(folder / "models_t5_umt5-xxl-enc-bf16.pth", t5_to_wan(t5_hf_weights(seed=3, **T5)))
    make_tokenizer(folder / "google" / "umt5-xxl")
    save_torch_zip(folder / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
                   {k: v.astype(np.float16) for k, v in clip_state().items()})
    save_file(dit_state(7), str(root / "casper.safetensors"))  # the removal fine-tune
    layers = DIT["num_layers"]
    save_file(lora_state(11, [layers - 1]), str(root / "effect.safetensors"))
    save_file(lora_state(12, range(layers)), str(root / "quality.safetensors"))
    return folder


def convert_sources(root: Path, out: Path, experts: bool = True, overwrite: bool = False, log=print) -> Path:
    """The folder `write_fun_folder(root)` wrote, converted into the bundle
    `out` as `convert FOLDER --transformer casper.safetensors [--expert ...]`."""
    root = Path(root)
    kinds = ("effect", "quality") if experts else ()
    plan = BundlePlan(root / "Wan2.1-Fun-tiny-InP", root / "casper.safetensors",
                      experts={k: root / f"{k}.safetensors" for k in kinds})
    return build_bundle(plan, Path(out), overwrite, log=log)


def write_tiny_bundle(out: Path, experts: bool = False, overwrite: bool = False, log=print) -> Path:
    """A tiny random bundle at `out` (sources written to a temporary folder,
    converted, and removed)."""
    with tempfile.TemporaryDirectory(prefix="mlx-omnimatte-tiny-") as tmp:
        write_fun_folder(Path(tmp))
        return convert_sources(Path(tmp), out, experts, overwrite, log)
