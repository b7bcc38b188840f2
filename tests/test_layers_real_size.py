"""The fast layer solver at a real size, as a user runs it: `synth` writes a
two-object clip (a shadow and a reflection) at 81 frames of 832x480 with an
exact and a removal-like plate, `decompose --clean-plate` solves it with the
default solver and `evaluate` measures it against the truth.

Measured (parity/bench_layers.py): exact plate IoU 0.999 / 0.993, object
MAE 0.002 / 0.0004, effect MAE 0.028 / 0.006, false alpha 0.0000 / 0.0003;
removal plate 0.998 / 0.993, 0.002 / 0.0004, 0.028 / 0.008, 0.0000 /
0.0003. The bounds below are the issue's targets (exact: IoU >= 0.9, object
<= 0.05, effect <= 0.1, false <= 0.02; removal: 0.85 / 0.08 / 0.15 / 0.05)
tightened to what the measurements allow with a margin."""

from __future__ import annotations

import json

import pytest

from mlx_omnimatte.synth import make_clip, write_clip
from helpers import run_ok

BOUNDS = {  # plate -> (IoU >=, object MAE <=, effect MAE <=, false alpha <=)
    "background": (0.97, 0.01, 0.05, 0.005),
    "background_removal": (0.97, 0.01, 0.05, 0.005),
}


@pytest.fixture(scope="module")
def real_clip(tmp_path_factory):
    clip = tmp_path_factory.mktemp("real") / "clip"
    write_clip(make_clip(3, frames=81, size=(832, 480), objects=2, effects=["shadow", "reflection"],
                         plate="removal"), clip)
    return clip


@pytest.mark.slow
@pytest.mark.parametrize("plate", sorted(BOUNDS))
def test_fast_solver_at_real_size(real_clip, plate, tmp_path, capsys):
    out = tmp_path / "out"
    run_ok(["decompose", real_clip, "--clean-plate", real_clip / "truth" / plate, "-o", out, "--quiet"], capsys)
    scores = tmp_path / "scores.json"
    run_ok(["evaluate", out, "--clip", real_clip, "--truth", real_clip / "truth", "--json", scores], capsys)
    rows = json.loads(scores.read_text())
    iou, obj, eff, false = BOUNDS[plate]
    for name in ("00", "01"):
        r = rows[name]
        assert r["iou"] >= iou and r["object_mae"] <= obj, (name, r)
        assert r["effect_mae"] <= eff and r["false_alpha"] <= false, (name, r)
        assert r["effect_pixels"] > 100_000  # a shadow and a reflection, not a speck
    assert rows["all"]["recompose_psnr"] > 40.0
