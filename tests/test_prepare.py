"""`prepare`: a synthetic data set into the latent cache, on the tiny
bundle; what each sample holds, resume after an interruption, and refusals."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

import mlx_omnimatte as mo
from mlx_omnimatte.train.prepare import alpha_video, on_grid, train_grid, without_object
from mlx_omnimatte.io.truth import read_truth
from mlx_omnimatte.train.cache import LatentCache, bundle_identity, read_manifest, sample_file
from mlx_omnimatte.bundle import open_bundle
from mlx_omnimatte.errors import OmnimatteError
from helpers import assert_refused, run_ok
from tiny_models import tiny_bundle, tiny_dataset


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    bundle = tiny_bundle(root)
    data = tiny_dataset(root)
    cache = root / "cache"
    return root, bundle, data, cache


def _prepare(prepared, capsys, out=None):
    root, bundle, data, cache = prepared
    return run_ok(["prepare", "--bundle", bundle, "--data", data, "-o", out or cache, "--quiet",
                   "--cache-dir", root / "prompts"], capsys)


def test_prepare_encodes_each_object(prepared, capsys):
    root, bundle, data, cache = prepared
    _prepare(prepared, capsys)
    manifest = read_manifest(cache)
    assert manifest["complete"] and len(manifest["samples"]) == 2
    assert manifest["encoders"] == bundle_identity(open_bundle(bundle, need=()))
    lc = LatentCache(cache, open_bundle(bundle, need=()))
    s = lc.read(0, keys=("cond", "alpha", "bg", "context", "clip", "alpha_px"))
    assert s["cond"].shape == (2, 6, 8, 20) and s["alpha"].shape == (2, 6, 8, 16) and s["bg"].shape == (2, 6, 8, 16)
    assert s["clip"].shape == (257, 1280) and s["context"].shape[1] == 64 and s["context"].shape[0] < 512
    assert np.abs(s["context"]).sum(axis=1).min() > 0  # only the caption's tokens are stored
    # the alpha latent is the VAE encoding of alpha as 3 equal channels in [-1, 1]
    truth = read_truth(data / "00000")
    plan = train_grid(64, 48, 5)
    alpha = on_grid(truth["alpha"][0], plan)
    assert np.allclose(s["alpha_px"], alpha, atol=1e-3) and alpha.max() > 0.5
    vae = mo.load_model(bundle / "vae")
    want = vae.encode(mx.array(alpha_video(alpha)[None] * 2 - 1))[0]
    assert float(mx.abs(mx.array(s["alpha"]) - want).max()) <= 1e-5 * float(mx.abs(want).max())
    bg = vae.encode(mx.array(on_grid(without_object(truth, 0), plan)[None] * 2 - 1))[0]
    assert float(mx.abs(mx.array(s["bg"]) - bg).max()) <= 1e-5 * float(mx.abs(bg).max())
    # mask channels: 1 - trimask, the object removed (1) where the dilated mask is
    assert s["cond"][..., :4].min() < 0.1 and s["cond"][..., :4].max() > 0.4


def test_without_object_composites_the_other_layers():
    t = {"background": np.full((1, 2, 2, 3), 100, np.uint8),
         "alpha": [np.full((1, 2, 2), 0.5, np.float32), np.full((1, 2, 2), 1.0, np.float32)],
         "foreground": [np.full((1, 2, 2, 3), 255, np.uint8), np.zeros((1, 2, 2, 3), np.uint8)]}
    assert np.allclose(without_object(t, 0), 0.0)  # layer 1 (opaque black) remains
    assert np.allclose(without_object(t, 1), 0.5 * 1.0 + 0.5 * 100 / 255)


def test_prepare_resumes_an_interrupted_cache(prepared, capsys):
    root, bundle, data, cache = prepared
    copy = root / "cache-resume"
    shutil.copytree(cache, copy)
    kept = sample_file(copy, 0).stat().st_mtime_ns
    want = mx.load(str(sample_file(copy, 1)))
    sample_file(copy, 1).unlink()
    manifest = json.loads((copy / "cache.json").read_text())
    manifest["complete"], manifest["samples"] = False, manifest["samples"][:1]
    (copy / "cache.json").write_text(json.dumps(manifest))
    with pytest.raises(OmnimatteError, match="incomplete"):
        LatentCache(copy)
    _prepare(prepared, capsys, copy)
    assert sample_file(copy, 0).stat().st_mtime_ns == kept  # not encoded again
    got = mx.load(str(sample_file(copy, 1)))
    for k in ("cond", "alpha", "bg", "context", "alpha_px"):
        assert np.array_equal(np.array(want[k]), np.array(got[k])), k
    # CLIP (float16) ran on a batch of 2 frames first, on 1 frame now
    assert np.allclose(np.array(want["clip"]), np.array(got["clip"]), atol=2e-3 * float(mx.abs(want["clip"]).max()))
    assert read_manifest(copy)["complete"]


def test_prepare_refuses_bad_input(prepared, capsys, tmp_path):
    root, bundle, data, cache = prepared
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(["prepare", "--bundle", bundle, "--data", empty, "-o", tmp_path / "c1"], capsys,
                   "no clip folders", tmp_path / "c1")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    assert_refused(["prepare", "--bundle", bundle, "--data", data, "-o", other], capsys, "not a latent cache")
    assert_refused(["prepare", "--bundle", bundle, "--data", data, "-o", cache, "--size", "64x32"], capsys,
                   "a cache of other size")


def test_prepare_overwrite_replaces_what_is_there(prepared, capsys, tmp_path):
    root, bundle, data, cache = prepared
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    base = ["prepare", "--bundle", bundle, "--data", data, "--quiet", "--cache-dir", root / "prompts"]
    assert_refused([*base, "-o", other], capsys, f"{other}: already exists and is not a latent cache "
                   "(add --overwrite to replace it)")
    assert (other / "notes.txt").read_text() == "x"
    run_ok([*base, "-o", other, "--overwrite"], capsys)
    assert not (other / "notes.txt").exists()
    manifest = read_manifest(other)
    assert manifest["complete"] and len(manifest["samples"]) == len(manifest["listing"]) == 2
    assert_refused([*base, "-o", other, "--size", "64x32"], capsys,
                   "a cache of other size; choose another -o, or add --overwrite to replace it")
    run_ok([*base, "-o", other, "--size", "64x32", "--overwrite"], capsys)
    assert read_manifest(other)["size"] == "64x32"
    assert LatentCache(other, open_bundle(bundle)).samples[0]["shape"][1:] == [32 // 8, 64 // 8]
