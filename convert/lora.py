"""LoRA files -> an EasyOmnimatte expert directory (component "expert").

Source formats (detected from the keys; any one of the prefixes
`base_model.model.`, `model.diffusion_model.`, `diffusion_model.`,
`transformer.`, `model.`, `pipe.dit.`, `dit.` is stripped; module names may
be original Wan or diffusers names, see `MODULE_NAMES`):

  peft       diffusers / PEFT: `blocks.0.attn1.to_q.lora_A.weight`,
             `...lora_B.weight`, optional `...lora_B.bias` (PEFT lora_bias)
             and `...alpha`
  kohya      kohya-ss / musubi-tuner: `lora_unet_blocks_0_self_attn_q.lora_down.weight`,
             `...lora_up.weight`, `...alpha`
  diffsynth  DiffSynth-Studio: `blocks.0.self_attn.q.lora_A.default.weight`,
             `...lora_B.default.weight`

An optional learned domain embedding (added to the replica tokens) is read
from a key `domain_embedding` (or `domain_emb`, `domain_embed`,
`branch_embedding`, each optionally ending in `.weight`).

The expert's settings come from, first that says wins:

1. options given to `convert(ckpt, spec, fmt, dtype, **options)` (the CLI's
   `--expert-kind`, `--k`, `--mask-type`; the bundle builder passes `kind`):
   kind ("effect"/"quality"), k, mask_type ("A"/"B"/"C"), tau, num_layers,
   dim, alpha; None means "not given". `manifest=PATH` names a manifest file;
2. a manifest JSON: the one named by `manifest=`, else one beside the LoRA
   file: `<file stem>.json`, `<file name>.json`, or `manifest.json` in the
   same folder (skipped when it is a bundle manifest), with any of the keys
   kind, k, mask_type, tau_default (or tau), num_layers, dim, alpha;
3. the LoRA itself: dim from the tensor shapes, num_layers from the width
   (1536 -> 30, 5120 -> 40; else the last block + 1), kind from the blocks
   (all blocks -> quality, a tail -> effect), K = the number of blocks,
   mask B for effect and C for quality, tau 0.5, alpha = rank when the file
   has no `.alpha`.

Per-module alphas (or ranks) that give a different alpha/rank than the
first module are folded into that module's B, so one manifest alpha/rank
holds for all.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_omnimatte.branch.experts import (
    DEFAULT_MASK,
    DEFAULT_TAU,
    KINDS,
    LAYERS_BY_DIM,
    SUPPORTED_TARGETS,
    check_tau,
)
from mlx_omnimatte.branch.attention import check_mask_type
from mlx_omnimatte.errors import OmnimatteError

from .core import DTYPES, ComponentSpec, Converted
from .keymap import KeyMap
from .readers import Checkpoint

PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "model.",
            "pipe.dit.", "dit.")

_DOMAIN = (r"(?:domain_embedding|domain_emb|domain_embed|branch_embedding)(?:\.weight)?", "domain_embedding")


def _dotted(a: str, b: str, bias: str | None = None) -> KeyMap:
    """Rules for `blocks.N.<module>.<a>` / `<b>` / `.alpha` names."""
    rules = [(rf"blocks\.(\d+)\.(.+)\.{a}", r"blocks.\1.\2.lora_a"),
             (rf"blocks\.(\d+)\.(.+)\.{b}", r"blocks.\1.\2.lora_b")]
    if bias:
        rules.append((rf"blocks\.(\d+)\.(.+)\.{bias}", r"blocks.\1.\2.lora_bias"))
    rules += [(r"blocks\.(\d+)\.(.+)\.alpha", r"blocks.\1.\2.alpha"), _DOMAIN]
    return KeyMap(rules)


_KOHYA = r"lora_unet_(?:diffusion_model_|transformer_|model_)?blocks_(\d+)_(.+)"

# Source format -> rules to `blocks.N.<source module>.<role>`; the module
# name is then normalized with MODULE_NAMES.
FORMATS = {
    "peft": _dotted(r"lora_A\.weight", r"lora_B\.weight", r"lora_B\.bias"),
    "diffsynth": _dotted(r"lora_A(?:\.default)?\.weight", r"lora_B(?:\.default)?\.weight",
                         r"lora_B(?:\.default)?\.bias"),
    "kohya": KeyMap([
        (rf"{_KOHYA}\.lora_down\.weight", r"blocks.\1.\2.lora_a"),
        (rf"{_KOHYA}\.lora_up\.weight", r"blocks.\1.\2.lora_b"),
        (rf"{_KOHYA}\.alpha", r"blocks.\1.\2.alpha"),
        _DOMAIN,
    ]),
}

# Module names inside a block (original Wan and diffusers) -> MLX target.
MODULE_NAMES = {
    "self_attn.q": "self_attn.q", "attn1.to_q": "self_attn.q",
    "self_attn.k": "self_attn.k", "attn1.to_k": "self_attn.k",
    "self_attn.v": "self_attn.v", "attn1.to_v": "self_attn.v",
    "self_attn.o": "self_attn.o", "attn1.to_out.0": "self_attn.o",
    "cross_attn.q": "cross_attn.q", "attn2.to_q": "cross_attn.q",
    "cross_attn.o": "cross_attn.o", "attn2.to_out.0": "cross_attn.o",
}
# Known modules a replica-only LoRA cannot act on, with the reason.
UNSUPPORTED = {
    **{m: "acts on the text/image tokens both halves share" for m in (
        "cross_attn.k", "cross_attn.v", "cross_attn.k_img", "cross_attn.v_img",
        "attn2.to_k", "attn2.to_v", "attn2.add_k_proj", "attn2.add_v_proj")},
    **{m: "the FFN stays frozen in EasyOmnimatte" for m in ("ffn.0", "ffn.2", "ffn.net.0.proj", "ffn.net.2")},
}
# kohya flattens dots to underscores
_KOHYA_NAMES = {k.replace(".", "_"): v for k, v in MODULE_NAMES.items()}
_KOHYA_UNSUPPORTED = {k.replace(".", "_"): v for k, v in UNSUPPORTED.items()}

_LORA_KEY = re.compile(r"\.(?:lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight$")
OPTIONS = ("kind", "k", "mask_type", "tau", "num_layers", "dim", "alpha")  # + manifest=PATH


def detect(ckpt: Checkpoint) -> str | None:
    """A format name only for LoRA files (any key that is a LoRA A/B weight)."""
    keys = list(ckpt)
    if not any(_LORA_KEY.search(k) for k in keys):
        return None
    if any(".lora_down." in k or ".lora_up." in k for k in keys):
        return "kohya"
    if any(".default.weight" in k for k in keys):
        return "diffsynth"
    return "peft"


def _strip(key: str) -> str:
    for p in PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


# --------------------------------------------------------------------------- settings


def sidecar_manifest(source: Path, explicit: Path | None = None) -> tuple[dict, Path | None]:
    """The manifest JSON named explicitly, else the one beside a LoRA file, if
    any (see the module doc)."""
    source = Path(source)
    if explicit is not None and not Path(explicit).is_file():
        raise OmnimatteError(f"{explicit}: expert manifest not found")
    cands = [Path(explicit)] if explicit is not None else [
        source.with_suffix(".json"), source.with_name(source.name + ".json"), source.parent / "manifest.json"]
    for cand in cands:
        if cand == source or not cand.is_file():
            continue
        try:
            data = json.loads(cand.read_text())
        except (OSError, ValueError):
            raise OmnimatteError(f"{cand}: expert manifest is not valid JSON") from None
        if not isinstance(data, dict):
            raise OmnimatteError(f"{cand}: expert manifest must be a JSON object")
        if explicit is None and cand.name == "manifest.json" and ("components" in data or data.get("component", "expert") != "expert"):
            continue  # a bundle's or another tool's manifest, not ours
        if "tau_default" in data and "tau" not in data:
            data["tau"] = data["tau_default"]
        return {k: data[k] for k in OPTIONS if data.get(k) is not None}, cand
    return {}, None


def _positive_int(name: str, value, where) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise OmnimatteError(f"{where}: {name} {value!r} must be a positive integer")
    return int(value)


def _settings(options: dict, source: Path) -> tuple[dict, Path | None]:
    given = {k: v for k, v in options.items() if v is not None}
    manifest, mpath = sidecar_manifest(source, given.pop("manifest", None))
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise OmnimatteError(f"expert conversion: unknown option {unknown[0]!r} ({', '.join(OPTIONS)})")
    s = {**manifest, **given}
    where = mpath if (mpath and set(manifest) - set(given)) else "expert option"
    if "kind" in s:
        kind = str(s["kind"]).lower()
        if kind not in KINDS:
            raise OmnimatteError(f"{where}: expert kind {s['kind']!r} unknown (effect or quality)")
        s["kind"] = kind
    for name in ("k", "num_layers", "dim"):
        if name in s:
            s[name] = _positive_int(name, s[name], where)
    try:
        if "mask_type" in s:
            s["mask_type"] = check_mask_type(s["mask_type"])
        if "tau" in s:
            s["tau"] = check_tau(s["tau"])
    except OmnimatteError as e:
        raise OmnimatteError(f"{where}: {e}") from None
    if "alpha" in s:
        if isinstance(s["alpha"], bool) or not isinstance(s["alpha"], (int, float)) or not s["alpha"] > 0:
            raise OmnimatteError(f"{where}: alpha {s['alpha']!r} must be a positive number")
        s["alpha"] = float(s["alpha"])
    return s, mpath


# --------------------------------------------------------------------------- conversion


def _plan(ckpt: Checkpoint, fmt: str):
    """{(block, target): {role: source key}} and the domain embedding key."""
    keymap = FORMATS[fmt]
    names = _KOHYA_NAMES if fmt == "kohya" else MODULE_NAMES
    unsupported = _KOHYA_UNSUPPORTED if fmt == "kohya" else UNSUPPORTED
    modules, domain = {}, None
    for key in ckpt:
        target = keymap.target(_strip(key))
        if target is None:
            if ".dora_scale" in key or "magnitude" in key:
                raise OmnimatteError(f"{ckpt.source}: {key}: DoRA adapters are not supported (plain LoRA only)")
            raise OmnimatteError(f"{ckpt.source}: unexpected key {key} (not a {fmt} LoRA tensor of the DiT blocks)")
        if target == "domain_embedding":
            if domain is not None:
                raise OmnimatteError(f"{ckpt.source}: keys {domain} and {key} are both a domain embedding")
            domain = key
            continue
        _, block, rest = target.split(".", 2)
        module, role = rest.rsplit(".", 1)
        if module in unsupported:
            raise OmnimatteError(f"{ckpt.source}: {key}: LoRA on {module} is not supported "
                                 f"({unsupported[module]})")
        if module not in names:
            raise OmnimatteError(f"{ckpt.source}: {key}: unknown module {module} "
                                 f"(LoRA targets: {', '.join(SUPPORTED_TARGETS)})")
        slot = modules.setdefault((int(block), names[module]), {})
        if role in slot:
            raise OmnimatteError(f"{ckpt.source}: keys {slot[role]} and {key} are the same LoRA tensor")
        slot[role] = key
    if not modules:
        raise OmnimatteError(f"{ckpt.source}: no LoRA A/B pairs found")
    order = sorted(modules, key=lambda m: (m[0], SUPPORTED_TARGETS.index(m[1])))
    return {m: modules[m] for m in order}, domain


def _matrix(ckpt: Checkpoint, key: str) -> tuple[int, ...]:
    shape = tuple(ckpt[key].shape)
    if len(shape) == 4 and shape[2:] == (1, 1):  # kohya may store linears as 1x1 convs
        shape = shape[:2]
    if len(shape) != 2:
        raise OmnimatteError(f"{ckpt.source}: {key} has shape {tuple(ckpt[key].shape)}, a LoRA matrix is 2-D")
    return shape


def _scalar(ckpt: Checkpoint, key: str) -> float:
    a = np.asarray(ckpt[key].load(), dtype=np.float64)
    if a.size != 1 or not np.isfinite(a).all() or float(a.reshape(-1)[0]) <= 0:
        raise OmnimatteError(f"{ckpt.source}: {key} must hold one positive number (the LoRA alpha)")
    return float(a.reshape(-1)[0])


def convert_lora(ckpt: Checkpoint, fmt: str, dtype: str = "bfloat16", **options) -> Converted:
    if fmt not in FORMATS:
        raise OmnimatteError(f"{ckpt.source}: unknown LoRA format {fmt!r} ({', '.join(FORMATS)})")
    if dtype not in DTYPES:
        raise OmnimatteError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
    src = ckpt.source
    s, mpath = _settings(options, Path(src))
    modules, domain_key = _plan(ckpt, fmt)

    # pairs and shapes, first mismatch named
    dim = s.get("dim")
    shapes = {}
    for (block, target), roles in modules.items():
        name = f"blocks.{block}.{target}"
        if "lora_a" not in roles and "lora_b" not in roles:
            raise OmnimatteError(f"{src}: {next(iter(roles.values()))}: no LoRA matrices for {name} (missing pair)")
        if "lora_a" not in roles or "lora_b" not in roles:
            have, lack = ("lora_a", "B (up)") if "lora_a" in roles else ("lora_b", "A (down)")
            raise OmnimatteError(f"{src}: {roles[have]}: LoRA {name} has no {lack} matrix (missing pair)")
        a_shape, b_shape = _matrix(ckpt, roles["lora_a"]), _matrix(ckpt, roles["lora_b"])
        if a_shape[0] != b_shape[1]:
            raise OmnimatteError(f"{src}: {name}: rank mismatch, {roles['lora_a']} has shape {a_shape} "
                                 f"and {roles['lora_b']} {b_shape}")
        if dim is None:
            dim = a_shape[1]
        if a_shape[1] != dim or b_shape[0] != dim:
            raise OmnimatteError(f"{src}: {name}: maps {a_shape[1]} -> {b_shape[0]} features, "
                                 f"the model width is {dim}")
        if "lora_bias" in roles and tuple(ckpt[roles["lora_bias"]].shape) != (dim,):
            raise OmnimatteError(f"{src}: {roles['lora_bias']} has shape {tuple(ckpt[roles['lora_bias']].shape)}, "
                                 f"expected ({dim},)")
        shapes[(block, target)] = a_shape[0]

    # one manifest alpha/rank; other module scales folded into B
    def module_alpha(roles, r):
        return _scalar(ckpt, roles["alpha"]) if "alpha" in roles else s.get("alpha", float(r))

    first = next(iter(modules))
    rank = shapes[first]
    alpha = module_alpha(modules[first], rank)
    fold = {}
    for m, roles in modules.items():
        f = (module_alpha(roles, shapes[m]) / shapes[m]) / (alpha / rank)
        if not math.isclose(f, 1.0, rel_tol=1e-7):
            fold[m] = f

    blocks = sorted({b for b, _ in modules})
    num_layers = s.get("num_layers") or LAYERS_BY_DIM.get(dim) or blocks[-1] + 1
    if blocks[-1] >= num_layers:
        raise OmnimatteError(f"{src}: LoRA on block {blocks[-1]}, but the model has {num_layers} blocks")
    kind = s.get("kind") or _infer_kind(blocks, num_layers, src)
    k = None
    if kind == "effect":
        k = s.get("k") or (num_layers - blocks[0])
        if k > num_layers:
            raise OmnimatteError(f"{src}: K={k} exceeds the model's {num_layers} blocks")
        if blocks[0] < num_layers - k:
            raise OmnimatteError(f"{src}: the Effect expert has LoRA on block {blocks[0]}, outside the last "
                                 f"K={k} of {num_layers} blocks")
    domain_shape = None
    if domain_key is not None:
        domain_shape = tuple(ckpt[domain_key].shape)
        if int(np.prod(domain_shape)) != dim:
            raise OmnimatteError(f"{src}: {domain_key} has shape {domain_shape}, expected {dim} values "
                                 f"(the model width)")

    targets = [t for t in SUPPORTED_TARGETS if any(tt == t for _, tt in modules)]
    config = {
        "component": "expert",
        "kind": kind,
        "rank": int(rank),
        "alpha": float(alpha),
        "targets": targets,
        "blocks": blocks,
        "k": k,
        "mask_type": s.get("mask_type") or DEFAULT_MASK[kind],
        "tau_default": s.get("tau", DEFAULT_TAU),
        "dim": int(dim),
        "num_layers": int(num_layers),
        "domain_embedding": domain_key is not None,
        "source_format": fmt,
        "manifest": str(mpath) if mpath else None,
        "dtype": dtype,
    }
    target_dtype = DTYPES[dtype]

    def load2d(key):
        a = ckpt[key].load()
        return a.reshape(a.shape[:2]) if a.ndim == 4 else a

    def tensors():
        for m, roles in modules.items():
            name = f"blocks.{m[0]}.{m[1]}"
            f = fold.get(m, 1.0)
            yield f"{name}.lora_a", mx.array(np.ascontiguousarray(load2d(roles["lora_a"]))).astype(target_dtype)
            b = load2d(roles["lora_b"]).astype(np.float32)
            yield f"{name}.lora_b", mx.array(np.ascontiguousarray(b * f if f != 1.0 else b)).astype(target_dtype)
            if "lora_bias" in roles:
                bias = ckpt[roles["lora_bias"]].load().astype(np.float32) * f
                yield f"{name}.lora_bias", mx.array(bias).astype(target_dtype)
        if domain_key is not None:
            # added to the float32 residual stream: kept in float32
            yield "domain_embedding", mx.array(ckpt[domain_key].load().reshape(-1).astype(np.float32))

    ignored = {}
    return Converted(config, tensors, ignored)


def _infer_kind(blocks: list[int], num_layers: int, src) -> str:
    if blocks == list(range(num_layers)):
        return "quality"
    if blocks == list(range(num_layers - len(blocks), num_layers)):
        return "effect"
    raise OmnimatteError(f"{src}: cannot tell the Effect from the Quality expert (LoRA on blocks "
                         f"{blocks[0]}..{blocks[-1]} of {num_layers}); pass --expert-kind effect|quality")


def _generic_unused(*_args):
    raise AssertionError("the expert converter is custom: convert() never calls config_for/build")


SPEC = ComponentSpec(
    component="expert",
    formats=FORMATS,
    detect=detect,
    config_for=_generic_unused,
    build=_generic_unused,
    custom=convert_lora,
)
