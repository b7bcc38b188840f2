"""The one JSON reader: a file that is missing, unreadable, not JSON or not
an object is one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import OmnimatteError


def parse_json(text: str | bytes, where: str | Path) -> dict:
    """``text`` as a JSON object, or an error naming ``where``."""
    try:
        data = json.loads(text)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
        raise OmnimatteError(f"{where}: not valid JSON ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise OmnimatteError(f"{where}: must be a JSON object, not {type(data).__name__}")
    return data


def read_json(path: str | Path) -> dict:
    """The JSON object in ``path``, or an error naming it."""
    try:
        text = Path(path).read_bytes()
    except OSError as e:
        raise OmnimatteError(f"{path}: not readable ({e.strerror or e})") from None
    return parse_json(text, path)
