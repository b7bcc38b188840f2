"""Torch-free checkpoint readers.

Every reader returns a `Checkpoint`: a mapping from key to `LazyTensor`, whose
shape and dtype are known without reading data. Tensors are read one at a time
so that a 14B checkpoint converts in bounded memory.

Formats: safetensors (one file, or shards with `*.index.json`), and torch zip
pickles (`.pth`, `.pt`, `.bin`) read by a restricted unpickler that only
rebuilds tensors from their storages and refuses every other global.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from safetensors import SafetensorError, safe_open

from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.weights import read_weight_map

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def _fp8_e4m3_table() -> np.ndarray:
    """float32 value of every e4m3fn byte (bias 7, no inf, 0x7f/0xff are NaN)."""
    b = np.arange(256, dtype=np.uint32)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp = (b >> 3) & 0xF
    man = (b & 0x7).astype(np.float64)
    normal = (1.0 + man / 8.0) * np.exp2(exp.astype(np.float64) - 7.0)
    subnormal = (man / 8.0) * np.exp2(-6.0)
    val = sign * np.where(exp == 0, subnormal, normal)
    val[(b & 0x7F) == 0x7F] = np.nan
    return val.astype(np.float32)


def _fp8_e5m2_table() -> np.ndarray:
    """float32 value of every e5m2 byte: the top byte of an IEEE half."""
    return (np.arange(256, dtype=np.uint16) << 8).view(np.float16).astype(np.float32)


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


# Storage dtype name -> (numpy dtype of the raw bytes, decoder to a numpy array).
# bf16 and fp8 have no numpy dtype: they are widened to float32, losslessly.
_DECODERS: dict[str, tuple[np.dtype, Callable[[np.ndarray], np.ndarray]]] = {
    "F64": (np.dtype("<f8"), lambda a: a),
    "F32": (np.dtype("<f4"), lambda a: a),
    "F16": (np.dtype("<f2"), lambda a: a),
    "BF16": (np.dtype("<u2"), _bf16_to_f32),
    "F8_E4M3": (np.dtype("u1"), lambda a: _fp8_e4m3_table()[a]),
    "F8_E5M2": (np.dtype("u1"), lambda a: _fp8_e5m2_table()[a]),
    "I64": (np.dtype("<i8"), lambda a: a),
    "I32": (np.dtype("<i4"), lambda a: a),
    "I16": (np.dtype("<i2"), lambda a: a),
    "I8": (np.dtype("i1"), lambda a: a),
    "U8": (np.dtype("u1"), lambda a: a),
    "BOOL": (np.dtype("?"), lambda a: a),
}


@dataclass
class LazyTensor:
    """A tensor whose bytes are read only by `load()`."""

    shape: tuple[int, ...]
    dtype: str  # a key of _DECODERS (the safetensors name)
    read: Callable[[], np.ndarray]  # returns the raw array, already shaped

    def load(self) -> np.ndarray:
        return _DECODERS[self.dtype][1](self.read())


class Checkpoint(dict):
    """key -> LazyTensor, plus where it came from."""

    def __init__(self, items, source: Path, fmt: str, metadata: dict | None = None):
        super().__init__(items)
        self.source = source
        self.file_format = fmt
        self.metadata = metadata or {}


# --------------------------------------------------------------------------- safetensors


def read_safetensors(path: Path) -> Checkpoint:
    """Header and numpy-typed tensors come from the `safetensors` library
    (which checks that every tensor lies inside the file). It cannot decode
    BF16 (numpy and mlx backends: TypeError, and BF16 is what Wan and Casper
    ship) nor F8 (AttributeError); those bytes come from `mx.load`, lazily
    (a 512 MB bf16 file, one 64 MB tensor read: 359 MB peak RSS, as with a
    memmap), which in turn has no F64 and returns F8 as plain uint8. The raw
    bytes are widened by `_DECODERS` from the header's dtype."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            header = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except SafetensorError as e:
        raise OmnimatteError(f"{path}: not a safetensors file, or truncated or corrupt ({e})") from None
    except OSError as e:
        raise OmnimatteError(f"{path}: cannot read ({e.strerror})") from None
    items = {}
    for key, (dtype, shape) in header.items():
        if dtype not in _DECODERS:
            raise OmnimatteError(f"{path}: tensor {key} has unsupported dtype {dtype}")
        read = _raw_reader(path, key, _DECODERS[dtype][0]) if dtype in _RAW else _numpy_reader(path, key)
        items[key] = LazyTensor(shape, dtype, read)
    return Checkpoint(items, path, "safetensors", metadata)


_RAW = ("BF16", "F8_E4M3", "F8_E5M2")  # no numpy dtype: read as bits


def _numpy_reader(path: Path, key: str):
    def read():
        with safe_open(str(path), framework="numpy") as f:
            return f.get_tensor(key)

    return read


def _raw_reader(path: Path, key: str, raw: np.dtype):
    def read():
        # a fresh lazy load per tensor: a kept dict would hold every tensor read so far
        a = mx.load(str(path))[key]
        if a.dtype == mx.bfloat16:
            a = a.view(mx.uint16)
        return np.array(a).view(raw)

    return read


def read_sharded_safetensors(index: Path) -> Checkpoint:
    index = Path(index)
    items, shards = {}, {}
    for key, shard in read_weight_map(index).items():
        if shard not in shards:
            shard_path = index.parent / shard
            if not shard_path.exists():
                raise OmnimatteError(f"{index}: shard {shard} is missing")
            shards[shard] = read_safetensors(shard_path)
        if key not in shards[shard]:
            raise OmnimatteError(f"{index.parent / shard}: tensor {key} named in the index is absent")
        items[key] = shards[shard][key]
    return Checkpoint(items, index, "safetensors")


# --------------------------------------------------------------------------- torch pickles

# The storage classes a tensor state dict names, and the safetensors dtype of each.
_TORCH_STORAGES = {
    "DoubleStorage": "F64",
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
    "Float8_e4m3fnStorage": "F8_E4M3",
    "Float8_e5m2Storage": "F8_E5M2",
}


@dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclass(frozen=True)
class _StorageRef:
    dtype: str
    member: str
    numel: int


def _rebuild_tensor(storage, offset, size, stride, *_args):
    return ("tensor", storage, int(offset), tuple(size), tuple(stride))


def _rebuild_tensor_v3(storage, offset, size, stride, _grad, _hooks, dtype, *_args):
    # v3 (fp8 and other newer dtypes) stores an untyped byte storage plus the dtype
    if not isinstance(dtype, _StorageType) or not isinstance(storage, _StorageRef):
        raise OmnimatteError("unsupported tensor record in the pickle")
    itemsize = _DECODERS[dtype.dtype][0].itemsize
    typed = _StorageRef(dtype.dtype, storage.member, storage.numel // itemsize)
    return ("tensor", typed, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_args):
    return data


def _ordered_dict(*args):
    return dict(*args)


# torch dtype objects that v3 records name, as safetensors dtypes
_TORCH_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}

# Every global the unpickler may resolve. Nothing else is ever imported, so no
# code from the file runs.
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch.storage", "UntypedStorage"): _StorageType("U8"),
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
    **{("torch", name): _StorageType(dt) for name, dt in _TORCH_STORAGES.items()},
    **{("torch", name): _StorageType(dt) for name, dt in _TORCH_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path, prefix: str):
        super().__init__(file)
        self.path, self.prefix = path, prefix

    def find_class(self, module, name):
        found = _ALLOWED.get((module, name))
        if found is None:
            raise OmnimatteError(
                f"{self.path}: refused to load: the pickle asks for {module}.{name}, "
                "which a plain tensor checkpoint never needs"
            )
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise OmnimatteError(f"{self.path}: unsupported persistent id in the pickle")
        _, stype, key, _location, numel = pid[:5]
        if not isinstance(stype, _StorageType):
            raise OmnimatteError(f"{self.path}: unsupported storage type in the pickle")
        return _StorageRef(stype.dtype, f"{self.prefix}/data/{key}", int(numel))


def read_torch(path: Path) -> Checkpoint:
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise OmnimatteError(
            f"{path}: not a torch zip checkpoint (a legacy or truncated .pth, or not a checkpoint)"
        )
    try:
        zf = zipfile.ZipFile(path)
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            raise OmnimatteError(f"{path}: zip file without data.pkl: not a torch checkpoint")
        prefix = pkl[0].rsplit("/", 1)[0] if "/" in pkl[0] else ""
        with zf.open(pkl[0]) as f:
            obj = _RestrictedUnpickler(f, path, prefix).load()
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, struct.error) as e:
        raise OmnimatteError(f"{path}: truncated or corrupt torch checkpoint ({e})") from None
    state = _find_state_dict(obj, path)
    items = {}
    names = set(zf.namelist())
    for key, (_, ref, offset, size, stride) in state.items():
        if ref.member not in names:
            raise OmnimatteError(f"{path}: storage of {key} is missing (truncated file?)")
        items[key] = LazyTensor(size, ref.dtype, _zip_reader(zf, ref, offset, size, stride))
    return Checkpoint(items, path, "torch")


def _is_tensor(v) -> bool:
    return isinstance(v, tuple) and len(v) == 5 and v[0] == "tensor"


def _find_state_dict(obj, path: Path) -> dict:
    """The tensor table: the top-level dict, or the one dict of tensors that a
    training checkpoint nests under a key such as `state_dict` or `model`."""
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if _is_tensor(v)}
        if tensors:
            return tensors
        for key in ("state_dict", "model", "module", "ema"):
            if isinstance(obj.get(key), dict):
                return _find_state_dict(obj[key], path)
    raise OmnimatteError(f"{path}: holds no tensor state dict")


def _zip_reader(zf: zipfile.ZipFile, ref: _StorageRef, offset: int, size, stride):
    def read():
        raw_dtype = _DECODERS[ref.dtype][0]
        data = np.frombuffer(zf.read(ref.member), dtype=raw_dtype)
        if data.size < ref.numel:
            raise OmnimatteError(f"{zf.filename}: storage {ref.member} is truncated")
        if not size:
            return data[offset : offset + 1].reshape(())
        view = np.lib.stride_tricks.as_strided(
            data[offset:], shape=size, strides=[s * raw_dtype.itemsize for s in stride]
        )
        return np.ascontiguousarray(view)

    return read


# --------------------------------------------------------------------------- dispatch


def read_checkpoint(path) -> Checkpoint:
    """Open a checkpoint file, a shard index, or a folder holding one checkpoint."""
    path = Path(path)
    if not path.exists():
        raise OmnimatteError(f"{path}: no such file or directory")
    if path.is_dir():
        return read_checkpoint(_single_checkpoint_in(path))
    name = path.name
    if name.endswith(".index.json"):
        return read_sharded_safetensors(path)
    if name.endswith(SAFETENSORS_SUFFIXES):
        return read_safetensors(path)
    if name.endswith(TORCH_SUFFIXES):
        return read_torch(path)
    raise OmnimatteError(f"{path}: unknown checkpoint type (expected .safetensors, .pth, .pt or .bin)")


def _single_checkpoint_in(folder: Path) -> Path:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return indexes[0]
    files = sorted(p for p in folder.iterdir() if p.name.endswith(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES))
    if len(files) == 1:
        return files[0]
    if not files:
        raise OmnimatteError(f"{folder}: no checkpoint file (.safetensors, .pth, .bin) in this folder")
    raise OmnimatteError(
        f"{folder}: several checkpoint files and no index; name one of {', '.join(p.name for p in files)}"
    )
