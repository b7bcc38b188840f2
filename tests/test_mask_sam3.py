"""`mlx-omnimatte mask` with a tiny random-weight SAM3 built from mlx-vlm's
own classes: end to end on boys-beach (the masks are meaningless, the
plumbing is real), its folder read by `decompose`; windows that do not
change the result; the dry run's figures. Skipped without the masks extra."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sam3_utils import tiny_sam3  # skips this module without mlx-vlm

from mlx_vlm.models.sam3.generate import Sam3VideoPredictor  # noqa: E402

from helpers import assert_refused, run_cli  # noqa: E402
from mlx_omnimatte.io.video import list_frame_files, probe_video, read_video  # noqa: E402
from mlx_omnimatte.models.sam3 import RELEASED_PARAMS, count_params, load_sam3, sam3_figures  # noqa: E402
from mlx_omnimatte.pipelines.masking import MaskRequest, Prompt, released_config, to_source, track  # noqa: E402
from tiny_models import tiny_bundle  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "examples"
VIDEO = EXAMPLES / "boys-beach" / "input_video.mp4"  # 640x384, 85 frames

pytestmark = pytest.mark.skipif(not VIDEO.exists(), reason=f"{VIDEO} not present")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_sam3(tmp_path_factory.mktemp("sam3") / "tiny")


@pytest.fixture(scope="module")
def clip(tiny, tmp_path_factory):
    """`mask` on the first 3 frames: a text prompt and a box on frame 1."""
    out = tmp_path_factory.mktemp("masks") / "beach"
    from helpers import main
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in ["mask", VIDEO, "-o", out, "--model", tiny, "--text", "a boy", "--threshold", "0",
                               "--box", "100,80,300,360@1", "--name", "boy", "--name", "box", "--frames", "3", "--quiet"]])
    assert e.value.code == 0
    return out


@pytest.mark.slow
def test_mask_writes_a_clip_folder(clip):
    names = sorted(p.name for p in clip.iterdir())
    assert names == ["input_video.mp4", "mask_00_boy", "mask_01_box", "masks.json", "masks_preview.mp4", "prompt.json"]
    assert json.loads((clip / "prompt.json").read_text()) == {"bg": ""}
    video, info = read_video(clip / "input_video.mp4")
    source = probe_video(VIDEO)
    assert video.shape == (3, 384, 640, 3) and info.fps == pytest.approx(source.fps)
    for name in ("mask_00_boy", "mask_01_box"):
        masks, _ = read_video(clip / name, gray=True)
        assert masks.shape == (3, 384, 640) and set(np.unique(masks)) <= {0, 255}
    box, _ = read_video(clip / "mask_01_box", gray=True)
    assert not box[0].any() and box[1:].any()  # prompted on frame 1: empty before it
    preview, _ = read_video(clip / "masks_preview.mp4")
    assert preview.shape == (3, 384, 640, 3)
    record = json.loads((clip / "masks.json").read_text())
    assert [o["prompt"] for o in record["objects"]] == ["text", "box"]
    assert record["objects"][1]["frames_present"] == 2


@pytest.mark.slow
def test_decompose_reads_the_folder(clip, tmp_path, capsys):
    out = tmp_path / "layers"
    code, stdout, err = run_cli(["decompose", clip, "--clean-plate", clip / "input_video.mp4", "-o", out, "-q"],
                                capsys)
    assert code == 0, err
    assert len(list_frame_files(out / "object_00_boy" / "layer")) == 3
    bundle = tiny_bundle(tmp_path / "casper", experts=False)
    code, stdout, err = run_cli(["decompose", clip, "--bundle", bundle, "--method", "two-stage", "--size", "64x32",
                                 "--steps", "1", "-o", tmp_path / "two", "--dry-run"], capsys)
    assert code == 0, err
    assert not (tmp_path / "two").exists()


@pytest.mark.slow
def test_windows_do_not_change_the_masks(tiny, monkeypatch):
    """Streaming (frames decoded in windows, each frame's features dropped
    once its masks are out) gives the masks of one pass over the whole clip,
    holding one frame's features at a time."""
    model, processor = load_sam3(tiny)
    info = probe_video(VIDEO)
    info = replace(info, frames=3)
    request = MaskRequest(VIDEO, info, [Prompt("point", (320.0, 200.0)), Prompt("box", (10, 20, 200, 300), 1)],
                          str(tiny))
    held = []
    propagate = Sam3VideoPredictor.propagate

    def counting(self, *a, **k):
        out = propagate(self, *a, **k)
        held.append(sum(f is not None for f in self._frame_features))
        return out

    monkeypatch.setattr(Sam3VideoPredictor, "propagate", counting)
    one = [m for _, m in track(model, processor, request, window=2)]
    assert held == [1, 1, 1]
    monkeypatch.setattr(Sam3VideoPredictor, "propagate", propagate)
    whole = Sam3VideoPredictor(model, processor)
    whole.set_video([f for f, _ in zip(read_video(VIDEO)[0], range(3))])
    h = 0.5 / 1008
    whole.add_point_prompt(np.array([[(320 / 640 + h) * 72 - 0.5, (200 / 384 + h) * 72 - 0.5]], np.float32),
                           np.ones(1, np.int32), 0)
    whole.add_box_prompt(np.array([10 / 640 + h, 20 / 384 + h, 200 / 640 + h, 300 / 384 + h], np.float32), 1)
    results = whole.propagate()
    for t in range(3):
        assert (one[t][0] == to_source(results[t].masks[0], (640, 384))).all()
    assert not one[0][1].any() and (one[2][1] == to_source(results[2].masks[1], (640, 384))).all()


@pytest.mark.slow
def test_a_prompt_that_finds_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "clip"
    assert_refused(["mask", VIDEO, "-o", out, "--model", tiny, "--text", "a boy", "--threshold", "1", "--frames",
                    "2", "-q"], capsys, "--text 'a boy': found nothing on frame 0", out)


@pytest.mark.slow
def test_dry_run_prints_figures(tiny, tmp_path, capsys):
    out = tmp_path / "clip"
    code, stdout, err = run_cli(["mask", VIDEO, "-o", out, "--model", tiny, "--box", "100,80,300,360",
                                 "--dry-run"], capsys)
    assert code == 0, err
    assert not out.exists()
    lines = stdout.splitlines()
    params = sum(np.prod(v.shape) for v in __import__("mlx.core").core.load(str(tiny / "model.safetensors")).values())
    assert lines[0] == "mask: 1 object over 85 frames of 640x384, decoded 8 frames at a time, predicted one by one"
    assert lines[1].startswith(f"model {tiny} (predicted): {params / 1e6:.2f} M parameters x float32")
    assert "per frame at its 1008x1008 input" in lines[1]
    assert "(measured here on frames 1-2, banks of 1-2 memories):" in lines[2] and "with full banks" in lines[2]
    assert lines[3].startswith("released SAM3 (facebook/sam3, bfloat16): 859.92 M parameters x 16-bit = 1.60 GiB")
    assert "s per frame at its float32 matmul rate" in lines[4]


@pytest.mark.slow
def test_released_size():
    cfg = released_config()
    assert count_params(cfg) == RELEASED_PARAMS
    f = sam3_figures(cfg, 2, objects=1, window=8, params=RELEASED_PARAMS)
    assert f.weight_bytes == 2 * RELEASED_PARAMS and f.resolution == 1008
    # the ViT's 32 layers at 72x72 tokens dominate: 2 N (4 C^2 + 2 C I) per layer
    n, c, i = 72 * 72, 1024, 4736
    assert f.flops > 32 * 2 * n * (4 * c * c + 2 * c * i)
