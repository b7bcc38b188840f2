"""`mlx-omnimatte encode-prompts`: precompute prompt embeddings into the cache,
so later runs never load the ~11 GB text encoder for these prompts."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.progress import quiet
from mlx_omnimatte.encoders.text import encode_prompts


def read_prompt_file(path: Path) -> list[str]:
    """A .json file (a text, a list of texts, or an object of texts such as
    prompt.json's {"bg": ...}) or a text file with one prompt per line."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise OmnimatteError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(raw)
        except ValueError:
            raise OmnimatteError(f"{path}: not valid JSON") from None
        items = [data] if isinstance(data, str) else list(data.values()) if isinstance(data, dict) else data
        if not isinstance(items, list) or not all(isinstance(p, str) for p in items):
            raise OmnimatteError(f"{path}: expected a text, a list of texts or an object of texts")
        return items
    return [line for line in raw.splitlines() if line.strip()]


@click.command("encode-prompts")
@click.argument("prompts", nargs=-1)
@click.option("--t5", "t5_dir", type=click.Path(path_type=Path), required=True,
              help="Converted text encoder directory (mlx-omnimatte convert ... --component t5).")
@click.option("-f", "--file", "files", type=click.Path(path_type=Path), multiple=True,
              help="Prompts from a file: one per line, or JSON (a text, a list, or {\"bg\": ...}). Repeatable.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Prompt cache (default: $MLX_OMNIMATTE_CACHE or ~/.cache/mlx-omnimatte/prompts).")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None,
              help="Run the encoder with 4- or 8-bit weights (cached apart from full-precision results).")
@click.option("--batch-size", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Prompts encoded together.")
def encode_prompts_cmd(prompts, t5_dir, files, cache_dir, quantize, batch_size):
    """Encode PROMPTS with the UMT5 text encoder and store the embeddings in
    the prompt cache (keyed by the encoder's weights and the cleaned text).

    \b
    Examples:
      mlx-omnimatte encode-prompts --t5 models/t5 "an empty street at dusk"
      mlx-omnimatte encode-prompts --t5 models/t5 -f prompts.txt
      mlx-omnimatte encode-prompts --t5 models/t5 -f clip/prompt.json --quantize 8
    """
    texts = list(prompts)
    for f in files:
        texts += read_prompt_file(f)
    if not texts:
        raise OmnimatteError("encode-prompts: no prompts (give them as arguments or with --file)")
    report, stats = quiet(), {}
    encode_prompts(t5_dir, texts, cache_dir, quantize=int(quantize) if quantize else None,
                   batch_size=batch_size, report=report, stats=stats)
    for text, n in zip(texts, stats["tokens"]):
        click.echo(f"{n:4d} tokens  {text if len(text) <= 60 else text[:57] + '...'}")
    click.echo(f"{stats['encoded']} encoded, {stats['hits']} already cached -> {stats['cache']}")
    for line in report.lines():
        click.echo(line)
