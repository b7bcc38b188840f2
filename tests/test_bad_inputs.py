"""Bad input to `decompose` and `remove` is one line, exit 2, nothing
written and nothing replaced, before any weight loads or any solver step:
options the chosen method would ignore, numbers that cannot work, sizes that
cannot fit, and outputs that are or contain an input."""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file

from mlx_omnimatte.io import writers
from mlx_omnimatte.io.video import read_video
from mlx_omnimatte.pipelines import two_stage
from mlx_omnimatte.synth import make_clip, write_clip
from helpers import assert_refused, run_cli
from tiny_models import dit_state, tiny_bundle


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad") / "clip"
    write_clip(make_clip(seed=3, frames=9, size=(64, 48)), folder)
    return folder


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(autouse=True)
def no_solving(monkeypatch):
    """A refused run never reaches a solver."""
    def fail(*a, **k):
        raise AssertionError("a solver ran")

    monkeypatch.setattr(two_stage, "solve_layers", fail)
    monkeypatch.setattr(two_stage, "optimize_layers", fail)


def _plate(clip, tmp_path, *extra):
    out = tmp_path / "out"
    return ["decompose", clip, "--clean-plate", clip / "truth" / "background", "-o", out, "--quiet", *extra], out


@pytest.mark.parametrize("extra, match", [
    (["--method", "experts"], "--method: a clean-plate run uses no model"),
    (["--steps", "4"], "--steps: a clean-plate run uses no model"),
    (["--tau", "0.3"], "--tau: a clean-plate run uses no model"),
    (["--solo"], "--solo: a clean-plate run uses no model"),
    (["--cache", "teacache"], "--cache: a clean-plate run uses no model"),
    (["--fast"], "--fast: a clean-plate run uses no model"),
    (["--iterations", "50"], "--iterations: only --layer-solver unet optimizes"),
    (["--lr", "1e-3"], "--lr: only --layer-solver unet optimizes"),
    (["--layer-solver", "unet", "--lr", "nan"], "--lr nan: must be a finite number above 0"),
    (["--layer-solver", "unet", "--lr", "inf"], "--lr inf: must be a finite number above 0"),
    (["--layer-solver", "unet", "--iterations", "0"], "--iterations 0: the U-Net needs at least one step"),
    (["--size", "100000x100000"], "exceeds 85% of this machine's"),
    (["--size", "100000x100000", "--dry-run"], "exceeds 85% of this machine's"),
])
def test_clean_plate_refuses(clip, tmp_path, capsys, extra, match):
    args, out = _plate(clip, tmp_path, *extra)
    assert_refused(args, capsys, match, out)


def test_clean_plate_refuses_a_bundle(clip, bundle, tmp_path, capsys):
    args, out = _plate(clip, tmp_path, "--bundle", bundle)
    assert_refused(args, capsys, "--bundle: a clean-plate run uses no model", out)


def test_experts_refuse_what_they_do_not_use(clip, bundle, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["decompose", clip, "--bundle", bundle, "-o", out, "--quiet", "--steps", "1", "--size", "64x32"]
    assert_refused([*base, "--layer-solver", "unet"], capsys, "--layer-solver: only the two-stage and clean-plate",
                   out)
    assert_refused([*base, "--solo"], capsys, "--solo: only the two-stage", out)
    assert_refused([*base, "--fit", "loop"], capsys, "--fit: only the two-stage and clean-plate", out)
    effect = bundle / "experts" / "effect"
    assert_refused([*base, "--tau", "1", "--expert", f"effect={effect}"], capsys,
                   "--expert effect=...: --tau 1.0 never runs the effect expert", out)
    assert_refused([*base, "--expert", f"quality={effect}"], capsys,
                   f"--expert quality={effect}: that is an effect expert", out)
    assert_refused([*base, "--method", "two-stage", "--tau", "0.5"], capsys, "--tau: only the experts method", out)


def test_two_stage_fit_needs_a_plate(clip, bundle, tmp_path, capsys):
    out = tmp_path / "out"
    assert_refused(["decompose", clip, "--bundle", bundle, "--method", "optimize", "--fit", "crop", "-o", out,
                    "--quiet"], capsys, "--fit: only a clean plate is fitted", out)


def test_outputs_never_replace_an_input(clip, tmp_path, capsys, monkeypatch):
    plate = clip / "truth" / "background"
    before = read_video(plate)[0]
    args = ["decompose", clip, "--clean-plate", plate, "--quiet", "--overwrite", "-o"]
    assert_refused([*args, plate], capsys, "the output would replace the input")
    assert_refused([*args, clip.parent], capsys, "the output would replace the input")
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    monkeypatch.chdir(inner)
    assert_refused([*args, ".."], capsys, "the output would replace the current folder")
    assert_refused([*args, "."], capsys, "the output would replace the current folder")
    assert_refused([*args, ""], capsys, "the output would replace the current folder")
    np.testing.assert_array_equal(read_video(plate)[0], before)
    assert sorted(os.listdir(tmp_path / "a")) == ["b"] and os.listdir(inner) == []


def test_existing_output_names_the_flag(clip, tmp_path, capsys):
    args, out = _plate(clip, tmp_path)
    out.mkdir()
    code, _, err = run_cli(args, capsys)
    assert code == 2 and err.strip() == f"error: {out}: already exists (add --overwrite to replace it)"


def test_remove_dry_run_that_does_not_fit_exits_2(clip, bundle, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(["remove", clip, "--bundle", bundle, "-o", out, "--quiet", "--dry-run",
                                 "--size", "16000x16000"], capsys)
    assert code == 2 and "does NOT fit" in stdout
    assert err.strip().startswith("error: predicted peak") and not out.exists()


def test_batch_longer_than_the_clip_is_clamped_and_said(clip, tmp_path, capsys, monkeypatch):
    seen = {}

    def record(frames, background, masks, opt, report):
        seen["batch"] = opt.batch_frames
        return [np.zeros(frames.shape[:3], np.float32) for _ in masks]

    monkeypatch.setattr(two_stage, "optimize_layers", lambda f, b, m, opt, report: [(a, None) for a in
                                                                                     record(f, b, m, opt, report)])
    out = tmp_path / "out"
    code, _, err = run_cli(["decompose", clip, "--clean-plate", clip / "truth" / "background", "-o", out,
                            "--layer-solver", "unet", "--iterations", "2", "--batch-frames", "50"], capsys)
    assert code == 0, err
    assert "--batch-frames 50: the clip has 9 frames; using 9" in err and seen["batch"] == 9


@pytest.mark.parametrize("extra, match", [
    (["--shadow-opacity", "nan"], "--shadow-opacity nan: must be a number in [0, 1]"),
    (["--size", "100000x100000"], "--size 100000x100000 with 21 frames needs about"),
    (["--size", "16000x16000", "--frames", "10000"], "more than this machine's"),
])
def test_synth_refuses_before_any_array(tmp_path, capsys, extra, match):
    out = tmp_path / "clip"
    assert_refused(["synth", "-o", out, *extra], capsys, match, out)


@pytest.mark.parametrize("mask, match", [
    ("x=", "--mask x=: no path given (expected PATH or NAME=PATH)"),
    ("", "--mask : no path given"),
    ("{clip}", "--mask {clip}: a clip folder, not a mask"),
    ("y={clip}", "--mask y={clip}: a clip folder, not a mask"),
])
def test_mask_that_is_no_mask(clip, tmp_path, capsys, mask, match):
    args, out = _plate(clip, tmp_path)
    args[1] = clip / "input_video"
    assert_refused([*args, "--mask", mask.format(clip=clip)], capsys, match.format(clip=clip), out)


def test_clip_folder_with_a_mask_names_its_video(clip, tmp_path, capsys):
    args, out = _plate(clip, tmp_path)
    assert_refused([*args, "--mask", clip / "mask_00"], capsys,
                   f"{clip}: a clip folder takes no --mask (its mask_XX files are used); to give masks, pass the "
                   f"video ({clip / 'input_video'}) instead", out)


def test_a_cut_caption_is_said_in_one_line(clip, bundle, tmp_path, capsys):
    out = tmp_path / "out"
    caption = "a sunny beach with waves " * 40000  # 1 MB
    code, _, err = run_cli(["remove", clip / "input_video", "--mask", clip / "mask_00", "--caption", caption,
                            "--bundle", bundle, "-o", out, "--quiet", "--dry-run", "--size", "64x48"], capsys)
    assert code == 0, err[:300]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"--caption: ") and lines[0].endswith(
        f"tokens ({len(caption)} characters); only the first 512 are used (the text encoder's limit)")
    assert int(lines[0].split()[1]) > 512 and not out.exists()
    code, _, err = run_cli(["remove", clip / "input_video", "--mask", clip / "mask_00", "--caption", "a beach",
                            "--bundle", bundle, "-o", out, "--quiet", "--dry-run", "--size", "64x48"], capsys)
    assert code == 0 and "only the first" not in err


@pytest.mark.parametrize("free, reason", [(0, "No space left on device"),
                                          (1 << 40, "[write] Unable to write 8 bytes to file.")])
def test_convert_onto_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch, free, reason):
    src = tmp_path / "casper.safetensors"
    save_file(dit_state(7), str(src))
    def full(path, arrays, metadata=None):  # what MLX does when the disk fills: a torn file, a RuntimeError
        with open(path, "wb") as f:
            f.write(b"\0" * 64)
        raise RuntimeError("[write] Unable to write 8 bytes to file.")

    monkeypatch.setattr(mx, "save_safetensors", full)
    monkeypatch.setattr(writers, "free_bytes", lambda folder: free)
    out = tmp_path / "out"
    assert_refused(["convert", src, "-o", out, "--component", "transformer"], capsys,
                   f"{out}: writing failed ({reason}); nothing was written", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["casper.safetensors"]
