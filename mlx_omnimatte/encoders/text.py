"""The prompt encoder as a pipeline stage: caption -> UMT5 embedding, with an
on-disk cache. The encoder is loaded only on a cache miss, run and freed, so
the DiT never shares memory with it.

Reference behaviour (Wan2.1 `T5EncoderModel` / `HuggingfaceTokenizer` and
`CLIPModel.visual`):
* text is cleaned (`clean='whitespace'`): ftfy.fix_text, HTML unescaped
  twice, stripped, whitespace runs collapsed to one space;
* tokenized with the umt5-xxl tokenizer.json (its post-processor appends
  `</s>`), truncated to 512 tokens (the `</s>` kept) and padded with `<pad>`;
* the encoder output past the prompt's length (tokens incl. `</s>`) is zero.
"""

from __future__ import annotations

import gc
import hashlib
import html
import logging
import os
import re
from pathlib import Path

import ftfy
import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer

from ..errors import OmnimatteError
from ..models import t5
from ..progress import Report, stage
from ..weights import fingerprint, load_weights, read_config

log = logging.getLogger(__name__)

TEXT_LEN = 512
CACHE_ENV = "MLX_OMNIMATTE_CACHE"
DEFAULT_CACHE = Path("~/.cache/mlx-omnimatte/prompts")
# bump when a change here alters the embeddings of an unchanged prompt and encoder
CACHE_VERSION = 1

# --------------------------------------------------------------------------- text cleaning

# Unicode White_Space: what the `regex` module's \s matches in Wan's whitespace_clean
_WHITESPACE = re.compile("[\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def clean_prompt(text: str) -> str:
    """Wan's `clean='whitespace'`: ftfy, HTML unescaped twice, stripped,
    whitespace collapsed."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


def check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise OmnimatteError(f"prompts: expected text or a list of texts, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise OmnimatteError(f"prompt {i}: expected text, got {type(p).__name__} ({p!r:.40})")
    return list(prompts)


# --------------------------------------------------------------------------- tokenizer


class PromptTokenizer:
    """tokenizer.json (the `tokenizers` library, as transformers' fast
    tokenizer) with Wan's cleaning, truncation and padding."""

    def __init__(self, path: Path, text_len: int = TEXT_LEN):
        path = Path(path)
        if not path.is_file():
            raise OmnimatteError(f"{path}: tokenizer file missing (convert the text encoder with its "
                                 "google/umt5-xxl tokenizer folder beside it)")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise OmnimatteError(f"{path}: not a tokenizer.json ({str(e).splitlines()[0]})") from None
        self.pad_id = self.tokenizer.token_to_id("<pad>")
        if self.pad_id is None:
            raise OmnimatteError(f"{path}: the tokenizer has no <pad> token")
        self.text_len = text_len
        self.tokenizer.no_padding()
        # as transformers' truncation=True, max_length=512: the appended </s> counts and is kept
        self.tokenizer.enable_truncation(max_length=text_len)

    def __call__(self, prompts, clean: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """ids, mask: int32 [B, text_len]; mask is 1 on the prompt's tokens.
        `clean=False` for texts already through `clean_prompt` (cleaning twice
        is not a no-op: HTML entities are unescaped twice per pass)."""
        texts = check_prompts(prompts)
        texts = [clean_prompt(p) for p in texts] if clean else texts
        encs = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        ids = np.full((len(texts), self.text_len), self.pad_id, np.int32)
        mask = np.zeros((len(texts), self.text_len), np.int32)
        for i, e in enumerate(encs):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        return ids, mask


def load_tokenizer(t5_dir, text_len: int = TEXT_LEN) -> PromptTokenizer:
    return PromptTokenizer(Path(t5_dir) / "tokenizer" / "tokenizer.json", text_len)


def prompt_tokens(t5_dir, prompt: str) -> int:
    """How many tokens `prompt` makes before the cut at TEXT_LEN (no weights
    load), so a run can say that a long caption is cut."""
    tokenizer = load_tokenizer(t5_dir).tokenizer
    tokenizer.no_truncation()
    return len(tokenizer.encode(clean_prompt(check_prompts([prompt])[0]), add_special_tokens=True).ids)


# --------------------------------------------------------------------------- prompt cache


def cache_root(cache_dir=None) -> Path:
    """`cache_dir`, else $MLX_OMNIMATTE_CACHE, else ~/.cache/mlx-omnimatte/prompts."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def encoder_fingerprint(t5_dir, quantize: int | None = None) -> str:
    """The text encoder's identity (`weights.fingerprint`, its tokenizer
    included) under this cache's version and quantization."""
    return fingerprint(t5_dir, ["tokenizer/tokenizer.json"], f"v{CACHE_VERSION} q{quantize}")


def _cache_file(root: Path, key: str, text: str) -> Path:
    return root / key / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.safetensors"


def _read_cached(path: Path, text: str) -> mx.array | None:
    if not path.is_file():
        return None
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError):
        return None  # a torn or foreign file: encode again and overwrite
    if meta.get("prompt") != text or "context" not in arrays:
        return None
    return arrays["context"]


def _write_cached(path: Path, text: str, context: mx.array) -> bool:
    """Store one embedding atomically; False (and nothing left) when the cache
    folder cannot be written: the run goes on without a cache."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.safetensors")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(tmp), {"context": context},
                            metadata={"prompt": text, "tokens": str(context.shape[0])})
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True) if tmp.parent.is_dir() else None
        log.warning("prompt cache %s not writable (%s): continuing without a cache", path.parent.parent,
                    e.strerror or e)
        return False
    return True


def load_text_encoder(t5_dir, quantize: int | None = None):
    t5_dir = Path(t5_dir)
    config = read_config(t5_dir)
    if config["component"] != "t5":
        raise OmnimatteError(f"{t5_dir}: holds a {config['component']}, not a t5 text encoder")
    return t5.load(t5_dir, config, load_weights(t5_dir), quantize_bits=quantize)


def _pad(context: mx.array, text_len: int) -> mx.array:
    n, d = context.shape
    return mx.concatenate([context, mx.zeros((text_len - n, d), context.dtype)]) if n < text_len else context


def _encode_missing(t5_dir: Path, texts: list[str], quantize, batch_size: int, report: Report) -> dict:
    """Run the text encoder (loaded here, freed before return) on `texts`:
    text -> embedding of its tokens [n, d_model]."""
    tokenizer = load_tokenizer(t5_dir)
    out_of = {}
    with stage(report, "text encoder", len(texts)) as tick:
        model = load_text_encoder(t5_dir, quantize)
        for i in range(0, len(texts), batch_size):
            batch = texts[i : i + batch_size]
            ids, mask = tokenizer(batch, clean=False)  # cleaned by the caller
            lengths = mask.sum(axis=1)
            # padded keys are masked out, so the prompt's rows do not depend on how
            # far the padding goes: run only up to the longest prompt
            n = int(lengths.max())
            out = model(mx.array(ids[:, :n]), mx.array(mask[:, :n]))
            mx.eval(out)
            for j, text in enumerate(batch):
                out_of[text] = out[j, : int(lengths[j])]
            tick(n=len(batch))
        del model, out
        gc.collect()
        mx.clear_cache()
    return out_of


def prompt_cached(t5_dir, prompt: str, cache_dir=None, quantize: int | None = None) -> bool:
    """Whether `prompt`'s embedding is in the cache (the planner then leaves
    the text encoder out)."""
    text = clean_prompt(check_prompts([prompt])[0])
    return _cache_file(cache_root(cache_dir), encoder_fingerprint(t5_dir, quantize), text).is_file()


def encode_prompts(t5_dir, prompts, cache_dir=None, *, quantize: int | None = None, batch_size: int = 4,
                   report: Report = None, stats: dict | None = None) -> list[mx.array]:
    """Embeddings [512, d_model] (float32, zero past each prompt's tokens) of
    `prompts` (a text or a list of texts), read from the cache when present.
    The encoder is loaded only on a cache miss, run, and freed before return.
    An unwritable cache folder costs a warning, not the run.
    `stats` (a dict) receives {"hits", "encoded", "tokens", "cache"}."""
    texts = [clean_prompt(p) for p in check_prompts(prompts)]
    t5_dir = Path(t5_dir)
    root = cache_root(cache_dir)
    fp = encoder_fingerprint(t5_dir, quantize)
    found = {t: _read_cached(_cache_file(root, fp, t), t) for t in dict.fromkeys(texts)}
    missing = [t for t, c in found.items() if c is None]
    if missing:
        encoded = _encode_missing(t5_dir, missing, quantize, batch_size, report)
        for text, ctx in encoded.items():
            if not _write_cached(_cache_file(root, fp, text), text, ctx):
                break  # warned once; the embeddings are still used
        found.update(encoded)
    if stats is not None:
        stats.update(hits=len(found) - len(missing), encoded=len(missing),
                     tokens=[int(found[t].shape[0]) for t in texts], cache=str(root / fp))
    return [_pad(found[t], TEXT_LEN) for t in texts]
