"""`decompose` without experts: `--method optimize` (Casper removal, then the
per-layer optimization) with the tiny bundle, and `--clean-plate` with no
bundle at all; the method choice, and the plate checks before any work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mlx_omnimatte.io.video import probe_video, read_rgba, read_video
from mlx_omnimatte.io.writers import write_png_frames, write_video
from mlx_omnimatte.synth import make_clip, write_clip
from helpers import EXAMPLES, assert_refused, run_cli as run
from tiny_models import tiny_bundle

FAST = ["--steps", "1", "--size", "64x32", "--quiet"]


@pytest.fixture(scope="module")
def casper(tmp_path_factory):
    """A tiny bundle without experts (what the public weights give)."""
    return tiny_bundle(tmp_path_factory.mktemp("casper"), experts=False)


@pytest.fixture(scope="module")
def synth_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth") / "clip"
    write_clip(make_clip(seed=3, frames=9, size=(64, 48)), folder)
    return folder


def test_optimize_on_boys_beach(casper, tmp_path, capsys):
    if not EXAMPLES.is_dir():
        pytest.skip(f"{EXAMPLES} not present")
    out = tmp_path / "beach"
    loud = [a for a in FAST if a != "--quiet"]  # the method choice is part of the run's header
    code, stdout, err = run(["decompose", EXAMPLES / "boys-beach", "--bundle", casper, "-o", out, *loud,
                             "--frames", "9", "--layer-solver", "unet", "--iterations", "3", "--batch-frames", "4",
                             "--layer-format", "png", "--layer-format", "webm"], capsys)
    assert code == 0, err
    assert "decompose method: two-stage (one removal pass for all objects, then layer solver: unet, 3 iterations)" in err  # the bundle has no experts: chosen and said
    src = probe_video(EXAMPLES / "boys-beach" / "input_video.mp4")
    for name in ("00", "01"):
        folder = out / f"object_{name}"
        rgba, info = read_rgba(folder / "layer")
        assert rgba.shape == (9, src.height, src.width, 4) and rgba.dtype == np.uint8
        webm, _ = read_rgba(folder / "layer.webm")
        assert webm.shape == rgba.shape
        for video in ("alpha.mp4", "background.mp4", "preview.mp4"):
            frames, vi = read_video(folder / video)
            assert frames.shape[0] == 9 and vi.fps == pytest.approx(src.fps)
    assert "object_00/layer/  (9 PNG frames)" in stdout


def test_clean_plate_without_any_bundle(synth_clip, tmp_path, capsys):
    out = tmp_path / "layers"
    code, _, err = run(["decompose", synth_clip, "--clean-plate", synth_clip / "truth" / "background", "-o", out,
                        "--layer-solver", "unet", "--iterations", "40", "--batch-frames", "4", "--quiet"], capsys)
    assert code == 0, err
    rgba, _ = read_rgba(out / "object_00" / "layer")
    bg, _ = read_video(out / "object_00" / "background.mp4")
    assert rgba.shape == (9, 48, 64, 4) and bg.shape == (9, 48, 64, 3)
    truth = read_video(synth_clip / "truth" / "background")[0]
    assert np.abs(bg.astype(np.float32) - truth).mean() < 4.0  # the plate itself (H.264 round trip)


def test_clean_plate_dry_run_and_single_image(synth_clip, tmp_path, capsys):
    image = tmp_path / "plate.png"
    from PIL import Image

    Image.fromarray(read_video(synth_clip / "truth" / "background", max_frames=1)[0][0]).save(image)
    code, stdout, _ = run(["decompose", synth_clip, "--clean-plate", image, "-o", tmp_path / "o", "--dry-run"],
                          capsys)
    assert code == 0 and "mode: clean-plate, 1 object(s), no model weights" in stdout
    assert "working grid 64x48" in stdout and not (tmp_path / "o").exists()


def test_plate_of_another_size_or_length_refused(synth_clip, tmp_path, capsys):
    small = tmp_path / "small.mp4"
    write_video(small, np.zeros((9, 32, 48, 3), np.uint8), 16)
    out = tmp_path / "out"
    args = ["decompose", synth_clip, "-o", out, "--quiet"]
    assert_refused([*args, "--clean-plate", small], capsys, "48x32 differs from the clip's 64x48", out)
    short = tmp_path / "short"
    write_png_frames(short, np.zeros((4, 48, 64, 3), np.uint8))
    assert_refused([*args, "--clean-plate", short], capsys, "4 frames, fewer than the clip's 9", out)
    assert_refused([*args, "--clean-plate", tmp_path / "nope.mp4"], capsys, "no such clean plate", out)
    # explicitly fitted, the same plates are accepted
    code, _, err = run([*args, "--clean-plate", short, "--fit", "loop"], capsys)
    assert code == 0, err


def test_method_needs_what_it_names(casper, synth_clip, tmp_path, capsys):
    out = tmp_path / "out"
    assert_refused(["decompose", synth_clip, "--bundle", casper, "--method", "experts", "-o", out, *FAST],
                   capsys, "--method experts: the bundle", out)
    assert_refused(["decompose", synth_clip, "-o", out, *FAST], capsys,
                   "give --bundle (a converted model bundle) or --clean-plate PLATE", out)


def test_disk_full_while_writing_is_one_line(synth_clip, tmp_path, capsys, monkeypatch):
    import errno

    import mlx_omnimatte.io.writers as writers

    real = writers.PngSink.add

    def full(self, frame):
        if self.count == 1:  # one frame is in the hidden folder already
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        real(self, frame)

    monkeypatch.setattr(writers.PngSink, "add", full)
    out = tmp_path / "out"
    args = ["decompose", synth_clip, "--clean-plate", synth_clip / "truth" / "background", "-o", out,
            "--quiet"]
    assert_refused(args, capsys, f"{out}: writing failed (No space left on device); nothing was written", out)


@pytest.mark.parametrize("solo, passes", [(False, ["denoise all"]), (True, ["denoise all", "denoise solo_00",
                                                                           "denoise solo_01"])])
def test_two_stage_removal_passes(casper, solo, passes):
    """One removal trajectory for all objects; --solo adds one per object
    (read from the run's stage records). `optimize` is the method's alias."""
    if not EXAMPLES.is_dir():
        pytest.skip(f"{EXAMPLES} not present")
    from mlx_omnimatte.pipelines.api import decompose_request, execute, prepare
    from mlx_omnimatte.pipelines.settings import Mode
    from mlx_omnimatte.progress import quiet

    request = decompose_request(EXAMPLES / "boys-beach", frames=5, bundle=casper, method="optimize", solo=solo,
                                steps=1, size="64x32")
    assert request.mode is Mode.TWO_STAGE and request.opened.root == casper
    prepared = prepare(request)
    assert f"{len(passes)} trajectories x 1 steps" in prepared.render()
    progress = quiet()
    layers = execute(prepared, progress)
    assert [r.name for r in progress.records if r.name.startswith("denoise")] == passes
    solved = ["solve layers 00", "solve layers 01"] if solo else ["solve layers"]
    assert sorted(layers) == ["00", "01"] and [r.name for r in progress.records if "solve" in r.name] == solved


def test_a_run_opens_its_bundle_once(casper, monkeypatch):
    """The method's choice, the checks and the plan share one opened bundle:
    its manifest and each component's config.json are read once."""
    if not EXAMPLES.is_dir():
        pytest.skip(f"{EXAMPLES} not present")
    from mlx_omnimatte import bundle as bundle_module
    from mlx_omnimatte.pipelines.api import decompose_request, prepare

    reads = []
    for name in ("read_json", "read_config"):
        real = getattr(bundle_module, name)
        monkeypatch.setattr(bundle_module, name, lambda p, real=real: reads.append(Path(p)) or real(p))
    prepared = prepare(decompose_request(EXAMPLES / "boys-beach", frames=5, bundle=casper, method="two-stage",
                                         steps=1, size="64x32"))
    assert prepared.bundle.root == casper
    names = sorted(p.name if p.suffix else p.name + "/" for p in reads)
    assert names == ["clip/", "manifest.json", "t5/", "transformer/", "vae/"]
