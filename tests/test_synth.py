import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from mlx_omnimatte import synth
from mlx_omnimatte.compositing import as_float, recompose
from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.io.inputs import load_clip_folder
from mlx_omnimatte.io.truth import read_truth
from mlx_omnimatte.io.writers import write_png_frames
from mlx_omnimatte.sampling import DEFAULT_SEED
from helpers import run_cli


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
    t = read_truth(folder)
    assert t["names"] == ["00", "01"]
    np.testing.assert_array_equal(t["background"], clip.background)
    for key in ("alpha", "effect", "object_alpha"):
        assert np.abs(t[key][1] - getattr(clip, key)[1]).max() <= 0.5 / 65535 + 1e-7
    np.testing.assert_array_equal(t["foreground"][0], clip.foreground[0])
    assert json.loads((folder / "truth" / "meta.json").read_text())["alpha_bits"] == 16
    with pytest.raises(OmnimatteError):
        synth.write_clip(clip, folder)  # exists
    with pytest.raises(OmnimatteError):
        read_truth(tmp_path)


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


def test_dataset_and_cli(tmp_path, capsys):
    out = synth.write_dataset(tmp_path / "d", 2, seed=3, frames=3, size=(32, 32))
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001"]
    assert json.loads((out / "00001" / "truth" / "meta.json").read_text())["seed"] == 4
    code, _, err = run_cli(["synth", "-o", str(tmp_path / "one"), "--frames", "4", "--size", "64x48", "--objects", "2",
                            "--seed", "7", "-q"], capsys)
    assert code == 0, err
    assert Image.open(tmp_path / "one" / "input_video" / "00003.png").size == (64, 48)
    assert (tmp_path / "one" / "mask_01").is_dir()
    code, _, err = run_cli(["synth", "-o", str(tmp_path / "one"), "--frames", "4"], capsys)
    assert code == 2 and "already exists" in err
    code, _, err = run_cli(["synth", "-o", str(tmp_path / "many"), "--count", "2", "--frames", "2", "--size", "32x32",
                            "-q"], capsys)
    assert code == 0, err
    assert (tmp_path / "many" / "00001" / "truth" / "alpha_00").is_dir()


# --- effects, removal plate, files ------------------------------------------------


def _base(obj_frame):
    return int(np.nonzero(obj_frame.max(axis=1) > 0.05)[0][-1]) + 1


def test_default_clip_is_bit_identical_to_before_effects():
    # Pinned with the code before effect kinds existed: the default (a shadow
    # for every object) must not move, README figures and tests rely on it.
    clip = synth.make_clip(3, frames=8, size=(64, 64), shadow_opacity=0.5)
    assert int(clip.video.astype(np.int64).sum()) == 10357724
    assert hashlib.sha256(clip.video.tobytes()).hexdigest() == (
        "2fed4399e19c9cb758e212bd4dbf4e322a2b9143b1d4a298760e2804cf689483")
    assert clip.effects == ["shadow"] and clip.removal_plate is None and clip.plate == "exact"


@pytest.mark.parametrize("effects", [["shadow", "reflection"], ["light"], ["reflection", "none", "light"]])
def test_effect_clips_recompose_exactly(effects):
    clip = synth.make_clip(1, frames=6, size=(64, 48), objects=len(effects), effects=effects)
    assert clip.effects == effects
    assert np.abs(_recompose_all(clip) - as_float(clip.video)).max() <= 1.5 / 255
    for k, kind in enumerate(effects):
        expect = clip.object_alpha[k] + (1 - clip.object_alpha[k]) * clip.effect[k]
        np.testing.assert_allclose(clip.alpha[k], expect, atol=1e-6)
        assert (clip.effect[k].max() == 0) == (kind == "none")


def test_reflection_mirrors_the_object_below_its_base():
    clip = synth.make_clip(6, frames=5, size=(96, 64), effects=["reflection"])
    obj, eff = clip.object_alpha[0], clip.effect[0]
    assert 0.3 - 0.02 <= eff.max() <= 0.5 + 1e-6
    video, bg, fg = as_float(clip.video), as_float(clip.background), as_float(clip.foreground[0])
    checked = 0
    for i in range(obj.shape[0]):
        base = _base(obj[i])
        rows = np.nonzero(eff[i].max(axis=1) > 0)[0]
        assert rows.min() == base  # below the base, touching it
        for y in range(base, min(2 * base, obj.shape[1])):
            src = 2 * base - 1 - y  # the mirrored row
            cols = (obj[i, src] > 0.99) & (obj[i, y] == 0) & (eff[i, y] > 0.05)
            e = eff[i, y, cols][:, None]
            # the video there: the mirrored object colour over the plate, at the effect's opacity
            expect = e * fg[i, src, cols] + (1 - e) * bg[i, y, cols]
            np.testing.assert_allclose(video[i, y, cols], expect, atol=3 / 255)
            checked += int(cols.sum())
    assert checked > 100


def test_light_brightens_the_ground_around_the_base():
    clip = synth.make_clip(4, frames=5, size=(96, 64), effects=["light"])
    obj, eff = clip.object_alpha[0], clip.effect[0]
    assert 0.3 - 0.02 <= eff.max() <= 0.5 + 1e-6
    region = (eff > 0.1) & (obj < 0.01)
    assert region.sum() > 50
    video, bg = as_float(clip.video), as_float(clip.background)
    assert video[region].mean() > bg[region].mean() + 0.05
    assert np.all(video[region].sum(-1) >= bg[region].sum(-1) - 3 / 255)  # never darker
    # warm white where only the light is, connected to the object's base
    only = (eff > 0.1) & (obj == 0)
    colour = as_float(clip.foreground[0])[only]
    np.testing.assert_allclose(colour, np.broadcast_to(synth.LIGHT_COLOUR, colour.shape), atol=0.5 / 255 + 1e-6)
    for i in range(obj.shape[0]):
        rows = np.nonzero(eff[i].max(axis=1) > 0.1)[0]
        assert rows.min() < _base(obj[i]) < rows.max()


def test_effects_keep_the_objects_and_cycle():
    plain = synth.make_clip(5, frames=4, size=(64, 48), objects=3)
    mixed = synth.make_clip(5, frames=4, size=(64, 48), objects=3, effects=["light", "none"])
    assert mixed.effects == ["light", "none", "light"]
    np.testing.assert_array_equal(mixed.background, plain.background)
    for k in range(3):  # the new kinds draw from streams of their own
        np.testing.assert_array_equal(mixed.object_alpha[k], plain.object_alpha[k])
    assert mixed.effect[1].max() == 0.0
    assert synth.make_clip(5, frames=4, size=(64, 48), shadow=False).effects == ["none"]
    with pytest.raises(OmnimatteError, match="effects"):
        synth.make_clip(5, frames=2, size=(32, 32), effects=["glow"])
    with pytest.raises(OmnimatteError, match="shadow"):
        synth.make_clip(5, frames=2, size=(32, 32), shadow=False, effects=["shadow"])
    with pytest.raises(OmnimatteError, match="plate"):
        synth.make_clip(5, frames=2, size=(32, 32), plate="blurry")


def test_removal_plate_is_a_slightly_wrong_deterministic_plate():
    clip = synth.make_clip(2, frames=6, size=(96, 64), plate="removal")
    exact = synth.make_clip(2, frames=6, size=(96, 64))
    np.testing.assert_array_equal(clip.video, exact.video)  # the clip itself is unchanged
    plate, bg = clip.removal_plate.astype(np.float64), clip.background.astype(np.float64)
    assert clip.removal_plate.shape == clip.background.shape and clip.plate == "removal"
    assert 1.0 <= np.abs(plate - bg).mean() <= 4.0  # in 1/255 units
    recipe = synth.removal_recipe(2, (96, 64), 6)
    assert np.all((recipe.gain >= 0.97) & (recipe.gain <= 1.03)) and np.ptp(recipe.gain) > 0.005
    np.testing.assert_allclose(plate.mean(axis=(0, 1, 2)) / bg.mean(axis=(0, 1, 2)), recipe.gain, atol=2e-3)
    residual = plate - bg * recipe.gain
    assert 1.2 < residual.std() < 2.0  # noise of sigma 1.5/255
    assert abs(np.corrcoef(residual[0].ravel(), residual[1].ravel())[0, 1]) < 0.1  # fresh each frame
    np.testing.assert_array_equal(synth.make_clip(2, frames=6, size=(96, 64), plate="removal").removal_plate,
                                  clip.removal_plate)
    other = synth.removal_plate(clip.background, 3)
    assert np.abs(other.astype(int) - clip.removal_plate).mean() > 0.5


def test_removal_drift_and_blur_scale_with_the_height():
    recipe = synth.removal_recipe(0, (832, 480), 81)
    assert recipe.blur == pytest.approx(0.6)
    assert np.abs(recipe.drift).max() == pytest.approx(0.5, abs=1e-3)
    small = synth.removal_recipe(0, (208, 120), 81)
    assert small.blur == pytest.approx(0.15) and np.abs(small.drift).max() == pytest.approx(0.125, abs=1e-3)
    # slow in time: keys 24 frames apart, eased between
    step = np.abs(np.diff(recipe.drift, axis=0)).max() / synth.REMOVAL_DRIFT_PERIOD
    assert step < 0.1
    plate = np.random.default_rng(0).random((2, 120, 208, 3)).astype(np.float32)
    out = synth.removal_plate(plate, 0).astype(np.float64) / 255
    assert 0.01 < np.abs(out - plate).mean() < 0.1  # blurred and drifted noise texture


def test_png_bytes_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (5, 7), dtype=np.uint8), rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
              rng.integers(0, 256, (5, 7, 4), dtype=np.uint8), rng.integers(0, 65536, (5, 7), dtype=np.uint16)]
    for i, f in enumerate(frames):
        (tmp_path / f"{i}.png").write_bytes(synth.png_bytes(f))
        with Image.open(tmp_path / f"{i}.png") as im:
            np.testing.assert_array_equal(np.asarray(im), f)


def test_cli_effects_and_plate(tmp_path, capsys):
    code, _, err = run_cli(["synth", "-o", str(tmp_path / "fx"), "--frames", "3", "--size", "64x48", "--objects", "3",
                            "--effect", "reflection", "--effect", "light", "--plate", "removal", "-q"], capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "fx" / "truth" / "meta.json").read_text())
    assert meta["effects"] == ["reflection", "light", "reflection"] and meta["plate"] == "removal"
    assert load_clip_folder(tmp_path / "fx").frames.shape == (3, 48, 64, 3)
    plate = sorted((tmp_path / "fx" / "truth" / "background_removal").iterdir())
    assert [p.name for p in plate] == ["00000.png", "00001.png", "00002.png"]
    clip = synth.make_clip(DEFAULT_SEED, frames=3, size=(64, 48), objects=3, effects=["reflection", "light"],
                           plate="removal")
    with Image.open(plate[2]) as im:
        np.testing.assert_array_equal(np.asarray(im), clip.removal_plate[2])
    code, _, err = run_cli(["synth", "-o", str(tmp_path / "plain"), "--frames", "2", "--size", "32x32", "-q"], capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "plain" / "truth" / "meta.json").read_text())
    assert meta["effects"] == ["shadow"] and meta["plate"] == "exact"
    assert not (tmp_path / "plain" / "truth" / "background_removal").exists()
    code, _, err = run_cli(["synth", "-o", str(tmp_path / "bad"), "--no-shadow", "--effect", "shadow"], capsys)
    assert code == 2 and not (tmp_path / "bad").exists()
