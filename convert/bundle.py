"""Build a model bundle from what a user downloads: the Hugging Face folder of
Wan2.1-Fun-1.3B-InP (original-format files), optionally the Casper
transformer that replaces its DiT, and expert LoRA files."""

from __future__ import annotations

import re
from pathlib import Path

from mlx_omnimatte.bundle import write_manifest
from mlx_omnimatte.errors import OmnimatteError

from .core import convert, detect
from .readers import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, read_checkpoint
from .writer import staged_dir, write_converted_into

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
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(src, allow_patterns=HUB_PATTERNS))
        except Exception as e:  # network, auth, missing repo: one line for the user
            reason = " ".join(str(e).split())  # one line, whatever the hub client says
            raise OmnimatteError(f"{src}: download from the hub failed ({type(e).__name__}: {reason})") from None
    raise OmnimatteError(f"{src}: no such file or directory")


def _component_file(folder: Path, component: str) -> Path:
    for name in FUN_FILES[component]:
        if (folder / name).exists():
            return folder / name
    raise OmnimatteError(f"{folder}: no {component} file ({' or '.join(FUN_FILES[component])})")


def build_bundle(folder: Path, out: Path, transformer: Path | None = None,
                 experts: dict[str, Path] | None = None, dtype: str | None = None,
                 overwrite: bool = False, quantize_t5: int | None = None, log=print) -> Path:
    sources = {c: _component_file(folder, c) for c in FUN_FILES if c != "transformer" or transformer is None}
    if transformer is not None:
        sources["transformer"] = Path(transformer)
    # read and check every source before writing anything
    plans = {}
    for component, path in sources.items():
        ckpt = read_checkpoint(path)
        spec, fmt = detect(ckpt, component)
        plans[component] = (ckpt, spec, fmt)
    ckpt, spec, fmt = plans["transformer"]
    dit = spec.config_for(ckpt, fmt, Path(ckpt.source))
    expert_plans = {}
    for kind, path in (experts or {}).items():
        ckpt = read_checkpoint(path)
        spec, fmt = detect(ckpt, "expert")
        expert_plans[kind] = (ckpt, spec, fmt)
    with staged_dir(out, overwrite) as tmp:
        for component, (ckpt, spec, fmt) in plans.items():
            dt = dtype or DEFAULT_DTYPES[component]
            log(f"converting {component} from {ckpt.source.name} ({fmt}) [{dt}]")
            options = {"quantize": quantize_t5} if component == "t5" and quantize_t5 else {}
            conv = convert(ckpt, spec, fmt, dt, **options)
            write_converted_into(tmp / component, conv, _meta(ckpt, fmt))
        for kind, (ckpt, spec, fmt) in expert_plans.items():
            log(f"converting {kind} expert from {ckpt.source.name} ({fmt})")
            conv = convert(ckpt, spec, fmt, dtype or "bfloat16", kind=kind, dim=dit["dim"],
                           num_layers=dit["num_layers"])
            write_converted_into(tmp / "experts" / kind, conv, _meta(ckpt, fmt))
        write_manifest(tmp, {c: c for c in plans}, {k: f"experts/{k}" for k in expert_plans},
                       {"folder": str(folder), "transformer": str(sources["transformer"])})
    return out


def _meta(ckpt, fmt: str) -> dict:
    return {"source": str(Path(ckpt.source).resolve()), "source_format": fmt,
            "file_format": ckpt.file_format, "converter": "mlx-omnimatte"}
