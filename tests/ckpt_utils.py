"""Write checkpoints in real source formats without torch, for tests:
`save_torch_zip` (the package's writer of `torch.save`'s zip layout) and
the malformed files the readers must refuse.
"""

from __future__ import annotations

import struct
import zipfile

from mlx_omnimatte.convert.torch_zip import save_torch_zip  # noqa: F401 (shared)


def save_raw_pickle_zip(path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")


def write_safetensors_raw(path, entries: dict[str, tuple[str, tuple, bytes]]) -> None:
    """entries: key -> (safetensors dtype, shape, raw bytes); for dtypes numpy lacks."""
    import json

    header, blobs, off = {}, [], 0
    for key, (dtype, shape, data) in entries.items():
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


