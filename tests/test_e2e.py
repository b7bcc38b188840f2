"""End to end: a tiny random model folder in the real source formats is
converted into a bundle by the real CLI, then `remove`, `decompose`,
`composite` and `--dry-run` run on the shared real clips and on small
synthetic ones; outputs are read back through PyAV. Bad input: one line on
stderr, exit status 2, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import shutil
from pathlib import Path

import numpy as np
import pytest

import mlx_omnimatte as mo
from mlx_omnimatte.io.video import probe_video, read_rgba, read_video
from mlx_omnimatte.io.writers import write_png_frames, write_video
from helpers import EXAMPLES, assert_refused, run_cli as run
from tiny_models import DIT, lora_state, poison, tiny_bundle

needs_examples = pytest.mark.skipif(not EXAMPLES.is_dir(), reason=f"shared clips not found at {EXAMPLES}")
FAST = ["--steps", "2", "--size", "128x64", "--quiet"]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return root, tiny_bundle(root)


def main_code(args) -> int:
    return run(args)[0]


def synthetic_clip(folder: Path, frames=9, size=(64, 32), fps=16, mask_frames=None, mask_size=None,
                   mask_fps=None, mask_value=None) -> tuple[Path, Path]:
    """A moving square: video.mp4 + mask/ (PNG frames; fps from the video's
    16 unless mask_fps writes the mask as a video)."""
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(0)
    video = (rng.random((frames, h, w, 3)) * 60 + 100).astype(np.uint8)
    mf = mask_frames or frames
    mw, mh = mask_size or size
    mask = np.zeros((mf, mh, mw), np.uint8)
    for t in range(mf):
        mask[t, mh // 4: mh // 2, (t % (mw // 2)): (t % (mw // 2)) + mw // 4] = 255
        video[min(t, frames - 1), h // 4: h // 2, (t % (w // 2)): (t % (w // 2)) + w // 4] = 220
    if mask_value is not None:
        mask[:] = mask_value
    write_video(folder / "video.mp4", video, fps)
    if mask_fps is not None:
        write_video(folder / "mask.mp4", mask, mask_fps, crf=0)
        return folder / "video.mp4", folder / "mask.mp4"
    write_png_frames(folder / "mask", mask)
    return folder / "video.mp4", folder / "mask"


# --------------------------------------------------------------------------- the bundle


def test_bundle_holds_every_component(models):
    _, bundle = models
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["components"]) == {"transformer", "vae", "t5", "clip"}
    assert set(manifest["experts"]) == {"effect", "quality"}
    assert (bundle / "t5" / "tokenizer" / "tokenizer.json").exists()
    dit = mo.load_model(bundle / "transformer")
    assert dit.config.dim == DIT["dim"] and dit.config.in_dim == 36
    effect = mo.load_model(bundle / "experts" / "effect")
    assert effect.kind == "effect" and effect.mask_type == "B" and effect.blocks == (DIT["num_layers"] - 1,)
    quality = mo.load_model(bundle / "experts" / "quality")
    assert quality.kind == "quality" and quality.mask_type == "C" and quality.blocks == (0, 1)


# --------------------------------------------------------------------------- real clips


@pytest.fixture(scope="module")
def removed(models, tmp_path_factory):
    _, bundle = models
    out = tmp_path_factory.mktemp("rm") / "beach"
    code = main_code(["remove", EXAMPLES / "boys-beach", "--bundle", bundle, "-o", out, *FAST])
    return code, out


@needs_examples
def test_remove_boys_beach(removed):
    code, out = removed
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["background_all.mp4", "background_without_00.mp4", "background_without_01.mp4"]
    for p in out.iterdir():
        info = probe_video(p)
        assert (info.frames, info.width, info.height, info.fps) == (85, 640, 384, 16)
        frames, _ = read_video(p)
        assert frames.shape == (85, 384, 640, 3) and frames.std() > 1  # not a blank video


@pytest.fixture(scope="module")
def decomposed(models, tmp_path_factory):
    _, bundle = models
    out = tmp_path_factory.mktemp("dec") / "beach"
    code = main_code(["decompose", EXAMPLES / "boys-beach", "--bundle", bundle, "-o", out, *FAST,
                      "--tau", "0.5", "--layer-format", "png", "--layer-format", "prores",
                      "--layer-format", "webm"])
    return code, out


@needs_examples
def test_decompose_boys_beach_layers(decomposed):
    code, out = decomposed
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["object_00", "object_01"]
    source, _ = read_video(EXAMPLES / "boys-beach" / "input_video.mp4")
    for obj in out.iterdir():
        assert sorted(p.name for p in obj.iterdir()) == [
            "alpha.mp4", "background.mp4", "layer", "layer.mov", "layer.webm", "preview.mp4"]
        for layer in ("layer", "layer.mov", "layer.webm"):
            rgba, info = read_rgba(obj / layer)
            assert rgba.shape == (85, 384, 640, 4), layer
            assert info.fps == 16
        png, _ = read_rgba(obj / "layer")
        mov, _ = read_rgba(obj / "layer.mov")
        webm, _ = read_rgba(obj / "layer.webm")
        # the alpha channel survives each format
        assert np.abs(mov[..., 3].astype(int) - png[..., 3]).max() <= 2
        assert np.abs(webm[..., 3].astype(int) - png[..., 3]).mean() <= 2
        for name in ("alpha.mp4", "background.mp4", "preview.mp4"):
            info = probe_video(obj / name)
            assert (info.frames, info.fps) == (85, 16), name
        assert probe_video(obj / "background.mp4").size == (640, 384)
        assert probe_video(obj / "preview.mp4").width > 640  # panels side by side
        # recomposition: alpha*fg + (1-alpha)*bg reproduces the input where alpha is solid
        a = png[..., 3:].astype(np.float32) / 255
        bg, _ = read_video(obj / "background.mp4")
        recomposed = a * png[..., :3] + (1 - a) * bg
        solid = a[..., 0] > 0.95  # there clipping of fg can cost at most 5%
        if solid.any():
            err = np.abs(recomposed - source)[solid].mean()
            assert err < 8, err


@needs_examples
def test_composite_over_new_background(decomposed, tmp_path, capsys):
    _, out = decomposed
    image = tmp_path / "bg.png"
    from PIL import Image

    Image.fromarray(np.full((100, 200, 3), (10, 200, 30), np.uint8)).save(image)
    target = tmp_path / "comp.mp4"
    code, stdout, err = run(["composite", out / "object_00" / "layer", out / "object_01" / "layer.mov",
                             "--background", image, "--fit", "stretch", "-o", target], capsys)
    assert code == 0, err
    frames, info = read_video(target)
    assert frames.shape == (85, 384, 640, 3) and info.fps == 16
    # back to front: object_00 over the new background, object_01 on top
    expected = np.broadcast_to(np.array((10, 200, 30), np.float32) / 255, frames.shape)
    for layer in (out / "object_00" / "layer", out / "object_01" / "layer.mov"):
        rgba_frames = read_rgba(layer)[0].astype(np.float32) / 255
        a = rgba_frames[..., 3:]
        expected = rgba_frames[..., :3] * a + expected * (1 - a)
    assert np.abs(frames / 255.0 - expected).mean() < 0.02  # H.264 coding


@needs_examples
def test_long_video_runs_through_windows(models, tmp_path, capsys):
    _, bundle = models
    out = tmp_path / "draw"
    args = ["remove", EXAMPLES / "animator-draw", "--bundle", bundle, "-o", out, "--objects", "all",
            "--steps", "1", "--size", "64x32", "--quiet"]
    code, stdout, _ = run([*args, "--dry-run"], capsys)
    assert code == 0
    assert "201 frames (51 latent frames, 1 padded)" in stdout and "3 window(s)" in stdout
    assert not out.exists()
    code, stdout, err = run(args, capsys)
    assert code == 0, err
    info = probe_video(out / "background_all.mp4")
    assert (info.frames, info.width, info.height, info.fps) == (200, 640, 384, 16)


@needs_examples
def test_dry_run_1_3b_figures(models, tmp_path, capsys):
    """The plan at the 480x832 grid for 81 frames; by default a small source
    is not upscaled to it."""
    _, bundle = models
    clip = tmp_path / "clip81"
    video, mask = synthetic_clip(clip, frames=81, size=(208, 120))  # the aspect of 832x480
    args = ["decompose", video, "--mask", mask, "--bundle", bundle, "-o", tmp_path / "x", "--dry-run"]
    code, stdout, _ = run([*args, "--size", "832x480"], capsys)
    assert code == 0
    assert "model grid 832x480, 81 frames (21 latent frames, 0 padded)" in stdout
    assert "65520 tokens per forward" in stdout  # 2 halves x 21 x 30 x 52
    assert "host GB" in stdout and "(MLX + host)" in stdout and "outputs: about" in stdout
    write = next(line for line in stdout.splitlines() if line.startswith("write "))
    assert float(write.split()[-2]) > 0.1  # host RAM of writing: the model-grid frames kept, the encoders
    code, stdout, _ = run(args, capsys)
    assert code == 0 and "source: 208x120, 81 frames -> model grid 208x128" in stdout
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- Python API


def test_python_api_returns_arrays(models, tmp_path):
    _, bundle = models
    video, mask = synthetic_clip(tmp_path / "c")
    bgs = mo.remove(video, [mask], bundle=bundle, caption="a wall", steps=1, size="64x32", min_frames=9)
    assert set(bgs) == {"all"} and bgs["all"].shape == (9, 32, 64, 3)
    layers = mo.decompose(video, [mask], bundle=bundle, caption="a wall", steps=2, size="64x32", min_frames=9)
    (layer,) = layers.values()
    assert layer.alpha.shape == (9, 32, 64) and layer.foreground.shape == (9, 32, 64, 3)
    assert 0 <= layer.alpha.min() and layer.alpha.max() <= 1
    assert np.isfinite(layer.background).all()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kind,match", [
    ("frames", "frame"), ("size", "32x32"), ("fps", "fps"), ("empty", "empty"), ("white", "white"),
])
def test_mask_mismatch_refused(models, tmp_path, capsys, kind, match):
    _, bundle = models
    opts = {"frames": dict(mask_frames=5), "size": dict(mask_size=(32, 32)), "fps": dict(mask_fps=25),
            "empty": dict(mask_value=0), "white": dict(mask_value=255)}[kind]
    video, mask = synthetic_clip(tmp_path / "c", **opts)
    out = tmp_path / "out"
    assert_refused(["remove", video, "--mask", mask, "--bundle", bundle, "-o", out, *FAST], capsys, match, out)


def test_non_binary_mask_refused(models, tmp_path, capsys):
    _, bundle = models
    video, _ = synthetic_clip(tmp_path / "c")
    gray = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (9, 32, 1))
    write_png_frames(tmp_path / "soft", gray)
    out = tmp_path / "out"
    assert_refused(["remove", video, "--mask", tmp_path / "soft", "--bundle", bundle, "-o", out, *FAST],
                   capsys, "binary", out)


def test_unreadable_and_missing_inputs(models, tmp_path, capsys):
    _, bundle = models
    _, mask = synthetic_clip(tmp_path / "c")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 1000)
    out = tmp_path / "out"
    assert_refused(["remove", bad, "--mask", mask, "--bundle", bundle, "-o", out], capsys, "bad.mp4", out)
    assert_refused(["remove", tmp_path / "nope.mp4", "--mask", mask, "--bundle", bundle, "-o", out], capsys,
                   "nope.mp4", out)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(["remove", empty, "--mask", mask, "--bundle", bundle, "-o", out], capsys, "empty", out)


def test_zero_frame_video_refused(models, tmp_path, capsys):
    import av

    _, bundle = models
    _, mask = synthetic_clip(tmp_path / "c")
    path = tmp_path / "zero.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=16)
        s.width, s.height = 64, 32
    out = tmp_path / "out"
    assert_refused(["remove", path, "--mask", mask, "--bundle", bundle, "-o", out], capsys, "zero.mp4", out)


def test_bundle_missing_component(models, tmp_path, capsys):
    _, bundle = models
    broken = tmp_path / "bundle"
    shutil.copytree(bundle, broken)
    shutil.rmtree(broken / "vae")
    video, mask = synthetic_clip(tmp_path / "c")
    out = tmp_path / "out"
    assert_refused(["remove", video, "--mask", mask, "--bundle", broken, "-o", out], capsys, "vae", out)


def test_expert_for_another_model(models, tmp_path, capsys):
    from safetensors.numpy import save_file

    root, bundle = models
    other = tmp_path / "bundle"
    shutil.copytree(bundle, other)
    wide = lora_state(0, [1], dim=512)
    save_file(wide, str(tmp_path / "wide.safetensors"))
    shutil.rmtree(other / "experts" / "effect")
    assert main_code(["convert", tmp_path / "wide.safetensors", "-o", other / "experts" / "effect",
                      "--component", "expert", "--expert-kind", "effect"]) == 0
    video, mask = synthetic_clip(tmp_path / "c")
    out = tmp_path / "out"
    assert_refused(["decompose", video, "--mask", mask, "--bundle", other, "-o", out], capsys, "width 512", out)


def test_existing_output_is_not_overwritten(models, tmp_path, capsys):
    _, bundle = models
    video, mask = synthetic_clip(tmp_path / "c")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused(["remove", video, "--mask", mask, "--bundle", bundle, "-o", out], capsys, "already exists")
    assert (out / "keep.txt").read_text() == "mine"
    assert_refused(["remove", video, "--mask", mask, "--bundle", bundle, "-o", video.parent, "--overwrite"],
                   capsys, "replace the input")


def test_tau_outside_range(models, tmp_path, capsys):
    _, bundle = models
    video, mask = synthetic_clip(tmp_path / "c")
    assert_refused(["decompose", video, "--mask", mask, "--bundle", bundle, "-o", tmp_path / "o", "--tau", "1.5"],
                   capsys, "tau", tmp_path / "o")


def test_interrupt_leaves_nothing(models, tmp_path, capsys, monkeypatch):
    from mlx_omnimatte.pipelines import stages

    _, bundle = models
    video, mask = synthetic_clip(tmp_path / "c")
    real = stages.decode

    def interrupted(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "decode", interrupted)
    out = tmp_path / "out"
    code, _, err = run(["remove", video, "--mask", mask, "--bundle", bundle, "-o", out, "--steps", "1",
                        "--size", "64x32", "--quiet"], capsys)
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == [tmp_path / "c"]


def test_interrupt_while_writing_leaves_nothing(models, tmp_path, capsys, monkeypatch):
    import mlx_omnimatte.io.writers as writers

    _, bundle = models
    video, mask = synthetic_clip(tmp_path / "c")
    real = writers.EncodedSink.add
    calls = []

    def interrupted(self, frame):
        calls.append(1)
        if len(calls) == 3:  # frames of every background are in the hidden folder
            raise KeyboardInterrupt
        real(self, frame)

    monkeypatch.setattr(writers.EncodedSink, "add", interrupted)
    out = tmp_path / "out"
    code, _, _ = run(["remove", video, "--mask", mask, "--bundle", bundle, "-o", out, "--steps", "1",
                      "--size", "64x32", "--quiet"], capsys)
    assert code == 130 and calls
    assert list(tmp_path.iterdir()) == [tmp_path / "c"]


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_signal_while_writing_leaves_nothing(models, tmp_path, capsys, monkeypatch, sig, code):
    """SIGTERM / SIGHUP halfway through writing: handled like Ctrl-C."""
    import mlx_omnimatte.io.writers as writers

    _, bundle = models
    video, mask = synthetic_clip(tmp_path / "c")
    real = writers.EncodedSink.add
    calls = []

    def killed(self, frame):
        real(self, frame)
        calls.append(1)
        if len(calls) == 3:  # encoded frames are on disk in the hidden folder
            assert [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(writers.EncodedSink, "add", killed)
    out = tmp_path / "out"
    status, _, err = run(["remove", video, "--mask", mask, "--bundle", bundle, "-o", out, "--steps", "1",
                          "--size", "64x32", "--quiet"], capsys)
    assert status == code and f"terminated by {sig.name}" in err
    assert len([l for l in err.splitlines() if l.strip()]) == 1
    assert list(tmp_path.iterdir()) == [tmp_path / "c"]


def test_bad_seed_refused_before_any_weight(models, tmp_path, capsys, monkeypatch):
    from mlx_omnimatte.pipelines import omnimatte, stages

    _, bundle = models
    video, mask = synthetic_clip(tmp_path / "c")
    loads = []
    for module in (stages, omnimatte):  # every place a run loads weights from
        monkeypatch.setattr(module, "load_model", lambda *a, **k: loads.append(a))
    for seed, dry in (("-1", False), (str(1 << 64), False), ("-1", True)):
        out = tmp_path / "out"
        args = ["decompose", video, "--mask", mask, "--bundle", bundle, "-o", out, "--seed", seed]
        assert_refused(args + (["--dry-run"] if dry else []), capsys, f"seed {seed}", out)
    assert loads == []


def test_nan_in_latents_stops_with_step_and_precision(models, tmp_path, capsys):
    _, bundle = models
    bad = tmp_path / "bundle"
    shutil.copytree(bundle, bad)
    poison(bad / "transformer")
    video, mask = synthetic_clip(tmp_path / "c")
    out = tmp_path / "out"
    assert_refused(["remove", video, "--mask", mask, "--bundle", bad, "-o", out, "--steps", "2",
                    "--size", "64x32", "--quiet"], capsys, "step 1/2", out)
    code, _, err = run(["remove", video, "--mask", mask, "--bundle", bad, "-o", out, "--steps", "2",
                        "--size", "64x32", "--quiet"], capsys)
    assert "bfloat16" in err


def test_truncated_weights_and_wrong_rank_refused_before_any_weight(models, tmp_path, capsys, monkeypatch):
    from mlx_omnimatte.pipelines import omnimatte, stages

    _, bundle = models
    loads = []
    for module in (stages, omnimatte):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: loads.append(a))
    video, mask = synthetic_clip(tmp_path / "c")
    cut = tmp_path / "cut"
    shutil.copytree(bundle, cut)
    f = cut / "transformer" / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 100)
    out = tmp_path / "out"
    for extra in ([], ["--dry-run"]):
        assert_refused(["remove", video, "--mask", mask, "--bundle", cut, "-o", out, *extra], capsys,
                       "the file is truncated or damaged", out)
    ranked = tmp_path / "ranked"
    shutil.copytree(bundle, ranked)
    cfg_file = ranked / "experts" / "effect" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["rank"] = cfg["rank"] * 2
    cfg_file.write_text(json.dumps(cfg))
    assert_refused(["decompose", video, "--mask", mask, "--bundle", ranked, "-o", out, "--dry-run"], capsys,
                   f"config.json says rank {cfg['rank']}, its LoRA tensors have rank {cfg['rank'] // 2}", out)
    assert loads == []
