"""Wan2.1 VAE parity: MLX against diffusers `AutoencoderKLWan`, float32.

Every parameter is random (norm gammas and biases too; see
vae_reference.make_vae). The weights reach MLX only through the real path:
written by torch as a diffusers `vae/` folder and as an original
`Wan2.1_VAE.pth`, converted by the `mlx-omnimatte convert` CLI, loaded with
`load_model`. Latents are compared normalized (the reference's raw posterior
mean with Wan2.1's mean/std applied here). Bound: max|mlx - ref| <= 1e-4 * max|ref|.

    pytest parity/test_vae_parity.py -m "not slow" -s     # base_dim 8
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        pytest parity/test_vae_parity.py -m slow -s         # full Wan2.1 VAE
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import mlx.core as mx  # noqa: E402
import vae_reference as ref  # noqa: E402

from helpers import rel_err, run_cli  # noqa: E402
from mlx_omnimatte.models.wan.vae_tiling import Tiling  # noqa: E402
from mlx_omnimatte.weights import load_model  # noqa: E402

pytestmark = pytest.mark.torch

BOUND = 1e-4
FORMATS = ("original", "diffusers")


def convert(src: Path, out: Path) -> Path:
    assert run_cli(["convert", str(src), "-o", str(out)])[0] == 0
    return out


def make_setup(root: Path, **config):
    vae = ref.make_vae(0, **config)
    srcs = {"diffusers": ref.save_diffusers(vae, root / "vae"),
            "original": ref.save_original(vae, root / "Wan2.1_VAE.pth")}
    models = {fmt: load_model(convert(srcs[fmt], root / f"mlx_{fmt}"), "vae") for fmt in FORMATS}
    return vae, models


def video(t, h, w, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (1, t, h, w, 3)).astype(np.float32)



def check(name, got, want):
    err = rel_err(got, want)
    print(f"{name}: max|mlx-ref|/max|ref| = {err:.2e} (max|ref| {np.abs(want).max():.3f})")
    assert got.shape == want.shape
    assert err <= BOUND


# --------------------------------------------------------------------------- key layouts


def test_original_file_is_what_diffusers_reads(tmp_path):
    """Our original-format writer agrees with diffusers' own single-file converter
    (loaders.single_file_utils.convert_wan_vae_to_diffusers)."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    vae = ref.make_vae(0, base_dim=8)
    path = ref.save_original(vae, tmp_path / "Wan2.1_VAE.pth")
    back = convert_wan_vae_to_diffusers(torch.load(path, weights_only=True))
    sd = vae.state_dict()
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_torch_free_layout_table_matches_the_reference():
    """tests/test_vae.py writes tiny checkpoints without torch from a table of
    names and shapes: it must be the reference's, in both formats."""
    tests = Path(__file__).parents[1] / "tests"
    sys.path.insert(0, str(tests))  # test_vae imports ckpt_utils by plain name
    spec = importlib.util.spec_from_file_location("tests_test_vae", tests / "test_vae.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for dim in (8, 96):
        sd = ref.AutoencoderKLWan(base_dim=dim).state_dict()
        table = mod.wan21_vae_layout(dim)
        assert {d: s for d, _, s in table} == {k: tuple(v.shape) for k, v in sd.items()}
        assert {d: o for d, o, _ in table} == {k: ref.original_key(k) for k in sd}


# --------------------------------------------------------------------------- tiny (fast)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("vae_tiny"), base_dim=8)


@pytest.mark.parametrize("fmt", FORMATS)
def test_tiny_encode_decode(tiny, fmt):
    vae, models = tiny
    x = video(9, 32, 48)
    want_z = ref.encode(vae, x)
    check(f"tiny {fmt} encode", np.array(models[fmt].encode(mx.array(x))), want_z)
    want_y = ref.decode(vae, want_z)
    check(f"tiny {fmt} decode", np.array(models[fmt].decode(mx.array(want_z))), want_y)


# --------------------------------------------------------------------------- full Wan2.1 VAE


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    vae, models = make_setup(tmp_path_factory.mktemp("vae_full"))
    x = video(9, 64, 96)
    z = ref.encode(vae, x)
    y = ref.decode(vae, z)
    assert 0.05 < np.abs(y).mean() and np.abs(y).max() < 1  # O(1), not clamped
    return vae, models, x, z, y


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_full_encode_9_frames(full, fmt):
    _, models, x, z, _ = full
    check(f"full {fmt} encode 9x64x96", np.array(models[fmt].encode(mx.array(x))), z)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_full_decode_9_frames(full, fmt):
    _, models, _, z, y = full
    check(f"full {fmt} decode 9x64x96", np.array(models[fmt].decode(mx.array(z))), y)


@pytest.mark.slow
def test_full_17_frames(full):
    vae, models, _, _, _ = full
    x = video(17, 64, 96, seed=1)
    z = ref.encode(vae, x)
    check("full diffusers encode 17x64x96", np.array(models["diffusers"].encode(mx.array(x))), z)
    y = ref.decode(vae, z)
    check("full diffusers decode 17x64x96", np.array(models["diffusers"].decode(mx.array(z))), y)


@pytest.mark.slow
def test_full_tiled_vs_untiled(full):
    """Random weights make the network chaotic (global attention, wide receptive
    field), so tiles of most of a small frame differ visibly; the numbers are a
    regression bound, not a quality claim. Measured: decode max 0.27, mean 0.041."""
    _, models, x, z, y = full
    m = models["diffusers"]
    tiled = np.array(m.decode(mx.array(z), tiling=Tiling(48, 64, 16)))
    d = np.abs(tiled - y)
    print(f"full decode 9x64x96 tiled 48x64/16 vs reference untiled: max {d.max():.4f} mean {d.mean():.5f}")
    assert 0 < d.max() < 0.4 and d.mean() < 0.06
    whole = np.array(m.decode(mx.array(z), tiling=Tiling(64, 96, 16)))  # one tile = untiled
    assert rel_err(whole, y) <= BOUND
