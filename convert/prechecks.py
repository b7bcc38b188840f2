"""Checks of the user's own files for a bundle, before its base model is
fetched: `convert HUB_ID --transformer F --expert KIND=F` may download tens
of GB, so a file that is missing, unreadable, corrupt, the wrong component
or made for another model size fails first, in one line naming the option.

Only headers are read (key names and shapes, no tensor data). The base
DiT's architecture comes from KNOWN_MODELS for the hub repositories the
README names, from the folder's config.json for a local folder, and
otherwise from the repository's config.json alone, downloaded before any
weight."""

from __future__ import annotations

from pathlib import Path

from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.removers import Remover, check_transformer

from .core import detect
from .hub import download_file
from .lora import expert_width
from .merge import open_lora
from .readers import read_checkpoint
from .transformer import read_json_config

# DiT architecture of the repositories the README names; ids lower-cased (the hub ignores case)
KNOWN_MODELS = {
    "alibaba-pai/wan2.1-fun-1.3b-inp": {"dim": 1536, "num_layers": 30, "in_dim": 36},
    "alibaba-pai/wan2.1-fun-14b-inp": {"dim": 5120, "num_layers": 40, "in_dim": 36},
}
# what a replacement transformer (or an expert: its width) must share with the base, as users say it
CHECKED = {"dim": "width", "num_layers": "depth (blocks)", "in_dim": "input channels"}


def _flagged(flag: str, check, *args):
    """Run one check; its error is prefixed by the option it concerns, on one line."""
    try:
        return check(*args)
    except OmnimatteError as e:
        raise OmnimatteError(f"{flag}: {' '.join(str(e).split())}") from None


def _transformer_arch(path: Path) -> dict:
    ckpt = read_checkpoint(path)
    spec, fmt = detect(ckpt, "transformer")
    return spec.config_for(ckpt, fmt, Path(ckpt.source))


def _expert_arch(path: Path) -> dict:
    return {"dim": expert_width(*open_lora(path))}


def base_architecture(src: str) -> tuple[dict, str] | None:
    """The base DiT's CHECKED fields and a phrase naming it; None when they
    cannot be known without its weights."""
    path = Path(src).expanduser()
    if path.exists():
        found = read_json_config(path)
    elif src.lower() in KNOWN_MODELS:
        return KNOWN_MODELS[src.lower()], f"the transformer of {src}"
    else:
        config = download_file(src, "config.json", optional=True)
        found = read_json_config(config) if config is not None else None
    if found is None:
        return None
    return {k: v for k, v in found[0].items() if k in CHECKED}, f"the transformer of {src}"


def check_fits(flag: str, path: Path, arch: dict, base: dict, where: str) -> None:
    for name, label in CHECKED.items():
        if name in arch and name in base and arch[name] != base[name]:
            raise OmnimatteError(f"{flag}: {path}: {label} {arch[name]}, but {where} has {base[name]} "
                                 "(made for another model?)")


def check_bundle_inputs(src: str, transformer: Path | None, loras: list[tuple[Path, float]],
                        experts: dict[str, Path], remover: Remover | None = None) -> None:
    """Every check the user's files allow, before any model file is downloaded
    (at most the base's config.json, when its architecture is not known)."""
    dit = _flagged("--transformer", _transformer_arch, transformer) if transformer is not None else None
    if dit is not None and remover is not None:  # e.g. MiniMax-Remover's file given for the Fun-InP base
        _flagged("--transformer", check_transformer, remover, dit, transformer, f"--remover {remover.kind} means")
    for path, _ in loras:
        _flagged("--transformer-lora", open_lora, path)
    expert_archs = {kind: _flagged(f"--expert {kind}", _expert_arch, path) for kind, path in experts.items()}
    if dit is None and not expert_archs:
        return  # nothing to compare: no reason to fetch the base's config
    base = base_architecture(src)
    if dit is not None and base is not None:
        check_fits("--transformer", transformer, dit, *base)
    target = (dit, f"the --transformer {transformer}") if dit is not None else base
    for kind, arch in expert_archs.items():
        if target is not None:
            check_fits(f"--expert {kind}", experts[kind], arch, *target)
