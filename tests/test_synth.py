import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mlx_omnimatte import synth
from mlx_omnimatte.compositing import as_float, recompose
from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.io.inputs import load_clip_folder
from mlx_omnimatte.io.writers import write_png_frames


def _recompose_all(clip):
    v = as_float(clip.background)
    for k in reversed(range(len(clip.alpha))):
        v = recompose(clip.alpha[k], clip.foreground[k], v)
    return v


def test_clip_shapes_and_exact_composition():
    clip = synth.make_clip(1, frames=9, size=(64, 48), objects=2)
    assert clip.video.shape == (9, 48, 64, 3) and clip.video.dtype == np.uint8
    assert len(clip.masks) == len(clip.alpha) == len(clip.effect) == len(clip.foreground) == 2
    assert clip.masks[0].dtype == bool and clip.alpha[0].dtype == np.float32
    # video = layers back to front over the plate, up to uint8 rounding of fg and video
    err = np.abs(_recompose_all(clip) - as_float(clip.video)).max()
    assert err <= 1.5 / 255
    for k in range(2):
        np.testing.assert_array_equal(clip.masks[k], clip.object_alpha[k] > 0.5)
        # the layer alpha is object over shadow
        expect = clip.object_alpha[k] + (1 - clip.object_alpha[k]) * clip.effect[k]
        np.testing.assert_allclose(clip.alpha[k], expect, atol=1e-6)
        assert 0.02 < clip.masks[k].mean() < 0.3


def test_shadow_opacity_and_effect_region():
    clip = synth.make_clip(2, frames=5, size=(96, 64), shadow_opacity=0.5)
    eff, obj = clip.effect[0], clip.object_alpha[0]
    assert eff.max() <= 0.5 + 1e-6 and eff.max() > 0.35
    # the shadow lies mostly outside the object, below its base
    outside = (eff > 0.05) & (obj < 0.01)
    assert outside.sum() > 50
    ys = np.nonzero(outside[0])[0]
    base = np.nonzero(obj[0].max(axis=1) > 0.05)[0][-1]
    assert np.median(ys) >= base - 2
    # darkening: the video under the shadow is darker than the plate
    region = outside
    assert as_float(clip.video)[region].mean() < 0.8 * as_float(clip.background)[region].mean()
    flat = synth.make_clip(2, frames=5, size=(96, 64), shadow=False)
    assert flat.effect[0].max() == 0.0


def test_seed_determinism():
    a = synth.make_clip(5, frames=4, size=(48, 32))
    b = synth.make_clip(5, frames=4, size=(48, 32))
    c = synth.make_clip(6, frames=4, size=(48, 32))
    np.testing.assert_array_equal(a.video, b.video)
    assert np.abs(a.video.astype(int) - c.video.astype(int)).mean() > 5


def test_affine_path_moves_smoothly_with_opposite_translations():
    rng = np.random.default_rng(0)
    a0, a1 = synth.random_affine_path(rng, 100.0)
    assert a0.tx * a1.tx < 0 and 15 <= abs(a0.tx) <= 30 and 15 <= abs(a1.tx) <= 30
    for s in (a0, a1):
        assert abs(s.rotate) <= 5 and 0.95 <= s.scale <= 1.05 and abs(s.shear) <= 3
    clip = synth.make_clip(3, frames=21, size=(128, 96), shadow=False)
    a = clip.object_alpha[0]
    xs = np.array([(f * np.arange(128)).sum() / f.sum() for f in a])
    v = np.diff(xs)
    travel = abs(xs[-1] - xs[0])
    # two translations of 15-30% of the canvas width, which is shrunk to the frame
    assert 0.3 * 128 - 4 <= travel <= 0.6 * 128 + 4
    assert np.all(np.sign(v[np.abs(v) > 1e-3]) == np.sign(xs[-1] - xs[0]))  # monotone
    assert abs(v[0]) < abs(v[len(v) // 2]) / 3 and abs(v[-1]) < abs(v[len(v) // 2]) / 3  # eased


def test_write_and_read_truth(tmp_path):
    clip = synth.make_clip(4, frames=5, size=(64, 48), objects=2)
    folder = synth.write_clip(clip, tmp_path / "c")
    loaded = load_clip_folder(folder)
    np.testing.assert_array_equal(loaded.frames, clip.video)
    assert loaded.names == ["00", "01"] and loaded.caption == clip.caption
    np.testing.assert_array_equal(loaded.masks[1] >= 240, clip.masks[1])
    t = synth.read_truth(folder)
    assert t["names"] == ["00", "01"]
    np.testing.assert_array_equal(t["background"], clip.background)
    for key in ("alpha", "effect", "object_alpha"):
        assert np.abs(t[key][1] - getattr(clip, key)[1]).max() <= 0.5 / 65535 + 1e-7
    np.testing.assert_array_equal(t["foreground"][0], clip.foreground[0])
    assert json.loads((folder / "truth" / "meta.json").read_text())["alpha_bits"] == 16
    with pytest.raises(OmnimatteError):
        synth.write_clip(clip, folder)  # exists
    with pytest.raises(OmnimatteError):
        synth.read_truth(tmp_path)


def test_user_sources(tmp_path):
    fg = tmp_path / "vm"
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 255, (6, 40, 30, 3), dtype=np.uint8)
    alpha = np.zeros((6, 40, 30), np.uint8)
    alpha[:, 10:35, 8:22] = 255
    write_png_frames(fg / "fgr" / "0000", colour)
    write_png_frames(fg / "pha" / "0000", alpha)
    bg = tmp_path / "bg"
    write_png_frames(bg, rng.integers(0, 255, (3, 32, 48, 3), dtype=np.uint8))
    clip = synth.make_clip(0, frames=8, size=(64, 48), source=synth.Source(fg, bg))
    assert clip.video.shape == (8, 48, 64, 3)
    assert 0.02 < clip.masks[0].mean() < 0.3
    err = np.abs(_recompose_all(clip) - as_float(clip.video)).max()
    assert err <= 1.5 / 255
    with pytest.raises(OmnimatteError, match="fgr/ and pha/"):
        synth.Source(tmp_path / "bg", None)


def test_dataset_and_cli(tmp_path):
    from mlx_omnimatte.cli.synth import synth as cmd

    out = synth.write_dataset(tmp_path / "d", 2, seed=3, frames=3, size=(32, 32))
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001"]
    assert json.loads((out / "00001" / "truth" / "meta.json").read_text())["seed"] == 4
    r = CliRunner().invoke(cmd, ["-o", str(tmp_path / "one"), "--frames", "4", "--size", "64x48", "--objects", "2",
                                 "--seed", "7", "-q"])
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "one" / "input_video" / "00003.png").size == (64, 48)
    assert (tmp_path / "one" / "mask_01").is_dir()
    r = CliRunner().invoke(cmd, ["-o", str(tmp_path / "one"), "--frames", "4"])
    assert r.exit_code != 0  # exists
    r = CliRunner().invoke(cmd, ["-o", str(tmp_path / "many"), "--count", "2", "--frames", "2", "--size", "32x32",
                                 "-q"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "many" / "00001" / "truth" / "alpha_00").is_dir()
