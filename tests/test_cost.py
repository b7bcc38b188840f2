"""The run plan's time: each stage's work and seconds from given rates, the
long-run warning, and the per-machine rate cache (probed once, then read)."""

from __future__ import annotations

import json

import pytest

from mlx_omnimatte.io.grid import plan_grid
from mlx_omnimatte.pipelines import cost
from mlx_omnimatte.pipelines.optimize import OptimizeSettings
from mlx_omnimatte.pipelines.settings import Mode

RATES = cost.Rates({"read": 1e-8, "solve": 2e-7, "write": 3e-7, "unet": 1e-4, "unet_start": 5.0, "flops_float32": 1e11,
                    "flops_bfloat16": 2e11})


def test_clean_plate_stages_and_seconds(monkeypatch):
    monkeypatch.setattr(cost.time, "process_time", lambda: 7.5)  # the CPU seconds this process spent
    grid = plan_grid(832, 480, 81, min_frames=1)
    px = 832 * 480 * 81
    fast = cost.run_costs(cost.CostRequest(Mode.PLATE, 2, "fast", plate_video=True), grid, RATES)
    assert [c.name for c in fast] == ["start-up", "read video", "solve layers", "write"]
    assert fast[0].seconds == 7.5 and fast[0].work == "imports (spent)"
    assert fast[1].seconds == pytest.approx(px * 4 * 1e-8)  # video, two masks, the plate
    assert fast[2].seconds == pytest.approx(px * 2 * 2e-7)
    assert fast[3].seconds == pytest.approx(px * 2 * 3e-7)
    opt = OptimizeSettings(batch_frames=16).scaled(300)
    unet = cost.run_costs(cost.CostRequest(Mode.PLATE, 1, "unet", opt), grid, RATES)
    assert unet[2].name == "optimize" and "300 iterations x 16 frames" in unet[2].work
    assert unet[2].seconds == pytest.approx(300 * 16 * 832 * 480 * 1e-4 + 5.0)  # 832x480: a multiple of 32


def test_dit_forwards_and_flops():
    cfg = {"dim": 1536, "ffn_dim": 8960, "num_layers": 30}
    flops = cost.dit_forward_flops(cfg, 32760)
    # the 1.3B DiT at 81x480x832: its matmuls (2 x tokens x weights) and attention (4 N^2 D a block)
    assert 2.7e14 < flops < 3.0e14
    assert 0.9e15 < cost.dit_forward_flops(cfg, 2 * 32760) < 1.1e15  # DESIGN sec. 7: ~1e15 for the branch
    grid = plan_grid(832, 480, 81)
    stages = cost.model_costs(Mode.TWO_STAGE, grid, 2, cfg, {"transformer": 3e9, "vae": 5e8}, 50, 1, 32760, 1,
                              "bfloat16", RATES, True)
    denoise = next(c for c in stages if c.name == "denoise")
    assert denoise.work.startswith("50 DiT forwards (1 trajectories x 50 steps x 1 windows")
    assert denoise.seconds == pytest.approx(50 * flops / (2e11 * cost.DIT_EFFICIENCY))


def test_long_runs_say_what_shortens_them():
    assert cost.long_run_advice(29 * 60, Mode.PLATE, "unet", False) is None
    line = cost.long_run_advice(3 * 3600, Mode.TWO_STAGE, "unet", True)
    assert line.startswith("this run is estimated at 3.0 h (over 30 min)")
    for tip in ("--layer-solver fast", "fewer --steps", "no --solo", "a smaller --size"):
        assert tip in line


def test_rates_are_probed_once_and_cached(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setenv("MLX_OMNIMATTE_RATES", str(tmp_path / "r" / "rates.json"))
    monkeypatch.setitem(cost.PROBE_FUNCTIONS, "plate",
                        lambda: calls.append("plate") or {"read": 1.0, "solve": 2.0, "write": 3.0})
    monkeypatch.setitem(cost.PROBE_FUNCTIONS, "unet", lambda: calls.append("unet") or {"unet": 4.0, "unet_start": 1.0})
    assert cost.machine_rates(("plate",)).solve == 2.0
    assert cost.machine_rates(("plate",)).write == 3.0 and calls == ["plate"]
    assert cost.machine_rates(("plate", "unet")).unet == 4.0 and calls == ["plate", "unet"]
    table = json.loads((tmp_path / "r" / "rates.json").read_text())
    assert list(table.values()) == [{"read": 1.0, "solve": 2.0, "write": 3.0, "unet": 4.0, "unet_start": 1.0}]
    (tmp_path / "r" / "rates.json").write_text("{not json")
    assert cost.machine_rates(("plate",)).read == 1.0 and calls == ["plate", "unet", "plate"]


def test_format_seconds():
    assert [cost.format_seconds(s) for s in (42, 600, 9000)] == ["42 s", "10 min", "2.5 h"]
