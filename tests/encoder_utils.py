"""Text-encoder helpers shared by tests (no tests here): random UMT5 weights
in the Hugging Face layout and their Wan names, and a tiny umt5-like
tokenizer (the package's, `convert/tiny.py`)."""

from __future__ import annotations

from mlx_omnimatte.convert.tiny import CORPUS, make_tokenizer  # noqa: F401 (shared)
from mlx_omnimatte.convert.tiny import T5_WAN_NAMES as WAN_NAMES  # noqa: F401
from mlx_omnimatte.convert.tiny import t5_hf_weights as hf_weights  # noqa: F401
from mlx_omnimatte.convert.tiny import t5_to_wan as to_wan  # noqa: F401
