"""Clip folders (Generative Omnimatte layout) and explicit clip inputs."""

import json

import numpy as np
import pytest

from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.io.inputs import find_clip_files, load_clip, load_clip_folder
from mlx_omnimatte.io.writers import write_video
from helpers import EXAMPLES

needs_examples = pytest.mark.skipif(
    not EXAMPLES.is_dir(), reason=f"shared example clips not found at {EXAMPLES}"
)

T, H, W = 5, 32, 48


@needs_examples
def test_real_clip_folder():
    clip = load_clip_folder(EXAMPLES / "boys-beach")
    assert clip.frames.shape == (85, 384, 640, 3) and clip.fps == 16.0
    assert clip.names == ["00", "01"] and len(clip.masks) == 2
    assert clip.caption == "a video of beautiful beach."
    assert [m.shape for m in clip.masks] == [(85, 384, 640)] * 2
    assert [i.path.name for i in clip.mask_infos] == ["mask_00.mp4", "mask_01.mp4"]
    assert clip.source == EXAMPLES / "boys-beach" and clip.size == (640, 384) and clip.num_frames == 85
    # The two boys are different objects.
    overlap = ((clip.masks[0] >= 240) & (clip.masks[1] >= 240)).mean()
    assert overlap < 1e-3 < (clip.masks[0] >= 240).mean()


def _mask(shift):
    m = np.zeros((T, H, W), np.uint8)
    m[:, 8:20, 4 + shift : 16 + shift] = 255
    return m


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "clip"
    write_video(d / "input_video.mp4", np.full((T, H, W, 3), 120, np.uint8), 16)
    write_video(d / "mask_10.mp4", _mask(20), 16)
    write_video(d / "mask_2.mp4", _mask(0), 16)
    return d


def test_synthetic_folder_natural_order_no_prompt(folder):
    clip = load_clip_folder(folder)
    assert clip.names == ["2", "10"] and clip.caption is None
    assert (clip.masks[0][:, 10, 6] >= 240).all() and (clip.masks[1][:, 10, 26] >= 240).all()
    assert load_clip_folder(folder, caption="a wall").caption == "a wall"
    (folder / "prompt.json").write_text(json.dumps({"bg": "a grey wall"}))
    assert load_clip_folder(folder).caption == "a grey wall"


def test_folder_errors(folder, tmp_path):
    (folder / "prompt.json").write_text(json.dumps({"fg": "x"}))
    with pytest.raises(OmnimatteError, match=r'prompt.json: expected \{"bg"'):
        load_clip_folder(folder)
    (folder / "prompt.json").write_text("{not json")
    with pytest.raises(OmnimatteError, match=r"prompt.json: not valid JSON \(Expecting property name"):
        load_clip_folder(folder)
    (folder / "input_video.mp4").rename(folder / "video.mp4")
    with pytest.raises(OmnimatteError, match="clip: no input_video.mp4"):
        find_clip_files(folder)
    nomask = tmp_path / "nomask"
    write_video(nomask / "input_video.mp4", np.zeros((T, H, W, 3), np.uint8), 16)
    with pytest.raises(OmnimatteError, match=r"nomask: no object masks \(mask_00.mp4"):
        load_clip_folder(nomask)


def test_mask_mismatch_in_folder_names_the_mask(folder):
    write_video(folder / "mask_3.mp4", _mask(0)[:4], 16)
    with pytest.raises(OmnimatteError, match=r"mask_3.mp4: mask has 4 frames but the video .*input_video.mp4 has 5"):
        load_clip_folder(folder)


def test_explicit_paths(folder):
    clip = load_clip(folder / "input_video.mp4", [folder / "mask_10.mp4"], caption="wall", names=["ball"])
    assert clip.names == ["ball"] and clip.caption == "wall" and len(clip.masks) == 1
    assert load_clip(folder / "input_video.mp4", [folder / "mask_2.mp4"]).names == ["2"]
    with pytest.raises(OmnimatteError, match="2 names for 1 masks"):
        load_clip(folder / "input_video.mp4", [folder / "mask_2.mp4"], names=["a", "b"])
    with pytest.raises(OmnimatteError, match="no object masks given"):
        load_clip(folder / "input_video.mp4", [])


def test_resolve_once_names_frames_and_clip_folder_rules(folder, tmp_path):
    from mlx_omnimatte.io.inputs import read_clip, resolve_clip

    video = folder / "input_video.mp4"
    other = tmp_path / "other"
    write_video(other / "mask_2.mp4", _mask(5), 16)
    # two masks with the same file name from different folders: named on the command line
    spec = resolve_clip(video, [f"left={folder / 'mask_2.mp4'}", f"right={other / 'mask_2.mp4'}"], frames=3)
    assert spec.names == ["left", "right"] and spec.info.frames == 3 and spec.caption_from == "none"
    clip = read_clip(spec)
    assert clip.num_frames == 3 and clip.info.frames == 3 and [m.shape[0] for m in clip.masks] == [3, 3]
    assert clip.names == ["left", "right"]
    with pytest.raises(OmnimatteError, match=r"not unique \(2, 2\); name them with --mask NAME=PATH"):
        resolve_clip(video, [folder / "mask_2.mp4", other / "mask_2.mp4"])
    with pytest.raises(OmnimatteError, match="a clip folder takes no --mask"):
        resolve_clip(folder, [folder / "mask_2.mp4"])
    with pytest.raises(OmnimatteError, match="--frames 0: must be at least 1"):
        resolve_clip(folder, frames=0)
    # a mask of another length is refused from the headers, before any decoding
    write_video(tmp_path / "long.mp4", np.zeros((T + 2, H, W), np.uint8), 16)
    with pytest.raises(OmnimatteError, match=f"mask has {T + 2} frames but the video"):
        resolve_clip(video, [tmp_path / "long.mp4"])
    assert resolve_clip(folder).caption_from == "none"
    (folder / "prompt.json").write_text(json.dumps({"bg": "a wall"}))
    spec = resolve_clip(folder, frames=99)
    assert spec.caption == "a wall" and spec.caption_from == "prompt.json" and spec.info.frames == T
