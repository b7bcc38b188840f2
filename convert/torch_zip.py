"""Write a tensor state dict in the zip-pickle layout that `torch.save`
produces (archive/data.pkl + archive/data/<n> storages), without torch: the
counterpart of `readers`, for random-weight models in the released formats
(`tiny`). The pickle is assembled from opcodes and names only the globals
the readers allow."""

from __future__ import annotations

import pickle
import struct
import zipfile

import numpy as np

STORAGES = {np.dtype("float32"): "FloatStorage", np.dtype("float16"): "HalfStorage",
            np.dtype("float64"): "DoubleStorage", np.dtype("int64"): "LongStorage",
            np.dtype("int32"): "IntStorage", np.dtype("uint8"): "ByteStorage"}


def _str(s: str) -> bytes:
    b = s.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def _int(i: int) -> bytes:
    return pickle.BININT + struct.pack("<i", i)


def _tuple(items) -> bytes:
    return pickle.MARK + b"".join(_int(i) for i in items) + pickle.TUPLE


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def tensor_pickle(tensors: dict[str, np.ndarray], storage_names: dict | None = None) -> bytes:
    """data.pkl of an OrderedDict-free state dict: key -> _rebuild_tensor_v2(storage i, ...)."""
    out = [pickle.PROTO + bytes([2]), pickle.EMPTY_DICT, pickle.MARK]
    for i, (key, arr) in enumerate(tensors.items()):
        storage = (storage_names or {}).get(key) or STORAGES[arr.dtype]
        out += [
            _str(key),
            _global("torch._utils", "_rebuild_tensor_v2"),
            pickle.MARK,
            pickle.MARK, _str("storage"), _global("torch", storage), _str(str(i)), _str("cpu"),
            _int(arr.size), pickle.TUPLE, pickle.BINPERSID,
            _int(0), _tuple(arr.shape), _tuple([s // arr.itemsize for s in arr.strides]),
            pickle.NEWFALSE,
            _global("collections", "OrderedDict"), pickle.EMPTY_TUPLE, pickle.REDUCE,
            pickle.TUPLE, pickle.REDUCE,
        ]
    out += [pickle.SETITEMS, pickle.STOP]
    return b"".join(out)


def save_torch_zip(path, tensors: dict[str, np.ndarray], raw: dict[str, bytes] | None = None,
                   storage_names: dict | None = None) -> None:
    """`raw` overrides the bytes of a tensor's storage (e.g. bf16 as uint16)."""
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", tensor_pickle(tensors, storage_names))
        zf.writestr("archive/byteorder", "little")
        for i, (key, arr) in enumerate(tensors.items()):
            zf.writestr(f"archive/data/{i}", (raw or {}).get(key, arr.tobytes()))
        zf.writestr("archive/version", "3\n")
