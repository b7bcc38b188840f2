"""Flow-matching samplers without torch: grids against closed forms, exactness
on straight flows, convergence order, API behaviour."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_omnimatte import sampling as S
from mlx_omnimatte.errors import OmnimatteError

ALL = [(n, g) for n in S.SAMPLERS for g in S.GRIDS]


def shift5(s):
    return 5.0 * s / (1.0 + 4.0 * s)


def test_shift_formula():
    s = np.linspace(0, 1, 11)
    np.testing.assert_allclose(S.shift_sigmas(s, 5.0), shift5(s))
    np.testing.assert_array_equal(S.shift_sigmas(s, 1.0), s)
    assert S.shift_sigmas(0.5, 5.0) == pytest.approx(5 / 6)


@pytest.mark.parametrize("steps", [1, 2, 12, 50])
def test_grids_closed_forms(steps):
    # UniPC (diffusers): linspace(1, 1/1000, N+1)[:-1], shifted, first nudged off 1.
    u = S.make_sampler("unipc", steps, 5.0, "diffusers")
    expect = shift5(np.linspace(1.0, 0.001, steps + 1)[:-1])
    expect[0] -= 1e-6
    np.testing.assert_allclose(u.sigmas[:-1], expect, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(u.timesteps, np.floor(expect * 1000))
    # Wan: linspace(0.999, 0, N+1)[:-1], shifted.
    w = S.make_sampler("unipc", steps, 5.0, "wan")
    np.testing.assert_allclose(w.sigmas[:-1], shift5(np.linspace(0.999, 0, steps + 1)[:-1]), atol=1e-7)
    # Euler (diffusers): N points from 1 to shift(0.001), / 1000, shifted again.
    e = S.make_sampler("euler", steps, 5.0, "diffusers")
    lo = shift5(0.001)
    expect = shift5(np.linspace(1.0, lo, steps)) if steps > 1 else np.array([1.0])
    np.testing.assert_allclose(e.sigmas[:-1], expect, rtol=0, atol=1e-7)
    np.testing.assert_allclose(e.timesteps, e.sigmas[:-1].astype(np.float64) * 1000, rtol=1e-7)
    if steps > 1:
        assert e.sigmas[-2] == pytest.approx(0.0244, abs=1e-4)  # the double shift of diffusers


@pytest.mark.parametrize("name,grid", ALL)
def test_grid_shape_monotone_final_zero(name, grid):
    for steps in (1, 3, 50):
        s = S.make_sampler(name, steps, 5.0, grid)
        assert s.sigmas.dtype == np.float32 and s.sigmas.shape == (steps + 1,)
        assert s.timesteps.shape == (steps,) and s.num_steps == steps
        assert s.sigmas[-1] == 0.0 and 0.99 < s.sigmas[0] <= 1.0
        assert np.all(np.diff(s.sigmas) < 0)
        assert np.all(np.diff(s.timesteps) < 0) if steps > 1 else True
        np.testing.assert_allclose(s.times, s.timesteps / 1000.0)
        assert np.all((s.times > 0) & (s.times <= 1))


def test_larger_shift_spends_more_steps_at_high_noise():
    lo = S.make_sampler("unipc", 20, 1.0).sigmas
    hi = S.make_sampler("unipc", 20, 5.0).sigmas
    assert np.all(hi[1:-1] > lo[1:-1])


def _straight_flow(shape=(2, 3, 4, 5, 6), seed=0):
    rng = np.random.default_rng(seed)
    x0 = mx.array(rng.standard_normal(shape).astype(np.float32))
    noise = mx.array(rng.standard_normal(shape).astype(np.float32))
    return x0, noise


@pytest.mark.parametrize("name,grid", ALL)
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_straight_flow_returns_x0(name, grid, steps):
    """x_s = (1-s) x0 + s noise, exact velocity noise - x0: both samplers land on x0."""
    x0, noise = _straight_flow()
    s = S.make_sampler(name, steps, 5.0, grid)
    s0 = float(s.sigmas[0])
    x = (1 - s0) * x0 + s0 * noise
    out = S.sample(lambda x, t, i: noise - x0, x, s)
    err = float(mx.abs(out - x0).max())
    # Euler sums fp32 dt's; UniPC's last step is the x0 prediction itself.
    assert err <= (2e-6 if name == "euler" else 1e-5), err


def test_straight_flow_state_along_the_path():
    """Every intermediate Euler/UniPC sample stays on the straight path."""
    x0, noise = _straight_flow(seed=1)
    for name in S.SAMPLERS:
        s = S.make_sampler(name, 12, 5.0)
        x = (1 - float(s.sigmas[0])) * x0 + float(s.sigmas[0]) * noise
        for i in range(12):
            x = s.step(noise - x0, x)
            sig = float(s.sigmas[i + 1])
            assert float(mx.abs(x - ((1 - sig) * x0 + sig * noise)).max()) <= 1e-5


@pytest.mark.parametrize("grid", S.GRIDS)
def test_convergence_order(grid):
    """dx/dsigma = a x: Euler is first order, UniPC (predictor-corrector) higher."""
    a = 1.3
    x1 = mx.array(np.random.default_rng(2).standard_normal((4, 8)).astype(np.float32))
    ratios = {}
    for name in S.SAMPLERS:
        errs = []
        for n in (10, 20, 40):
            s = S.make_sampler(name, n, 5.0, grid)
            exact = x1 * np.exp(-a * float(s.sigmas[0]))
            errs.append(float(mx.abs(S.sample(lambda x, t, i: a * x, x1, s) - exact).max()))
        ratios[name] = errs[1] / errs[2]
        assert errs[0] > errs[1] > errs[2]
    assert 1.7 < ratios["euler"] < 2.6
    assert ratios["unipc"] > 5.0


@pytest.mark.parametrize("name", S.SAMPLERS)
def test_list_of_arrays_equals_separate_runs(name):
    rng = np.random.default_rng(3)
    a = mx.array(rng.standard_normal((1, 4, 2, 2, 16)).astype(np.float32))
    b = mx.array(rng.standard_normal((1, 4, 2, 2, 1)).astype(np.float32))

    def f(x, t, i):
        return mx.tanh(x) * (t / 1000.0) - 0.3 * x

    def pair_fn(xs, t, i):
        return [f(xs[0], t, i), f(xs[1], t, i)]

    s = S.make_sampler(name, 9, 5.0)
    pair = S.sample(pair_fn, [a, b], s)
    assert isinstance(pair, list) and len(pair) == 2
    sa = S.sample(f, a, S.make_sampler(name, 9, 5.0))
    sb = S.sample(f, b, S.make_sampler(name, 9, 5.0))
    assert float(mx.abs(pair[0] - sa).max()) == 0.0
    assert float(mx.abs(pair[1] - sb).max()) == 0.0


def test_sample_loop_callback_timesteps_and_reuse():
    s = S.make_sampler("unipc", 6, 5.0)
    seen_fn, seen_cb = [], []
    x = mx.ones((2, 3))

    def fn(x, t, i):
        seen_fn.append((i, t))
        return x * 0.5 + t / 1000.0

    out1 = S.sample(fn, x, s, callback=lambda i, t: seen_cb.append((i, t)))
    assert seen_fn == seen_cb == [(i, float(t)) for i, t in enumerate(s.timesteps)]
    assert all(isinstance(t, float) for _, t in seen_fn)
    out2 = S.sample(fn, x, s)  # reset: the same sampler object runs again
    assert float(mx.abs(out1 - out2).max()) == 0.0
    with pytest.raises(OmnimatteError):
        s.step(x, x)  # past the end of the schedule


def test_expert_routing_from_times():
    """The caller routes Effect while t > tau: the split is where times cross tau."""
    s = S.make_sampler("euler", 50, 5.0)
    effect = [t > 0.5 for t in s.times]
    k = effect.index(False)
    assert all(effect[:k]) and not any(effect[k:])
    assert s.times[k - 1] > 0.5 >= s.times[k]


@pytest.mark.parametrize("name", S.SAMPLERS)
def test_dtype_kept(name):
    s = S.make_sampler(name, 3, 5.0)
    x = mx.ones((2, 2), dtype=mx.bfloat16)
    out = S.sample(lambda x, t, i: x.astype(mx.float32) * 0.1, x, s)
    assert out.dtype == mx.bfloat16


def test_bad_arguments():
    for kwargs in (
        dict(name="ddim"),
        dict(grid="karras"),
        dict(steps=0),
        dict(steps=-3),
        dict(steps=2.5),
        dict(shift=0.0),
        dict(shift=float("nan")),
    ):
        args = dict(name="euler", steps=10, shift=5.0, grid="diffusers") | kwargs
        with pytest.raises(OmnimatteError) as e:
            S.make_sampler(**args)
        assert "\n" not in str(e.value)
    assert isinstance(S.make_sampler("UniPC", 4), S.UniPC)
