"""Prompt cleaning, tokenization, the prompt-embedding cache and the
encode-prompts command, with a tiny tokenizer and a tiny converted UMT5."""

import json

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file

from encoder_utils import CORPUS, hf_weights, make_tokenizer
from mlx_omnimatte.encoders import text
from mlx_omnimatte.cli.main import cli
from mlx_omnimatte.cli.prompts import encode_prompts_cmd
from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.models import t5
from helpers import invoke, run_cli

@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):

    root = tmp_path_factory.mktemp("t5")
    src = root / "src"
    src.mkdir()
    save_file(hf_weights(seed=5), str(src / "model.safetensors"))
    make_tokenizer(src)
    res = invoke(["convert", src / "model.safetensors", "-o", root / "t5", "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    return root / "t5"


# --------------------------------------------------------------------------- cleaning, tokenizer


@pytest.mark.parametrize("raw,clean", [
    ("  a  b\t\tc\n\nd  ", "a b c d"),
    ("&amp;amp; &lt;x&gt;", "& <x>"),
    ("\u00a0nbsp\u2003em\u3000ideo", "nbsp em ideo"),
    ("", ""),
])
def test_clean_prompt(raw, clean):
    assert text.clean_prompt(raw) == clean


def test_encode_cleans_once(t5_dir, tmp_path):
    """Cleaning is not idempotent (HTML is unescaped twice per pass): the text
    encoded must be the once-cleaned one."""
    raw = "x <b> &amp;amp;lt; y"
    once = text.clean_prompt(raw)
    twice = text.clean_prompt(once)
    tok = text.load_tokenizer(t5_dir)
    n_once, n_twice = (int(tok([t], clean=False)[1].sum()) for t in (once, twice))
    assert once != twice and n_once != n_twice
    stats = {}
    text.encode_prompts(t5_dir, [raw], tmp_path, stats=stats)
    assert stats["tokens"] == [n_once]


def test_clean_quotes_ligatures_width_controls():
    assert text.clean_prompt("it’s “ﬁne”  ＡＢＣ\x07 e\u0301") == "it's \"fine\" ABC \u00e9"


def test_tokenizer_pad_truncate(t5_dir):
    tok = text.load_tokenizer(t5_dir)
    ids, mask = tok(["a quiet street", "", " ".join(CORPUS) * 30])
    assert ids.shape == mask.shape == (3, 512) and ids.dtype == np.int32
    n = mask.sum(1)
    assert n[1] == 1 and ids[1, 0] == 1 and not ids[1, 1:].any()  # empty: only </s>, then <pad>
    assert ids[0, n[0] - 1] == 1 and not ids[0, n[0]:].any() and 3 < n[0] < 20
    assert n[2] == 512 and ids[2, 511] == 1  # truncated to 512 with </s> kept
    # whitespace cleaning happens before tokenization
    a, _ = tok(["  a   quiet\n street "])
    np.testing.assert_array_equal(a[0], ids[0])


@pytest.mark.parametrize("bad", [None, 3, ["ok", None], [b"bytes"], {"bg": "x"}])
def test_prompt_not_text(bad, t5_dir, tmp_path):
    with pytest.raises(OmnimatteError) as e:
        text.encode_prompts(t5_dir, bad, tmp_path)
    assert "\n" not in str(e.value) and "expected text" in str(e.value)


def test_missing_tokenizer_file(t5_dir, tmp_path):
    import shutil

    broken = tmp_path / "t5"
    shutil.copytree(t5_dir, broken)
    (broken / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(OmnimatteError, match="tokenizer.json"):
        text.encode_prompts(broken, ["a street"], tmp_path / "cache")
    with pytest.raises(OmnimatteError, match="tokenizer file missing"):
        text.load_tokenizer(broken)


# --------------------------------------------------------------------------- encode + cache


def test_encode_prompts_zero_past_length(t5_dir, tmp_path):
    stats = {}
    out = text.encode_prompts(t5_dir, ["a quiet street at dusk", ""], tmp_path, stats=stats)
    ids, mask = text.load_tokenizer(t5_dir)(["a quiet street at dusk", ""])
    n = mask.sum(1)
    assert [o.shape for o in out] == [(512, 64), (512, 64)] and stats["tokens"] == n.tolist()
    for o, k in zip(out, n):
        assert not mx.any(o[k:]).item() and mx.all(mx.abs(o[:k]).sum(-1) > 0).item()
    # the cached rows are the encoder's output on the full padded 512 tokens
    model = text.load_text_encoder(t5_dir)
    full = model(mx.array(ids), mx.array(mask))
    assert mx.abs(full[0, : n[0]] - out[0][: n[0]]).max().item() < 1e-5


def test_second_call_does_not_build_encoder(t5_dir, tmp_path, monkeypatch):
    built = []
    init = t5.Model.__init__
    monkeypatch.setattr(t5.Model, "__init__", lambda self, cfg: (built.append(1), init(self, cfg))[1])
    prompts = ["an empty beach", "a forest path"]
    first = text.encode_prompts(t5_dir, prompts, tmp_path)
    assert len(built) == 1
    stats = {}
    second = text.encode_prompts(t5_dir, prompts[::-1] + prompts, tmp_path, stats=stats)
    assert len(built) == 1 and stats == {**stats, "hits": 2, "encoded": 0}
    assert mx.array_equal(second[1], first[0]) and mx.array_equal(second[2], first[0])
    # a new prompt loads the encoder once more, for that prompt only
    text.encode_prompts(t5_dir, prompts + ["a new prompt"], tmp_path, stats=stats)
    assert len(built) == 2 and stats["encoded"] == 1 and stats["hits"] == 2


def test_cache_keys_on_weights_and_env(t5_dir, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv(text.CACHE_ENV, str(tmp_path / "envcache"))
    text.encode_prompts(t5_dir, ["a street"])
    files = list((tmp_path / "envcache").rglob("*.safetensors"))
    assert len(files) == 1
    # other weights of the same shapes: a different key, not a stale hit
    other = tmp_path / "other"
    shutil.copytree(t5_dir, other)
    w = dict(mx.load(str(other / "model.safetensors")))
    w["norm.weight"] = w["norm.weight"] * 2
    mx.save_safetensors(str(other / "model.safetensors"), w)
    assert text.encoder_fingerprint(other) != text.encoder_fingerprint(t5_dir)
    assert text.encoder_fingerprint(t5_dir, quantize=8) != text.encoder_fingerprint(t5_dir)
    stats = {}
    text.encode_prompts(other, ["a street"], stats=stats)
    assert stats["encoded"] == 1 and len(list((tmp_path / "envcache").rglob("*.safetensors"))) == 2
    # a corrupt cache file is re-encoded, not trusted
    files[0].write_bytes(b"junk")
    text.encode_prompts(t5_dir, ["a street"], stats=stats)
    assert stats["encoded"] == 1


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(text.CACHE_ENV, raising=False)
    assert text.cache_root().as_posix().endswith(".cache/mlx-omnimatte/prompts")
    monkeypatch.setenv(text.CACHE_ENV, str(tmp_path / "a"))
    assert text.cache_root() == tmp_path / "a" and text.cache_root(tmp_path / "b") == tmp_path / "b"


def test_quantized_at_load_cached_apart(t5_dir, tmp_path):
    # d_model 64 is one quantization group; toy weights: bf16 alone costs 2e-2 here
    full = text.encode_prompts(t5_dir, ["a quiet street"], tmp_path)[0]
    stats = {}
    q = text.encode_prompts(t5_dir, ["a quiet street"], tmp_path, quantize=8, stats=stats)[0]
    assert stats["encoded"] == 1
    err = (mx.abs(q - full).max() / mx.abs(full).max()).item()
    assert 0 < err < 0.15


# --------------------------------------------------------------------------- CLI


def test_encode_prompts_command(t5_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(cli.commands, "encode-prompts", encode_prompts_cmd)
    (tmp_path / "p.txt").write_text("a quiet street\n\nan empty room\n")
    (tmp_path / "prompt.json").write_text(json.dumps({"bg": "a clean beach"}))
    args = ["encode-prompts", "--t5", str(t5_dir), "--cache-dir", str(tmp_path / "c"), "a forest",
            "-f", str(tmp_path / "p.txt"), "-f", str(tmp_path / "prompt.json")]
    code, out, _ = run_cli(args, capsys)
    assert code == 0 and "4 encoded, 0 already cached" in out and "text encoder: peak" in out
    code, out, _ = run_cli(args, capsys)
    assert code == 0 and "0 encoded, 4 already cached" in out
    code = run_cli(["encode-prompts", "--t5", str(t5_dir)])[0]
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    (tmp_path / "bad.json").write_text("[1, 2]")
    code = run_cli(["encode-prompts", "--t5", str(t5_dir), "-f", str(tmp_path / "bad.json")])[0]
    assert code == 2 and "bad.json" in capsys.readouterr().err
