"""scripts/gpu_check.sh in its tiny CPU mode, so that the GPU check cannot rot:
every step runs, exits 0 and leaves its figures in the one results folder.

    pytest parity/test_gpu_check.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ["tests", "dit", "branch", "vae", "unet", "train", "fixtures"]


def run(*args, timeout=600):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.torch
def test_tiny_cpu_run(tmp_path):
    out = tmp_path / "results"
    r = run("--tiny", "-o", out)
    assert r.returncode == 0, r.stdout + r.stderr
    steps = [line.split() for line in (out / "steps.txt").read_text().splitlines()]
    assert [s[0] for s in steps] == STEPS and all(s[1] == "rc=0" for s in steps)
    res = json.loads((out / "results.json").read_text())
    assert res["ok"] and res["meta"]["mode"] == "cpu" and res["meta"]["mlx"]
    assert [s["step"] for s in res["steps"]] == STEPS
    branch = res["figures"]["branch"]
    assert branch["effect"]["finite"] and branch["quality"]["finite"] and branch["tokens"] == 16
    assert branch["effect"]["blocks"] == 1 and branch["quality"]["mask"] == "C"
    fx = res["figures"]["fixtures"]
    assert fx["within_bound"] and fx["device"] == "cpu"
    assert json.loads((out / "fixtures" / "meta.json").read_text())["device"] == "cpu"
    dit = (out / "dit.txt").read_text()
    assert "mlx    on " in dit and "torch  on cpu: " in dit and "s/forward" in dit
    unet = (out / "unet.txt").read_text()
    assert "MLX / torch (glibc's default heap) time ratio" in unet and "(heap kept as for MLX) time ratio" in unet
    assert " 5   32x32" in (out / "vae.txt").read_text()
    assert "passed" in (out / "tests.txt").read_text()


def test_refuses_a_results_folder_in_use(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    r = run("-o", tmp_path)
    assert r.returncode == 2 and "not empty" in r.stderr and os.listdir(tmp_path) == ["old.txt"]
    r = run("--bogus")
    assert r.returncode == 2 and "unknown argument" in r.stderr
