"""CLIP image encoder converter: the visual tower only -> `mlx_omnimatte.models.clip`.

Source layouts (one key map each):
* `wan`: Wan's `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`. It is
  a state dict of Wan's own `XLMRobertaCLIP` (wan/modules/clip.py loads it
  with `load_state_dict`), so it uses Wan's names: `visual.patch_embedding`,
  `visual.cls_embedding` [1,1,D], `visual.pos_embedding` [1,N,D],
  `visual.pre_norm`, `visual.transformer.N.{norm1,attn.to_qkv,attn.proj,norm2,mlp.0,mlp.2}`,
  `visual.post_norm`, `visual.head`; plus `textual.*` and `log_scale`.
* `open_clip`: an open_clip CLIP state dict (`visual.conv1`, `visual.class_embedding`,
  `visual.transformer.resblocks.N.{ln_1,attn.in_proj_*,attn.out_proj,ln_2,mlp.c_fc,mlp.c_proj}`, ...).
* `hf`: transformers `CLIPVisionModel` / `CLIPModel` (`vision_model.*`, or no
  prefix as transformers v5 writes a CLIPVisionModel); its
  separate q/k/v projections are fused on read into the qkv layout of the others.

Only ViT-H/14-wide towers (width 1280, 16 heads) are accepted: Wan's image
branch takes 1280-wide features. The MLP activation comes from a config beside
the weights (`hidden_act` gelu or quick_gelu; see `hidden_act`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np

from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.jsonfile import read_json
from mlx_omnimatte.models import clip as clip_model

from .core import ComponentSpec, Converted, convert as generic_convert
from .keymap import KeyMap
from .readers import Checkpoint, LazyTensor

WIDTH = 1280  # ViT-H/14, what Wan's img_emb (LayerNorm(1280)) takes
HEAD_DIM = 80  # ViT-H/14: 16 heads of 80

_HEAD = "projection head and final norm: Wan reads the features before them"
_V = r"(?:vision_model\.)?"

FORMATS = {
    "wan": KeyMap(
        renames=[
            (r"visual\.patch_embedding\.weight", r"patch_embedding.weight"),
            (r"visual\.cls_embedding", r"cls_embedding"),
            (r"visual\.pos_embedding", r"pos_embedding"),
            (r"visual\.pre_norm\.(weight|bias)", r"pre_norm.\1"),
            (r"visual\.transformer\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
            (r"visual\.transformer\.(\d+)\.attn\.to_qkv\.(weight|bias)", r"blocks.\1.attn.qkv.\2"),
            (r"visual\.transformer\.(\d+)\.attn\.proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
            (r"visual\.transformer\.(\d+)\.mlp\.0\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
            (r"visual\.transformer\.(\d+)\.mlp\.2\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
        ],
        ignored={r"visual\.post_norm\.(weight|bias)": _HEAD, r"visual\.head": _HEAD},
    ),
    "open_clip": KeyMap(
        renames=[
            (r"visual\.conv1\.weight", r"patch_embedding.weight"),
            (r"visual\.class_embedding", r"cls_embedding"),
            (r"visual\.positional_embedding", r"pos_embedding"),
            (r"visual\.ln_pre\.(weight|bias)", r"pre_norm.\1"),
            (r"visual\.transformer\.resblocks\.(\d+)\.ln_([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
            (r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
            (r"visual\.transformer\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
            (r"visual\.transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
            (r"visual\.transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
        ],
        ignored={r"visual\.ln_post\.(weight|bias)": _HEAD, r"visual\.proj": _HEAD},
    ),
    # transformers CLIPVisionModel: `vision_model.` in v4 files and CLIPModel
    # files, no prefix in files written by transformers v5
    "hf": KeyMap(
        renames=[
            (_V + r"embeddings\.patch_embedding\.weight", r"patch_embedding.weight"),
            (_V + r"embeddings\.class_embedding", r"cls_embedding"),
            (_V + r"embeddings\.position_embedding\.weight", r"pos_embedding"),
            (_V + r"pre_layrnorm\.(weight|bias)", r"pre_norm.\1"),
            (_V + r"encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
            # virtual key: q/k/v fused by _view
            (_V + r"encoder\.layers\.(\d+)\.self_attn\.qkv_proj\.(weight|bias)", r"blocks.\1.attn.qkv.\2"),
            (_V + r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
            (_V + r"encoder\.layers\.(\d+)\.mlp\.fc([12])\.(weight|bias)", r"blocks.\1.mlp.fc\2.\3"),
        ],
        ignored={
            _V + r"post_layernorm\.(weight|bias)": _HEAD,
            r"visual_projection\.weight": _HEAD,
            _V + r"embeddings\.position_ids": "index buffer, not a weight",
        },
    ),
}

_VISUAL = re.compile(r"^(?:visual\.|vision_model\.|visual_projection\.|embeddings\.|encoder\.layers\.|pre_layrnorm\."
                     r"|post_layernorm\.)")


def select(key: str) -> bool:
    """The vision tower; the text tower (`textual.*`, `text_model.*`, open_clip's
    top-level text keys) and the logit scale are left out."""
    return bool(_VISUAL.match(key))


def detect(ckpt: Checkpoint) -> str | None:
    keys = set(ckpt)
    if "visual.patch_embedding.weight" in keys and "visual.transformer.0.attn.to_qkv.weight" in keys:
        return "wan"
    if "visual.conv1.weight" in keys and "visual.transformer.resblocks.0.attn.in_proj_weight" in keys:
        return "open_clip"
    if {"vision_model.embeddings.patch_embedding.weight", "embeddings.patch_embedding.weight"} & keys \
            and ({"vision_model.pre_layrnorm.weight", "pre_layrnorm.weight"} & keys):
        return "hf"
    return None


def _reshaped(t: LazyTensor, shape: tuple) -> LazyTensor:
    return LazyTensor(shape, t.dtype, lambda: t.read().reshape(shape))


def _fused(parts: list[LazyTensor]) -> LazyTensor:
    if len({p.dtype for p in parts}) != 1:
        raise OmnimatteError("CLIP q/k/v projections have different dtypes")
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    return LazyTensor(shape, parts[0].dtype, lambda: np.concatenate([p.read() for p in parts], axis=0))


def _view(ckpt: Checkpoint, fmt: str) -> Checkpoint:
    """The checkpoint with one shape per weight whatever the layout: class
    embedding [D], positions [N, D], fused qkv."""
    items = {k: v for k, v in ckpt.items() if select(k)}
    for key in ("visual.cls_embedding", "visual.pos_embedding"):
        if fmt == "wan" and key in items:
            items[key] = _reshaped(items[key], items[key].shape[-2:] if key.endswith("pos_embedding")
                                   else items[key].shape[-1:])
    if fmt == "hf":
        pat = re.compile(r"((?:vision_model\.)?encoder\.layers\.\d+\.self_attn\.)q_proj\.(weight|bias)")
        for key in [k for k in items if pat.fullmatch(k)]:
            pre, kind = pat.fullmatch(key).groups()
            names = [f"{pre}{p}_proj.{kind}" for p in "qkv"]
            missing = [n for n in names if n not in items]
            if missing:
                raise OmnimatteError(f"{ckpt.source}: missing weight {missing[0]}")
            items[f"{pre}qkv_proj.{kind}"] = _fused([items.pop(n) for n in names])
    return Checkpoint(items, ckpt.source, ckpt.file_format, ckpt.metadata)


def config_for(ckpt: Checkpoint, fmt: str, src: Path) -> dict:
    keymap = FORMATS[fmt]
    shapes = {t: v.shape for k, v in ckpt.items() if (t := keymap.target(k)) is not None}
    for name in ("patch_embedding.weight", "pos_embedding", "blocks.0.mlp.fc1.weight"):
        if name not in shapes:
            raise OmnimatteError(f"{src}: missing weight for {name} (incomplete CLIP vision tower?)")
    width = shapes["pos_embedding"][-1]
    if width != WIDTH:
        raise OmnimatteError(f"{src}: CLIP vision width {width}, but Wan's image branch needs "
                             f"ViT-H/14 features (width {WIDTH})")
    patch = shapes["patch_embedding.weight"][-1]
    grid = math.isqrt(shapes["pos_embedding"][0] - 1)
    if grid * grid + 1 != shapes["pos_embedding"][0]:
        raise OmnimatteError(f"{src}: {shapes['pos_embedding'][0]} positions is not a square grid plus a class token")
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k)))
    return {"image_size": grid * patch, "patch_size": patch, "width": width, "layers": layers,
            "heads": width // HEAD_DIM, "mlp_dim": shapes["blocks.0.mlp.fc1.weight"][0], "eps": 1e-5,
            "hidden_act": hidden_act(Path(src))}


def _json_beside(src: Path, name: str) -> dict:
    path = (src if src.is_dir() else src.parent) / name
    if not path.is_file():
        return {}
    return read_json(path)


def hidden_act(src: Path) -> str:
    """The MLP activation a config beside the weights names: transformers'
    `hidden_act` (top level or `vision_config`), open_clip's `quick_gelu`
    flag; exact GELU (Wan's ViT-H/14) when none says."""
    hf = _json_beside(src, "config.json")
    oc = _json_beside(src, "open_clip_config.json")
    act = (hf.get("vision_config") or {}).get("hidden_act") or hf.get("hidden_act")
    if act is None and (oc.get("model_cfg") or oc).get("quick_gelu"):
        act = "quick_gelu"
    act = act or "gelu"
    if act not in clip_model.ACTIVATIONS:
        raise OmnimatteError(f"{src}: CLIP hidden_act {act!r} is not supported "
                             f"({' or '.join(clip_model.ACTIVATIONS)})")
    return act


def build(config: dict):
    return clip_model.Model(clip_model.Config.from_dict(config))


def convert(ckpt: Checkpoint, fmt: str, dtype: str, **_options) -> Converted:
    view = _view(ckpt, fmt)
    conv = generic_convert(view, dataclasses.replace(SPEC, custom=None), fmt, dtype)
    conv.ignored.update({k: "not part of the vision tower" for k in ckpt if not select(k)})
    return conv


SPEC = ComponentSpec(
    component="clip",
    formats=FORMATS,
    detect=detect,
    config_for=config_for,
    build=build,
    select=select,
    keep_fp32=(r"cls_embedding", r"pos_embedding", r".*norm\d?\.(weight|bias)"),
    custom=convert,
)
