"""Helpers every test shares (no tests here): the random-weight initializer,
the relative error the parity bounds are stated in, and the command line as
a user runs it."""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from mlx_omnimatte.cli.main import main
from mlx_omnimatte.convert.tiny import random_params  # noqa: F401 (shared)

# the project's example clips (boys-beach, ...), beside the repository; tests
# that need them skip when they are absent
EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "examples"


def rel_err(got, want) -> float:
    """max |got - want| / max |want| (arrays of MLX or numpy, same shape)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def run_cli(args, capsys=None):
    """The CLI as a user runs it (the one way tests run it): (exit status,
    stdout, stderr); without `capsys` the output is left where it went and
    stdout and stderr are empty."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    if capsys is None:
        return e.value.code, "", ""
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@dataclass
class CliResult:
    exit_code: int
    output: str  # stdout and stderr together


def invoke(args) -> CliResult:
    """`run_cli` with its output kept, for helpers that have no capsys."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = run_cli(args)[0]
    return CliResult(code, out.getvalue())


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
