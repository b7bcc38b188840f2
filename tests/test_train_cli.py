"""`train` and `export` on the tiny bundle and a small synthetic cache: the
expert it writes loads through the bundle path and `decompose` runs with
it; trained experts beat untrained ones on their clip; an interrupted run
resumes exactly; bad input is refused in one line with nothing written."""

from __future__ import annotations

import json
import os
import shutil

import mlx.core as mx
import numpy as np
import pytest

import mlx_omnimatte as mo
from mlx_omnimatte.train.cache import LatentCache
from mlx_omnimatte.train import session
from mlx_omnimatte.train.session import run_training, work_dir
from mlx_omnimatte.train.trainer import TrainSettings, new_state, train, trained_expert
from mlx_omnimatte.train.validate import ValidationSettings, validate
from helpers import assert_refused, run_cli, run_ok
from tiny_models import tiny_bundle, tiny_dataset

# --------------------------------------------------------------------------- shared with test_prepare.py

# --------------------------------------------------------------------------- train and export

TRAIN = ["--rank", "4", "--k", "1", "--dtype", "float32", "--quiet"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    bundle = tiny_bundle(root)
    data = tiny_dataset(root)
    cache = root / "cache"
    from mlx_omnimatte.train.prepare import prepare

    prepare(bundle, data, cache, cache_dir=root / "prompts")
    return root, bundle, data, cache


def _train(setup, out, *extra):
    root, bundle, _, cache = setup
    return ["train", "--bundle", bundle, "--cache", cache, "-o", out, *TRAIN, *extra]


def test_trained_expert_loads_in_a_bundle_and_decomposes(setup, capsys, tmp_path):
    root, bundle, data, cache = setup
    experts = {}
    for kind in ("effect", "quality"):
        experts[kind] = tmp_path / kind
        err = run_ok(_train(setup, experts[kind], "--expert", kind, "--steps", "2", "--checkpoint-every", "1",
                            "--val-cache", cache, "--val-steps", "2"), capsys)
        assert err.count("validation latent_mse") == 2 and "object_mse" in err and "effect_mse" in err
        e = mo.load_model(experts[kind], "expert")
        assert e.kind == kind and e.rank == 4 and e.mask_type == ("B" if kind == "effect" else "C")
    assert mo.load_model(experts["effect"], "expert").blocks == (1,)
    assert mo.load_model(experts["quality"], "expert").blocks == (0, 1)
    # the trained experts over the bundle's own, straight from the trainer's output
    out = tmp_path / "dec"
    err = run_ok(["decompose", data / "00000", "--bundle", bundle, "-o", out, "--steps", "2", "--size", "64x48",
                  "--dtype", "float32", "--expert", f"effect={experts['effect']}",
                  "--expert", f"quality={experts['quality']}", "--cache-dir", root / "prompts"], capsys)
    assert "decompose method: experts" in err and (out / "object_00" / "alpha.mp4").is_file()
    # and in a bundle whose manifest lists them
    trained = tmp_path / "bundle"
    trained.mkdir()
    manifest = json.loads((bundle / "manifest.json").read_text())
    for sub in manifest["components"].values():
        os.symlink(bundle / sub, trained / sub)
    manifest["experts"] = {k: str(p) for k, p in experts.items()}
    (trained / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "dec2"
    run_ok(["decompose", data / "00000", "--bundle", trained, "-o", out, "--steps", "2", "--size", "64x48",
            "--dtype", "float32", "--quiet", "--cache-dir", root / "prompts"], capsys)
    assert (out / "object_00").is_dir()


@pytest.mark.parametrize("kind", ["quality", "effect"])
def test_trained_expert_beats_untrained_on_its_clip(setup, kind):
    root, bundle, _, cache = setup
    lc = LatentCache(cache)
    model = mo.load_model(bundle / "transformer", "transformer", dtype="float32")
    s = TrainSettings(kind=kind, rank=8, k=2, steps=20, lr=3e-3).resolve(2)
    untrained, state = new_state(model, s), train(model, [lc[0]], s)
    vs = ValidationSettings(steps=2)
    errors = [validate(model, [lc.read(0, None)], vs, **{kind: trained_expert(st, model, s)})["latent_mse"]
              for st in (untrained, state)]
    assert errors[1] < 0.8 * errors[0], errors


def test_interrupted_run_resumes_and_equals_uninterrupted(setup, capsys, tmp_path):
    root, bundle, _, cache = setup
    whole = tmp_path / "whole"
    run_ok(_train(setup, whole, "--expert", "quality", "--steps", "4"), capsys)
    out = tmp_path / "cut"

    def interrupt(stage, done, total, detail=""):
        if done == 3:
            raise KeyboardInterrupt

    s = TrainSettings(kind="quality", rank=4, k=1, steps=4, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        run_training(bundle, cache, out, s, dtype="float32", report=interrupt)
    assert not out.exists() and (work_dir(out) / "checkpoint").is_dir()
    assert_refused(_train(setup, out, "--expert", "quality", "--steps", "4"), capsys,
                   "an interrupted run left a checkpoint at step 2")
    err = run_ok(_train(setup, out, "--expert", "quality", "--steps", "4", "--resume"), capsys)
    assert "resuming from" in err and "at step 2 of 4" in err
    a, b = mx.load(str(whole / "model.safetensors")), mx.load(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert float(mx.abs(a[k] - b[k]).max()) <= 1e-6, k
    assert not work_dir(out).exists()
    # a finished expert trains further with --resume and a larger --steps
    err = run_ok(_train(setup, out, "--expert", "quality", "--steps", "5", "--resume"), capsys)
    assert "at step 4 of 5" in err
    assert json.loads((out / "config.json").read_text())["source"]["trained_steps"] == 5


def test_train_refuses_bad_input(setup, capsys, tmp_path):
    root, bundle, data, cache = setup
    out = tmp_path / "out"
    q = ["--expert", "quality", "--steps", "1"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(["train", "--bundle", bundle, "--cache", empty, "-o", out, *TRAIN, *q], capsys,
                   "not a latent cache", out)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "cache.json").write_text(json.dumps({"format": "something-else"}))
    assert_refused(["train", "--bundle", bundle, "--cache", foreign, "-o", out, *TRAIN, *q], capsys,
                   "not a latent cache of mlx-omnimatte", out)
    other = tmp_path / "other-cache"
    shutil.copytree(cache, other)
    manifest = json.loads((other / "cache.json").read_text())
    manifest["encoders"]["vae"] = "0" * 24
    (other / "cache.json").write_text(json.dumps(manifest))
    assert_refused(["train", "--bundle", bundle, "--cache", other, "-o", out, *TRAIN, *q], capsys,
                   "made with another bundle", out)
    assert_refused(_train(setup, out, *q, "--rank", "0"), capsys, "--rank 0: must be a positive integer", out)
    assert_refused(_train(setup, out, "--expert", "effect", "--k", "3"), capsys,
                   "--k 3: larger than the transformer's 2 blocks", out)
    out.mkdir()
    assert_refused(_train(setup, out, *q), capsys, "already exists")
    assert_refused(_train(setup, tmp_path / "none", *q, "--resume"), capsys, "nothing to resume")


def test_export_round_trips_through_convert(setup, capsys, tmp_path):
    root, bundle, _, cache = setup
    expert = tmp_path / "effect"
    run_ok(_train(setup, expert, "--expert", "effect", "--steps", "1", "--alpha", "2"), capsys)
    src = mo.load_model(expert, "expert")
    for fmt, name in (("peft", "adapter_model.safetensors"), ("diffusers", "pytorch_lora_weights.safetensors")):
        out = tmp_path / f"export-{fmt}"
        run_ok(["export", expert, "--format", fmt, "-o", out], capsys)
        assert (out / name).is_file()
        back = tmp_path / f"back-{fmt}"
        run_ok(["convert", out / name, "-o", back, "--component", "expert", "--dtype", "float32"], capsys)
        e = mo.load_model(back, "expert")
        assert (e.kind, e.rank, e.alpha, e.k, e.mask_type, e.blocks) == \
            (src.kind, src.rank, src.alpha, src.k, src.mask_type, src.blocks)
        for m in src.lora:
            assert np.array_equal(np.array(src.lora[m].a), np.array(e.lora[m].a))
            assert np.array_equal(np.array(src.lora[m].b), np.array(e.lora[m].b))
    assert json.loads((tmp_path / "export-peft" / "adapter_config.json").read_text())["lora_alpha"] == 2.0
    assert_refused(["export", expert, "--format", "peft", "-o", tmp_path / "export-peft"], capsys, "already exists")


def test_overwrite_starts_afresh_and_an_interrupt_says_resume(setup, capsys, tmp_path, monkeypatch):
    out = tmp_path / "out"
    q = ["--expert", "quality", "--steps", "3", "--checkpoint-every", "1"]
    real = session.train

    def cut(model, cache, settings, state, report, checkpoint, **kw):
        def stop(stage, done, total, detail=""):
            if done == 2:
                raise KeyboardInterrupt
        return real(model, cache, settings, state, stop, checkpoint, **kw)

    monkeypatch.setattr(session, "train", cut)
    code, _, err = run_cli(_train(setup, out, *q), capsys)
    assert code == 130 and not out.exists()
    assert err.strip().splitlines() == [f"interrupted: {out} not written; the checkpoint at step 1 is kept in "
                                        f"{work_dir(out)} (continue with --resume)"]
    monkeypatch.setattr(session, "train", real)
    assert_refused(_train(setup, out, *q), capsys, "add --resume to continue it (or --overwrite to start afresh)")
    assert_refused(_train(setup, out, *q, "--resume", "--overwrite"), capsys, "give one of them")
    assert not out.exists() and (work_dir(out) / "checkpoint").is_dir()
    run_ok(_train(setup, out, *q, "--overwrite"), capsys)
    assert not work_dir(out).exists()
    assert json.loads((out / "config.json").read_text())["source"]["trained_steps"] == 3
    assert_refused(_train(setup, out, *q), capsys, f"{out}: already exists (add --overwrite to replace it)")
    run_ok(_train(setup, out, "--expert", "quality", "--steps", "1", "--overwrite"), capsys)
    assert json.loads((out / "config.json").read_text())["source"]["trained_steps"] == 1
