"""The converted-directory writer: shards past a size, index, atomic output."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_omnimatte.convert.core import Converted
from mlx_omnimatte.convert.writer import write_converted
from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.weights import load_weights


def _converted(n=5, fail_at=None):
    def tensors():
        for i in range(n):
            if i == fail_at:
                raise KeyboardInterrupt
            yield f"w{i}", mx.full((256,), float(i))  # 1 KiB each
    return Converted({"component": "vae"}, tensors)


def test_shards_and_index(tmp_path):
    out = write_converted(tmp_path / "m", _converted(), {"source": "x"}, shard_bytes=2048)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    weights = load_weights(out)
    assert sorted(weights) == [f"w{i}" for i in range(5)]
    assert all(float(weights[f"w{i}"][0]) == i for i in range(5))
    assert json.loads((out / "config.json").read_text())["source"] == {"source": "x"}


def test_single_file_below_the_limit(tmp_path):
    out = write_converted(tmp_path / "m", _converted(), {})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_interrupted_write_leaves_nothing_and_keeps_old(tmp_path):
    out = tmp_path / "m"
    with pytest.raises(KeyboardInterrupt):
        write_converted(out, _converted(fail_at=3), {}, shard_bytes=1024)
    assert list(tmp_path.iterdir()) == []
    write_converted(out, _converted(), {})
    with pytest.raises(OmnimatteError, match="already exists"):
        write_converted(out, _converted(), {})
    with pytest.raises(KeyboardInterrupt):
        write_converted(out, _converted(fail_at=2), {}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert np.array(load_weights(out)["w4"])[0] == 4
