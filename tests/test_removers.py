"""ROSE and MiniMax-Remover bundles: converted by the real CLI from tiny
random files in their released layouts, then `remove` and `decompose
--method two-stage` on boys-beach with every output read back; the
conditioning each remover gets; bad input (one line, exit 2, nothing
written)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from helpers import assert_refused, run_cli
from tiny_models import write_fun_folder
from tiny_removers import (UNIPC_CONFIG, minimax_state, rose_bundle, minimax_bundle, write_minimax_folder,
                           write_rose_file)
from mlx_omnimatte.bundle import open_bundle
from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.io.masks import build_trimask
from mlx_omnimatte.io.video import probe_video, read_rgba, read_video
from mlx_omnimatte.pipelines.conditioning import (grey_hole_channels, mask_channels,
                                                  removal_mask)
from mlx_omnimatte.removers import CASPER, MINIMAX, ROSE
from safetensors.numpy import save_file

EXAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "examples"
needs_examples = pytest.mark.skipif(not EXAMPLES.is_dir(), reason=f"shared clips not found at {EXAMPLES}")
SMALL = ["--size", "128x64", "--frames", "9"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("removers")
    return root, rose_bundle(root / "r"), minimax_bundle(root / "m")


def manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_manifests_record_the_removers(bundles):
    _, rose, minimax = bundles
    r, m = manifest(rose), manifest(minimax)
    assert r["remover"]["kind"] == "rose" and set(r["components"]) == {"transformer", "vae", "t5"}
    assert (r["remover"]["mask"], r["remover"]["prompt"], r["remover"]["clip"]) == ("binary", "empty", "zeros")
    assert (r["remover"]["sampler"], r["remover"]["steps"]) == ("euler", 50)
    assert m["remover"]["kind"] == "minimax" and set(m["components"]) == {"transformer", "vae"}
    # the sampler and shift come from its scheduler config
    assert (m["remover"]["sampler"], m["remover"]["steps"], m["remover"]["shift"]) == ("unipc", 12, 3.0)
    cfg = json.loads((minimax / "transformer" / "config.json").read_text())
    assert (cfg["in_dim"], cfg["cross_attn"], cfg["image_dim"]) == (48, False, None)
    assert open_bundle(minimax).remover.shift == 3.0


def test_minimax_weights_loaded_under_their_names(bundles):
    _, _, minimax = bundles
    import mlx_omnimatte as mo

    dit = mo.load_model(minimax / "transformer", dtype="float32")
    state = minimax_state()
    got = np.array(dit.blocks[1].self_attn.o.weight)
    want = state["blocks.1.attn1.to_out.0.weight"]
    assert np.abs(got - want).max() < 1e-2 * np.abs(want).max()  # bfloat16 storage
    assert "cross_attn" not in dit.blocks[0] and "text_embedding" not in dit


# --------------------------------------------------------------------------- conditioning


def masks_pair():
    a = np.zeros((5, 16, 16), bool)
    b = np.zeros((5, 16, 16), bool)
    a[:, 2:6, 2:6] = True
    b[:, 8:12, 8:12] = True
    return [a, b]


def test_rose_mask_is_binary_and_casper_keeps_its_trimask():
    masks = masks_pair()
    rose = removal_mask(masks, [0], ROSE)
    assert set(np.unique(rose)) == {0.0, 1.0} and rose[:, 3, 3].min() == 1.0 and rose[:, 9, 9].max() == 0.0
    casper = removal_mask(masks, [0], CASPER)
    np.testing.assert_array_equal(casper, build_trimask(masks, [0]))
    assert np.isclose(casper[0, 0, 0], 127 / 255)
    # the DiT's mask channels are 1 - mask: 0 where ROSE removes, 1 elsewhere
    ch = np.array(mask_channels(rose))
    assert ch.shape == (1, 2, 2, 2, 4) and set(np.unique(ch)) <= {0.0, 0.5, 0.25, 0.75, 1.0}
    assert ch[..., :].min() >= 0 and np.array(mask_channels(np.zeros_like(rose))).min() == 1.0


def test_minimax_channels_are_the_grey_hole_and_the_mask_video():
    masks = masks_pair()
    video = np.random.default_rng(0).uniform(-1, 1, (5, 16, 16, 3)).astype(np.float32)
    seen = {}

    def encode(x, what):
        seen[what] = np.array(x)
        return mx.array(np.array(x)[..., :1].repeat(16, -1)[:, ::4][:, :2, ::8, ::8])

    y = grey_hole_channels(video, removal_mask(masks, [1], MINIMAX), encode)
    assert y.shape == (1, 2, 2, 2, 32)
    hole, mask_video = seen["video"][0], seen["mask"][0]
    assert np.all(hole[:, 9, 9] == 0) and np.array_equal(hole[:, 3, 3], video[:, 3, 3])  # kept object visible
    assert set(np.unique(mask_video)) == {-1.0, 1.0} and np.all(mask_video[:, 9, 9] == 1.0)
    assert np.all(mask_video[:, 3, 3] == -1.0)


def test_settings_take_the_removers_schedule_unless_given():
    from mlx_omnimatte.pipelines.settings import apply_remover, settings_from

    s = settings_from(seed=1)
    apply_remover(s, MINIMAX)
    assert (s.sampler, s.steps) == ("unipc", 12)
    s = settings_from(steps=4)
    apply_remover(s, MINIMAX)
    assert (s.sampler, s.steps) == ("unipc", 4)
    s = settings_from(fast=True)
    apply_remover(s, ROSE)  # ROSE's schedule is the default one: --fast still applies
    assert (s.sampler, s.steps) == ("unipc", 25)
    s = settings_from()
    apply_remover(s, CASPER)
    assert (s.sampler, s.steps, s.shift) == ("euler", 50, 5.0)


# --------------------------------------------------------------------------- end to end


def _outputs_read_back(out: Path, names, frames=9):
    assert sorted(p.name for p in out.iterdir()) == names
    for p in out.iterdir():
        if p.suffix == ".mp4":
            video, _ = read_video(p)
            assert video.shape == (frames, 384, 640, 3) and video.std() > 1
        else:
            for f in ("alpha.mp4", "background.mp4", "preview.mp4"):
                assert probe_video(p / f).frames == frames
            rgba, _ = read_rgba(p / "layer")
            assert rgba.shape == (frames, 384, 640, 4)


@pytest.mark.slow
@needs_examples
@pytest.mark.parametrize("which", ["rose", "minimax"])
def test_remove_and_two_stage_on_boys_beach(bundles, which, capsys):
    root, rose, minimax = bundles
    bundle = rose if which == "rose" else minimax
    steps = ["--steps", "2"] if which == "rose" else []  # MiniMax-Remover: its own 12
    out = root / f"{which}-remove"
    code, _, err = run_cli(["remove", EXAMPLES / "boys-beach", "--bundle", bundle, "-o", out, *SMALL, *steps,
                            "--cache-dir", root / f"prompts-{which}"], capsys)  # a fresh prompt cache
    assert code == 0, err
    _outputs_read_back(out, ["background_all.mp4", "background_without_00.mp4", "background_without_01.mp4"])
    if which == "minimax":
        assert "denoise all: 12/12 step" in err and "unipc" not in err
        assert "text encoder:" not in err and "image encoder:" not in err
        assert "vae encode without_00 mask" in err
    else:
        assert "denoise all: 2/2 step" in err and "CLIP context zeros" in err and 'prompt ""' in err
        assert "image encoder:" not in err and "text encoder:" in err
    out = root / f"{which}-two-stage"
    code, _, err = run_cli(["decompose", EXAMPLES / "boys-beach", "--bundle", bundle, "-o", out, "--method",
                            "optimize", *SMALL, *steps], capsys)
    assert code == 0, err
    _outputs_read_back(out, ["object_00", "object_01"])


@needs_examples
def test_dry_runs_show_each_removers_schedule(bundles, capsys):
    root, rose, minimax = bundles
    for bundle, steps, encoders in ((rose, 50, ["text encoder"]), (minimax, 12, [])):
        code, out, err = run_cli(["remove", EXAMPLES / "boys-beach", "--bundle", bundle, "-o", root / "dry",
                                  "--size", "128x64", "--dry-run"], capsys)
        assert code == 0, err
        assert f"denoising: {steps} steps" in out
        assert "image encoder" not in out
        assert ("text encoder" in out) == bool(encoders)
        # MiniMax-Remover encodes two videos per removal pass (3 passes: all, and each object alone)
        encodes = re.search(r"^vae encode\s+(\d+ x )?\d+ frames", out, re.M).group(1)
        assert encodes == (None if bundle == rose else "6 x ")
    code, out, _ = run_cli(["remove", EXAMPLES / "boys-beach", "--bundle", minimax, "-o", root / "dry",
                            "--size", "128x64", "--dry-run", "--steps", "6"], capsys)
    assert "denoising: 6 steps" in out and not (root / "dry").exists()


# --------------------------------------------------------------------------- bad input


def test_wrong_base_refused(tmp_path, capsys):
    folder = write_fun_folder(tmp_path)
    mm = tmp_path / "minimax.safetensors"
    save_file(minimax_state(), str(mm))
    out = tmp_path / "b"
    # MiniMax-Remover's transformer over the Fun-InP base
    assert_refused(["convert", folder, "--transformer", mm, "-o", out], capsys, "48", out)
    assert_refused(["convert", folder, "--transformer", mm, "--remover", "rose", "-o", out], capsys,
                   "--remover rose means ROSE", out)
    # ROSE's over a base of another width
    rose = write_rose_file(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "dim": 512, "num_heads": 4}))
    assert_refused(["convert", folder, "--transformer", rose, "--remover", "rose", "-o", out], capsys,
                   "width 256", out)
    # --remover minimax with a Fun-InP folder
    (folder / "config.json").write_text(json.dumps(cfg))
    assert_refused(["convert", folder, "--remover", "minimax", "-o", out], capsys, "not MiniMax-Remover's folder",
                   out)


def test_missing_or_unsupported_scheduler_refused(tmp_path, capsys):
    out = tmp_path / "b"
    folder = write_minimax_folder(tmp_path / "a", scheduler=None)
    assert_refused(["convert", folder, "-o", out], capsys, "no scheduler config", out)
    folder = write_minimax_folder(tmp_path / "c", scheduler={**UNIPC_CONFIG, "solver_order": 3})
    assert_refused(["convert", folder, "-o", out], capsys, "solver_order", out)


@needs_examples
def test_bundle_mixing_conventions_refused(bundles, tmp_path, capsys):
    _, rose, minimax = bundles
    out = tmp_path / "out"
    cases = [(rose, {"mask": "trimask"}, "mixes conventions"),
             (rose, {"kind": "minimax"}, "mixes conventions"),
             (rose, MINIMAX.record(), "48 input channels"),  # the record of another model's transformer
             (minimax, ROSE.record(), "36 input channels"),
             (rose, {"kind": "lama"}, "unknown")]
    for source, change, words in cases:
        mixed = tmp_path / f"mixed-{source.name}"
        shutil.copytree(source, mixed, dirs_exist_ok=True)
        m = manifest(source)
        m["remover"].update(change)
        (mixed / "manifest.json").write_text(json.dumps(m))
        for cmd in (["remove"], ["decompose", "--method", "two-stage"]):
            assert_refused([*cmd, EXAMPLES / "boys-beach", "--bundle", mixed, "-o", out, "--dry-run"], capsys,
                           words, out)
        with pytest.raises(OmnimatteError, match=words):
            open_bundle(mixed)


def test_prepare_builds_roses_conditioning_and_refuses_minimax(bundles, tmp_path, capsys):
    from helpers import run_ok
    from tiny_models import tiny_dataset
    from mlx_omnimatte.train.cache import LatentCache

    _, rose, minimax = bundles
    data = tiny_dataset(tmp_path)
    run_ok(["prepare", "--bundle", rose, "--data", data, "-o", tmp_path / "cache", "--quiet",
            "--cache-dir", tmp_path / "prompts"], capsys)
    s = LatentCache(tmp_path / "cache", open_bundle(rose, need=())).read(0, keys=("cond", "context", "clip"))
    assert s["clip"].shape == (257, 1280) and not np.any(s["clip"])  # a zero CLIP context
    mask = s["cond"][..., :4]
    # 1 - binary mask: the background (most of the grid) is 1, not Casper's neutral 0.502
    assert np.median(mask) == 1.0 and mask.min() < 0.3
    assert s["context"].shape[0] == 1  # the prompt "": one token (its end token), whatever the caption
    assert_refused(["prepare", "--bundle", minimax, "--data", data, "-o", tmp_path / "c2", "--quiet"], capsys,
                   "no cross-attention", tmp_path / "c2")


@needs_examples
def test_experts_refused_on_minimax(bundles, tmp_path, capsys):
    _, _, minimax = bundles
    out = tmp_path / "out"
    dirs = {}
    for kind in ("effect", "quality"):
        dirs[kind] = tmp_path / kind
        dirs[kind].mkdir()
        (dirs[kind] / "config.json").write_text(json.dumps({"component": "expert", "kind": kind, "dim": 256,
                                                            "rank": 4, "blocks": [1]}))
    assert_refused(["decompose", EXAMPLES / "boys-beach", "--bundle", minimax, "-o", out, "--method", "experts",
                    "--expert", f"effect={dirs['effect']}", "--expert", f"quality={dirs['quality']}", "--dry-run"],
                   capsys, "no cross-attention", out)


@pytest.mark.slow
@needs_examples
def test_rose_default_run_records_50_steps_and_a_zero_clip_context(bundles, capsys):
    root, rose, _ = bundles
    out = root / "rose-default"
    code, _, err = run_cli(["remove", EXAMPLES / "boys-beach", "--bundle", rose, "-o", out, "--size", "64x32",
                            "--frames", "9", "--objects", "all"], capsys)
    assert code == 0, err
    assert "denoise all: 50/50 step" in err and "CLIP context zeros" in err
    assert "image encoder:" not in err
    video, _ = read_video(out / "background_all.mp4")
    assert video.shape == (9, 384, 640, 3) and video.std() > 1


def test_repacked_minimax_file_converts_as_a_component(tmp_path, capsys):
    from helpers import run_ok
    import mlx_omnimatte as mo

    f = tmp_path / "minimax_remover.safetensors"
    save_file(minimax_state(), str(f))  # one file, no config.json: the architecture from its shapes
    run_ok(["convert", f, "-o", tmp_path / "dit", "--dtype", "float32"], capsys)
    cfg = json.loads((tmp_path / "dit" / "config.json").read_text())
    assert (cfg["in_dim"], cfg["cross_attn"], cfg["image_dim"], cfg["num_layers"]) == (48, False, None, 2)
    dit = mo.load_model(tmp_path / "dit")
    np.testing.assert_array_equal(np.array(dit.head.head.weight), minimax_state()["proj_out.weight"])
    v = dit(mx.zeros((1, 1, 4, 4, 48)), mx.array([500.0]))
    assert v.shape == (1, 1, 4, 4, 16) and bool(mx.all(mx.isfinite(v)))
