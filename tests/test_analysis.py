"""Block-wise effect analysis: the chunked attention probe against a dense
softmax, a constructed DiT whose block j attends to the effect region, the
stage partition, the token grid, and `mlx-omnimatte analyze` end to end on
the tiny random bundle with synthetic clips (bad input: one line, exit 2)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from PIL import Image

from mlx_omnimatte import synth
from mlx_omnimatte.analysis.scores import block_scores, key_mass, partition, probe_attn_fn
from mlx_omnimatte.io.writers import write_png_frames
from mlx_omnimatte.models.base import sdpa
from mlx_omnimatte.models.wan import transformer
from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.io.grid import plan_grid
from mlx_omnimatte.analysis.run import EFFECT_THRESHOLD, effect_region, find_clips, token_coverage
from helpers import run_cli
from tiny_models import DIT, write_fun_folder



def dense_key_mass(q, k, rows):
    """The reference: full softmax(q k^T / sqrt(d)) in float64, rows summed."""
    q, k = np.array(q, np.float64), np.array(k, np.float64)
    s = q[:, :, rows] @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).sum(axis=(0, 1, 2))


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_key_mass_matches_dense_softmax(chunk):
    q, k = (2.0 * mx.random.normal((1, 3, 50, 16), key=mx.random.key(s)) for s in (0, 1))
    rows = np.array([0, 3, 4, 17, 18, 30, 41, 49])
    got = np.array(key_mass(q, k, mx.array(rows.astype(np.uint32)), chunk))
    want = dense_key_mass(q, k, rows)
    assert np.abs(got - want).max() < 1e-6
    assert abs(got.sum() - 3 * rows.size) < 1e-4  # each head's row is a distribution


def test_probe_returns_the_normal_attention():
    q, k, v = (mx.random.normal((1, 2, 40, 32), key=mx.random.key(s)) for s in (2, 3, 4))
    sink = []
    out = probe_attn_fn(mx.array(np.arange(5, dtype=np.uint32)), sink)(q, k, v)
    assert np.array_equal(np.array(out), np.array(sdpa(q, k, v)))
    assert len(sink) == 1 and sink[0].shape == (40,)


# --------------------------------------------------------------------------- a constructed DiT

GRID = (3, 4, 6)  # token grid (f, h, w) of the constructed model's input


class ForcedAttention(nn.Module):
    """A block's self-attention whose queries all point at the effect tokens'
    keys: a large shared direction is added to every query and to the keys
    of the effect tokens, after the block's own q/k norm and RoPE."""

    def __init__(self, inner, effect_tokens: np.ndarray, strength: float = 20.0):
        super().__init__()
        self.inner = inner
        d = inner.q.weight.shape[0] // inner.num_heads
        u = np.zeros(d, np.float32)
        u[0] = strength
        self._q_shift = mx.array(u)
        self._k_shift = mx.array(effect_tokens.reshape(-1, 1).astype(np.float32) * u[None])

    def __call__(self, x, rope, attn_fn=None):
        def forced(q, k, v):
            return attn_fn(q + self._q_shift, k + self._k_shift, v)

        return self.inner(x, rope, forced)


def constructed_model(forced_block: int, effect_tokens: np.ndarray, layers: int = 6):
    mx.random.seed(5)
    model = transformer.Model(transformer.Config(dim=64, ffn_dim=128, num_heads=2, num_layers=layers, in_dim=36,
                                                 text_dim=32, text_len=16))
    block = model.blocks[forced_block]
    block.self_attn = ForcedAttention(block.self_attn, effect_tokens)
    return model


def token_regions():
    objects = np.zeros(GRID, bool)
    objects[:, 1:3, 1:3] = True
    effect = np.zeros(GRID, np.float32)
    effect[:, 3, 1:4] = 1.0  # the row under the object
    effect[:, 1, 3] = 0.5  # a token half inside
    return objects, effect


def run_constructed(j: int, budget_bytes=None, layers: int = 6):
    objects, effect = token_regions()
    model = constructed_model(j, effect == 1.0, layers)  # the tokens wholly inside M^e
    x = mx.random.normal((1, GRID[0], 2 * GRID[1], 2 * GRID[2], 36), key=mx.random.key(6))
    ctx = model.embed_context(mx.random.normal((1, 16, 32), key=mx.random.key(7)))
    return block_scores(model, x, 800.0, ctx, objects, effect, budget_bytes)


@pytest.mark.parametrize("j", [1, 3, 4])
def test_forced_block_peaks_and_sets_k(j):
    scores = run_constructed(j)
    c = scores.contribution
    assert abs(c.sum() - 1) < 1e-9
    assert int(np.argmax(c)) == j
    others = np.delete(c, j)
    assert c[j] > 3 * others.max(), c
    # the forced block puts (nearly) all of the object's attention on the effect tokens
    assert scores.effect_mass[j] > 0.9
    stages = partition(c)
    assert stages.perception == range(j, j + 1)
    assert stages.k == 6 - j - 1 and stages.suppression == range(j + 1, 6)
    # every block's map is a distribution over the tokens
    assert np.allclose(scores.maps.sum(axis=(1, 2, 3)), 1.0, atol=1e-5)
    assert scores.maps.shape == (6, *GRID) and (scores.seconds > 0).all() and (scores.peak_bytes > 0).all()


def test_chunked_and_unchunked_scores_agree():
    one_row = run_constructed(2, budget_bytes=1)  # chunks of a single query row
    whole = run_constructed(2, budget_bytes=1 << 34)
    assert np.abs(one_row.maps - whole.maps).max() < 1e-6
    assert np.abs(one_row.contribution - whole.contribution).max() < 1e-6


# --------------------------------------------------------------------------- stages and the token grid


def test_partition_at_troughs():
    curve = [0.06, 0.03, 0.02, 0.08, 0.2, 0.22, 0.1, 0.01, 0.012, 0.05, 0.04, 0.03]
    s = partition(curve)
    # troughs: block 2 before the peak (5), block 7 after it (8 is within tolerance but later)
    assert (s.context, s.perception, s.suppression) == (range(0, 3), range(3, 7), range(7, 12))
    assert s.k == 5 and s.of(5) == "perception" and s.of(0) == "context" and s.of(11) == "suppression"
    first = partition([0.5, 0.1, 0.05, 0.06])
    assert (len(first.context), first.perception, first.k) == (0, range(0, 2), 2)
    last = partition([0.05, 0.1, 0.5])
    assert last.k == 0 and last.perception == range(1, 3) and last.context == range(0, 1)


def test_token_coverage_groups_frames_and_cells():
    m = np.zeros((9, 32, 48), bool)
    m[0, :16, :16] = True  # frame 0 alone is latent frame 0
    m[1:3, :16, 16:32] = True  # two of latent frame 1's four frames
    m[5:9, 16:24, 32:48] = True  # half of a cell in all of latent frame 2
    cov = token_coverage(m, (1, 2, 2))
    assert cov.shape == (3, 2, 3)
    want = np.zeros((3, 2, 3), np.float32)
    want[0, 0, 0], want[1, 0, 1], want[2, 1, 2] = 1.0, 0.5, 0.5
    assert np.array_equal(cov, want)


def test_effect_region_is_the_effect_outside_the_dilated_object():
    plan = plan_grid(32, 32, 5, size=(32, 32), min_frames=1)
    effect = np.zeros((5, 32, 32), np.float32)
    effect[:, 20:24, 4:28] = 0.3  # a shadow band, 30% opaque
    effect[:, 10:12, 4:8] = 0.5 * EFFECT_THRESHOLD  # too faint to count
    obj = np.zeros((5, 32, 32), bool)
    obj[:, 14:22, 12:20] = True  # the dilated object covers part of the band
    region = effect_region(effect, plan, obj)
    want = (effect > EFFECT_THRESHOLD) & ~obj
    assert np.array_equal(region, want) and region.sum() == 5 * (4 * 24 - 2 * 8)


def test_find_clips_natural_order_and_limit(tmp_path):
    for name in ("clip10", "clip2", "clip1"):
        (tmp_path / name / "truth" / "effect_00").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    assert [p.name for p in find_clips(tmp_path)] == ["clip1", "clip2", "clip10"]
    assert [p.name for p in find_clips(tmp_path, 2)] == ["clip1", "clip2"]
    with pytest.raises(OmnimatteError, match="--clips 0"):
        find_clips(tmp_path, 0)


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    folder = write_fun_folder(root)
    out = root / "bundle"
    assert run_main(["convert", folder, "--transformer", root / "casper.safetensors", "-o", out])[0] == 0
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth.write_dataset(tmp_path_factory.mktemp("synth") / "data", 2, seed=3, frames=5, size=(128, 96))


def run_main(args, capsys=None):
    """(exit status, the captured output) of the CLI (`helpers.run_cli`)."""
    code, _, _ = run_cli(args)
    return code, capsys.readouterr() if capsys is not None else None


ARGS = ["--size", "128x96", "--quiet", "--dtype", "float32"]  # token grid 2 x 6 x 8


def test_analyze_end_to_end(bundle, data, tmp_path, capsys):
    out = tmp_path / "report"
    code, printed = run_main(["analyze", "--bundle", bundle, "--data", data, "-o", out, "--t", "0.7", *ARGS,
                              "--cache-dir", tmp_path / "prompts"], capsys)
    assert code == 0, printed.err
    blocks = DIT["num_layers"]
    rows = list(csv.reader((out / "scores.csv").open()))
    assert rows[0] == ["block", "C_00000", "C_00001", "mean", "std"]
    table = np.array([[float(v) for v in r] for r in rows[1:]])
    assert table.shape == (blocks, 5) and list(table[:, 0]) == list(range(blocks))
    assert np.allclose(table[:, 1:3].sum(axis=0), 1.0, atol=1e-6)  # C_b normalized over blocks per clip
    assert np.allclose(table[:, 3], table[:, 1:3].mean(axis=1), atol=1e-7)
    assert np.allclose(table[:, 4], table[:, 1:3].std(axis=1), atol=1e-7)
    summary = json.loads((out / "summary.json").read_text())
    stages = partition(table[:, 3])  # the report's stages are the mean curve's
    assert summary["k"] == stages.k and summary["stages"] == json.loads(json.dumps(stages.as_dict()))
    assert summary["t"] == 0.7 and summary["clips"] == ["00000", "00001"]
    assert len(summary["seconds_per_block"]) == blocks and min(summary["peak_bytes_per_block"]) > 0
    png = Image.open(out / "contribution.png")
    assert png.size == (900, 420) and np.asarray(png).std() > 10
    maps = sorted(p.name for p in (out / "maps").iterdir())
    assert maps and all(p.startswith(("00000_", "00001_")) for p in maps)
    tile = np.asarray(Image.open(out / "maps" / maps[0]))
    # both latent frames side by side, enlarged 3x to reach 640 px, under a caption
    assert tile.shape == (38 + 3 * 96, 3 * 2 * 128, 3)
    assert (out / "summary.txt").read_text().strip() in printed.out and "wrote" in printed.out


def assert_refused(args, capsys, match: str, out: Path):
    code, printed = run_main(args, capsys)
    lines = [line for line in printed.err.strip().splitlines() if line]
    assert code == 2, printed.err
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], lines
    assert not out.exists()


@pytest.mark.parametrize("t", ["1.5", "-0.1"])
def test_t_outside_unit_interval(bundle, data, tmp_path, capsys, t):
    out = tmp_path / "r"
    assert_refused(["analyze", "--bundle", bundle, "--data", data, "-o", out, "--t", t, *ARGS], capsys,
                   "must be in [0, 1]", out)


def test_clip_without_effect_mask(bundle, data, tmp_path, capsys):
    clip = tmp_path / "data" / "00000"
    shutil.copytree(data / "00000", clip)
    shutil.rmtree(clip / "truth" / "effect_00")
    out = tmp_path / "r"
    assert_refused(["analyze", "--bundle", bundle, "--data", clip.parent, "-o", out, *ARGS], capsys,
                   "no truth/effect_00/", out)


def test_object_empty_on_the_latent_grid(bundle, data, tmp_path, capsys):
    clip = tmp_path / "data" / "00000"
    shutil.copytree(data / "00000", clip)
    mask = np.zeros((5, 96, 128), np.uint8)
    mask[:, 40:41, 60:61] = 255  # one pixel: dilated 11 x 11, under half of any 16 x 16 token cell
    shutil.rmtree(clip / "mask_00")
    write_png_frames(clip / "mask_00", mask)
    out = tmp_path / "r"
    assert_refused(["analyze", "--bundle", bundle, "--data", clip, "-o", out, *ARGS], capsys,
                   "covers no token of the latent grid", out)


def _without_effect(src: Path, dst: Path) -> None:
    """A copy of clip `src` whose effect alpha is empty: nothing to measure."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "truth" / "effect_00")
    write_png_frames(dst / "truth" / "effect_00", np.zeros((5, 96, 128), np.uint8))


def test_a_clip_with_nothing_to_measure_is_skipped_with_one_line(bundle, data, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    shutil.copytree(data / "00000", mixed / "00000")
    _without_effect(data / "00001", mixed / "00001")
    out = tmp_path / "report"
    code, printed = run_main(["analyze", "--bundle", bundle, "--data", mixed, "-o", out, *ARGS,
                              "--cache-dir", tmp_path / "prompts"], capsys)
    assert code == 0, printed.err
    assert printed.err.strip().splitlines() == [
        f"{mixed / '00001'}: the effect in truth/effect_00 lies entirely inside the dilated object mask "
        "(or is empty): nothing to measure; skipped"]
    assert json.loads((out / "summary.json").read_text())["clips"] == ["00000"]
    rows = list(csv.reader((out / "scores.csv").open()))
    assert rows[0] == ["block", "C_00000", "mean", "std"]


def test_a_data_set_with_nothing_to_measure_is_refused(bundle, data, tmp_path, capsys):
    empty = tmp_path / "empty"
    _without_effect(data / "00000", empty / "00000")
    out = tmp_path / "r"
    assert_refused(["analyze", "--bundle", bundle, "--data", empty / "00000", "-o", out, *ARGS], capsys,
                   "lies entirely inside the dilated object mask (or is empty): nothing to measure", out)
    _without_effect(data / "00001", empty / "00001")
    assert_refused(["analyze", "--bundle", bundle, "--data", empty, "-o", out, *ARGS], capsys,
                   "no clip has an effect outside its dilated object mask", out)


def test_vae_encode_counts_frames(bundle, data):
    seen = []

    def report(name, done, total, detail=""):
        if name == "vae encode":
            seen.append((done, total))

    from mlx_omnimatte.bundle import open_bundle
    from mlx_omnimatte.analysis.run import run_analysis
    from mlx_omnimatte.pipelines.settings import Settings

    run_analysis(data, open_bundle(bundle), 0.7, None, Settings(size="128x96", dtype="float32"), report)
    # two clips, each its video and its plate at 5 frames (4n+1)
    assert seen == [(0, 20), (10, 20), (20, 20)]
