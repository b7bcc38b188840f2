"""Flow-matching samplers: Euler and UniPC (bh2, order 2) on shifted sigma grids.

Convention (Wan / rectified flow): x_s = (1 - s) * x0 + s * noise, the model
predicts the velocity v = noise - x0, sigma runs from ~1 down to 0 and the
timestep the model sees is 1000 * sigma.

The grids and updates follow diffusers' ``FlowMatchEulerDiscreteScheduler``
and ``UniPCMultistepScheduler(prediction_type="flow_prediction",
use_flow_sigmas=True, solver_type="bh2", solver_order=2,
lower_order_final=True)`` step for step, including their float32 roundings,
so trajectories match the references to fp32 precision. Each sampler keeps
the timestep convention of its reference: Euler hands the model float32
``sigma * 1000``, UniPC the integer part of it (diffusers and Wan cast the
UniPC timesteps to int64).

Samplers work on one ``mx.array`` of any shape or on a list/tuple (any
``mlx.utils`` tree) of arrays stepped with the same coefficients, e.g.
``[z_background, z_alpha]`` for the omnimatte loop.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from .errors import OmnimatteError

# Every seed a user can give defaults to this one number: the reference's
# (Generative Omnimatte's and Casper's inference scripts seed 43), also for
# the synthetic clips, training and analysis, so "the default seed" means one thing.
DEFAULT_SEED = 43

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_SHIFT = 5.0
SAMPLERS = ("euler", "unipc")
GRIDS = ("diffusers", "wan")


def shift_sigmas(s, shift: float):
    """Static time shift ``shift*s / (1 + (shift-1)*s)`` (pushes steps to high noise)."""
    return shift * s / (1 + (shift - 1) * s)


# ----------------------------------------------------------------------------
# Sigma grids. Each returns the N shifted sigmas (float64 or float32 as the
# reference computes them, before the final 0 is appended).


def euler_grid(steps: int, shift: float, num_train: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """diffusers FlowMatchEulerDiscreteScheduler.set_timesteps(steps).

    The training table (1000..1 / 1000, shifted, float32) gives sigma_max = 1
    and sigma_min = shift(0.001); the N timesteps are spaced linearly between
    them and shifted a second time (a diffusers quirk we reproduce: the last
    nonzero sigma for shift 5 is ~0.024, not ~0.005).
    """
    train = np.linspace(1, num_train, num_train, dtype=np.float32)[::-1] / num_train
    train = shift_sigmas(train, shift)  # float32 arithmetic, as the torch table
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    ts = np.linspace(sigma_max * num_train, sigma_min * num_train, steps)
    return shift_sigmas(ts / num_train, shift)


def unipc_grid(steps: int, shift: float, num_train: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """diffusers UniPCMultistepScheduler(use_flow_sigmas=True).set_timesteps(steps)."""
    s = shift_sigmas(np.linspace(1, 1 / num_train, steps + 1)[:-1], shift)
    if abs(s[0] - 1) < 1e-6:  # diffusers keeps log(sigma_0) finite this way
        s[0] -= 1e-6
    return s


def wan_grid(steps: int, shift: float, num_train: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """Original Wan FlowUniPCMultistepScheduler: linspace(0.999, 0, N+1)[:-1], shifted.

    0.999 is the float32 value of the first training sigma, as Wan reads it.
    """
    sigma_max = float(np.float32(1.0 - 1.0 / num_train))
    return shift_sigmas(np.linspace(sigma_max, 0.0, steps + 1)[:-1], shift)


def _finish(sigmas: np.ndarray, integer_timesteps: bool, num_train: int):
    """Append the final sigma 0 and derive the timesteps the model sees."""
    s32 = np.concatenate([np.asarray(sigmas, np.float32), np.zeros(1, np.float32)])
    if integer_timesteps:  # torch .to(int64) truncates toward zero
        t = np.trunc(np.asarray(sigmas, np.float64) * num_train).astype(np.float64)
    else:  # float32 sigma * 1000 in float32
        t = (s32[:-1] * np.float32(num_train)).astype(np.float64)
    return s32, t


# ----------------------------------------------------------------------------
# Samplers


def _as_f32(a):
    return a if a.dtype == mx.float32 else a.astype(mx.float32)


def _combine(coeffs, *trees, like=None):
    """sum_k coeffs[k] * trees[k], leafwise, in float32; cast to the dtypes of
    ``like`` (a tree of the same structure) when given."""

    def f(*leaves):
        arrs, ref = (leaves[:-1], leaves[-1]) if like is not None else (leaves, None)
        out = None
        for c, a in zip(coeffs, arrs):
            if c == 0.0:  # skip, so e.g. the last UniPC step returns x0 exactly
                continue
            term = _as_f32(a) if c == 1.0 else _as_f32(a) * c
            out = term if out is None else out + term
        if out is None:
            out = mx.zeros(arrs[0].shape, mx.float32)
        return out if ref is None or ref.dtype == mx.float32 else out.astype(ref.dtype)

    return tree_map(f, *trees) if like is None else tree_map(f, *trees, like)


class _FlowSampler:
    """Shared state: sigma grid, timesteps, and the step counter."""

    name = ""
    integer_timesteps = False

    def __init__(self, sigmas: np.ndarray, num_train: int = NUM_TRAIN_TIMESTEPS):
        self.num_train = num_train
        self.sigmas, self.timesteps = _finish(sigmas, self.integer_timesteps, num_train)
        self.reset()

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def times(self) -> np.ndarray:
        """Normalized time t/1000 in [0, 1] per step, for expert routing (Effect while t > tau)."""
        return self.timesteps / self.num_train

    def reset(self):
        self.step_index = 0

    def _next_index(self) -> int:
        if self.step_index >= self.num_steps:
            raise OmnimatteError(
                f"{self.name} sampler: step {self.step_index + 1} past the {self.num_steps}-step schedule"
            )
        return self.step_index

    def __repr__(self):
        return f"{type(self).__name__}(steps={self.num_steps}, sigma0={self.sigmas[0]:.6f})"


class Euler(_FlowSampler):
    """First-order flow-matching Euler: x <- x + (sigma_next - sigma) * v."""

    name = "euler"

    def step(self, velocity, x):
        i = self._next_index()
        # dt in float32 as diffusers computes it from its float32 sigma table.
        dt = float(self.sigmas[i + 1] - self.sigmas[i])
        self.step_index += 1
        return _combine((1.0, dt), x, velocity, like=x)


def _lam(s: float) -> float:
    """log-SNR of the flow path, log((1 - s) / s); +inf at s = 0."""
    return math.inf if s == 0.0 else math.log(1.0 - s) - math.log(s)


class UniPC(_FlowSampler):
    """UniPC multistep (bh2, order 2, predicting x0, lower order at the end).

    One call to ``step`` = diffusers' step: the UniC corrector refines the
    sample the model was just evaluated on (using the new x0 prediction), then
    the UniP predictor moves to the next sigma. The model is always evaluated
    on the uncorrected predictor output, exactly as in diffusers. The scalar
    coefficients are computed in float64 from the float32 sigma table.
    """

    name = "unipc"
    integer_timesteps = True
    order = 2

    def reset(self):
        super().reset()
        self._x0 = []  # x0 predictions of the last (up to) two steps, oldest first
        self._last_sample = None  # sample before the last predictor (for the corrector)
        self._last_order = 0
        self._warm = 0  # lower_order_nums: steps taken so far, capped at order

    def _sig(self, j: int) -> float:
        return float(self.sigmas[j])

    def _corrector_coeffs(self, i: int, order: int):
        """UniC from sigma[i-1] to sigma[i]; returns (c_x, c_m0, c_m1, c_model)
        with x_corr = c_x*last + c_m0*m0 + c_m1*m_older + c_model*model_t."""
        s_t, s_0 = self._sig(i), self._sig(i - 1)
        h = _lam(s_t) - _lam(s_0)
        hh = -h
        h_phi_1 = math.expm1(hh)
        b_h = math.expm1(hh)  # bh2
        a_t = 1.0 - s_t
        c_x, c_m0 = s_t / s_0, -a_t * h_phi_1
        if order == 1:
            rho_d, rho_t = 0.0, 0.5  # diffusers' simplification for order 1
            rk = 1.0
        else:
            # 2x2 system R rho = b with R = [[1, 1], [rk, 1]]
            rk = (_lam(self._sig(i - 2)) - _lam(s_0)) / h
            h_phi_k = h_phi_1 / hh - 1.0
            b1 = h_phi_k / b_h
            h_phi_k = h_phi_k / hh - 0.5
            b2 = 2.0 * h_phi_k / b_h
            rho_d, rho_t = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), np.array([b1, b2]))
            rho_d, rho_t = float(rho_d), float(rho_t)
        # corr = rho_d * (m1 - m0) / rk + rho_t * (model_t - m0)
        k = -a_t * b_h
        d = k * rho_d / rk
        return c_x, c_m0 - d - k * rho_t, d, k * rho_t

    def _predictor_coeffs(self, i: int, order: int):
        """UniP from sigma[i] to sigma[i+1]; returns (c_x, c_m0, c_m1)."""
        s_t, s_0 = self._sig(i + 1), self._sig(i)
        if s_t == 0.0:  # h = inf: the first-order step lands on x0 exactly
            if order != 1:
                raise AssertionError("UniPC: the final step must be first order")
            return 0.0, 1.0, 0.0
        h = _lam(s_t) - _lam(s_0)
        hh = -h
        h_phi_1 = math.expm1(hh)
        b_h = math.expm1(hh)
        a_t = 1.0 - s_t
        c_x, c_m0, c_m1 = s_t / s_0, -a_t * h_phi_1, 0.0
        if order == 2:
            rk = (_lam(self._sig(i - 1)) - _lam(s_0)) / h
            d = -a_t * b_h * 0.5 / rk  # rhos_p = 0.5 for order 2
            c_m0 -= d
            c_m1 = d
        return c_x, c_m0, c_m1

    def step(self, velocity, x):
        i = self._next_index()
        s = self._sig(i)
        m = _combine((1.0, -s), x, velocity)  # x0 prediction x - sigma * v (float32)
        if i > 0 and self._last_sample is not None:
            cx, c0, c1, ct = self._corrector_coeffs(i, self._last_order)
            m1 = self._x0[-2] if len(self._x0) > 1 else self._x0[-1]
            x = _combine((cx, c0, c1, ct), self._last_sample, self._x0[-1], m1, m, like=x)
        self._x0 = (self._x0 + [m])[-self.order:]
        order = min(self.order, self.num_steps - i, self._warm + 1)  # lower_order_final + warmup
        self._last_sample, self._last_order = x, order
        cx, c0, c1 = self._predictor_coeffs(i, order)
        m1 = self._x0[-2] if len(self._x0) > 1 else self._x0[-1]
        x_next = _combine((cx, c0, c1), x, self._x0[-1], m1, like=x)
        self._warm = min(self._warm + 1, self.order)
        self.step_index += 1
        return x_next


def make_sampler(name: str = "euler", steps: int = 50, shift: float = DEFAULT_SHIFT, grid: str = "diffusers"):
    """Build a sampler. ``grid="diffusers"`` is the named diffusers scheduler's
    own default grid (they differ: Euler starts at sigma 1 and double-shifts
    its low end, UniPC spaces N+1 points from 1 to 0.001); ``grid="wan"`` is
    the original Wan grid linspace(0.999, 0, N+1)[:-1], shifted.
    """
    name = str(name).lower()
    if name not in SAMPLERS:
        raise OmnimatteError(f"sampler {name!r}: unknown, choose one of {', '.join(SAMPLERS)}")
    if grid not in GRIDS:
        raise OmnimatteError(f"sigma grid {grid!r}: unknown, choose one of {', '.join(GRIDS)}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise OmnimatteError(f"steps {steps!r}: must be an integer >= 1")
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise OmnimatteError(f"shift {shift!r}: must be a positive number")
    cls = Euler if name == "euler" else UniPC
    if grid == "wan":
        sigmas = wan_grid(int(steps), float(shift))
    else:
        sigmas = (euler_grid if name == "euler" else unipc_grid)(int(steps), float(shift))
    return cls(sigmas)


def sample(
    velocity_fn: Callable,
    x,
    sampler: _FlowSampler,
    callback: Optional[Callable[[int, float], None]] = None,
):
    """Run the whole schedule: ``v = velocity_fn(x, t, i)`` then ``x = sampler.step(v, x)``.

    ``t`` is the timestep in [0, 1000] (a Python float; ``t / 1000`` is the
    normalized time used for expert routing), ``i`` the step index.
    ``callback(i, t)`` runs after each step (progress bars). ``x`` may be an
    array or a list/tuple of arrays stepped together. The sampler is reset
    first, so one sampler object can be reused.
    """
    sampler.reset()
    for i, t in enumerate(sampler.timesteps):
        t = float(t)
        v = velocity_fn(x, t, i)
        x = sampler.step(v, x)
        # Evaluate per step: keeps the lazy graph (and memory) to one step.
        mx.eval(x)
        if callback is not None:
            callback(i, t)
    return x
