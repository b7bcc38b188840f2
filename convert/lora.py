"""LoRA files -> an EasyOmnimatte expert directory (component "expert").

Key layouts and the LoRA scale (alpha, from wherever the trainer stored it)
are read by `lora_files` (see there); module names may be original Wan or
diffusers names (see `MODULE_NAMES`).

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
   mask B for effect and C for quality, tau 0.5, alpha as `lora_files`
   finds it. config.json records `alpha` and `alpha_source`.

Per-module alphas (or ranks) that give a different alpha/rank than the
first module are folded into that module's B, so one manifest alpha/rank
holds for all.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_omnimatte.branch.attention import check_mask_type
from mlx_omnimatte.branch.experts import (
    DEFAULT_MASK,
    DEFAULT_TAU,
    KINDS,
    LAYERS_BY_DIM,
    SUPPORTED_TARGETS,
    check_tau,
)
from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.jsonfile import read_json
from mlx_omnimatte.models.base import DTYPES

from . import lora_files as lf
from .core import ComponentSpec, Converted
from .readers import Checkpoint

_DOMAIN = re.compile(r"(?:domain_embedding|domain_emb|domain_embed|branch_embedding)(?:\.weight)?")
# a block's module in each layout: dotted `blocks.N.<module>`, kohya `blocks_N_<module>`
_BLOCK = {"peft": re.compile(r"blocks\.(\d+)\.(.+)"), "diffsynth": re.compile(r"blocks\.(\d+)\.(.+)"),
          "kohya": re.compile(r"blocks_(\d+)_(.+)")}
FORMATS = lf.FORMATS

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

OPTIONS = ("kind", "k", "mask_type", "tau", "num_layers", "dim", "alpha")  # + manifest=PATH
detect = lf.detect


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
        data = read_json(cand)
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
    """{(block, target): {role: source key}} in block/target order, the
    source module of each, and the domain embedding key."""
    names = _KOHYA_NAMES if fmt == "kohya" else MODULE_NAMES
    unsupported = _KOHYA_UNSUPPORTED if fmt == "kohya" else UNSUPPORTED
    domain = [k for k in ckpt if _DOMAIN.fullmatch(lf.strip(k))]
    if len(domain) > 1:
        raise OmnimatteError(f"{ckpt.source}: keys {domain[0]} and {domain[1]} are both a domain embedding")
    grouped = lf.group(ckpt, fmt, skip=lambda k: k in domain)
    modules, sources = {}, {}
    for source, roles in grouped.items():
        key = next(iter(roles.values()))
        m = _BLOCK[fmt].fullmatch(source)
        if m is None:
            raise OmnimatteError(f"{ckpt.source}: unexpected key {key} (not a {fmt} LoRA tensor of the DiT blocks)")
        block, module = m.groups()
        if module in unsupported:
            raise OmnimatteError(f"{ckpt.source}: {key}: LoRA on {module} is not supported "
                                 f"({unsupported[module]})")
        if module not in names:
            raise OmnimatteError(f"{ckpt.source}: {key}: unknown module {module} "
                                 f"(LoRA targets: {', '.join(SUPPORTED_TARGETS)})")
        slot = (int(block), names[module])
        if slot in modules:
            raise OmnimatteError(f"{ckpt.source}: {key} and {next(iter(modules[slot].values()))} are the same LoRA")
        modules[slot], sources[slot] = roles, source
    order = sorted(modules, key=lambda m: (m[0], SUPPORTED_TARGETS.index(m[1])))
    return {m: modules[m] for m in order}, sources, (domain[0] if domain else None)


def _shapes(ckpt: Checkpoint, modules: dict, dim: int | None) -> tuple[dict, int]:
    """Rank of each module and the model width, every pair and width checked."""
    src, ranks = ckpt.source, {}
    for (block, target), roles in modules.items():
        name = f"blocks.{block}.{target}"
        a_shape, b_shape = lf.check_pair(ckpt, name, roles)
        dim = a_shape[1] if dim is None else dim
        if a_shape[1] != dim or b_shape[0] != dim:
            raise OmnimatteError(f"{src}: {name}: maps {a_shape[1]} -> {b_shape[0]} features, "
                                 f"the model width is {dim}")
        if "lora_bias" in roles and tuple(ckpt[roles["lora_bias"]].shape) != (dim,):
            raise OmnimatteError(f"{src}: {roles['lora_bias']} has shape {tuple(ckpt[roles['lora_bias']].shape)}, "
                                 f"expected ({dim},)")
        ranks[(block, target)] = a_shape[0]
    return ranks, dim


def expert_width(ckpt: Checkpoint, fmt: str) -> int:
    """The model width a LoRA file is for, every module and pair checked
    (for checks before the base model is at hand)."""
    modules, _, _ = _plan(ckpt, fmt)
    return _shapes(ckpt, modules, None)[1]


def _blocks_and_kind(s: dict, blocks: list[int], dim: int, src) -> tuple[int, str, int | None]:
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
    return num_layers, kind, k


def _check_domain(ckpt: Checkpoint, key: str | None, dim: int) -> None:
    if key is not None and int(np.prod(ckpt[key].shape)) != dim:
        raise OmnimatteError(f"{ckpt.source}: {key} has shape {tuple(ckpt[key].shape)}, expected {dim} values "
                             f"(the model width)")


def convert_lora(ckpt: Checkpoint, fmt: str, dtype: str = "bfloat16", **options) -> Converted:
    if fmt not in FORMATS:
        raise OmnimatteError(f"{ckpt.source}: unknown LoRA format {fmt!r} ({', '.join(FORMATS)})")
    if dtype not in DTYPES:
        raise OmnimatteError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
    src = ckpt.source
    s, mpath = _settings(options, Path(src))
    modules, sources, domain_key = _plan(ckpt, fmt)
    ranks, dim = _shapes(ckpt, modules, s.get("dim"))
    by_source = {sources[m]: roles for m, roles in modules.items()}
    where = "option alpha" if options.get("alpha") is not None else f"manifest {mpath}"
    alphas = lf.resolve_alpha(ckpt, fmt, by_source, {sources[m]: r for m, r in ranks.items()}, s.get("alpha"), where)
    # one alpha/rank for the expert; modules at another scale get it folded into B
    first = next(iter(modules))
    rank, alpha = ranks[first], alphas.values[sources[first]]
    fold = {m: f for m in modules
            if not math.isclose(f := (alphas.values[sources[m]] / ranks[m]) / (alpha / rank), 1.0, rel_tol=1e-7)}
    blocks = sorted({b for b, _ in modules})
    num_layers, kind, k = _blocks_and_kind(s, blocks, dim, src)
    _check_domain(ckpt, domain_key, dim)
    config = {
        "component": "expert", "kind": kind, "rank": int(rank), "alpha": float(alpha),
        "alpha_source": alphas.source,
        "targets": [t for t in SUPPORTED_TARGETS if any(tt == t for _, tt in modules)],
        "blocks": blocks, "k": k, "mask_type": s.get("mask_type") or DEFAULT_MASK[kind],
        "tau_default": s.get("tau", DEFAULT_TAU), "dim": int(dim), "num_layers": int(num_layers),
        "domain_embedding": domain_key is not None, "source_format": fmt,
        "manifest": str(mpath) if mpath else None, "dtype": dtype,
    }
    tensors = _tensors(ckpt, modules, fold, domain_key, DTYPES[dtype])
    return Converted(config, tensors, {}, notes=[alphas.note] if alphas.note else [])


def _tensors(ckpt: Checkpoint, modules: dict, fold: dict, domain_key: str | None, target_dtype):
    def tensors():
        for m, roles in modules.items():
            name, f = f"blocks.{m[0]}.{m[1]}", fold.get(m, 1.0)
            yield f"{name}.lora_a", mx.array(lf.load_matrix(ckpt, roles["lora_a"])).astype(target_dtype)
            yield f"{name}.lora_b", mx.array(lf.load_matrix(ckpt, roles["lora_b"]) * f).astype(target_dtype)
            if "lora_bias" in roles:
                bias = ckpt[roles["lora_bias"]].load().astype(np.float32) * f
                yield f"{name}.lora_bias", mx.array(bias).astype(target_dtype)
        if domain_key is not None:
            # added to the float32 residual stream: kept in float32
            yield "domain_embedding", mx.array(ckpt[domain_key].load().reshape(-1).astype(np.float32))

    return tensors


def _infer_kind(blocks: list[int], num_layers: int, src) -> str:
    if blocks == list(range(num_layers)):
        return "quality"
    if blocks == list(range(num_layers - len(blocks), num_layers)):
        return "effect"
    raise OmnimatteError(f"{src}: cannot tell the Effect from the Quality expert (LoRA on blocks "
                         f"{blocks[0]}..{blocks[-1]} of {num_layers}); pass --expert-kind effect|quality")


SPEC = ComponentSpec(
    component="expert",
    formats={f: None for f in FORMATS},
    detect=detect,
    custom=convert_lora,
)
