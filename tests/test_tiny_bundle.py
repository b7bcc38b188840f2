"""`mlx-omnimatte tiny-bundle`: the tests' tiny random model, for users, from
the package (no test code): the same weights as the tests' bundle, through
the real converter, usable by the model commands; refusals as everywhere."""

from __future__ import annotations

import ast
from pathlib import Path

import mlx.core as mx
import numpy as np

import mlx_omnimatte as mo
from helpers import assert_refused, run_cli, run_ok
from tiny_models import tiny_bundle

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_bundle_is_the_tests_bundle(tmp_path, capsys):
    out = tmp_path / "tiny"
    code, stdout, err = run_cli(["tiny-bundle", "-o", out, "--experts", "-q"], capsys)
    assert code == 0, err
    assert stdout.strip() == f"wrote {out} (random weights: its outputs mean nothing)"
    ours = tiny_bundle(tmp_path / "tests")
    for part in ("transformer", "vae", "t5", "clip", "experts/effect", "experts/quality"):
        a, b = mx.load(str(out / part / "model.safetensors")), mx.load(str(ours / part / "model.safetensors"))
        assert a.keys() == b.keys() and a, part
        for k in a:
            assert np.array_equal(np.array(a[k].astype(mx.float32)), np.array(b[k].astype(mx.float32))), (part, k)
    assert mo.load_model(out / "experts" / "effect", "expert").kind == "effect"
    assert_refused(["tiny-bundle", "-o", out], capsys, f"{out}: already exists (add --overwrite to replace it)")
    run_ok(["tiny-bundle", "-o", out, "--overwrite", "-q"], capsys)
    assert not (out / "experts").exists() and (out / "transformer" / "config.json").is_file()


def test_tiny_bundle_runs_a_model_command(tmp_path, capsys):
    bundle = tmp_path / "tiny"
    run_ok(["tiny-bundle", "-o", bundle, "-q"], capsys)
    clip = tmp_path / "clip"
    run_ok(["synth", "-o", clip, "--frames", "5", "--size", "64x48", "-q"], capsys)
    out = tmp_path / "out"
    run_ok(["remove", clip, "--bundle", bundle, "-o", out, "--steps", "1", "--size", "64x48", "-q",
            "--objects", "all"], capsys)
    assert (out / "background_all.mp4").stat().st_size > 0


def test_the_product_imports_no_test_code():
    test_modules = {p.stem for p in (ROOT / "tests").glob("*.py")} | {"tests", "parity"}
    for folder in ("mlx_omnimatte", "convert", "cli"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                assert not {n.split(".")[0] for n in names} & test_modules, f"{path}: imports {names}"
