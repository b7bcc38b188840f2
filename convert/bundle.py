"""Build a model bundle from what a user downloads: the Hugging Face folder of
Wan2.1-Fun-1.3B-InP or -14B-InP (original-format files), optionally the
Casper or ROSE transformer that replaces its DiT (1.3B; their keys are the
same, so `remover` says which) or the Casper LoRA merged into it (14B),
expert LoRA files, and per-component quantization; or MiniMax-Remover's
diffusers folder (transformer/, vae/, scheduler/). The manifest records the
remover and its conventions (`mlx_omnimatte/removers.py`); encoders the
remover does not use are not converted."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mlx_omnimatte.bundle import write_manifest
from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.io.writers import atomic_output
from mlx_omnimatte.removers import REMOVERS, Remover, check_transformer, remover_named

from .core import convert, detect
from .hub import download_snapshot
from .merge import convert_transformer
from .quantize import check_quantize
from .readers import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, read_checkpoint
from .scheduler import read_scheduler
from .writer import write_converted_into

# component -> file names in a Wan / Wan-Fun folder (first that exists wins)
FUN_FILES = {
    "transformer": ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors"),
    "vae": ("Wan2.1_VAE.pth",),
    "t5": ("models_t5_umt5-xxl-enc-bf16.pth",),
    "clip": ("models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",),
}
# what to fetch from a hub repository: the files above and the tokenizer
HUB_PATTERNS = ["*.json", "diffusion_pytorch_model*.safetensors", "Wan2.1_VAE.pth",
                "models_t5_umt5-xxl-enc-bf16.pth", "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
                "google/umt5-xxl/*"]
# MiniMax-Remover's diffusers folder: component -> subfolder (its weights and config.json inside)
MINIMAX_FOLDERS = {"transformer": "transformer", "vae": "vae"}
MINIMAX_PATTERNS = ["transformer/*", "vae/*", "scheduler/*"]
# hub repositories whose remover is known from the id (lower-cased)
KNOWN_REMOVERS = {"zibojia/minimax-remover": "minimax"}
DEFAULT_DTYPES = {"transformer": "bfloat16", "vae": "float32", "t5": "bfloat16", "clip": "float16"}
# what `--quantize BITS` quantizes in a bundle (CLIP stays float16, the VAE float32)
QUANTIZED_BY_DEFAULT = ("transformer", "t5")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (any((path / f).exists() for f in FUN_FILES["vae"] + FUN_FILES["t5"])
                              or is_minimax_folder(path))


def is_minimax_folder(path: Path) -> bool:
    """A diffusers folder with a transformer/ and a vae/ and no text encoder (MiniMax-Remover's layout)."""
    return (path / "transformer" / "config.json").is_file() and (path / "vae").is_dir() and not (
        path / "text_encoder").exists()


def source_remover(src: str, given: str | None) -> Remover:
    """The remover a bundle source holds: MiniMax-Remover from its folder or hub
    id; the user's --remover for a Fun-InP folder (casper by default, ROSE's
    keys being Casper's)."""
    path = Path(src).expanduser()
    known = KNOWN_REMOVERS.get(src.lower()) == "minimax" or given == "minimax"  # a hub id: known or said
    minimax = is_minimax_folder(path) if path.exists() else known
    if given is not None and given not in REMOVERS:
        raise OmnimatteError(f"--remover {given}: unknown (one of {', '.join(REMOVERS)})")
    if minimax:
        if given not in (None, "minimax"):
            raise OmnimatteError(f"--remover {given}: {src} is MiniMax-Remover's folder (give --remover minimax "
                                 "or none)")
        return remover_named("minimax")
    if given == "minimax":
        raise OmnimatteError(f"--remover minimax: {src} is not MiniMax-Remover's folder (transformer/, vae/, "
                             "scheduler/); convert zibojia/minimax-remover itself")
    return remover_named(given or "casper")


def is_hub_id(src: str) -> bool:
    return bool(HUB_ID.match(src)) and not src.endswith(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)


def resolve_source(src: str, remover: Remover | None = None) -> Path:
    """A local folder, or a hub repository id fetched into the normal hub cache."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    if is_hub_id(src):
        minimax = remover is not None and remover.kind == "minimax"
        return download_snapshot(src, MINIMAX_PATTERNS if minimax else HUB_PATTERNS)
    raise OmnimatteError(f"{src}: no such file or directory")


def _component_file(folder: Path, component: str) -> Path:
    for name in FUN_FILES[component]:
        if (folder / name).exists():
            return folder / name
    raise OmnimatteError(f"{folder}: no {component} file ({' or '.join(FUN_FILES[component])})")


@dataclass
class BundlePlan:
    """What a bundle is built from; the defaults are the README's."""

    folder: Path
    transformer: Path | None = None  # a DiT checkpoint replacing the folder's own (Casper)
    transformer_loras: list[tuple[Path, float]] = field(default_factory=list)  # merged into the DiT
    experts: dict[str, Path] = field(default_factory=dict)
    dtype: str | None = None  # one dtype for every component, else DEFAULT_DTYPES
    quantize: dict[str, int] = field(default_factory=dict)  # component -> bits
    group_size: int = 64
    remover: Remover = REMOVERS["casper"]


def parse_quantize(values) -> dict[str | None, int]:
    """`--quantize BITS` (key None) and `--quantize COMPONENT=BITS`, repeatable."""
    out = {}
    for v in values:
        component, sep, bits = str(v).rpartition("=")
        if bits not in ("4", "8"):
            raise OmnimatteError(f"--quantize {v}: bits must be 4 or 8")
        if sep and component not in FUN_FILES:
            raise OmnimatteError(f"--quantize {v}: unknown component {component!r} ({', '.join(FUN_FILES)})")
        out[component if sep else None] = int(bits)
    return out


def bundle_quantize(given: dict[str | None, int]) -> dict[str, int]:
    """Plain BITS quantizes the transformer and the text encoder of a bundle."""
    out = {c: given[None] for c in QUANTIZED_BY_DEFAULT} if None in given else {}
    out.update({c: b for c, b in given.items() if c is not None})
    return out


def _source_paths(plan: BundlePlan) -> dict[str, Path]:
    """component -> file or folder, for the components the remover uses."""
    if plan.remover.kind == "minimax":
        if plan.transformer is not None:
            raise OmnimatteError("--transformer: MiniMax-Remover's folder brings its own transformer")
        return {c: plan.folder / sub for c, sub in MINIMAX_FOLDERS.items()}
    sources = {c: _component_file(plan.folder, c) for c in FUN_FILES
               if c in plan.remover.components and (c != "transformer" or plan.transformer is None)}
    if plan.transformer is not None:
        sources["transformer"] = Path(plan.transformer)
    return sources


def bundle_remover(plan: BundlePlan, dit: dict, source) -> Remover:
    """The remover's record: its transformer checked, MiniMax-Remover's
    sampler and shift from its scheduler config."""
    check_transformer(plan.remover, dit, source, f"--remover {plan.remover.kind}:")
    if plan.remover.kind != "minimax":
        return plan.remover
    return Remover(**{**plan.remover.record(), **read_scheduler(plan.folder), "levels": plan.remover.levels})


def _read_sources(plan: BundlePlan) -> dict:
    sources = _source_paths(plan)
    if plan.remover.kind == "minimax":
        read_scheduler(plan.folder)  # a missing or unsupported scheduler stops here, before any tensor
    checked = {}
    for component, path in sources.items():
        ckpt = read_checkpoint(path)
        spec, fmt = detect(ckpt, component)
        if component in plan.quantize:
            check_quantize(spec, plan.quantize[component], plan.group_size)
        checked[component] = (ckpt, spec, fmt)
    return checked


def _convert_component(plan: BundlePlan, component: str, ckpt, spec, fmt: str):
    dt = plan.dtype or DEFAULT_DTYPES[component]
    bits = plan.quantize.get(component)
    if component == "transformer":
        return convert_transformer(ckpt, spec, fmt, dt, plan.transformer_loras, bits, plan.group_size), dt
    return convert(ckpt, spec, fmt, dt, quantize=bits, group_size=plan.group_size), dt


def build_bundle(plan: BundlePlan, out: Path, overwrite: bool = False, log=print) -> Path:
    """Every source is read and checked (keys, shapes, LoRAs to merge, experts)
    before the first tensor is written; the bundle appears only when complete."""
    plans = _read_sources(plan)
    ckpt, spec, fmt = plans["transformer"]
    dit = spec.config_for(ckpt, fmt, Path(ckpt.source))
    remover = bundle_remover(plan, dit, ckpt.source)
    conversions = {c: _convert_component(plan, c, *p) for c, p in plans.items()}  # LoRAs checked here
    expert_plans = {}
    for kind, path in plan.experts.items():
        eckpt = read_checkpoint(path)
        expert_plans[kind] = (eckpt, *detect(eckpt, "expert"))
    with atomic_output(out, overwrite, directory=True) as tmp:
        for component, (conv, dt) in conversions.items():
            ckpt, _, fmt = plans[component]
            bits = plan.quantize.get(component)
            log(f"converting {component} from {ckpt.source.name} ({fmt}) [{dt}{f', {bits}-bit' if bits else ''}]")
            for note in conv.notes:
                log(note)
            write_converted_into(tmp / component, conv, _meta(ckpt, fmt))
        for kind, (eckpt, espec, efmt) in expert_plans.items():
            log(f"converting {kind} expert from {eckpt.source.name} ({efmt})")
            conv = convert(eckpt, espec, efmt, plan.dtype or "bfloat16", kind=kind, dim=dit["dim"],
                           num_layers=dit["num_layers"])
            for note in conv.notes:
                log(note)
            write_converted_into(tmp / "experts" / kind, conv, _meta(eckpt, efmt))
        source = {"folder": str(plan.folder), "transformer": str(plans["transformer"][0].source),
                  "transformer_loras": conversions["transformer"][0].config.get("merged_loras", []),
                  "quantization": {c: {"bits": b, "group_size": plan.group_size} for c, b in plan.quantize.items()}}
        write_manifest(tmp, {c: c for c in plans}, {k: f"experts/{k}" for k in expert_plans}, source, remover)
    return out


def _meta(ckpt, fmt: str) -> dict:
    return {"source": str(Path(ckpt.source).resolve()), "source_format": fmt,
            "file_format": ckpt.file_format, "converter": "mlx-omnimatte"}
