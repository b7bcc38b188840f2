"""MLX against stored diffusers outputs, without torch.

The fixture (written by parity/make_fixtures.py) holds the weights as a
diffusers save_pretrained folder; they reach MLX through the real converter
(CLI) and `load_model`, exactly like a downloaded checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_omnimatte.weights import load_model
from helpers import run_cli

FIXTURE = Path(__file__).parent.parent / "parity" / "fixtures" / "wan_dit_tiny"


def test_wan_dit_tiny_matches_diffusers(tmp_path):
    meta = json.loads((FIXTURE / "meta.json").read_text())
    out = tmp_path / "mlx"
    code = run_cli(["convert", str(FIXTURE), "-o", str(out), "--dtype", "float32"])[0]
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["source"]["source_format"] == "diffusers"
    assert {k: config[k] for k in ("dim", "num_heads", "num_layers", "image_dim")} == \
        {k: meta["config"][k] for k in ("dim", "num_heads", "num_layers", "image_dim")}
    model = load_model(out, component="transformer")
    d = np.load(FIXTURE / "inputs.npz")
    assert d["context"].shape[1] < 512  # padded inside the model
    y = np.array(model(mx.array(d["x"]), mx.array(d["t"]), mx.array(d["context"]), mx.array(d["clip_fea"])))
    ref = d["output"]
    assert y.shape == ref.shape == (2, 2, 8, 8, 16)
    err = np.abs(y - ref).max() / np.abs(ref).max()
    assert err <= 1e-4, err
