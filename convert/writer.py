"""Write a converted model directory: config.json + safetensors (sharded past a
size, with an index), built in a temporary sibling and renamed when complete
(`io.writers.atomic_output`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx

from mlx_omnimatte.io.writers import atomic_output, save_safetensors

from .core import Converted

SHARD_BYTES = 4 << 30


def write_converted(out: Path, conv: Converted, metadata: dict, overwrite: bool = False,
                    shard_bytes: int = SHARD_BYTES) -> Path:
    with atomic_output(out, overwrite, directory=True) as tmp:
        write_converted_into(tmp, conv, metadata, shard_bytes)
    return Path(out)


def write_converted_into(folder: Path, conv: Converted, metadata: dict, shard_bytes: int = SHARD_BYTES) -> None:
    """Write into an existing (staged) folder. Each shard (at most `shard_bytes`)
    is saved as soon as it is full, so memory holds one shard at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {k: str(v) for k, v in metadata.items()}
    written: list[tuple[Path, list[str]]] = []
    current, size = {}, 0

    def flush(shard):
        path = folder / f"shard-{len(written):05d}.safetensors"
        save_safetensors(path, shard, meta)
        written.append((path, list(shard)))

    for name, arr in conv.tensors():
        mx.eval(arr)
        if current and size + arr.nbytes > shard_bytes:
            flush(current)
            current, size = {}, 0
        current[name] = arr
        size += arr.nbytes
    if current or not written:
        flush(current)
    del current  # the last shard's arrays
    if len(written) == 1:
        written[0][0].rename(folder / "model.safetensors")
    else:
        weight_map = {}
        for i, (path, names) in enumerate(written):
            fname = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
            path.rename(folder / fname)
            weight_map.update({k: fname for k in names})
        index = {"metadata": meta, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config = {**conv.config, "source": metadata}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name, obj in conv.extra_json.items():
        (folder / name).write_text(json.dumps(obj, indent=2))
    for src, rel in conv.extra_files:
        dst = folder / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
