"""Step-cache parity: our TeaCache and MagCache (skip decisions and the
sampled latents) against a torch implementation of the same algorithms around
diffusers' `WanTransformer3DModel` (`step_cache_reference.py`), fp32, with the
same random weights (through the real converter) and inputs, Euler over two
temporal windows.

The reference model's time MLP sees only the lowest quarter of the sinusoid's
frequencies (`smooth_time_embedding_`), so its modulation moves with t as
slowly as a trained model's does and the published TeaCache polynomial skips
steps; with all frequencies a random model's e0 changes 70-120% a step, where
the published fit never skips.

    pytest parity/test_step_cache_parity.py -s
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mlx.core as mx  # noqa: E402
from step_cache_reference import MagCacheRule, TeaCacheRule, install, sample, smooth_time_embedding_  # noqa: E402
from wan_reference import build_reference, make_inputs, write_format  # noqa: E402

from helpers import rel_err, run_cli  # noqa: E402
from mlx_omnimatte.models.wan.transformer import Config  # noqa: E402
from mlx_omnimatte.pipelines.removal import dit_velocity  # noqa: E402
from mlx_omnimatte.pipelines.stages import denoise  # noqa: E402
from mlx_omnimatte.sampling import make_sampler  # noqa: E402
from mlx_omnimatte.step_cache import (MAGCACHE_RATIOS, TEACACHE_COEFFICIENTS, CacheSpec, attached,  # noqa: E402
                                      nearest_ratios, new_cache)
from mlx_omnimatte.weights import load_model  # noqa: E402

pytestmark = pytest.mark.torch

BOUND = 1e-5
CFG = Config(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=36, image_dim=1280)
GRID = (5, 8, 12)  # latent frames, height, width
WINDOW, OVERLAP = 3, 1  # windows (0, 3) and (2, 5)
STEPS, SHIFT = 20, 5.0
KEEP_FROM = 96  # time-MLP input columns kept: frequency index >= 96 of 128


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Torch's threads fight a preloaded multi-threaded BLAS (14x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The reference model, the same weights converted to MLX, and inputs."""
    folder = tmp_path_factory.mktemp("step-cache")
    model = build_reference(CFG, seed=3)
    smooth_time_embedding_(model, KEEP_FROM)
    src = write_format(model, folder, "original", "safetensors")
    assert run_cli(["convert", src, "-o", folder / "mlx", "--dtype", "float32"])[0] == 0
    assert json.loads((folder / "mlx" / "config.json").read_text())["dim"] == CFG.dim
    dit = load_model(folder / "mlx", component="transformer")
    inputs = make_inputs(CFG, *GRID, seed=4)
    rng = np.random.default_rng(5)
    z = rng.standard_normal((1, *GRID, 16)).astype(np.float32)
    y = rng.standard_normal((1, *GRID, CFG.in_dim - 16)).astype(np.float32)
    return model, dit, inputs, z, y


def run_mlx(dit, inputs, z, y, spec: CacheSpec):
    ctx = dit.embed_context(mx.array(inputs["context"]), mx.array(inputs["clip_fea"]))
    cache = new_cache(spec, STEPS)
    with attached(dit, cache):
        out = denoise(dit_velocity(dit, mx.array(y), ctx), mx.array(z), sampler=make_sampler("euler", STEPS, SHIFT),
                      window=WINDOW, overlap=OVERLAP, cache=cache)
    return np.array(out), cache


def run_torch(model, inputs, z, y, rule):
    blocks = model.blocks
    cached = install(model, rule)
    try:
        out = sample(model, cached, z, y, inputs["context"], inputs["clip_fea"], STEPS, SHIFT, WINDOW, OVERLAP)
    finally:
        model.blocks = blocks
    return out, cached.log


@pytest.mark.parametrize("kind,threshold", [("teacache", 0.05), ("teacache", 0.1), ("magcache", 0.12)])
def test_cache_matches_reference(case, kind, threshold):
    model, dit, inputs, z, y = case
    rule = (TeaCacheRule(threshold, TEACACHE_COEFFICIENTS) if kind == "teacache"
            else MagCacheRule(threshold, nearest_ratios(MAGCACHE_RATIOS, STEPS)))
    ref, log = run_torch(model, inputs, z, y, rule)
    got, cache = run_mlx(dit, inputs, z, y, CacheSpec(kind, threshold))
    assert cache.decisions == log  # every (step, window, computed) alike
    spans = {span for _, span, _ in log}
    assert spans == {(0, 3), (2, 5)}
    computed = sum(c for _, _, c in log)
    assert 0 < cache.skipped == 2 * STEPS - computed  # something was skipped, in both windows alike
    err = rel_err(got, ref)
    print(f"\n{kind}:{threshold}: computed {computed}/{2 * STEPS} window forwards, "
          f"max|mlx - torch| / max|torch| = {err:.2e}")
    assert err <= BOUND


def test_no_cache_matches_reference(case):
    """The plain trajectory (every forward) against the reference, for scale."""
    model, dit, inputs, z, y = case
    ref, log = run_torch(model, inputs, z, y, TeaCacheRule(0.0, TEACACHE_COEFFICIENTS))
    got, _ = run_mlx(dit, inputs, z, y, CacheSpec())
    assert all(c for _, _, c in log) and len(log) == 2 * STEPS
    assert rel_err(got, ref) <= BOUND
