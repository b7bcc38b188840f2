"""Wan2.1 VAE: key maps for the original `Wan2.1_VAE.pth` and the diffusers
`vae/` folder (AutoencoderKLWan), detection, and the architecture config.

MLX names follow the original block layout (`encoder.downsamples.i`,
`decoder.upsamples.i`, `*.middle.{0,1,2}`) with diffusers' names inside the
residual blocks and at the ends (see mlx_omnimatte/models/wan/vae.py), so
each format needs renames along one axis only:

* original: `residual.{0,2,3,6}` -> `norm1, conv1, norm2, conv2`,
  `shortcut` -> `conv_shortcut`, `conv1/head.0/head.2` -> `conv_in/norm_out/
  conv_out`, top-level `conv1/conv2` -> `quant_conv/post_quant_conv`.
* diffusers: `down_blocks.i` -> `downsamples.i`, `mid_block.{resnets.0,
  attentions.0, resnets.1}` -> `middle.{0,1,2}`, decoder `up_blocks.j.resnets.k`
  / `up_blocks.j.upsamplers.0` -> the flat `upsamples.(4j+k)` / `upsamples.(4j+3)`.

The latent mean/std are not in the original file (the reference code holds
them); diffusers keeps them in config.json. Both default to Wan2.1's values.
"""

from __future__ import annotations

from pathlib import Path

from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.jsonfile import read_json
from mlx_omnimatte.models.wan import vae as wan_vae

from .core import ComponentSpec
from .keymap import KeyMap, strip_prefix

_WB = r"(weight|bias)"
_BLOCK = r"((?:encoder\.downsamples|decoder\.upsamples|encoder\.middle|decoder\.middle)\.\d+)"

ORIGINAL = KeyMap(renames=[
    (r"(encoder|decoder)\.conv1\." + _WB, r"\1.conv_in.\2"),
    (r"(encoder|decoder)\.head\.0\.gamma", r"\1.norm_out.gamma"),
    (r"(encoder|decoder)\.head\.2\." + _WB, r"\1.conv_out.\2"),
    (r"conv1\." + _WB, r"quant_conv.\1"),
    (r"conv2\." + _WB, r"post_quant_conv.\1"),
    (_BLOCK + r"\.residual\.0\.gamma", r"\1.norm1.gamma"),
    (_BLOCK + r"\.residual\.2\." + _WB, r"\1.conv1.\2"),
    (_BLOCK + r"\.residual\.3\.gamma", r"\1.norm2.gamma"),
    (_BLOCK + r"\.residual\.6\." + _WB, r"\1.conv2.\2"),
    (_BLOCK + r"\.shortcut\." + _WB, r"\1.conv_shortcut.\2"),
    (_BLOCK + r"\.(resample\.1|time_conv|to_qkv|proj)\." + _WB, r"\1.\2.\3"),
    (_BLOCK + r"\.norm\.gamma", r"\1.norm.gamma"),
])

# Decoder: diffusers groups (num_res_blocks + 1) = 3 resnets and one upsampler
# per up block; the flat layout numbers them 4j + k (Wan2.1: 4 up blocks).
_UP = [(rf"decoder\.up_blocks\.{j}\.resnets\.{k}\.(.+)", rf"decoder.upsamples.{4 * j + k}.\1")
       for j in range(4) for k in range(3)]
_UP += [(rf"decoder\.up_blocks\.{j}\.upsamplers\.0\.(.+)", rf"decoder.upsamples.{4 * j + 3}.\1") for j in range(3)]

DIFFUSERS = KeyMap(renames=[
    (r"((?:encoder|decoder)\.(?:conv_in|conv_out)\.(?:weight|bias))", r"\1"),
    (r"((?:encoder|decoder)\.norm_out\.gamma)", r"\1"),
    (r"((?:post_)?quant_conv\.(?:weight|bias))", r"\1"),
    (r"encoder\.down_blocks\.(\d+)\.(.+)", r"encoder.downsamples.\1.\2"),
    (r"(encoder|decoder)\.mid_block\.resnets\.0\.(.+)", r"\1.middle.0.\2"),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", r"\1.middle.1.\2"),
    (r"(encoder|decoder)\.mid_block\.resnets\.1\.(.+)", r"\1.middle.2.\2"),
    *_UP,
])

# Keys that only a Wan VAE has, per format (after the common prefixes).
_MARKERS = {
    "original": ("encoder.conv1.weight", "decoder.conv1.weight", "conv1.weight", "conv2.weight",
                 "encoder.head.2.weight", "decoder.upsamples.0.residual.0.gamma"),
    "diffusers": ("encoder.conv_in.weight", "decoder.conv_in.weight", "quant_conv.weight",
                  "post_quant_conv.weight", "decoder.up_blocks.0.resnets.0.norm1.gamma"),
}


def _bare(ckpt) -> dict:
    prefix = strip_prefix(ckpt.keys())
    return {k[len(prefix):]: v for k, v in ckpt.items()}


def detect(ckpt) -> str | None:
    keys = _bare(ckpt)
    for fmt, markers in _MARKERS.items():
        if all(m in keys for m in markers):
            return fmt
    return None


def config_for(ckpt, fmt: str, src: Path) -> dict:
    keys = _bare(ckpt)
    conv_in = "encoder.conv1.weight" if fmt == "original" else "encoder.conv_in.weight"
    post = "conv2.weight" if fmt == "original" else "post_quant_conv.weight"
    if conv_in not in keys or post not in keys:
        raise OmnimatteError(f"{src}: not a Wan VAE checkpoint ({conv_in} or {post} missing)")
    shape = keys[conv_in].shape
    if len(shape) != 5 or shape[1] != 3:
        raise OmnimatteError(f"{src}: {conv_in} has shape {tuple(shape)}; only the Wan2.1 VAE "
                             "(3 input channels, no patchify) is supported")
    cfg = wan_vae.Config(base_dim=int(shape[0]), z_dim=int(keys[post].shape[0]),
                         latents_mean=_stats(keys[post].shape[0], wan_vae.LATENTS_MEAN, src),
                         latents_std=_stats(keys[post].shape[0], wan_vae.LATENTS_STD, src)).to_dict()
    if fmt == "diffusers":
        cfg.update(_diffusers_config(src, cfg))
    cfg.pop("dtype")
    return cfg


def _stats(z_dim: int, default: tuple, src) -> tuple:
    if z_dim != len(default):
        # Only the 16-channel Wan2.1 statistics are known; a config.json can supply others.
        return (0.0,) * z_dim if default is wan_vae.LATENTS_MEAN else (1.0,) * z_dim
    return default


def _diffusers_config(src: Path, cfg: dict) -> dict:
    """Architecture fields of a diffusers config.json beside the weights (if any)."""
    path = (src if src.is_dir() else src.parent) / "config.json"
    if not path.exists():
        return {}
    d = read_json(path)
    if d.get("is_residual") or d.get("patch_size") or d.get("attn_scales"):
        raise OmnimatteError(f"{path}: a Wan2.2-style or attention-scaled VAE (is_residual/patch_size/"
                             "attn_scales); only the Wan2.1 VAE is supported")
    if d.get("decoder_base_dim") not in (None, d.get("base_dim", cfg["base_dim"])):
        raise OmnimatteError(f"{path}: decoder_base_dim differs from base_dim; not supported")
    if tuple(d.get("dim_mult", (1, 2, 4, 4))) != (1, 2, 4, 4) or d.get("num_res_blocks", 2) != 2:
        raise OmnimatteError(f"{path}: dim_mult/num_res_blocks differ from Wan2.1's [1, 2, 4, 4]/2; "
                             "the key map supports the Wan2.1 layout only")
    out = {"temporal_downsample": list(d.get("temperal_downsample", cfg["temporal_downsample"]))}
    for k in ("latents_mean", "latents_std"):
        if d.get(k) is not None:
            out[k] = [float(v) for v in d[k]]
    for k, v in (("base_dim", cfg["base_dim"]), ("z_dim", cfg["z_dim"])):
        if k in d and d[k] != v:
            raise OmnimatteError(f"{path}: {k}={d[k]} but the weights say {v}")
    return out


def build(config: dict):
    return wan_vae.Model(wan_vae.Config.from_dict(config))


SPEC = ComponentSpec(
    component="vae",
    formats={"original": ORIGINAL, "diffusers": DIFFUSERS},
    detect=detect,
    config_for=config_for,
    build=build,
)
