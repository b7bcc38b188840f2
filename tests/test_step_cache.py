"""DiT step caches (TeaCache, MagCache) without torch: the setting and its
refusals, the decision rules against hand-worked and published schedules, the
DiT's block-stack hook, and `remove` / `decompose` / `calibrate-cache` on a
tiny bundle, with the computed and skipped forwards counted exactly.

The tiny bundle's time MLP keeps only the lowest quarter of the sinusoid's
frequencies, so e0 moves with t as slowly as a trained model's does (a random
one changes 70-120% a step, beyond the published TeaCache fit: it would never
skip). Both rules read nothing of a step's content, so the counts do not
depend on the seed; they are asserted for the default one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from helpers import assert_refused, run_cli
from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.io.inputs import resolve_clip
from mlx_omnimatte.io.writers import write_png_frames, write_video
from mlx_omnimatte.models.wan import transformer as wan
from mlx_omnimatte.pipelines import omnimatte, stages
from mlx_omnimatte.pipelines.api import Request, execute, prepare
from mlx_omnimatte.pipelines.settings import Mode, Settings, settings_from
from mlx_omnimatte.pipelines.windows import blend_velocity, make_windows
from mlx_omnimatte.sampling import make_sampler, sample
from mlx_omnimatte.progress import Progress
from mlx_omnimatte.step_cache import (CALIBRATED, CALIBRATION_FILE, MAGCACHE_RATIOS, PUBLISHED, TEACACHE_RET_STEPS,
                                      CacheSpec, MagCache, StepCache, TeaCache, attached, current_calibration,
                                      expected_forwards, make_policy, nearest_ratios, parse_cache, read_calibration,
                                      schedule, teacache_published)
from tiny_models import tiny_bundle

RUN = dict(size="64x32", min_frames=9, window=2, overlap=1, steps=20)  # 3 latent frames: windows (0, 2), (1, 3)
COUNT = re.compile(r"computed (\d+)/(\d+) forwards \(([^,]+), ([^)]+)\)")


def bits(flags) -> str:
    return "".join("1" if f else "0" for f in flags)


# --------------------------------------------------------------------------- the setting


@pytest.mark.parametrize("text,kind,threshold", [
    (None, "none", 0.0), ("none", "none", 0.0), ("teacache", "teacache", 0.05), ("MagCache", "magcache", 0.12),
    ("teacache:0.1", "teacache", 0.1), ("magcache:0.24", "magcache", 0.24), (" teacache:1e-2 ", "teacache", 0.01),
])
def test_parse_cache(text, kind, threshold):
    spec = parse_cache(text)
    assert (spec.kind, spec.threshold) == (kind, threshold)
    assert parse_cache(str(spec)) == spec


@pytest.mark.parametrize("text,match", [
    ("foo", "unknown"), ("teacache:-1", "positive number"), ("teacache:nan", "positive number"),
    ("magcache:inf", "positive number"), ("teacache:0", "positive number"), ("teacache:", "positive number"),
    ("teacache:x", "positive number"), ("none:1", "unknown"),
])
def test_parse_cache_refuses(text, match):
    with pytest.raises(OmnimatteError, match=match) as e:
        parse_cache(text)
    assert "\n" not in str(e.value) and f"--cache {text}" in str(e.value)


def test_fast_preset_fills_the_defaults_only():
    s = Settings(fast=True)
    assert (s.sampler, s.steps, s.cache) == ("unipc", 25, "teacache:0.05")
    s = Settings(fast=True, steps=30, cache="magcache")
    assert (s.sampler, s.steps, s.cache) == ("unipc", 30, "magcache:0.12")
    s = Settings()
    assert (s.sampler, s.steps, s.cache) == ("euler", 50, "none")  # the reference's, unchanged
    with pytest.raises(OmnimatteError, match="--cache teacache:-1"):
        Settings(cache="teacache:-1")


# --------------------------------------------------------------------------- decision rules


def test_magcache_published_schedules():
    """K 2, retention 0.2, threshold 0.12 on the published 1.3B ratios: 25 of
    50 forwards (the README's 189 s -> 87 s), 12 of 25, 10 of 20; ratios
    resampled by MagCache's nearest index."""
    assert nearest_ratios(MAGCACHE_RATIOS, 50) == MAGCACHE_RATIOS
    idx = [0, 3, 5, 8, 10, 13, 15, 18, 21, 23, 26, 28, 31, 34, 36, 39, 41, 44, 46, 49]
    assert nearest_ratios(MAGCACHE_RATIOS, 20) == tuple(MAGCACHE_RATIOS[i] for i in idx)
    expected = {50: "11111111110010010010010010010010010010010010101011",
                25: "1111100100100100100100101", 20: "11110010010010010011"}
    for steps, pattern in expected.items():
        policy, source = make_policy(parse_cache("magcache"), steps)
        assert source == PUBLISHED
        assert bits(schedule(policy, [None] * steps)) == pattern
    looser = MagCache(0.24, nearest_ratios(MAGCACHE_RATIOS, 50), max_skips=6)
    assert sum(schedule(looser, [None] * 50)) == 18  # E024K6R02


def test_teacache_rule_by_hand():
    """Identity polynomial, threshold 0.25, 5 retention steps: the sum of the
    changes since the last computed step decides; |poly| is what is added."""
    changes = [None] + [0.1] * 8 + [0.3, 0.1]
    assert bits(schedule(TeaCache(0.25, (0, 0, 0, 1, 0)), changes)) == "11111001010"
    # a fit that is negative there counts as its magnitude (0.1 a step)
    assert bits(schedule(TeaCache(0.25, (0, 0, 0, 0, -0.1)), [None] + [0.5] * 10)) == "11111001001"


def fake_stack(tokens):
    return tokens * 2.0 + 1.0


def test_step_cache_states_per_window_and_expert():
    """Each window keeps its own residual; a residual of another expert is
    never reused: the step after the switch is computed."""
    policy = MagCache(0.12, nearest_ratios(MAGCACHE_RATIOS, 20))
    cache = StepCache(policy, 20, CacheSpec("magcache", 0.12))
    e6 = mx.zeros((1, 6, 4))
    seen = {}
    for i in range(20):
        for span, shift in (((0, 2), 0.0), ((1, 3), 10.0)):
            cache.at(i, span)
            tokens = mx.full((1, 3, 4), float(i) + shift)
            out = cache(tokens, None, e6, fake_stack, tag="effect" if i < 11 else "quality")
            seen.setdefault(span, []).append(out)
    per_window = {span: bits(c for _, s, c in cache.decisions if s == span) for span in seen}
    # the published 20-step pattern (11110010010010010011) up to step 10; step 11,
    # a skip there, is computed at the switch, and the rule restarts from it
    assert per_window == {(0, 2): "11110010010100100101", (1, 3): "11110010010100100101"}
    assert (cache.computed, cache.skipped) == (20, 20)
    # step 5 is skipped: its tokens plus the window's own residual of step 3 (tokens + 1)
    assert float(seen[(0, 2)][5][0, 0, 0]) == 5.0 + (3.0 + 1.0)
    assert float(seen[(1, 3)][5][0, 0, 0]) == 15.0 + (13.0 + 1.0)
    assert cache.detail() == f"computed 20/40 forwards (magcache:0.12, {PUBLISHED})"


# --------------------------------------------------------------------------- the DiT's hook


@pytest.fixture(scope="module")
def small_dit():
    mx.random.seed(0)
    dit = wan.Model(wan.Config(dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=36, text_dim=32,
                               image_dim=None, text_len=16))
    mx.eval(dit.parameters())
    return dit


def composed(dit, x, t, ctx, residual=None):
    """The forward as the transformer's docstring composes it, written out."""
    tokens, grid = dit.patchify(x)
    temb, e6 = dit.embed_time(t)
    rope = dit.rope(grid)
    if residual is None:
        for block in dit.blocks:
            tokens = block(tokens, e6, ctx, rope, None)
    else:
        tokens = tokens + residual
    return dit.unpatchify(dit.head(tokens, temb), grid), tokens


def test_forward_hook(small_dit):
    """Without a cache the forward is the plain composition, bit for bit; a
    computed step is too; a skipped step is the head of input + kept residual."""
    rng = np.random.default_rng(1)
    x = mx.array(rng.standard_normal((1, 2, 4, 6, 36)).astype(np.float32))
    x2 = x + 0.01
    ctx = small_dit.embed_context(mx.array(rng.standard_normal((1, 16, 32)).astype(np.float32)))
    t = mx.array([700.0])
    plain, after = composed(small_dit, x, t, ctx)
    assert np.array_equal(np.array(small_dit.forward(x, t, ctx)), np.array(plain))
    residual = after - small_dit.patchify(x)[0]
    cache = StepCache(TeaCache(1e9, ret_steps=1), 2, parse_cache("teacache:1e9"))  # skips all but step 0
    with attached(small_dit, cache):
        cache.at(0, (0, 2))
        assert np.array_equal(np.array(small_dit.forward(x, t, ctx)), np.array(plain))
        cache.at(1, (0, 2))
        skipped = small_dit.forward(x2, mx.array([680.0]), ctx)
    assert small_dit.step_cache is None  # detached on exit
    want, _ = composed(small_dit, x2, mx.array([680.0]), ctx, residual)
    assert np.abs(np.array(skipped) - np.array(want)).max() <= 1e-6
    assert [c for _, _, c in cache.decisions] == [True, False]


def test_denoise_without_cache_is_the_plain_loop(small_dit):
    """`denoise` with no cache is today's loop: the sampler over blended windows."""
    rng = np.random.default_rng(2)
    z = mx.array(rng.standard_normal((1, 3, 4, 6, 16)).astype(np.float32))
    y = mx.array(rng.standard_normal((1, 3, 4, 6, 20)).astype(np.float32))
    ctx = small_dit.embed_context(mx.array(rng.standard_normal((1, 16, 32)).astype(np.float32)))

    def window_velocity(x, t, span):
        s, e = span
        return small_dit.forward(mx.concatenate([x, y[:, s:e]], -1), mx.array([t]), ctx)

    sampler = make_sampler("unipc", 6)
    got = stages.denoise(window_velocity, z, sampler=sampler, window=2, overlap=1)
    windows = make_windows(3, 2, 1)
    want = sample(lambda x, t, i: blend_velocity(window_velocity, x, t, windows), z, sampler)
    assert np.array_equal(np.array(got), np.array(want))


# --------------------------------------------------------------------------- runs on the tiny bundle


def smooth_time_embedding(transformer_dir: Path, keep_from: int = 96) -> None:
    """Zero the time MLP's inputs of the sinusoid frequencies below `keep_from` (of 128)."""
    f = transformer_dir / "model.safetensors"
    weights = mx.load(str(f))
    w = np.array(weights["time_embedding.0.weight"].astype(mx.float32))
    half = w.shape[1] // 2
    w[:, :keep_from] = 0
    w[:, half:half + keep_from] = 0
    weights["time_embedding.0.weight"] = mx.array(w).astype(weights["time_embedding.0.weight"].dtype)
    mx.save_safetensors(str(f), weights)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    b = tiny_bundle(tmp_path_factory.mktemp("cache-models"))
    smooth_time_embedding(b / "transformer")
    return b


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache-clip")
    rng = np.random.default_rng(0)
    video = (rng.random((9, 32, 64, 3)) * 60 + 100).astype(np.uint8)
    mask = np.zeros((9, 32, 64), np.uint8)
    for t in range(9):
        mask[t, 8:16, 4 + t:20 + t] = 255
        video[t, 8:16, 4 + t:20 + t] = 220
    write_video(folder / "video.mp4", video, 16)
    write_png_frames(folder / "mask", mask)
    return folder / "video.mp4", folder / "mask"


def run(bundle, clip, mode=Mode.REMOVE, **settings):
    """(the outputs, {stage: its last progress detail}) of one run."""
    details = {}

    def report(name, done, total=None, detail=""):
        if detail:
            details[name] = detail

    video, mask = clip
    request = Request(mode, resolve_clip(video, [mask], "a wall", None), bundle, settings_from(**{**RUN, **settings}),
                      "all")
    return execute(prepare(request), report), details


def counts(detail: str) -> tuple:
    m = COUNT.search(detail)
    return int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)


@pytest.fixture(scope="module")
def removed(bundle, clip):
    """The background (uint8 frames) and the denoise detail per cache setting."""
    out = {}
    for cache in (None, "none", "teacache:0.05", "teacache:0.1", "magcache"):
        result, details = run(bundle, clip, cache=cache)
        out[cache] = (result["all"].full(), details.get("denoise all", ""))
    return out


def test_remove_none_is_todays_output(removed):
    assert np.array_equal(removed["none"][0], removed[None][0])
    assert removed["none"][1] == removed[None][1] == ""  # no cache, nothing counted


@pytest.mark.parametrize("cache,computed", [("teacache:0.05", 34), ("teacache:0.1", 26), ("magcache", 20)])
def test_remove_counts(removed, cache, computed):
    """Two windows x 20 Euler steps = 40 forwards without a cache."""
    background, detail = removed[cache]
    assert counts(detail) == (computed, 40, str(parse_cache(cache)), PUBLISHED)
    plain = removed["none"][0].astype(np.float32)
    diff = np.abs(background.astype(np.float32) - plain)
    assert 0 < diff.mean() < 16, diff.mean()  # another trajectory, the same picture


def test_decompose_counts_and_the_expert_switch(bundle, clip):
    """The dual-branch passes are cached too; at the Effect -> Quality switch
    (tau 0.5) each window computes once more than removal's 10 of 20."""
    _, details = run(bundle, clip, Mode.EXPERTS, cache="magcache")
    (name, detail), = [(k, v) for k, v in details.items() if k.startswith("denoise")]
    assert detail.startswith("quality expert; ")
    assert counts(detail) == (22, 40, "magcache:0.12", PUBLISHED)


def test_fast_preset_run(bundle, clip):
    _, details = run(bundle, clip, fast=True, steps=50)  # steps at its default: the preset's 25
    assert counts(details["denoise all"]) == (34, 50, "teacache:0.05", PUBLISHED)


def test_calibrate_cache(bundle, clip, tmp_path, capsys):
    """The bundle's own figures: stored, read back, used and named by a run."""
    own = tmp_path / "bundle"
    shutil.copytree(bundle, own)
    video, mask = clip
    code, out, err = run_cli(["calibrate-cache", video, "--mask", mask, "--bundle", own, "--steps", "20",
                              "--size", "64x32", "--quiet"], capsys)
    assert code == 0, err
    stored = json.loads((own / "transformer" / CALIBRATION_FILE).read_text())
    cal = read_calibration(own / "transformer")
    assert stored["steps"] == cal.steps == 20 and stored["sampler"] == "euler"
    assert len(cal.mag_ratios) == 20 and cal.mag_ratios[0] == 1.0 and len(cal.tea_points) == 19
    assert all(0.2 < r < 5 for r in cal.mag_ratios) and np.all(np.isfinite(cal.tea_coefficients))
    assert f"wrote {own / 'transformer' / CALIBRATION_FILE}" in out
    assert "--cache magcache:0.12: " in out and f"({CALIBRATED})" in out
    changes = [None] + [x for x, _ in cal.tea_points]
    for cache in ("magcache", "teacache:0.05"):
        spec = parse_cache(cache)
        expected = 2 * sum(schedule(make_policy(spec, 20, cal)[0], changes))
        _, details = run(own, clip, cache=cache)
        assert counts(details["denoise all"]) == (expected, 40, str(spec), CALIBRATED)
        assert f"--cache {spec}: {expected // 2}/20 forwards a window ({CALIBRATED})" in out


def test_broken_calibration_is_one_line(bundle, clip, tmp_path, capsys, monkeypatch):
    own = tmp_path / "bundle"
    shutil.copytree(bundle, own)
    (own / "transformer" / CALIBRATION_FILE).write_text("{not json")
    loads = []
    monkeypatch.setattr(stages, "load_model", lambda *a, **k: loads.append(a))
    video, mask = clip
    assert_refused(["remove", video, "--mask", mask, "--bundle", own, "-o", tmp_path / "o", "--cache", "magcache",
                    "--steps", "2", "--size", "64x32", "--quiet"], capsys, CALIBRATION_FILE, tmp_path / "o")
    assert loads == []


@pytest.mark.parametrize("command", ["remove", "decompose"])
@pytest.mark.parametrize("value", ["foo", "teacache:-1", "teacache:nan"])
def test_bad_cache_refused_before_any_weight(bundle, clip, tmp_path, capsys, monkeypatch, command, value):
    loads = []
    for module in (stages, omnimatte):  # every place a run loads weights from
        monkeypatch.setattr(module, "load_model", lambda *a, **k: loads.append(a))
    video, mask = clip
    out = tmp_path / "out"
    assert_refused([command, video, "--mask", mask, "--bundle", bundle, "-o", out, "--cache", value], capsys,
                   f"--cache {value}", out)
    assert loads == []


def test_cli_run_reports_its_counts(bundle, clip, tmp_path, capsys):
    """The denoise line of a run names the cache, its figures and the count
    (81 padded frames: one window of 21 latent frames)."""
    video, mask = clip
    code, _, err = run_cli(["remove", video, "--mask", mask, "--bundle", bundle, "-o", tmp_path / "o",
                            "--steps", "8", "--size", "64x32", "--cache", "magcache"], capsys)
    assert code == 0, err
    computed = sum(schedule(make_policy(parse_cache("magcache"), 8)[0], [None] * 8))
    assert computed == 4
    assert f"computed 4/8 forwards (magcache:0.12, {PUBLISHED})" in err


def test_calibration_needs_six_steps(bundle, clip, tmp_path, capsys, monkeypatch):
    loads = []
    monkeypatch.setattr(stages, "load_model", lambda *a, **k: loads.append(a))
    video, mask = clip
    assert_refused(["calibrate-cache", video, "--mask", mask, "--bundle", bundle, "--steps", "5", "--quiet"], capsys,
                   "at least 6")
    assert loads == [] and not (bundle / "transformer" / CALIBRATION_FILE).exists()


# --------------------------------------------------------------------------- the plan counts the cache


@pytest.mark.parametrize("threshold,steps,computed", [(0.05, 50, 33.0), (0.1, 50, 21.0), (0.25, 50, 12.0),
                                                      (0.075, 50, 27.0), (1.0, 50, 12.0), (0.05, 25, 25 - 17 * 20 / 45),
                                                      (0.05, 5, 5.0)])
def test_teacache_published_expectation(threshold, steps, computed):
    """mlx-examples' skip rates (34%, 58%, 76% of 50 steps), interpolated
    between thresholds, as a share of the steps after the 5 always computed."""
    assert teacache_published(threshold, steps) == pytest.approx(computed)
    assert teacache_published(threshold, steps) >= min(steps, TEACACHE_RET_STEPS)


def test_expected_forwards_sources():
    mag = expected_forwards(parse_cache("magcache"), 8)
    assert (mag.computed, mag.steps) == (4, 8) and PUBLISHED in mag.how
    assert mag.computed == sum(schedule(make_policy(parse_cache("magcache"), 8)[0], [None] * 8))
    tea = expected_forwards(parse_cache("teacache:0.05"), 50)
    assert tea.computed == pytest.approx(33.0) and "published" in tea.how
    assert "an expectation" in tea.line(parse_cache("teacache:0.05"))
    assert expected_forwards(CacheSpec(), 50).computed == 50


def test_dry_run_and_header_state_expected_forwards(bundle, clip, tmp_path, capsys):
    """The plan names the expected computed forwards and costs the denoise
    stage at them; the run's header says the same; the run's records (its
    stage summary) report the computed forwards of the trajectory."""
    video, mask = clip
    base = ["remove", video, "--mask", mask, "--bundle", bundle, "--steps", "8", "--size", "64x32"]
    line = (f"step cache magcache:0.12: expected 4 of 8 DiT forwards computed a window (MagCache's rule on the "
            f"{PUBLISHED}; an expectation)")
    code, out, err = run_cli(base + ["-o", tmp_path / "d", "--dry-run", "--cache", "magcache"], capsys)
    assert code == 0, err
    assert line in out
    cached = _denoise_cost(out)
    assert "8 DiT forwards, ~4 computed (step cache, expected)" in cached
    code, out, err = run_cli(base + ["-o", tmp_path / "d", "--dry-run"], capsys)
    assert "step cache" not in out and "~" not in _denoise_cost(out)
    # the stage's seconds at half the forwards (rounded to 0.1 s in the table)
    assert float(cached.split()[-1]) == pytest.approx(float(_denoise_cost(out).split()[-1]) / 2, abs=0.06)
    code, out, err = run_cli(base + ["-o", tmp_path / "r", "--cache", "magcache"], capsys)
    assert code == 0, err
    assert line in err
    summary = [ln for ln in err.splitlines() if ln.startswith("denoise all") and ln.rstrip().endswith(")")]
    assert summary and f"computed 4/8 forwards (magcache:0.12, {PUBLISHED})" in summary[-1]


def _denoise_cost(plan: str) -> str:
    (line,) = [ln for ln in plan.splitlines() if ln.startswith("denoise") and "DiT forwards" in ln]
    return line


def test_records_keep_the_computed_forwards(bundle, clip):
    video, mask = clip
    request = Request(Mode.REMOVE, resolve_clip(video, [mask], "a wall", None), bundle,
                      settings_from(**{**RUN, "cache": "magcache"}), "all")
    rec = Progress(enabled=False)
    execute(prepare(request), rec)
    (record,) = [r for r in rec.records if r.name == "denoise all"]
    assert counts(record.detail) == (20, 40, "magcache:0.12", PUBLISHED)
    assert [r.detail for r in rec.records if r.name.startswith("vae")] == ["", ""]


def _change_weights(transformer_dir: Path) -> None:
    """Other weights of the same shapes, as a conversion of another checkpoint gives."""
    f = transformer_dir / "model.safetensors"
    weights = {k: v * 1.5 for k, v in mx.load(str(f)).items()}
    mx.save_safetensors(str(f), weights)


def test_calibration_of_other_weights_is_ignored(bundle, clip, tmp_path, capsys):
    """A calibration is tied to the transformer's fingerprint: after a
    re-conversion (other weights) it is ignored with one line, and the run
    uses and names the published figures; an untied file (format 1) too."""
    own = tmp_path / "bundle"
    shutil.copytree(bundle, own)
    tdir = own / "transformer"
    ratios = [1.0] + [0.999] * 7  # skips as long as K allows: 3 of 8 computed
    stages.Calibration(ratios, [0.0, 0.0, 0.0, 1.0, 0.0], "euler", 8, 5.0).save(tdir)
    cal, note = current_calibration(tdir)
    assert note is None and cal.mag_ratios == ratios
    video, mask = clip
    base = ["remove", video, "--mask", mask, "--bundle", own, "--steps", "8", "--size", "64x32", "--cache",
            "magcache"]
    code, out, err = run_cli(base + ["-o", tmp_path / "a", "--dry-run"], capsys)
    own_count = sum(schedule(make_policy(parse_cache("magcache"), 8, cal)[0], [None] * 8))
    assert own_count != 4  # the figures differ from the published ones: the source shows in the count
    assert f"expected {own_count} of 8" in out and CALIBRATED in out and "other weights" not in err
    _change_weights(tdir)
    cal, note = current_calibration(tdir)
    assert cal is None and note.startswith(f"{tdir / CALIBRATION_FILE}: measured on other weights")
    code, out, err = run_cli(base + ["-o", tmp_path / "b"], capsys)
    assert code == 0, err
    assert [ln for ln in err.splitlines() if "other weights" in ln] == [note]
    assert f"computed 4/8 forwards (magcache:0.12, {PUBLISHED})" in err
    data = json.loads((tdir / CALIBRATION_FILE).read_text())
    data.pop("weights")
    data["format"] = 1
    (tdir / CALIBRATION_FILE).write_text(json.dumps(data))
    assert read_calibration(tdir) is not None and current_calibration(tdir)[0] is None


def test_plan_counts_the_residuals(bundle, clip):
    """The denoise stage's memory holds one float32 residual per window."""
    video, mask = clip

    def denoise_stage(cache):
        request = Request(Mode.REMOVE, resolve_clip(video, [mask], "a wall", None), bundle,
                          settings_from(**{**RUN, "cache": cache}), "all")
        plan = prepare(request).plan
        return plan, next(s for s in plan.stages if s.name == "denoise")

    plan, plain = denoise_stage(None)
    _, cached = denoise_stage("magcache")
    dim = json.loads((bundle / "transformer" / "config.json").read_text())["dim"]
    assert plan.windows == 2 and cached.activations - plain.activations == 2 * plan.tokens * dim * 4
