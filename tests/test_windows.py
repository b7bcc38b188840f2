"""Temporal windows: coverage, weights, and blending against the reference loop."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.pipelines.windows import blend_velocity, make_windows, window_spans

RNG = np.random.default_rng(0)


def _latent(t, seed=0, c=3):
    return mx.array(np.random.default_rng(seed).standard_normal((1, t, 2, 3, c)).astype(np.float32))


def _maxdiff(a, b):
    return float(mx.abs(mx.array(a) - mx.array(b)).max())


@pytest.mark.parametrize("window,overlap", [(21, 4), (5, 2), (7, 0), (4, 3)])
def test_coverage_and_weights_lengths_1_to_60(window, overlap):
    for length in range(1, 61):
        wins = make_windows(length, window, overlap)
        assert wins[0].start == 0 and wins[-1].end == length
        count = np.zeros(length, int)
        total = np.zeros(length)
        for a, b in zip(wins, wins[1:]):
            assert b.start > a.start and b.end > a.end
            assert a.end - b.start >= overlap  # neighbours share at least `overlap` frames
        for w in wins:
            assert w.end - w.start == min(window, length)
            assert w.weight.shape == (w.end - w.start,)
            assert np.all(w.weight > 0)
            count[w.start : w.end] += 1
            total[w.start : w.end] += w.weight
        assert np.all(count >= 1), length
        np.testing.assert_allclose(total, 1.0, atol=1e-6)
        # A frame seen by one window only gets weight exactly 1.
        for w in wins:
            single = count[w.start : w.end] == 1
            np.testing.assert_array_equal(w.weight[single], 1.0)
        if length <= window:
            assert len(wins) == 1


def test_reference_spans_and_ramps():
    # Windows start 17 latent frames apart (21 - 4), the tail window slides back.
    assert window_spans(21) == [(0, 21)]
    assert window_spans(38) == [(0, 21), (17, 38)]
    assert window_spans(30) == [(0, 21), (9, 30)]
    assert window_spans(50) == [(0, 21), (17, 38), (29, 50)]
    # 197 pixel frames -> 50 latent frames: the reference's longest clip.
    a, b = make_windows(38)
    np.testing.assert_allclose(a.weight[-4:], [0.8, 0.6, 0.4, 0.2], atol=1e-7)
    np.testing.assert_allclose(b.weight[:4], [0.2, 0.4, 0.6, 0.8], atol=1e-7)
    np.testing.assert_array_equal(a.weight[:17], 1.0)
    np.testing.assert_array_equal(b.weight[4:], 1.0)


def test_bad_arguments():
    with pytest.raises(OmnimatteError):
        window_spans(0)
    with pytest.raises(OmnimatteError):
        window_spans(10, window=4, overlap=4)
    with pytest.raises(OmnimatteError):
        window_spans(10, window=0, overlap=0)
    with pytest.raises(OmnimatteError):
        blend_velocity(lambda x, t, s: x, [_latent(5), _latent(6)], 0.5, window=3, overlap=1)


def test_constant_velocity_unchanged_by_windows():
    x = _latent(47)
    const = mx.array(RNG.standard_normal((1, 1, 2, 3, 3)).astype(np.float32))

    def fn(xw, t, span):
        return mx.broadcast_to(const, xw.shape)

    full = fn(x, 0.0, (0, 47))
    for window, overlap in [(21, 4), (9, 3), (5, 0)]:
        out = blend_velocity(fn, x, 500.0, window=window, overlap=overlap)
        assert out.shape == x.shape
        assert _maxdiff(out, full) <= 1e-6


def test_per_frame_model_unchanged_by_windows_and_conditioning_follows_span():
    """A model whose output per frame depends only on that frame (and its own
    conditioning frame, sliced with the span) gives the same velocity."""
    length = 60
    x = _latent(length, seed=1)
    cond = _latent(length, seed=2)
    mix = mx.array(RNG.standard_normal((3, 3)).astype(np.float32))
    calls = []

    def fn(xw, t, span):
        s, e = span
        calls.append(e - s)
        return mx.tanh(xw @ mix) * (t / 1000.0) + cond[:, s:e] * xw

    full = fn(x, 700.0, (0, length))
    calls.clear()
    out = blend_velocity(fn, x, 700.0)
    assert calls == [21, 21, 21, 21]  # (0,21) (17,38) (34,55) (39,60)
    assert _maxdiff(out, full) <= 1e-6


def test_list_of_latents_blended_together():
    x = [_latent(33, seed=3), _latent(33, seed=4, c=2)]

    def fn(xw, t, span):
        bg, al = xw
        return [bg * 2.0 - 1.0, mx.sin(al)]

    full = fn(x, 1.0, (0, 33))
    out = blend_velocity(fn, x, 1.0, window=10, overlap=3)
    assert isinstance(out, list) and len(out) == 2
    assert _maxdiff(out[0], full[0]) <= 1e-6 and _maxdiff(out[1], full[1]) <= 1e-6


def test_short_latent_is_one_call_on_x_itself():
    x = _latent(21)
    seen = []

    def fn(xw, t, span):
        seen.append((xw, span))
        return xw * 3.0

    out = blend_velocity(fn, x, 10.0)
    assert len(seen) == 1 and seen[0][0] is x and seen[0][1] == (0, 21)
    assert _maxdiff(out, x * 3.0) == 0.0


def _reference_step(x, v_fn, dt, window, overlap):
    """The reference pipeline's loop (numpy): Euler-step each window, blend the
    stepped latents with raw ramp weights, divide by the weight canvas."""
    length = x.shape[1]
    canvas = np.zeros_like(x)
    weights = np.zeros((1, length, 1, 1, 1), np.float32)
    beg = 0
    while beg < length:
        end = min(beg + window, length)
        if end - beg < window:
            beg = max(0, end - window)
        xi = x[:, beg:end]
        stepped = xi + dt * v_fn(xi)
        w = np.ones((1, end - beg, 1, 1, 1), np.float32)
        if beg > 0 and overlap > 0:
            w[:, :overlap] = np.linspace(0.0, 1.0, overlap + 2)[1:-1].reshape(1, -1, 1, 1, 1)
        if end < length and overlap > 0:
            w[:, -overlap:] = np.linspace(1.0, 0.0, overlap + 2)[1:-1].reshape(1, -1, 1, 1, 1)
        canvas[:, beg:end] += stepped * w
        weights[:, beg:end] += w
        beg = end - overlap
        if end >= length:
            break
    return canvas / weights


@pytest.mark.parametrize("length", [22, 30, 38, 50, 60])
def test_matches_reference_stepped_latent_blend(length):
    """Window-dependent model (uses the window mean, so windows do matter):
    Euler with blended velocities equals the reference's blended Euler steps."""
    x = np.array(_latent(length, seed=5))
    dt = -0.0731

    def v_np(xw):
        return np.tanh(xw) + xw.mean(axis=1, keepdims=True)

    ref = _reference_step(x, v_np, dt, 21, 4)
    v = blend_velocity(lambda xw, t, s: mx.tanh(xw) + xw.mean(axis=1, keepdims=True), mx.array(x), 0.0)
    ours = mx.array(x) + dt * v
    assert _maxdiff(ours, ref) <= 2e-6
    # and windows really change the result for this model
    full = mx.array(x) + dt * (mx.tanh(mx.array(x)) + mx.array(x).mean(axis=1, keepdims=True))
    assert _maxdiff(ours, full) > 1e-4
