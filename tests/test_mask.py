"""`mlx-omnimatte mask`: bad input refused in one line before any weight
loads (with or without the masks extra), and without mlx-vlm one line
saying what to install."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import assert_refused, run_cli

EXAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "examples"
VIDEO = EXAMPLES / "boys-beach" / "input_video.mp4"  # 640x384, 85 frames

pytestmark = pytest.mark.skipif(not VIDEO.exists(), reason=f"{VIDEO} not present")


@pytest.fixture
def sam3_folder(tmp_path):
    """A folder that says it is SAM3 (no weights: every check runs before they load)."""
    folder = tmp_path / "sam3"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "sam3_video"}))
    return folder


@pytest.fixture
def without_mlx_vlm(monkeypatch):
    """As if the extra were not installed: every mlx_vlm import fails."""
    for name in [m for m in sys.modules if m == "mlx_vlm" or m.startswith("mlx_vlm.")] + ["mlx_vlm"]:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("args,match", [
    ([], "give at least one prompt"),
    (["--point", "640,10"], "--point '640,10': outside the 640x384 frame"),
    (["--point", "10,10@85"], "frame 85 does not exist (the clip has 85: 0..84)"),
    (["--box", "10,10,700,100"], "not a box inside the 640x384 frame"),
    (["--box", "100,10,50,100"], "not a box inside"),
    (["--point", "1,2,3"], "expected X,Y[@FRAME]"),
    (["--text", "  "], "give a few words"),
    (["--text", "a", "--name", "x", "--name", "y"], "2 names for 1 objects"),
    (["--point", "10,10@4", "--frames", "3"], "frame 4 does not exist (the clip has 3"),
])
def test_bad_prompts(args, match, sam3_folder, tmp_path, capsys):
    out = tmp_path / "clip"
    assert_refused(["mask", VIDEO, "-o", out, "--model", sam3_folder, *args], capsys, match, out)
    assert_refused(["mask", VIDEO, "-o", out, "--model", sam3_folder, "--dry-run", *args], capsys, match, out)


def test_bad_model_output_and_video(sam3_folder, tmp_path, capsys):
    out = tmp_path / "clip"
    wan = tmp_path / "wan"
    wan.mkdir()
    (wan / "config.json").write_text(json.dumps({"model_type": "sam3.1_video"}))
    assert_refused(["mask", VIDEO, "-o", out, "--model", wan, "--point", "1,1"], capsys,
                   "not a SAM3 video model (config.json model_type is 'sam3.1_video'", out)
    assert_refused(["mask", VIDEO, "-o", out, "--model", tmp_path / "nowhere", "--point", "1,1"], capsys,
                   "no such folder, and not a hub id", out)
    assert_refused(["mask", VIDEO, "-o", out, "--model", tmp_path, "--point", "1,1"], capsys,
                   "not a SAM3 model folder (no config.json)", out)
    assert_refused(["mask", tmp_path / "none.mp4", "-o", out, "--model", sam3_folder, "--point", "1,1"], capsys,
                   "none.mp4", out)
    out.mkdir()
    code, _, err = run_cli(["mask", VIDEO, "-o", out, "--model", sam3_folder, "--point", "1,1"], capsys)
    assert code == 2 and "already exists (add --overwrite to replace it)" in err and not any(out.iterdir())
    inside = sam3_folder / "clip"
    assert_refused(["mask", VIDEO, "-o", sam3_folder, "--model", sam3_folder, "--point", "1,1", "--overwrite"],
                   capsys, "the output would replace the input")
    assert not inside.exists()


def test_without_the_extra_one_line_says_what_to_install(without_mlx_vlm, sam3_folder, tmp_path, capsys):
    out = tmp_path / "clip"
    for extra in ([], ["--dry-run"]):
        assert_refused(["mask", VIDEO, "-o", out, "--model", sam3_folder, "--point", "10,10", *extra], capsys,
                       'masks need mlx-vlm: pip install "mlx-omnimatte[masks]"', out)
    # bad input is still named first
    assert_refused(["mask", VIDEO, "-o", out, "--model", sam3_folder], capsys, "give at least one prompt", out)


def test_help_says_masks_cover_the_object_only(capsys):
    code, stdout, _ = run_cli(["mask", "--help"], capsys)
    assert code == 0 and "cover the object only" in stdout and "--dilate" in stdout and "--raw" in stdout


def test_frame_window_holds_one_window_and_frame_0():
    from mlx_omnimatte.errors import OmnimatteError
    from mlx_omnimatte.pipelines.masking import FrameWindow

    w = FrameWindow(VIDEO, 90)  # declares more frames than the file has
    a = w.load(0, 8)
    b = w.load(8, 16)
    assert len(w) == 90 and w[0] is a[0] and w[9] is b[1] and sorted(w._frames) == list(range(8, 16))
    with pytest.raises(OmnimatteError, match="decoding stopped after 85 of the 90 frames"):
        w.load(16, 90)


def test_no_room_on_the_disk(sam3_folder, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "clip"
    assert_refused(["mask", VIDEO, "-o", out, "--model", sam3_folder, "--point", "1,1"], capsys,
                   "the outputs need about", out)
