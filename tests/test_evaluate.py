import json

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from mlx_omnimatte.compositing import as_float
from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.io.inputs import load_clip_folder
from mlx_omnimatte.evaluation.evaluate import EFFECT_DILATE, evaluate
from mlx_omnimatte.pipelines.omnimatte import Layers
from mlx_omnimatte.io.outputs import write_decomposition
from mlx_omnimatte.io.truth import read_truth
from mlx_omnimatte.synth import make_clip, write_clip


def _layers(clip, damage=None):
    """Truth layers as a decompose output would hold them (plate background)."""
    out = {}
    for k in range(len(clip.alpha)):
        alpha = clip.alpha[k].copy()
        if damage is not None:
            alpha = damage(alpha, clip, k)
        out[f"{k:02d}"] = Layers(alpha, as_float(clip.foreground[k]), as_float(clip.background))
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    clip = make_clip(2, frames=4, size=(64, 48), objects=2, shadow_opacity=0.5)
    folder = write_clip(clip, root / "clip")
    return root, clip, folder


def test_truth_layers_score_as_perfect(synthetic):
    root, clip, folder = synthetic
    out = write_decomposition(root / "perfect", load_clip_folder(folder), _layers(clip), background="png",
                              preview=False)
    ev = evaluate(out, folder, folder / "truth")
    assert set(ev.rows) == {"00", "01", "all"}
    assert ev.rows["all"]["recompose_psnr"] > 45
    for name in ("00", "01"):
        r = ev.rows[name]
        assert r["object_mae"] < 3e-3 and r["effect_mae"] < 3e-3 and r["iou"] > 0.99
        assert r["background_psnr"] == 100.0 and r["effect_pixels"] > 20
    # one layer over the shared plate misses the other object: measured only in "all", and the table says so
    assert "recompose_psnr" not in ev.rows["00"] and "recompose_psnr" not in ev.rows["01"]
    table = ev.table().splitlines()
    assert table[1].startswith("00") and table[1].split()[1] == "-"
    assert any(line.startswith("  recompose_psnr: PSNR in dB") for line in table) and any("'all' recomposition" in line for line in table)


def test_a_missing_shadow_shows_in_the_effect_error(synthetic):
    root, clip, folder = synthetic

    def no_shadow(alpha, clip, k):
        return clip.object_alpha[k].copy()

    out = write_decomposition(root / "noshadow", load_clip_folder(folder), _layers(clip, no_shadow),
                              background="png", preview=False)
    r = evaluate(out, folder, folder / "truth").rows["00"]
    assert r["object_mae"] < 3e-3
    obj = clip.object_alpha[0] > 0.5
    from mlx_omnimatte.io.masks import dilate_mask

    region = (clip.effect[0] > 0.05) & ~dilate_mask(obj, 5)
    assert r["effect_mae"] == pytest.approx(float(clip.alpha[0][region].mean()), abs=5e-3)
    assert r["effect_mae"] > 0.1


def test_cli_table_json_and_errors(synthetic, tmp_path):
    from mlx_omnimatte.cli.evaluate import evaluate_cmd

    root, clip, folder = synthetic
    out = root / "perfect"
    if not out.exists():
        write_decomposition(out, load_clip_folder(folder), _layers(clip), background="png", preview=False)
    r = CliRunner().invoke(evaluate_cmd, [str(out), "--clip", str(folder), "--truth", str(folder / "truth"),
                                          "--json", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    assert "recompose_psnr" in r.output and "effect_mae" in r.output
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["00"]["iou"] > 0.99
    with pytest.raises(OmnimatteError, match="not a decompose output"):
        evaluate(tmp_path, folder)
    r = CliRunner().invoke(evaluate_cmd, [str(tmp_path / "nothing"), "--clip", str(folder)])
    assert r.exit_code != 0 and isinstance(r.exception, OmnimatteError)


def test_false_alpha_is_the_mean_alpha_where_the_layer_is_empty(synthetic):
    root, clip, folder = synthetic
    truth = read_truth(folder)
    square = np.ones((1, EFFECT_DILATE, EFFECT_DILATE), bool)  # per frame, as the evaluation dilates
    empty, margin = [], []
    for k in range(2):
        a = truth["alpha"][k]
        near = ndimage.binary_dilation(a > 0.01, structure=square)
        empty.append((a < 0.01) & ~near)
        margin.append(near & (a <= 0.01))

    def spurious(alpha, clip, k):
        alpha[empty[k]] = 0.4  # false alpha far from the object: counted
        alpha[margin[k]] = 1.0  # a halo within the margin: not counted
        return alpha

    out = write_decomposition(root / "spurious", load_clip_folder(folder), _layers(clip, spurious),
                              background="png", preview=False)
    ev = evaluate(out, folder, folder / "truth")
    for k, name in enumerate(("00", "01")):
        r = ev.rows[name]
        assert margin[k].sum() > 20 and r["false_pixels"] == int(empty[k].sum()) > 1000
        assert r["false_alpha"] == pytest.approx(102 / 255, abs=1e-6)  # 0.4 stored as 8-bit 102
    perfect = evaluate(write_decomposition(root / "exact", load_clip_folder(folder), _layers(clip),
                                           background="png", preview=False), folder, folder / "truth")
    assert perfect.rows["00"]["false_alpha"] == 0.0
    assert perfect.rows["00"]["false_pixels"] == ev.rows["00"]["false_pixels"]
    assert "false_alpha" not in perfect.rows["all"]
    assert "false_alpha" in perfect.table() and json.loads(perfect.to_json())["01"]["false_pixels"] > 0
