"""Every command speaks the same way: each option says what it does, every
command with an output has -o and --overwrite, every --quiet has -q, and
every --seed defaults to the one default seed."""

from __future__ import annotations

import click
import pytest

from mlx_omnimatte.cli.main import COMMANDS, cli
from mlx_omnimatte.pipelines.optimize import PLATE_MILESTONES, OptimizeSettings
from mlx_omnimatte.sampling import DEFAULT_SEED


def _options(name: str) -> list[click.Option]:
    return [p for p in cli.get_command(None, name).params if isinstance(p, click.Option)]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_says_what_it_does(name):
    silent = [p.opts for p in _options(name) if not (p.help or "").strip()]
    assert not silent, f"{name}: options without help: {silent}"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_same_flags_everywhere(name):
    opts = {o for p in _options(name) for o in p.opts}
    if "-o" in opts:
        assert "--overwrite" in opts, name
    if "--quiet" in opts:
        assert "-q" in opts, name
    for p in _options(name):
        if p.name == "seed":
            assert p.default == DEFAULT_SEED, name


def test_iterations_help_states_both_schedules():
    help_text = next(p.help for p in _options("decompose") if p.name == "iterations")
    s = OptimizeSettings()
    # the reference's schedule as fractions of its 6000 steps, as the help says
    assert [m / s.iterations for m in s.milestones] == [1 / 12, 1 / 6, 1 / 3] and s.mask_steps / s.iterations == 1 / 6
    assert "lr x0.1 at 1/12, 1/6, 1/3; mask supervision for the first 1/6" in help_text
    assert PLATE_MILESTONES == (0.7, 0.9) and "clean plate: lr x0.1 at 70% and 90%" in help_text
