"""`mlx-omnimatte`: the command line. Each command lives in its own module,
imported only when that command runs (so `--help` and quick commands do not
load every model); this one holds the group, the command table and the error
policy: one line, exit status 2 (also for the system's errors: a full disk,
a folder that cannot be written); Ctrl-C, SIGTERM and SIGHUP leave nothing
half-written and exit 130, 143 and 129."""

from __future__ import annotations

import importlib
import signal
import sys

import click

from mlx_omnimatte.errors import OmnimatteError

# command name -> "module:function"
COMMANDS = {
    "convert": "mlx_omnimatte.cli.convert:convert",
    "remove": "mlx_omnimatte.cli.run:remove",
    "decompose": "mlx_omnimatte.cli.run:decompose",
    "composite": "mlx_omnimatte.cli.composite:composite",
    "encode-prompts": "mlx_omnimatte.cli.prompts:encode_prompts_cmd",
    "synth": "mlx_omnimatte.cli.synth:synth",
    "evaluate": "mlx_omnimatte.cli.evaluate:evaluate_cmd",
    "prepare": "mlx_omnimatte.cli.train:prepare",
    "train": "mlx_omnimatte.cli.train:train",
    "export": "mlx_omnimatte.cli.train:export",
    "analyze": "mlx_omnimatte.cli.analyze:analyze",
    "calibrate-cache": "mlx_omnimatte.cli.cache:calibrate_cache",
    "mask": "mlx_omnimatte.cli.mask:mask",
    "tiny-bundle": "mlx_omnimatte.cli.tiny:tiny_bundle",
}


class Terminated(BaseException):
    """SIGTERM / SIGHUP, raised where the program is so that every open
    atomic output is removed on the way out (as for Ctrl-C)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame):
    raise Terminated(signum)


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-omnimatte")
def cli():
    """Video layer decomposition (omnimatte) with MLX.

    \b
    Without any weights (a generated clip at a real size, decomposed against its plate):
      mlx-omnimatte synth -o clips/synth --frames 81 --size 832x480 --objects 2 --effect shadow \\
          --effect reflection --plate removal
      mlx-omnimatte decompose clips/synth --clean-plate clips/synth/truth/background_removal -o out/synth
      mlx-omnimatte evaluate out/synth --clip clips/synth --truth clips/synth/truth
    Masks from a few words (needs the extra: pip install "mlx-omnimatte[masks]"):
      mlx-omnimatte mask beach.mp4 --text "a boy" -o clips/beach
    Without a download (random weights: the outputs mean nothing, for trying the commands):
      mlx-omnimatte tiny-bundle -o models/tiny --experts
    With converted weights:
      mlx-omnimatte convert alibaba-pai/Wan2.1-Fun-1.3B-InP --transformer casper.safetensors -o models/casper-1.3b
      mlx-omnimatte remove clips/boys-beach --bundle models/casper-1.3b -o out/beach
      mlx-omnimatte decompose clips/boys-beach --bundle models/omnimatte-1.3b -o out/beach
      mlx-omnimatte composite out/beach/object_00/layer --background sunset.jpg -o out/sunset.mp4
    """


def _kept(e: BaseException) -> str:
    """What an interrupted command leaves: nothing, unless it says (a
    training run keeps its checkpoint)."""
    for cause in (e, e.__cause__):  # click turns Ctrl-C into an Abort raised from it
        if hasattr(cause, "kept"):
            return cause.kept
    return "nothing was written"


def main(argv=None):
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        cli.main(args=argv, standalone_mode=False)
    except OmnimatteError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt) as e:
        click.echo(f"interrupted: {_kept(e)}", err=True)
        sys.exit(130)
    except Terminated as e:
        click.echo(f"terminated by {signal.Signals(e.signum).name}: {_kept(e)}", err=True)
        sys.exit(128 + e.signum)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except OSError as e:  # disk full, permissions: the system's words, one line; outputs already removed
        where = f"{e.filename}: " if e.filename else ""
        click.echo(f"error: {where}{e.strerror or e}; nothing was written", err=True)
        sys.exit(2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    sys.exit(0)


if __name__ == "__main__":
    main()
