"""Torch-free checkpoint reading: safetensors (plain, bf16, fp8, sharded) and
torch zip pickles, including refusal of pickles that would run code."""

import json
import os
import pickle

import numpy as np
import pytest
from safetensors.numpy import save_file

from ckpt_utils import save_raw_pickle_zip, save_torch_zip, write_safetensors_raw
from mlx_omnimatte.convert.readers import read_checkpoint
from mlx_omnimatte.errors import OmnimatteError

rng = np.random.default_rng(0)


def test_safetensors_roundtrip_fp32_fp16(tmp_path):
    t = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float16)}
    save_file(t, str(tmp_path / "m.safetensors"))
    ck = read_checkpoint(tmp_path / "m.safetensors")
    assert set(ck) == {"a", "b"} and ck["a"].shape == (3, 4) and ck["b"].dtype == "F16"
    np.testing.assert_array_equal(ck["a"].load(), t["a"])
    np.testing.assert_array_equal(ck["b"].load(), t["b"])


def test_bf16_and_fp8_decode(tmp_path):
    x = rng.standard_normal(64).astype(np.float32)
    bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)  # truncation: exact in bf16
    # e4m3: 0x38 = 1.0, 0xB8 = -1.0, 0x40 = 2.0, 0x01 = 2^-9 (smallest subnormal), 0x7E = 448
    fp8 = np.array([0x38, 0xB8, 0x40, 0x01, 0x7E, 0x00], np.uint8)
    write_safetensors_raw(tmp_path / "m.safetensors", {
        "w": ("BF16", (8, 8), bf16.tobytes()), "q": ("F8_E4M3", (6,), fp8.tobytes())})
    ck = read_checkpoint(tmp_path / "m.safetensors")
    expect = (bf16.astype(np.uint32) << 16).view(np.float32).reshape(8, 8)
    np.testing.assert_array_equal(ck["w"].load(), expect)
    np.testing.assert_array_equal(ck["q"].load(), [1.0, -1.0, 2.0, 2.0 ** -9, 448.0, 0.0])


def test_sharded_index(tmp_path):
    save_file({"a": np.ones((2, 2), np.float32)}, str(tmp_path / "m-1.safetensors"))
    save_file({"b": np.zeros(3, np.float32)}, str(tmp_path / "m-2.safetensors"))
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}))
    ck = read_checkpoint(tmp_path)  # a folder with one index
    assert sorted(ck) == ["a", "b"]
    assert ck["a"].load().sum() == 4


def test_torch_zip_tensors(tmp_path):
    t = {"x": rng.standard_normal((2, 3, 4)).astype(np.float32), "y": np.arange(6, dtype=np.int64)}
    # a transposed view: strides that are not C-contiguous
    save_torch_zip(tmp_path / "m.pth", t)
    ck = read_checkpoint(tmp_path / "m.pth")
    np.testing.assert_array_equal(ck["x"].load(), t["x"])
    np.testing.assert_array_equal(ck["y"].load(), t["y"])


def test_torch_zip_bf16_storage(tmp_path):
    x = rng.standard_normal((4, 4)).astype(np.float32)
    bits = (x.view(np.uint32) >> 16).astype(np.uint16)
    save_torch_zip(tmp_path / "m.pth", {"w": bits}, storage_names={"w": "BFloat16Storage"})
    got = read_checkpoint(tmp_path / "m.pth")["w"].load()
    np.testing.assert_array_equal(got, (bits.astype(np.uint32) << 16).view(np.float32))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(str(marker)), protocol=2)
    save_raw_pickle_zip(tmp_path / "evil.pth", payload)
    with pytest.raises(OmnimatteError, match="refused to load.*(posix|os).system"):
        read_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"])
def test_garbage_files(tmp_path, content):
    for name in ("bad.pth", "bad.safetensors"):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(OmnimatteError, match=name):
            read_checkpoint(tmp_path / name)


def test_truncated_safetensors(tmp_path):
    save_file({"a": np.ones((64, 64), np.float32)}, str(tmp_path / "m.safetensors"))
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(OmnimatteError, match="truncated"):
        read_checkpoint(tmp_path / "t.safetensors")


def test_truncated_torch_zip(tmp_path):
    save_torch_zip(tmp_path / "m.pth", {"a": np.ones((64, 64), np.float32)})
    data = (tmp_path / "m.pth").read_bytes()
    (tmp_path / "t.pth").write_bytes(data[: len(data) - 200])
    with pytest.raises(OmnimatteError, match="t.pth"):
        ck = read_checkpoint(tmp_path / "t.pth")
        ck["a"].load()


def test_missing_path(tmp_path):
    with pytest.raises(OmnimatteError, match="no such file"):
        read_checkpoint(tmp_path / "nope.safetensors")


def test_safetensors_metadata_and_every_numpy_dtype(tmp_path):
    t = {str(d): np.arange(6).astype(d).reshape(2, 3)
         for d in (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_)}
    t["empty"] = np.zeros((0, 3), np.float32)
    save_file(t, str(tmp_path / "m.safetensors"), metadata={"lora_adapter_metadata": '{"r": 4}'})
    ck = read_checkpoint(tmp_path / "m.safetensors")
    assert ck.metadata == {"lora_adapter_metadata": '{"r": 4}'}
    for key, want in t.items():
        got = ck[key].load()
        assert got.dtype == want.dtype and got.shape == want.shape, key
        np.testing.assert_array_equal(got, want)


def test_sharded_index_names_a_missing_tensor(tmp_path):
    save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "m-1.safetensors"))
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"b": "m-1.safetensors"}}))
    with pytest.raises(OmnimatteError, match="tensor b named in the index is absent"):
        read_checkpoint(tmp_path / "m.safetensors.index.json")
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weights": {}}))
    with pytest.raises(OmnimatteError, match="not a safetensors index"):
        read_checkpoint(tmp_path / "m.safetensors.index.json")
