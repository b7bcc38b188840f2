"""The torch-free .pth reader against files written by the real torch.save."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mlx_omnimatte.convert.readers import read_checkpoint  # noqa: E402

pytestmark = pytest.mark.torch


def _state():
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "transposed": torch.randn(4, 3, generator=g).t(),
        "slice": torch.randn(8, generator=g)[2:7],
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "fp8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "param": torch.nn.Parameter(torch.randn(2, generator=g)),
        "scalar": torch.tensor(3.5),
        "int": torch.arange(6),
    }


@pytest.mark.parametrize("nest", [None, "state_dict", "model"])
def test_reads_torch_save(tmp_path, nest):
    sd = _state()
    torch.save(sd if nest is None else {nest: sd, "epoch": 1}, tmp_path / "m.pth")
    ck = read_checkpoint(tmp_path / "m.pth")
    assert set(ck) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(ck[k].load(), v.detach().float().numpy() if v.is_floating_point() else v.numpy())
        assert ck[k].shape == tuple(v.shape)


def test_refuses_pickled_module(tmp_path):
    torch.save({"net": torch.nn.Linear(2, 2)}, tmp_path / "m.pth")
    with pytest.raises(Exception, match="refused to load"):
        read_checkpoint(tmp_path / "m.pth")
