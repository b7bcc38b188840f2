"""Converter for the Wan2.1 DiT (T2V, I2V, Fun-InP, Casper, ROSE, and
MiniMax-Remover's transformer: diffusers names, no text embedder and no
cross-attention, 48 input channels).

Source formats, one key table each (wrapper prefixes such as `model.` or
`model.diffusion_model.` are stripped by the core before matching):

* original: the Wan2.1 repository's `WanModel` state dict; VideoX-Fun and the
  Casper checkpoints use the same names. These are also the MLX names.
* diffusers: `WanTransformer3DModel` (`diffusion_pytorch_model*.safetensors`).
* diffsynth: DiffSynth-Studio's `WanModel` (diffsynth/models/wan_video_dit.py).
  Its names equal the original ones; its training scripts may leave the
  pipeline's `pipe.dit.` / `dit.` prefix on them, which this table accepts.
  A DiffSynth file without that prefix is indistinguishable from (and detected
  as) the original format, which converts it identically.

The architecture comes from a `config.json` beside the weights when there is
one (diffusers or original Wan names), otherwise from tensor shapes alone
(a lone Casper .safetensors): dim, in/out channels and patch from
patch_embedding, ffn width, layer count, text/freq/image widths; the head
count assumes Wan's head dim of 128.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.jsonfile import read_json
from mlx_omnimatte.models.wan.transformer import Config, Model

from .core import ComponentSpec
from .keymap import KeyMap, strip_prefix
from .quantize import linear_in_groups
from .readers import Checkpoint

_W = r"(weight|bias)"

# original names == MLX names: identity renames that also list what is allowed
_ORIGINAL_NAMES = [
    rf"patch_embedding\.{_W}",
    rf"(text_embedding|time_embedding)\.[02]\.{_W}",
    rf"time_projection\.1\.{_W}",
    rf"img_emb\.proj\.[0134]\.{_W}",
    r"blocks\.\d+\.modulation",
    rf"blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)\.{_W}",
    r"blocks\.\d+\.(self_attn|cross_attn)\.(norm_q|norm_k)\.weight",
    rf"blocks\.\d+\.cross_attn\.(k_img|v_img)\.{_W}",
    r"blocks\.\d+\.cross_attn\.norm_k_img\.weight",
    rf"blocks\.\d+\.norm3\.{_W}",
    rf"blocks\.\d+\.ffn\.[02]\.{_W}",
    rf"head\.head\.{_W}",
    r"head\.modulation",
]
ORIGINAL = KeyMap(renames=[(p, r"\g<0>") for p in _ORIGINAL_NAMES])

DIFFSYNTH = KeyMap(renames=[(rf"(?:pipe\.dit\.|dit\.)?({p})", r"\1") for p in _ORIGINAL_NAMES])

_ATTN = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "norm_q": "norm_q", "norm_k": "norm_k"}
DIFFUSERS = KeyMap(
    renames=[
        (rf"patch_embedding\.{_W}", r"patch_embedding.\1"),
        (rf"condition_embedder\.time_embedder\.linear_1\.{_W}", r"time_embedding.0.\1"),
        (rf"condition_embedder\.time_embedder\.linear_2\.{_W}", r"time_embedding.2.\1"),
        (rf"condition_embedder\.time_proj\.{_W}", r"time_projection.1.\1"),
        (rf"condition_embedder\.text_embedder\.linear_1\.{_W}", r"text_embedding.0.\1"),
        (rf"condition_embedder\.text_embedder\.linear_2\.{_W}", r"text_embedding.2.\1"),
        (rf"condition_embedder\.image_embedder\.norm1\.{_W}", r"img_emb.proj.0.\1"),
        (rf"condition_embedder\.image_embedder\.ff\.net\.0\.proj\.{_W}", r"img_emb.proj.1.\1"),
        (rf"condition_embedder\.image_embedder\.ff\.net\.2\.{_W}", r"img_emb.proj.3.\1"),
        (rf"condition_embedder\.image_embedder\.norm2\.{_W}", r"img_emb.proj.4.\1"),
        (r"blocks\.(\d+)\.scale_shift_table", r"blocks.\1.modulation"),
        *[(rf"blocks\.(\d+)\.attn1\.{re.escape(s)}\.{_W}", rf"blocks.\1.self_attn.{t}.\2") for s, t in _ATTN.items()],
        *[(rf"blocks\.(\d+)\.attn2\.{re.escape(s)}\.{_W}", rf"blocks.\1.cross_attn.{t}.\2") for s, t in _ATTN.items()],
        (rf"blocks\.(\d+)\.attn2\.add_k_proj\.{_W}", r"blocks.\1.cross_attn.k_img.\2"),
        (rf"blocks\.(\d+)\.attn2\.add_v_proj\.{_W}", r"blocks.\1.cross_attn.v_img.\2"),
        (r"blocks\.(\d+)\.attn2\.norm_added_k\.weight", r"blocks.\1.cross_attn.norm_k_img.weight"),
        # diffusers' norm2 is the cross-attention LayerNorm (original norm3)
        (rf"blocks\.(\d+)\.norm2\.{_W}", r"blocks.\1.norm3.\2"),
        (rf"blocks\.(\d+)\.ffn\.net\.0\.proj\.{_W}", r"blocks.\1.ffn.0.\2"),
        (rf"blocks\.(\d+)\.ffn\.net\.2\.{_W}", r"blocks.\1.ffn.2.\2"),
        (rf"proj_out\.{_W}", r"head.head.\1"),
        (r"scale_shift_table", r"head.modulation"),
    ],
    ignored={
        r"blocks\.\d+\.attn2\.norm_added_q\.weight": "unused by the forward (diffusers ignores it too)",
    },
)

FORMATS = {"original": ORIGINAL, "diffusers": DIFFUSERS, "diffsynth": DIFFSYNTH}

# adapter files, never full transformers
_LORA = re.compile(r"lora_A|lora_B|lora_down|lora_up|lora_te|lora_unet|(^|\.)alpha$|\.diff(_b)?$")
_DIFFSYNTH_PREFIX = re.compile(r"^(pipe\.dit\.|dit\.)")


def detect(ckpt: Checkpoint) -> str | None:
    keys = list(ckpt)
    if not keys or any(_LORA.search(k) for k in keys):
        return None
    prefix = strip_prefix(keys)
    bare = [k[len(prefix):] for k in keys]
    fmt = None
    if all(_DIFFSYNTH_PREFIX.match(k) for k in bare):
        bare, fmt = [_DIFFSYNTH_PREFIX.sub("", k) for k in bare], "diffsynth"
    names = set(bare)
    if "patch_embedding.weight" not in names:
        return None
    blocks = " ".join(k for k in bare if k.startswith("blocks."))
    if "time_embedding.0.weight" in names or ".self_attn." in blocks:
        return fmt or "original"
    if fmt is None and ("condition_embedder.time_embedder.linear_1.weight" in names or ".attn1." in blocks):
        return "diffusers"
    return None


# --------------------------------------------------------------------------- architecture


def _target_shapes(ckpt: Checkpoint, fmt: str) -> dict[str, tuple]:
    keymap = FORMATS[fmt]
    prefix = strip_prefix(list(ckpt))
    shapes = {}
    for key, t in ckpt.items():
        target = keymap.target(key[len(prefix):])
        if target is not None:
            shapes[target] = tuple(t.shape)
    return shapes


def infer_config(shapes: dict[str, tuple], source) -> dict:
    """Architecture from MLX-named tensor shapes (conv weights in torch layout)."""

    def need(name):
        if name not in shapes:
            raise OmnimatteError(f"{source}: missing weight for {name} (incomplete checkpoint?)")
        return shapes[name]

    pe = need("patch_embedding.weight")
    cross = "text_embedding.0.weight" in shapes or any(".cross_attn." in n for n in shapes)
    if len(pe) != 5:
        raise OmnimatteError(f"{source}: patch_embedding.weight has shape {pe}, expected a Conv3d weight")
    dim, in_dim, patch = pe[0], pe[1], tuple(pe[2:])
    layers = sorted({int(m.group(1)) for n in shapes if (m := re.match(r"blocks\.(\d+)\.", n))})
    if not layers:
        raise OmnimatteError(f"{source}: no transformer blocks in the checkpoint")
    ffn = [shapes[n][0] for n in sorted(shapes) if re.fullmatch(r"blocks\.\d+\.ffn\.0\.weight", n)]
    if not ffn:
        raise OmnimatteError(f"{source}: missing weight for blocks.{layers[0]}.ffn.0.weight")
    if dim % 128:
        raise OmnimatteError(f"{source}: width {dim} is not a multiple of Wan's head dim 128; "
                             "put the model's config.json beside the weights")
    return {
        "dim": dim,
        "ffn_dim": ffn[0],
        "num_heads": dim // 128,
        "num_layers": layers[-1] + 1,
        "in_dim": in_dim,
        "out_dim": need("head.head.weight")[0] // math.prod(patch),
        "text_dim": need("text_embedding.0.weight")[1] if cross else Config.text_dim,
        "cross_attn": cross,
        "freq_dim": need("time_embedding.0.weight")[1],
        "patch_size": list(patch),
        "image_dim": shapes["img_emb.proj.0.weight"][0] if "img_emb.proj.0.weight" in shapes else None,
        "cross_attn_norm": any(n.endswith(".norm3.weight") for n in shapes) if cross else False,
    }


def _from_diffusers_json(c: dict, path: Path) -> dict:
    heads, head_dim = c.get("num_attention_heads"), c.get("attention_head_dim")
    out = {"num_heads": heads, "dim": heads * head_dim if heads and head_dim else None}
    for ours, theirs in (("ffn_dim", "ffn_dim"), ("num_layers", "num_layers"), ("in_dim", "in_channels"),
                         ("out_dim", "out_channels"), ("text_dim", "text_dim"), ("freq_dim", "freq_dim"),
                         ("eps", "eps"), ("patch_size", "patch_size"), ("image_dim", "image_dim"),
                         ("cross_attn_norm", "cross_attn_norm"), ("rope_max_seq_len", "rope_max_seq_len")):
        if theirs in c:
            out[ours] = c[theirs]
    if c.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise OmnimatteError(f"{path}: qk_norm {c['qk_norm']!r} is not supported (Wan2.1 uses rms_norm_across_heads)")
    if c.get("pos_embed_seq_len"):
        raise OmnimatteError(f"{path}: pos_embed_seq_len is set (a first-last-frame model): not supported")
    if c.get("image_dim") and c.get("added_kv_proj_dim") not in (None, out["dim"]):
        raise OmnimatteError(f"{path}: added_kv_proj_dim {c['added_kv_proj_dim']} differs from the width")
    return {k: v for k, v in out.items() if v is not None}


def _from_original_json(c: dict, path: Path) -> dict:
    out = {k: c[k] for k in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_len",
                             "text_dim", "freq_dim", "eps", "patch_size", "cross_attn_norm") if k in c}
    kind = c.get("model_type")
    if kind == "flf2v":
        raise OmnimatteError(f"{path}: model_type flf2v (first-last-frame) is not supported")
    if kind in ("t2v", "i2v"):
        out["image_dim"] = 1280 if kind == "i2v" else None
    return out


def read_json_config(src: Path) -> tuple[dict, Path] | None:
    """Architecture fields from a Wan config.json beside the weights, if any."""
    path = (src if src.is_dir() else src.parent) / "config.json"
    if not path.is_file():
        return None
    c = read_json(path)
    if c.get("_class_name") in ("WanTransformer3DModel", "Transformer3DModel") or "num_attention_heads" in c:
        return _from_diffusers_json(c, path), path
    if c.get("_class_name") == "WanModel" or {"dim", "num_heads"} <= c.keys():
        return _from_original_json(c, path), path
    return None  # some other component's config: rely on the shapes


def _norm(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


_CHECKED = ("dim", "in_dim", "out_dim", "ffn_dim", "text_dim", "freq_dim", "patch_size", "image_dim")
# fields the weights decide alone (MiniMax-Remover's config.json keeps cross_attn_norm True with no cross-attention)
_FROM_WEIGHTS = ("cross_attn", "cross_attn_norm")


def config_for(ckpt: Checkpoint, fmt: str, src: Path) -> dict:
    cfg = infer_config(_target_shapes(ckpt, fmt), ckpt.source)
    found = read_json_config(Path(src))
    if found is not None:
        given, path = found
        for k in _CHECKED:  # num_layers is left to the core: it names the missing block
            if k in given and _norm(given[k]) != _norm(cfg[k]):
                raise OmnimatteError(f"{path}: {k} = {given[k]} but the weights in {ckpt.source} have {cfg[k]}")
        cfg.update({k: v for k, v in given.items() if not (k in _FROM_WEIGHTS and not cfg["cross_attn"])})
    try:
        return Config.from_dict(cfg).to_dict()
    except (TypeError, ValueError) as e:
        raise OmnimatteError(f"{ckpt.source}: inconsistent architecture ({e})") from None


def build(config: dict) -> Model:
    return Model(Config.from_dict(config))


# The block linears hold ~98% of the weights (1.3B and 14B); embeddings, the head, norms and
# modulation tables stay as converted (see parity/bench_quantize.py).
_QUANTIZED = re.compile(r"blocks\.\d+\.(?:self_attn\.[qkvo]|cross_attn\.(?:[qkvo]|k_img|v_img)|ffn\.[02])")


def quantizable(path: str, module, group_size: int) -> bool:
    return bool(_QUANTIZED.fullmatch(path)) and linear_in_groups(module, group_size)


SPEC = ComponentSpec(
    component="transformer",
    formats=FORMATS,
    detect=detect,
    config_for=config_for,
    build=build,
    # small tensors applied to the float32 stream: kept in float32 whatever the dtype
    keep_fp32=(
        r"blocks\.\d+\.modulation",
        r"head\.modulation",
        r"time_embedding\..*",
        r"time_projection\..*",
        r"blocks\.\d+\.norm3\..*",
        r"img_emb\.proj\.[04]\..*",
    ),
    quantizable=quantizable,
)
