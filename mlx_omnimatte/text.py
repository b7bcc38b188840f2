"""Conditioning encoders as pipeline stages: prompt -> UMT5 embedding (with an
on-disk cache), frame -> CLIP image features. Each stage loads its model,
runs it and frees it, so the DiT never shares memory with an encoder.

Reference behaviour (Wan2.1 `T5EncoderModel` / `HuggingfaceTokenizer` and
`CLIPModel.visual`):
* text is cleaned (`clean='whitespace'`): ftfy.fix_text, HTML unescaped
  twice, stripped, whitespace runs collapsed to one space;
* tokenized with the umt5-xxl tokenizer.json (its post-processor appends
  `</s>`), truncated to 512 tokens (the `</s>` kept) and padded with `<pad>`;
* the encoder output past the prompt's length (tokens incl. `</s>`) is zero;
* CLIP: the frame in [-1, 1] is resized to 224x224 (whole frame, aspect not
  kept) with torch's bicubic filter (A = -0.75, align_corners=False, no
  antialias), mapped to [0, 1] and normalized with the CLIP mean/std.
"""

from __future__ import annotations

import gc
import hashlib
import html
import json
import logging
import os
import re
import unicodedata
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import OmnimatteError
from .progress import Progress, quiet

log = logging.getLogger(__name__)

TEXT_LEN = 512
CACHE_ENV = "MLX_OMNIMATTE_CACHE"
DEFAULT_CACHE = Path("~/.cache/mlx-omnimatte/prompts")
# bump when a change here alters the embeddings of an unchanged prompt and encoder
CACHE_VERSION = 1

# --------------------------------------------------------------------------- text cleaning

# Unicode White_Space: what the `regex` module's \s matches in Wan's whitespace_clean
_WHITESPACE = re.compile("[\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
_ANSI = re.compile(r"\x1b\[((?:\d|;)*)([a-zA-Z])")
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u02bc": "'",
                         "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"'})
_LIGATURES = str.maketrans({"\u0132": "IJ", "\u0133": "ij", "\u0149": "\u02bcn", "\u01c4": "D\u017d",
                            "\u01c5": "D\u017e", "\u01c6": "d\u017e", "\u01c7": "LJ", "\u01c8": "Lj",
                            "\u01c9": "lj", "\u01ca": "NJ", "\u01cb": "Nj", "\u01cc": "nj",
                            "\u01f1": "DZ", "\u01f2": "Dz", "\u01f3": "dz", "\u02a3": "dz", "\u02a6": "ts",
                            "\u02aa": "ls", "\u02ab": "lz", "\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl",
                            "\ufb03": "ffi", "\ufb04": "ffl", "\ufb05": "\u017ft", "\ufb06": "st"})
# control characters ftfy removes (C0 but tab/newline/CR/FF, DEL, bidi and
# interlinear marks, BOM, ...)
_CONTROL = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f\u206a-\u206f\ufeff\ufff9-\ufffc\U0001d173-\U0001d17a"
                      "\U000e0000-\U000e007f]")


def _fix_text_fallback(text: str) -> str:
    """The parts of ftfy.fix_text that matter for prompts typed by people:
    terminal escapes, curly quotes, Latin ligatures, fullwidth forms, control
    characters, NFC. (ftfy's mojibake repair is not reproduced.)"""
    text = _ANSI.sub("", text)
    text = text.translate(_QUOTES).translate(_LIGATURES)
    text = "".join(unicodedata.normalize("NFKC", c) if 0xFF01 <= ord(c) <= 0xFFEF or c == "\u3000" else c
                   for c in text)
    text = _CONTROL.sub("", text)
    return unicodedata.normalize("NFC", text)


def clean_prompt(text: str) -> str:
    """Wan's `clean='whitespace'`: ftfy (or its documented fallback when ftfy is
    not installed), HTML unescaped twice, stripped, whitespace collapsed."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        text = _fix_text_fallback(text)
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
        from tokenizers import Tokenizer

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


# --------------------------------------------------------------------------- prompt cache


def cache_root(cache_dir=None) -> Path:
    """`cache_dir`, else $MLX_OMNIMATTE_CACHE, else ~/.cache/mlx-omnimatte/prompts."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def _weight_files(t5_dir: Path) -> list[Path]:
    index = t5_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError):
            raise OmnimatteError(f"{index}: unreadable weight index") from None
        return [t5_dir / n for n in names]
    return [t5_dir / "model.safetensors"]


def encoder_fingerprint(t5_dir, quantize: int | None = None) -> str:
    """A cheap identity of the text encoder: config, tokenizer, and for each
    weight file its size and first/last MiB (header and a sample of values;
    any re-conversion of other weights changes it)."""
    t5_dir = Path(t5_dir)
    h = hashlib.sha256(f"v{CACHE_VERSION} q{quantize}".encode())
    for f in [t5_dir / "config.json", t5_dir / "tokenizer" / "tokenizer.json"]:
        if not f.is_file():
            raise OmnimatteError(f"{f}: missing (not a converted text encoder directory?)")
        h.update(f.read_bytes())
    for f in _weight_files(t5_dir):
        try:
            size = f.stat().st_size
            with open(f, "rb") as fh:
                head = fh.read(1 << 20)
                fh.seek(max(0, size - (1 << 20)))
                tail = fh.read()
        except OSError:
            raise OmnimatteError(f"{f}: missing weight file") from None
        h.update(f"{f.name}:{size}".encode() + head + tail)
    return h.hexdigest()[:24]


def _cache_file(root: Path, fingerprint: str, text: str) -> Path:
    return root / fingerprint / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.safetensors"


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


def _write_cached(path: Path, text: str, context: mx.array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.safetensors")
    mx.save_safetensors(str(tmp), {"context": context}, metadata={"prompt": text, "tokens": str(context.shape[0])})
    os.replace(tmp, path)


def load_text_encoder(t5_dir, quantize: int | None = None):
    from .models import t5
    from .weights import read_config

    t5_dir = Path(t5_dir)
    config = read_config(t5_dir)
    if config["component"] != "t5":
        raise OmnimatteError(f"{t5_dir}: holds a {config['component']}, not a t5 text encoder")
    return t5.load(t5_dir, config, quantize_bits=quantize)


def _pad(context: mx.array, text_len: int) -> mx.array:
    n, d = context.shape
    return mx.concatenate([context, mx.zeros((text_len - n, d), context.dtype)]) if n < text_len else context


def encode_prompts(t5_dir, prompts, cache_dir=None, *, quantize: int | None = None, batch_size: int = 4,
                   report: Progress | None = None, stats: dict | None = None) -> list[mx.array]:
    """Embeddings [512, d_model] (float32, zero past each prompt's tokens) of
    `prompts` (a text or a list of texts), read from the cache when present.
    The encoder is loaded only on a cache miss, run, and freed before return.
    `stats` (a dict) receives {"hits", "encoded", "tokens", "cache"}."""
    texts = [clean_prompt(p) for p in check_prompts(prompts)]
    t5_dir = Path(t5_dir)
    root = cache_root(cache_dir)
    fp = encoder_fingerprint(t5_dir, quantize)
    found = {t: _read_cached(_cache_file(root, fp, t), t) for t in dict.fromkeys(texts)}
    missing = [t for t, c in found.items() if c is None]
    if missing:
        report = report if report is not None else quiet()
        tokenizer = load_tokenizer(t5_dir)
        with report.stage("text encoder"):
            model = load_text_encoder(t5_dir, quantize)
            for i in range(0, len(missing), batch_size):
                batch = missing[i : i + batch_size]
                ids, mask = tokenizer(batch, clean=False)  # cleaned above
                lengths = mask.sum(axis=1)
                # padded keys are masked out, so the prompt's rows do not depend on how
                # far the padding goes: run only up to the longest prompt
                n = int(lengths.max())
                out = model(mx.array(ids[:, :n]), mx.array(mask[:, :n]))
                mx.eval(out)
                for j, text in enumerate(batch):
                    ctx = out[j, : int(lengths[j])]
                    _write_cached(_cache_file(root, fp, text), text, ctx)
                    found[text] = ctx
            del model, out
            gc.collect()
            mx.clear_cache()
        log.info("; ".join(report.lines()[-1:]))
    if stats is not None:
        stats.update(hits=len(found) - len(missing), encoded=len(missing),
                     tokens=[int(found[t].shape[0]) for t in texts], cache=str(root / fp))
    return [_pad(found[t], TEXT_LEN) for t in texts]


# --------------------------------------------------------------------------- CLIP


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of torch's bicubic resize (align_corners=False, no
    antialias, Keys' A = -0.75, border taps clamped), with torch's float32
    rounding: at 1920 px a float32 source coordinate is only good to ~1e-4, so
    the coordinate is rounded as torch's CPU kernel does (float32 scale, one
    fused multiply-add) to stay within 1e-6 of its weights."""
    f = np.float32
    a = f(-0.75)
    scale = np.float64(f(n_in) / f(n_out))
    src = (scale * (np.arange(n_out) + 0.5) - 0.5).astype(f)  # exact in float64, rounded once
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    t = np.clip(src - i0.astype(f), f(0), f(1))

    def near(x):  # |x| <= 1
        return ((a + f(2)) * x - (a + f(3))) * x * x + f(1)

    def far(x):  # 1 < |x| < 2
        return ((a * x - f(5) * a) * x + f(8) * a) * x - f(4) * a

    w = np.stack([far(t + f(1)), near(t), near(f(1) - t), far(f(1) - t + f(1))], axis=1)
    idx = np.clip(i0[:, None] + np.arange(-1, 3), 0, n_in - 1)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.repeat(np.arange(n_out), 4), idx.ravel()), w.ravel())
    return m


def clip_preprocess(frames, size: int = 224) -> mx.array:
    """frames [H, W, 3] or [B, H, W, 3], uint8 in [0, 255] or float in [-1, 1]
    -> normalized pixels [B, size, size, 3] float32 (the reference transform)."""
    from .models.clip import MEAN, STD

    a = np.asarray(frames)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise OmnimatteError(f"clip frame: expected [H, W, 3] or [B, H, W, 3], got shape {a.shape}")
    x = a.astype(np.float32) / 127.5 - 1.0 if a.dtype == np.uint8 else a.astype(np.float32)
    wh = mx.array(bicubic_matrix(a.shape[1], size))
    ww = mx.array(bicubic_matrix(a.shape[2], size))
    x = mx.einsum("oh,bhwc->bowc", wh, mx.array(x))
    x = mx.einsum("pw,bowc->bopc", ww, x)
    return ((x * 0.5 + 0.5) - mx.array(MEAN)) / mx.array(STD)


def clip_features(clip_dir, frame, *, report: Progress | None = None) -> mx.array:
    """CLIP features [B, 257, 1280] (float32) of one frame [H, W, 3] (B = 1)
    or a batch: load the vision tower, preprocess, run, free."""
    from .weights import load_model

    report = report if report is not None else quiet()
    with report.stage("clip"):
        model = load_model(clip_dir, component="clip")
        pixels = clip_preprocess(frame, model.config.image_size)
        out = model(pixels)
        mx.eval(out)
        del model
        gc.collect()
        mx.clear_cache()
    log.info(report.lines()[-1])
    return out
