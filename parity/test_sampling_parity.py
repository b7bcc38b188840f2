"""Parity of mlx_omnimatte.sampling with diffusers' flow-matching schedulers.

Both sides integrate the same velocity field (a fixed random linear map of
the sample plus a time-dependent term, computed in numpy float32 from each
side's own state), and every step's sample is compared.

Run ``python parity/test_sampling_parity.py`` to print the error table.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import mlx.core as mx  # noqa: E402

from mlx_omnimatte import sampling  # noqa: E402

pytestmark = pytest.mark.torch

SHIFT = 5.0
SHAPE = (1, 3, 4, 5, 16)  # [B, T', H', W', C], channels last
TOL = 1e-5


def _velocity_field(seed):
    rng = np.random.default_rng(seed)
    c = SHAPE[-1]
    m = (0.3 * rng.standard_normal((c, c)) / np.sqrt(c)).astype(np.float32)
    bias = rng.standard_normal(SHAPE).astype(np.float32)

    def v(x: np.ndarray, t: float) -> np.ndarray:
        tt = np.float32(t / 1000.0)
        return (x @ m + np.sin(np.float32(3.0) * tt) * bias + tt * tt * x).astype(np.float32)

    return v


def _reference(name, steps, grid):
    cfg = dict(num_train_timesteps=1000)
    if name == "euler":
        sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=SHIFT, **cfg)
    else:
        sch = diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT,
            solver_type="bh2", solver_order=2, lower_order_final=True, **cfg,
        )
    if grid == "wan":
        # The Wan grid before shifting; the scheduler applies its own shift.
        base = np.linspace(float(np.float32(0.999)), 0.0, steps + 1)[:-1]
        sch.set_timesteps(sigmas=base)
    else:
        sch.set_timesteps(steps)
    return sch


def _run_pair(name, steps, grid, n_arrays=1, seed=0):
    """Integrate on both sides; returns per-step max abs errors and the scale."""
    fields = [_velocity_field(seed + k) for k in range(n_arrays)]
    rng = np.random.default_rng(100 + seed)
    x0 = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(n_arrays)]

    refs = [_reference(name, steps, grid) for _ in range(n_arrays)]
    ours = sampling.make_sampler(name, steps, SHIFT, grid)
    xt = [torch.from_numpy(a.copy()) for a in x0]
    xm = [mx.array(a) for a in x0]
    errs, scale = [], 0.0
    for i, t_ref in enumerate(refs[0].timesteps):
        t_ours = float(ours.timesteps[i])
        vt = [torch.from_numpy(f(a.numpy(), float(t_ref))) for f, a in zip(fields, xt)]
        vm = [mx.array(f(np.array(a), t_ours)) for f, a in zip(fields, xm)]
        xt = [r.step(v, t, a, return_dict=False)[0] for r, v, t, a in zip(refs, vt, [t_ref] * n_arrays, xt)]
        xm = ours.step(vm if n_arrays > 1 else vm[0], xm if n_arrays > 1 else xm[0])
        xm = list(xm) if n_arrays > 1 else [xm]
        errs.append(max(float(np.abs(np.array(a) - b.numpy()).max()) for a, b in zip(xm, xt)))
        scale = max(scale, max(float(b.abs().max()) for b in xt))
    return np.array(errs), scale, refs[0], ours


CASES = [
    ("euler", 12, "diffusers"), ("euler", 50, "diffusers"),
    ("unipc", 12, "diffusers"), ("unipc", 50, "diffusers"),
    ("unipc", 12, "wan"), ("unipc", 50, "wan"),
    ("euler", 12, "wan"), ("euler", 50, "wan"),
]


@pytest.mark.parametrize("name,steps,grid", CASES)
def test_grid_matches_diffusers(name, steps, grid):
    ref = _reference(name, steps, grid)
    ours = sampling.make_sampler(name, steps, SHIFT, grid)
    ref_sig, ref_t = ref.sigmas.numpy(), ref.timesteps.numpy().astype(np.float64)
    assert ours.sigmas.dtype == np.float32 and ours.sigmas.shape == ref_sig.shape
    assert ours.timesteps.shape == ref_t.shape
    if name == "euler" and grid == "wan":
        # diffusers' Euler shifts custom sigmas in float32, we in float64 (as Wan does).
        np.testing.assert_allclose(ours.sigmas, ref_sig, rtol=0, atol=2e-7)
        np.testing.assert_allclose(ours.timesteps, ref_t, rtol=0, atol=2e-4)
    else:
        np.testing.assert_array_equal(ours.sigmas, ref_sig)
        np.testing.assert_array_equal(ours.timesteps, ref_t)


@pytest.mark.parametrize("name,steps,grid", CASES)
def test_trajectory_matches_diffusers(name, steps, grid):
    errs, scale, _, _ = _run_pair(name, steps, grid)
    assert np.all(np.isfinite(errs))
    assert scale > 0.5  # the field moves the sample: the comparison is not trivial
    assert errs.max() <= TOL, f"{name}/{grid}/{steps}: step errors {errs}"


@pytest.mark.parametrize("name", ["euler", "unipc"])
def test_list_of_latents_matches_separate_references(name):
    """The omnimatte loop steps [z_bg, z_alpha] together: same as two references."""
    errs, _, _, _ = _run_pair(name, 12, "diffusers", n_arrays=2, seed=7)
    assert errs.max() <= TOL


def test_wan_grid_differs_from_diffusers_unipc_grid():
    """Guard that the two UniPC grids really are different schedules."""
    a = sampling.make_sampler("unipc", 12, SHIFT, "wan").sigmas
    b = sampling.make_sampler("unipc", 12, SHIFT, "diffusers").sigmas
    assert np.abs(a - b).max() > 1e-3


if __name__ == "__main__":
    for case in CASES:
        errs, scale, _, _ = _run_pair(*case)
        print(f"{case[0]:6s} {case[2]:9s} {case[1]:3d} steps: max|mlx-ref| {errs.max():.3e}"
              f"  (final {errs[-1]:.3e}, max|ref| {scale:.3f})")
