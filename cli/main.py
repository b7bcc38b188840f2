"""`mlx-omnimatte`: the command line. Each command lives in its own module;
this one holds the group and the error policy (one line, exit status 2)."""

from __future__ import annotations

import sys

import click

from mlx_omnimatte.errors import OmnimatteError

from .convert import convert
from .prompts import encode_prompts_cmd
from .run import composite, decompose, remove


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-omnimatte")
def cli():
    """Video layer decomposition (omnimatte) with MLX.

    \b
    Examples:
      mlx-omnimatte convert alibaba-pai/Wan2.1-Fun-1.3B-InP --transformer casper.safetensors -o models/casper-1.3b
      mlx-omnimatte remove clips/boys-beach --bundle models/casper-1.3b -o out/beach
      mlx-omnimatte decompose clips/boys-beach --bundle models/omnimatte-1.3b -o out/beach
      mlx-omnimatte composite out/beach/object_00/layer --background sunset.jpg -o out/sunset.mp4
    """


for command in (convert, remove, decompose, composite, encode_prompts_cmd):
    cli.add_command(command)


def main(argv=None):
    try:
        cli.main(args=argv, standalone_mode=False)
    except OmnimatteError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("interrupted: nothing was written", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted: nothing was written", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    sys.exit(0)


if __name__ == "__main__":
    main()
