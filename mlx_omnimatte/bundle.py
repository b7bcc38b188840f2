"""A model bundle: one directory with every converted component and a manifest.

    bundle/
      manifest.json        {"components": {name: subdir}, "experts": {kind: subdir},
                            "remover": {kind, conventions} (removers.py; absent: casper),
                            "source": {folder, transformer, transformer_loras: [{file, scale,
                            format, alpha_source, modules}], quantization: {component: {bits, group_size}}}}
      transformer/ vae/ t5/ clip/      converted model directories
      experts/effect/ experts/quality/ expert directories (LoRA + manifest)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OmnimatteError
from .jsonfile import read_json
from .removers import Remover, remover_from_manifest
from .weights import BUNDLE_COMPONENTS, read_config

MANIFEST = "manifest.json"


@dataclass
class Bundle:
    """An opened bundle. Its component configs are read once and kept, and
    `check` validates each component once: a run opens its bundle once and
    carries it."""

    root: Path
    manifest: dict
    _configs: dict = field(default_factory=dict, repr=False, compare=False)
    _checked: set = field(default_factory=set, repr=False, compare=False)

    def path(self, component: str) -> Path:
        sub = self.manifest.get("components", {}).get(component)
        if sub is None:
            raise OmnimatteError(f"{self.root}: the bundle has no {component} component")
        return self.root / sub

    def config(self, component: str) -> dict:
        """The component's config.json, read on first use."""
        if component not in self._configs:
            self._configs[component] = read_config(self.path(component))
        return self._configs[component]

    @property
    def experts(self) -> dict[str, Path]:
        return {kind: self.root / sub for kind, sub in self.manifest.get("experts", {}).items()}

    def expert(self, kind: str) -> Path:
        if kind not in self.experts:
            raise OmnimatteError(
                f"{self.root}: the bundle has no {kind} expert (convert one with "
                f"`mlx-omnimatte convert BUNDLE --expert {kind}=FILE`)")
        return self.experts[kind]

    @property
    def remover(self) -> Remover:
        """The removal model and its conventions (checked against the transformer's config)."""
        return remover_from_manifest(self.manifest, self.config("transformer"), self.root / MANIFEST)

    def weight_bytes(self, component: str) -> int:
        return sum(f.stat().st_size for f in self.path(component).glob("*.safetensors"))

    def check(self, need=BUNDLE_COMPONENTS, experts=()) -> "Bundle":
        """The components and experts a run needs are present and readable,
        before any weight is loaded."""
        used = self.remover.components  # the encoders a remover has none of are not needed
        for component in [c for c in need if c in used or c not in BUNDLE_COMPONENTS]:
            if component not in self._checked:
                check_component(self.path(component), self.config(component), component)
                self._checked.add(component)
        for kind in experts:
            check_expert_fits(self.expert(kind), self.config("transformer"))
        return self


def open_bundle(path, need=BUNDLE_COMPONENTS, experts=()) -> Bundle:
    """Open a bundle and check that the components and experts a run needs are
    present and readable, before any weight is loaded."""
    root = Path(path)
    man = root / MANIFEST
    if not man.exists():
        raise OmnimatteError(f"{root}: not a model bundle (no {MANIFEST}); build one with `mlx-omnimatte convert`")
    bundle = Bundle(root, read_json(man))
    bundle.remover  # a bundle mixing conventions is refused here
    return bundle.check(need, experts)


def check_component(sub: Path, config: dict, component: str) -> None:
    if config["component"] != component:
        raise OmnimatteError(f"{sub}: holds a {config['component']}, the bundle lists it as {component}")
    if not any(sub.glob("*.safetensors")):
        raise OmnimatteError(f"{sub}: no weights (.safetensors) in the {component} component")
    for f in sorted(sub.glob("*.safetensors")):
        weight_header(f)


def weight_header(path: Path) -> dict:
    """The tensor table of a safetensors file, checked against the file's size
    (a truncated download or copy is caught here, before any weight loads)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 + n:
                raise ValueError
            header = json.loads(fh.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError):
        raise OmnimatteError(f"{path}: not a readable safetensors file (truncated or damaged)") from None
    if 8 + n + max(ends, default=0) != size:
        raise OmnimatteError(f"{path}: {size} bytes, but its header describes {8 + n + max(ends, default=0)}: "
                             "the file is truncated or damaged (convert or copy it again)")
    return header


def check_expert_fits(expert_dir: Path, transformer: dict) -> None:
    """An expert made for another model is refused from the configs alone."""
    config = read_config(expert_dir)
    if config["component"] != "expert":
        raise OmnimatteError(f"{expert_dir}: holds a {config['component']}, not an expert")
    if config.get("dim") != transformer.get("dim"):
        raise OmnimatteError(f"{expert_dir}: expert for model width {config.get('dim')}, "
                             f"the bundle's transformer has width {transformer.get('dim')}")
    ranks = {v["shape"][0] for f in sorted(Path(expert_dir).glob("*.safetensors"))
             for k, v in weight_header(f).items() if k.endswith(".lora_a")}
    if ranks and ranks != {config.get("rank")}:
        raise OmnimatteError(f"{expert_dir}: config.json says rank {config.get('rank')}, "
                             f"its LoRA tensors have rank {', '.join(map(str, sorted(ranks)))}")
    blocks = config.get("blocks") or []
    if blocks and max(blocks) >= transformer.get("num_layers", 0):
        raise OmnimatteError(f"{expert_dir}: LoRA on block {max(blocks)}, "
                             f"the bundle's transformer has {transformer.get('num_layers')} blocks")


def write_manifest(root: Path, components: dict[str, str], experts: dict[str, str], source: dict,
                   remover: Remover | None = None) -> None:
    manifest = {"format": "mlx-omnimatte-bundle", "version": 1, "components": components,
                "experts": experts, "source": source}
    if remover is not None:
        manifest["remover"] = remover.record()
    (Path(root) / MANIFEST).write_text(json.dumps(manifest, indent=2))
