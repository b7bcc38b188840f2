"""Step caches for the DiT: the same trajectory in fewer block-stack forwards.

Between neighbouring denoising steps the residual of the block stack (its
output minus its input) changes little over long stretches of the schedule.
A step cache estimates that change without running the blocks and, while the
estimate accumulated since the last computed step stays under a threshold,
adds the last computed residual to the new input instead of running the
blocks. The patch embedding, time embedding and head always run (they are a
few percent of a forward). Two published estimates, both reading no content
of the step (so every window of a step decides alike):

* TeaCache ("Timestep Embedding Tells", Liu et al. 2024): the relative L1
  change of the time modulation e0 since the previous step, mapped by a
  polynomial fitted offline to the output's change.
* MagCache (Ma et al. 2025): per-step ratios of the residual's magnitude,
  measured once on a reference trajectory; the skip error is |1 - product of
  the ratios since the cached step|, at most K steps in a row.

State is per trajectory and per temporal window (a window's residual is of its
own tokens). In the dual-branch forward a residual is tagged with its expert,
so the step after the Effect -> Quality switch is always computed.

`calibrate-cache` measures a bundle's own ratios and polynomial
(`Calibration`, `BUNDLE/transformer/step_cache.json`, tied to the weights'
fingerprint); runs use them when present and made for these weights, the
published Wan2.1-T2V-1.3B figures otherwise. `expected_forwards` says before a
run how many forwards a window is expected to compute.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from .errors import OmnimatteError
from .weights import fingerprint

KINDS = ("none", "teacache", "magcache")
CALIBRATION_FILE = "step_cache.json"
CALIBRATION_FORMAT = 2  # 2: tied to the transformer's weights fingerprint

# TeaCache4Wan2.1 (ali-vilab/TeaCache, teacache_generate.py with --use_ret_steps,
# Wan2.1-T2V-1.3B): the polynomial (highest power first) of the relative L1
# change of e0 = time_projection(temb); the first 5 steps are always computed
# and the last is not forced. The same figures are mlx-examples'
# video/wan2.1 default for t2v-1.3B (from LightX2V's
# wan_t2v_1_3b_tea_480p.json) and VideoX-Fun's for its Fun-1.3B models.
TEACACHE_COEFFICIENTS = (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02)
TEACACHE_RET_STEPS = 5
# mlx-examples' table for 1.3B, 50 UniPC steps: 0.05 skips ~34% ("almost
# lossless"), 0.1 ~58% ("slightly corrupted"), 0.25 ~76% (visible loss)
TEACACHE_THRESHOLD = 0.05
# the same table as (threshold, share of 50 steps skipped): what a plan
# expects of a TeaCache run when the bundle's own e0 changes are not known
TEACACHE_PUBLISHED_SKIPS = ((0.05, 0.34), (0.1, 0.58), (0.25, 0.76))
TEACACHE_PUBLISHED_STEPS = 50

# MagCache4Wan2.1 (Zehong-Ma/MagCache, magcache_generate.py, T2V-1.3B, 50
# UniPC steps): the conditional pass's ratios mean_tokens(|r_i| / |r_{i-1}|),
# step 0 padded with 1.0; its defaults threshold 0.12, K 2, retention 0.2
# (README, 1.3B 480p on an A800: 189 s -> 87 s with K 2, 68 s with K 4).
MAGCACHE_RATIOS = (
    1.0, 1.0124, 1.00166, 0.99791, 0.99682, 0.99634, 0.99567, 0.99416, 0.99578, 0.9957,
    0.99511, 0.99535, 0.99552, 0.99541, 0.9954, 0.99489, 0.99518, 0.99484, 0.99481, 0.99415,
    0.99419, 0.99396, 0.99388, 0.99349, 0.99309, 0.9927, 0.99228, 0.99171, 0.99137, 0.99068,
    0.99005, 0.98944, 0.98849, 0.98758, 0.98644, 0.98504, 0.9836, 0.98202, 0.97977, 0.97717,
    0.9741, 0.97003, 0.96538, 0.9593, 0.95086, 0.94013, 0.92402, 0.90241, 0.86821, 0.81838,
)
MAGCACHE_THRESHOLD = 0.12
MAGCACHE_K = 2
MAGCACHE_RETENTION = 0.2

DEFAULT_THRESHOLDS = {"teacache": TEACACHE_THRESHOLD, "magcache": MAGCACHE_THRESHOLD}
PUBLISHED = "published Wan2.1-T2V-1.3B figures"
CALIBRATED = "this bundle's calibration"


# --------------------------------------------------------------------------- the setting


@dataclass(frozen=True)
class CacheSpec:
    """`--cache`: none, teacache[:THRESHOLD] or magcache[:THRESHOLD]."""

    kind: str = "none"
    threshold: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def __str__(self) -> str:
        return f"{self.kind}:{self.threshold:g}" if self.enabled else "none"


def parse_cache(value) -> CacheSpec:
    """A CacheSpec from its text; any other text is one line naming the forms."""
    if value is None or isinstance(value, CacheSpec):
        return value or CacheSpec()
    kind, sep, number = str(value).strip().lower().partition(":")
    forms = "none, teacache[:THRESHOLD] or magcache[:THRESHOLD]"
    if kind not in KINDS or (kind == "none" and sep):
        raise OmnimatteError(f"--cache {value}: unknown (one of {forms}, e.g. teacache:{TEACACHE_THRESHOLD})")
    if kind == "none":
        return CacheSpec()
    if not sep:
        return CacheSpec(kind, DEFAULT_THRESHOLDS[kind])
    try:
        threshold = float(number)
    except ValueError:
        threshold = math.nan
    if not (math.isfinite(threshold) and threshold > 0):
        raise OmnimatteError(f"--cache {value}: the threshold must be a positive number "
                             f"(e.g. {kind}:{DEFAULT_THRESHOLDS[kind]})")
    return CacheSpec(kind, threshold)


# --------------------------------------------------------------------------- decision rules


@dataclass
class WindowState:
    """What one window's cache keeps between steps."""

    residual: Optional[mx.array] = None  # block-stack output minus input at the last computed step
    tag: object = None  # the expert that computed it (None: the plain DiT)
    previous: Optional[mx.array] = None  # TeaCache: the previous step's e0
    accumulated: float = 0.0  # TeaCache: rescaled distance; MagCache: skip error
    ratio: float = 1.0  # MagCache: magnitude ratio to the cached step
    run: int = 0  # MagCache: steps since the cached one

    def restart(self) -> None:
        self.accumulated, self.ratio, self.run = 0.0, 1.0, 0


def rel_l1(a: mx.array, b: mx.array) -> float:
    """mean|a - b| / mean|b|, TeaCache's change measure (float32, as the reference)."""
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.abs(a - b).mean() / mx.abs(b).mean()).item()


@dataclass(frozen=True)
class TeaCache:
    threshold: float
    coefficients: tuple = TEACACHE_COEFFICIENTS
    ret_steps: int = TEACACHE_RET_STEPS

    def skip(self, s: WindowState, i: int, e6: mx.array) -> bool:
        """May step `i` reuse the residual? Updates the state as the reference does."""
        prev, s.previous = s.previous, e6
        return prev is not None and self.skip_after(s, i, rel_l1(e6, prev))

    def skip_after(self, s: WindowState, i: int, change: float) -> bool:
        """The rule given e0's relative change since step i - 1."""
        if i < self.ret_steps:
            return False
        # |poly| as mlx-examples adds it: the published fit is negative below a
        # 0.43% change and above 10.2%, where TeaCache's own sum would shrink
        # and let skips run on unbounded
        s.accumulated += abs(float(np.polyval(self.coefficients, change)))
        return s.accumulated < self.threshold


@dataclass(frozen=True)
class MagCache:
    threshold: float
    ratios: tuple  # one per step of this schedule
    max_skips: int = MAGCACHE_K
    retention: float = MAGCACHE_RETENTION

    def skip(self, s: WindowState, i: int, e6: mx.array) -> bool:
        return self.skip_after(s, i, None)

    def skip_after(self, s: WindowState, i: int, change=None) -> bool:
        # without guidance the reference's counter is the step index
        if i < int(len(self.ratios) * self.retention):
            return False
        s.ratio *= self.ratios[i]
        s.run += 1
        s.accumulated += abs(1.0 - s.ratio)
        return s.accumulated < self.threshold and s.run <= self.max_skips


def nearest_ratios(ratios, steps: int) -> tuple:
    """Per-step ratios resampled to `steps` by MagCache's nearest index
    (`nearest_interp`: numpy's round-half-even of i * (n - 1) / (steps - 1))."""
    ratios = np.asarray(ratios, np.float64)
    if steps == len(ratios):
        return tuple(float(r) for r in ratios)
    if steps == 1:
        return (float(ratios[-1]),)
    idx = np.round(np.arange(steps) * ((len(ratios) - 1) / (steps - 1))).astype(int)
    return tuple(float(r) for r in ratios[idx])


def make_policy(spec: CacheSpec, steps: int, calibration: Optional["Calibration"] = None):
    """(decision rule, where its figures come from) for a schedule of `steps`."""
    if spec.kind == "teacache":
        coefficients = tuple(calibration.tea_coefficients) if calibration else TEACACHE_COEFFICIENTS
        return TeaCache(spec.threshold, coefficients), CALIBRATED if calibration else PUBLISHED
    if spec.kind == "magcache":
        ratios = calibration.mag_ratios if calibration else MAGCACHE_RATIOS
        return MagCache(spec.threshold, nearest_ratios(ratios, steps)), CALIBRATED if calibration else PUBLISHED
    raise OmnimatteError(f"step cache {spec}: nothing to build")


def schedule(policy, changes) -> list[bool]:
    """Which steps one window computes (True), given e0's relative change into
    each step (`changes[0]` unused): both rules read nothing else."""
    s, out = WindowState(), []
    for i, change in enumerate(changes):
        skip = i > 0 and policy.skip_after(s, i, change)
        if not skip:
            s.restart()
        out.append(not skip)
    return out


@dataclass(frozen=True)
class Expectation:
    """What a plan expects of a cache: forwards computed per window of `steps`."""

    computed: float
    steps: int
    how: str  # where the figure comes from

    def line(self, spec: CacheSpec) -> str:
        return (f"step cache {spec}: expected {self.computed:.0f} of {self.steps} DiT forwards computed a window "
                f"({self.how}; an expectation)")


def teacache_published(threshold: float, steps: int) -> float:
    """Forwards computed of `steps` at the published skip rate for `threshold`
    (interpolated in the table, the table's last rate beyond it), the same
    share of the steps after the always-computed ones as at 50 steps."""
    x, y = zip((0.0, 0.0), *TEACACHE_PUBLISHED_SKIPS)
    skipped_at_50 = float(np.interp(threshold, x, y)) * TEACACHE_PUBLISHED_STEPS
    share = skipped_at_50 / (TEACACHE_PUBLISHED_STEPS - TEACACHE_RET_STEPS)
    return steps - share * max(steps - TEACACHE_RET_STEPS, 0)


def expected_forwards(spec: CacheSpec, steps: int, calibration: Optional["Calibration"] = None,
                      sampler: str = "", shift: Optional[float] = None) -> Expectation:
    """Forwards a window computes: MagCache's rule reads only its ratios (so
    the count is its schedule's); TeaCache's reads e0's changes, known from a
    calibration of the same schedule, else the published skip rate."""
    if not spec.enabled:
        return Expectation(steps, steps, "no cache")
    policy, source = make_policy(spec, steps, calibration)
    if spec.kind == "magcache":
        return Expectation(sum(schedule(policy, [None] * steps)), steps, f"MagCache's rule on the {source}")
    if calibration is not None and (calibration.steps, calibration.sampler, calibration.shift) == (steps, sampler,
                                                                                                   shift):
        changes = [None] + [x for x, _ in calibration.tea_points]
        return Expectation(sum(schedule(policy, changes)), steps, f"TeaCache's rule on {CALIBRATED}")
    return Expectation(teacache_published(spec.threshold, steps), steps,
                       "mlx-examples' published Wan2.1-1.3B skip rate at 50 steps")


# --------------------------------------------------------------------------- the hook the DiT calls


class _Hook:
    """Called by the DiT in place of its block stack (`Model.run_blocks`);
    `at(step, span)` names the forward about to run."""

    def __init__(self, steps: int):
        self.steps = steps
        self.computed = self.skipped = 0
        self._at = (0, (0, 0))

    def at(self, step: int, span) -> None:
        self._at = (step, tuple(span))

    def step_done(self, step: int, velocity) -> None:
        """After a step's windows are blended (the recorder reads the velocity)."""

    @property
    def forwards(self) -> int:
        return self.computed + self.skipped

    def detail(self) -> str:
        return f"computed {self.computed}/{self.forwards}"


class StepCache(_Hook):
    """One trajectory's cache: a WindowState per temporal window."""

    def __init__(self, policy, steps: int, spec: CacheSpec, source: str = PUBLISHED):
        super().__init__(steps)
        self.policy, self.spec, self.source = policy, spec, source
        self.states: dict[tuple, WindowState] = {}
        self.decisions: list[tuple[int, tuple, bool]] = []  # (step, span, computed)

    def __call__(self, tokens, temb, e6, run, tag=None):
        step, span = self._at
        s = self.states.setdefault(span, WindowState())
        skip = self.policy.skip(s, step, e6) and s.residual is not None and s.tag is tag
        self.decisions.append((step, span, not skip))
        if skip:
            self.skipped += 1
            return tokens + s.residual
        s.restart()
        out = run(tokens)
        s.residual, s.tag = out - tokens, tag
        mx.eval(s.residual)  # kept across steps: not a lazy graph holding the window's activations
        self.computed += 1
        return out

    def detail(self) -> str:
        return f"{super().detail()} forwards ({self.spec}, {self.source})"


def new_cache(spec: CacheSpec, steps: int, calibration: Optional["Calibration"] = None) -> Optional[StepCache]:
    """A fresh cache for one trajectory (None for `--cache none`)."""
    if not spec.enabled:
        return None
    policy, source = make_policy(spec, steps, calibration)
    return StepCache(policy, steps, spec, source)


@contextmanager
def attached(dit, hook):
    """The DiT runs its block stack through `hook` inside the block."""
    if hook is None:
        yield dit
        return
    dit.step_cache = hook
    try:
        yield dit
    finally:
        dit.step_cache = None


# --------------------------------------------------------------------------- calibration


@dataclass
class Calibration:
    """A bundle's own figures, from one trajectory with every forward computed."""

    mag_ratios: list[float]  # per step: mean over tokens (and windows) of |r_i| / |r_{i-1}|; [0] = 1
    tea_coefficients: list[float]  # degree-4 fit of the velocity's change on e0's, highest power first
    sampler: str
    steps: int
    shift: float
    tea_points: list[list[float]] = field(default_factory=list)  # the fitted (x, y) pairs
    clip: str = ""
    weights: str = ""  # the transformer's fingerprint (`weights.fingerprint`) when measured

    def save(self, transformer_dir: Path) -> Path:
        """Into the transformer's directory, tied to its weights as they are now."""
        path = Path(transformer_dir) / CALIBRATION_FILE
        self.weights = fingerprint(transformer_dir)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"format": CALIBRATION_FORMAT, **asdict(self)}, indent=1))
        os.replace(tmp, path)  # a reader never sees half a file
        return path


def read_calibration(transformer_dir: Path) -> Optional[Calibration]:
    """The bundle's calibration, or None when it has none."""
    path = Path(transformer_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        data.pop("format", None)
        cal = Calibration(**data)
    except (ValueError, TypeError) as e:
        raise OmnimatteError(f"{path}: not a step-cache calibration ({e}); run `mlx-omnimatte "
                             "calibrate-cache` again or delete it") from None
    if len(cal.mag_ratios) < 2 or len(cal.tea_coefficients) != len(TEACACHE_COEFFICIENTS):
        raise OmnimatteError(f"{path}: incomplete step-cache calibration; run `mlx-omnimatte calibrate-cache` again")
    return cal


def current_calibration(transformer_dir: Path) -> tuple[Optional[Calibration], Optional[str]]:
    """(the bundle's calibration, None), or (None, a one-line note) when the
    file was measured on other weights (a re-converted transformer, or a file
    from before calibrations were tied to weights): it is ignored, not used."""
    cal = read_calibration(transformer_dir)
    if cal is None or cal.weights == fingerprint(transformer_dir):
        return cal, None
    path = Path(transformer_dir) / CALIBRATION_FILE
    return None, (f"{path}: measured on other weights than this transformer's; ignored ({PUBLISHED} used), "
                  "run `mlx-omnimatte calibrate-cache` again")


def magnitude_ratio(r: mx.array, prev: mx.array) -> float:
    """MagCache's measure: mean over tokens of |r| / |prev| (norms over channels)."""
    r, prev = r.astype(mx.float32), prev.astype(mx.float32)
    return mx.mean(mx.linalg.norm(r, axis=-1) / mx.linalg.norm(prev, axis=-1)).item()


class Recorder(_Hook):
    """Every forward computed; records what a calibration fits: e0 per step,
    each window's residual magnitude ratio to its previous step, and the
    relative change of the blended velocity."""

    def __init__(self, steps: int):
        if steps < 6:  # five points for a quartic, refused before anything runs
            raise OmnimatteError(f"calibrate-cache: {steps} steps; a calibration needs at least 6")
        super().__init__(steps)
        self.e6s: dict[int, mx.array] = {}
        self.ratios: dict[int, list[float]] = {}
        self.v_change: dict[int, float] = {}
        self._residual: dict[tuple, mx.array] = {}
        self._velocity = None

    def __call__(self, tokens, temb, e6, run, tag=None):
        step, span = self._at
        out = run(tokens)
        r = out - tokens
        mx.eval(r)
        if span in self._residual:
            self.ratios.setdefault(step, []).append(magnitude_ratio(r, self._residual[span]))
        self._residual[span] = r
        self.e6s.setdefault(step, e6)
        self.computed += 1
        return out

    def step_done(self, step: int, velocity) -> None:
        v = velocity[0] if isinstance(velocity, (list, tuple)) else velocity
        if self._velocity is not None:
            self.v_change[step] = rel_l1(v, self._velocity)
        self._velocity = v

    def calibration(self, sampler: str, shift: float, clip: str = "") -> Calibration:
        """The fitted figures of the recorded trajectory."""
        ratios = [1.0] + [float(np.mean(self.ratios[i])) for i in range(1, self.steps)]
        x = [rel_l1(self.e6s[i], self.e6s[i - 1]) for i in range(1, self.steps)]
        y = [self.v_change[i] for i in range(1, self.steps)]
        with warnings.catch_warnings():  # a poorly conditioned fit still ranks steps
            warnings.simplefilter("ignore")
            coefficients = np.polyfit(np.asarray(x, np.float64), np.asarray(y, np.float64), 4)
        if not np.all(np.isfinite(coefficients)):
            raise OmnimatteError("calibrate-cache: the TeaCache fit failed (the time embedding does not change "
                                 "between steps)")
        return Calibration(ratios, [float(c) for c in coefficients], sampler, self.steps, float(shift),
                           [[a, b] for a, b in zip(x, y)], clip)
