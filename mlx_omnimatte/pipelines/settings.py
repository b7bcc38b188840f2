"""What a run is asked to do: the mode, the knobs, and the budgets derived
from them. The planner and the stages both read these; neither imports the
other."""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum

from ..branch.experts import KINDS, check_tau
from ..errors import OmnimatteError
from ..memory import machine_memory
from ..removers import Remover
from ..sampling import DEFAULT_SEED, make_sampler
from ..step_cache import TEACACHE_THRESHOLD, parse_cache
from .windows import DEFAULT_OVERLAP, DEFAULT_WINDOW, make_windows

SEED_LIMIT = 1 << 64


class Mode(str, Enum):
    REMOVE = "remove"  # Casper backgrounds
    EXPERTS = "experts"  # dual-expert layers (decompose --method experts)
    TWO_STAGE = "two-stage"  # a removal model's background, then the layers over it
    PLATE = "clean-plate"  # the layers over a given plate: no model

    @property
    def halves(self) -> int:
        """Token halves per DiT forward (the branch doubles them)."""
        return 2 if self is Mode.EXPERTS else 1


@dataclass
class Settings:
    """Every knob of a run; the defaults are the reference's."""

    steps: int = 50
    seed: int = DEFAULT_SEED
    shift: float = 5.0
    sampler: str = "euler"
    size: str | None = None  # "WxH" on the model grid; default: ~480x832 area, source aspect
    min_frames: int = 81  # short clips are padded to one full window
    dtype: str = "bfloat16"  # DiT weights and matmuls
    tau: float | None = None  # expert switch (omnimatte); None: the experts' default
    window: int = DEFAULT_WINDOW
    overlap: int = DEFAULT_OVERLAP
    cache_dir: str | None = None  # prompt-embedding cache
    vae_tiling: bool | None = None  # None: tiles only when a frame does not fit vae_budget
    vae_budget: int | None = None  # bytes for the VAE; None: half of this machine's memory
    cache: str | None = None  # DiT step cache: none | teacache[:T] | magcache[:T] (step_cache.py)
    fast: bool = False  # the FAST preset for the settings above left at their defaults
    given: frozenset = frozenset()  # the names the caller set (the rest may come from the bundle's remover)

    def __post_init__(self):
        check_settings(self)


# `--fast`: Wan's own solver at half the reference's steps, with TeaCache at
# the threshold mlx-examples calls "almost lossless" (0.05): at most 25
# forwards a window instead of 50, the first 5 always computed
FAST = {"sampler": "unipc", "steps": 25, "cache": f"teacache:{TEACACHE_THRESHOLD}"}


def apply_fast(s: Settings) -> None:
    """`fast` fills in the preset where a setting was left at its default (an
    explicit --steps 50 or --sampler euler cannot be told from the default)."""
    if s.fast is not True and s.fast is not False:
        raise OmnimatteError(f"fast {s.fast!r}: must be True or False")
    if not s.fast:
        return
    defaults = {f.name: f.default for f in fields(Settings)}
    for name, value in FAST.items():
        if getattr(s, name) == defaults[name]:
            setattr(s, name, value)


def check_settings(s: Settings) -> None:
    """Every setting checked once, before anything is read or loaded."""
    apply_fast(s)
    s.cache = str(parse_cache(s.cache))
    make_sampler(s.sampler, s.steps, s.shift)  # checks steps, shift and the sampler's name
    if isinstance(s.seed, bool) or not isinstance(s.seed, int) or not 0 <= s.seed < SEED_LIMIT:
        raise OmnimatteError(f"seed {s.seed!r}: must be an integer in [0, 2^64)")
    if s.tau is not None:
        s.tau = check_tau(s.tau)
    if s.window < 2 or not 0 <= s.overlap < s.window:
        raise OmnimatteError(f"window {s.window} / overlap {s.overlap}: need 0 <= overlap < window")


def settings_from(**kwargs) -> Settings:
    """Settings from keyword arguments (None = the default); unknown names are
    a TypeError, as for a function call."""
    known = {f.name for f in fields(Settings)} - {"given"}
    unknown = set(kwargs) - known
    if unknown:
        raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
    given = {k: v for k, v in kwargs.items() if v is not None}
    return Settings(**given, given=frozenset(given))


REMOVER_DEFAULTS = ("sampler", "steps", "shift")


def apply_remover(s: Settings, remover: Remover) -> None:
    """The bundle's remover gives the sampler, steps and shift the caller did
    not set (over `--fast`'s: a distilled schedule is already short); a
    remover's values that equal the defaults (Casper's, ROSE's) change
    nothing, so `--fast` still applies to those."""
    defaults = {f.name: f.default for f in fields(Settings)}
    for name in REMOVER_DEFAULTS:
        if name not in s.given and getattr(remover, name) != defaults[name]:
            setattr(s, name, getattr(remover, name))
    make_sampler(s.sampler, s.steps, s.shift)


def experts_needed(mode: Mode, tau: float | None) -> tuple[str, ...]:
    """The expert kinds a run loads: none for removal; for decomposition tau =
    0 runs the Effect expert only, tau = 1 the Quality expert only."""
    if mode is not Mode.EXPERTS:
        return ()
    if tau is None or 0 < tau < 1:
        return KINDS
    return ("effect",) if tau <= 0 else ("quality",)


def vae_budget(settings: Settings) -> int:
    return settings.vae_budget or machine_memory() // 2


def num_windows(latent_frames: int, settings: Settings) -> int:
    return len(make_windows(latent_frames, settings.window, settings.overlap))
