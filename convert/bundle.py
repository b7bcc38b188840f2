"""Build a model bundle from what a user downloads: the Hugging Face folder of
Wan2.1-Fun-1.3B-InP or -14B-InP (original-format files), optionally the
Casper transformer that replaces its DiT (1.3B) or the Casper LoRA merged
into it (14B), expert LoRA files, and per-component quantization."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mlx_omnimatte.bundle import write_manifest
from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.io.writers import atomic_output

from .core import convert, detect
from .hub import download_snapshot
from .merge import convert_transformer
from .quantize import check_quantize
from .readers import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, read_checkpoint
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
DEFAULT_DTYPES = {"transformer": "bfloat16", "vae": "float32", "t5": "bfloat16", "clip": "float16"}
# what `--quantize BITS` quantizes in a bundle (CLIP stays float16, the VAE float32)
QUANTIZED_BY_DEFAULT = ("transformer", "t5")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in FUN_FILES["vae"] + FUN_FILES["t5"])


def is_hub_id(src: str) -> bool:
    return bool(HUB_ID.match(src)) and not src.endswith(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)


def resolve_source(src: str) -> Path:
    """A local folder, or a hub repository id fetched into the normal hub cache."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    if is_hub_id(src):
        return download_snapshot(src, HUB_PATTERNS)
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


def _read_sources(plan: BundlePlan) -> dict:
    sources = {c: _component_file(plan.folder, c) for c in FUN_FILES
               if c != "transformer" or plan.transformer is None}
    if plan.transformer is not None:
        sources["transformer"] = Path(plan.transformer)
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
        write_manifest(tmp, {c: c for c in plans}, {k: f"experts/{k}" for k in expert_plans}, source)
    return out


def _meta(ckpt, fmt: str) -> dict:
    return {"source": str(Path(ckpt.source).resolve()), "source_format": fmt,
            "file_format": ckpt.file_format, "converter": "mlx-omnimatte"}
