"""Helpers every test shares (no tests here): the random-weight initializer,
the relative error the parity bounds are stated in, and the command line as
a user runs it."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_omnimatte.cli.main import main

NORM = re.compile(r"(norm|gamma|ln_|pre_norm)|\.proj\.[04]\.weight$")


def random_params(model, seed: int = 0, norm: float = 0.05, bias: float = 0.02,
                  modulation: float | None = None, scale: float = 1.0) -> dict[str, np.ndarray]:
    """Random float32 values for every parameter of an MLX `model` (MLX names
    and layout): norm gains near 1 and weights scaled by 1/sqrt(fan in), so
    activations stay O(1); `modulation` (when given) is the scale of the
    DiT's modulation tables, O(1) offsets in trained models."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, p in tree_flatten(model.parameters()):
        shape = tuple(p.shape)
        if NORM.search(name) and name.endswith(("weight", "gamma")):
            a = 1.0 + norm * rng.standard_normal(shape)
        elif name.endswith("bias"):
            a = bias * rng.standard_normal(shape)
        elif modulation is not None and "modulation" in name:
            a = modulation * rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[-1]
            a = scale * rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))
        out[name] = a.astype(np.float32)
    return out


def rel_err(got, want) -> float:
    """max |got - want| / max |want| (arrays of MLX or numpy, same shape)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def run_cli(args, capsys):
    """The CLI as a user runs it: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def run_ok(args, capsys) -> str:
    """Run the CLI, assert success, return stderr."""
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    return err


def assert_refused(args, capsys, match: str, out=None) -> None:
    """One line `error: ...` naming `match`, exit 2, and (given `out`) no
    output and no hidden temporary beside it."""
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.fixture(autouse=True, scope="session")
def isolated_rates(tmp_path_factory):
    """Run plans probe this machine's rates once per session, into a file of
    the session's own (never the user's cache)."""
    os.environ["MLX_OMNIMATTE_RATES"] = str(tmp_path_factory.mktemp("rates") / "rates.json")
    yield
