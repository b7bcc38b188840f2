"""Parity of the UMT5 text encoder, its converter and the prompt pipeline with
transformers (UMT5EncoderModel, AutoTokenizer) and Wan's text cleaning.

Weights are random (fixed seeds), written in the real source layouts
(Hugging Face `save_pretrained` safetensors; Wan's `.pth` via torch.save) and
reach MLX through `mlx-omnimatte convert`.

Run ``python parity/test_t5_parity.py`` to print the error, quantization and
timing table at XXL width.
"""

import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from helpers import rel_err  # noqa: E402
from encoder_reference import (  # noqa: E402
    PROMPT_CORPUS, build_spm_tokenizer, hf_to_wan_t5, hf_umt5, wan_clean, wan_tokenize,
)
from mlx_omnimatte.encoders import text  # noqa: E402
from mlx_omnimatte.cli.main import cli  # noqa: E402
from mlx_omnimatte.models.t5 import relative_buckets  # noqa: E402
from mlx_omnimatte.weights import load_model  # noqa: E402

pytestmark = pytest.mark.torch

TOL = 1e-4
TINY = dict(vocab=1000, d_model=64, d_kv=16, d_ff=160, heads=4, layers=3)
XXL_WIDTH = dict(vocab=1000, d_model=4096, d_kv=64, d_ff=10240, heads=64, layers=2)


def convert(src: Path, out: Path, *args) -> Path:
    res = CliRunner().invoke(cli, ["convert", str(src), "-o", str(out), *args])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return out


def write_sources(model, root: Path, dtype=torch.float32) -> dict:
    """The model as a HF folder (safetensors + config + tokenizer) and as Wan's
    .pth with the tokenizer in google/umt5-xxl/ beside it."""
    hf_dir = root / "hf"
    model.to(dtype).save_pretrained(hf_dir)
    build_spm_tokenizer(hf_dir)
    wan_dir = root / "wan"
    wan_dir.mkdir()
    torch.save(hf_to_wan_t5(model.state_dict()), wan_dir / "models_t5_umt5-xxl-enc-bf16.pth")
    build_spm_tokenizer(wan_dir / "google" / "umt5-xxl")
    model.float()
    return {"hf": hf_dir, "wan": wan_dir / "models_t5_umt5-xxl-enc-bf16.pth"}


def batch(vocab: int, lengths: list[int], total: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(len(lengths), total))
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, n - 1] = 1  # </s>
        ids[i, n:] = 0  # <pad>
        mask[i, :n] = 1
    return ids, mask


def hf_forward(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()


# --------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("length", [1, 9, 200, 512, 700])
def test_relative_buckets_match_transformers(length):
    model = hf_umt5(**TINY)
    attn = model.encoder.block[0].layer[0].SelfAttention
    pos = torch.arange(length)
    ref = attn._relative_position_bucket(pos[None, :] - pos[:, None]).numpy()
    np.testing.assert_array_equal(relative_buckets(length, 32, 128), ref)


# --------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5tiny")
    model = hf_umt5(**TINY)
    sources = write_sources(model, root)
    dirs = {fmt: convert(src, root / f"mlx_{fmt}", "--dtype", "float32") for fmt, src in sources.items()}
    return model, dirs


@pytest.mark.parametrize("fmt", ["hf", "wan"])
def test_t5_tiny_parity(tiny, fmt):
    model, dirs = tiny
    mine = load_model(dirs[fmt], component="t5")
    ids, mask = batch(TINY["vocab"], [200, 57], 200)
    ref = hf_forward(model, ids, mask)
    out = np.array(mine(mx.array(ids), mx.array(mask)))
    err = rel_err(out, ref)
    print(f"t5 tiny {fmt}: max|mlx-ref|/max|ref| = {err:.2e}")
    assert err <= TOL
    # the prompt's rows do not depend on the padding length (encode_prompts runs trimmed)
    short = np.array(mine(mx.array(ids[1:, :57]), mx.array(mask[1:, :57])))
    assert rel_err(short[0], ref[1, :57]) <= TOL


def test_converted_tokenizer_files_copied(tiny):
    _, dirs = tiny
    for d in dirs.values():
        names = sorted(p.name for p in (d / "tokenizer").iterdir())
        assert names == ["special_tokens_map.json", "spiece.model", "tokenizer.json", "tokenizer_config.json"]


def test_t5_bf16_pth(tmp_path):
    """Wan's file is bf16: convert it as is (default bf16 weights, matmuls in bf16)
    and compare with the fp32 reference run on the same bf16-rounded weights."""
    model = hf_umt5(**TINY, seed=3)
    src = write_sources(model, tmp_path, dtype=torch.bfloat16)["wan"]
    ckpt_model = hf_umt5(**TINY, seed=3)
    with torch.no_grad():
        for p in ckpt_model.parameters():
            p.copy_(p.bfloat16().float())
    out_dir = convert(src, tmp_path / "mlx")
    mine = load_model(out_dir, component="t5")
    assert mine.blocks[0].attn.q.weight.dtype == mx.bfloat16
    ids, mask = batch(TINY["vocab"], [120, 33], 120, seed=1)
    ref = hf_forward(ckpt_model, ids, mask)
    err = rel_err(np.array(mine(mx.array(ids), mx.array(mask))), ref)
    print(f"t5 tiny bf16 .pth, bf16 compute: {err:.2e}")
    assert err < 3e-2


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_matches_transformers(tmp_path):
    folder = build_spm_tokenizer(tmp_path / "tok")
    prompts = [
        "A quiet  street at dusk.",
        "",
        "   \t\n ",
        "海边的日落 ünïcödé ＡＢＣ ﬁne “quoted” it’s &amp; &lt;b&gt; \t\n tab",
        "e\u0301te\u0301 cafe\u0301 Ω Å ℃ ① ½ \u00a0nbsp\u2003em",
        "emoji 🎬🌅 and 漢字 and Ελληνικά",
        " ".join(PROMPT_CORPUS) * 20,  # > 512 tokens
        "</s> literal <pad> <unk>",
    ]
    ids, mask = text.PromptTokenizer(folder / "tokenizer.json")(prompts)
    ref_ids, ref_mask = wan_tokenize(folder, prompts)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)
    assert mask[6].sum() == 512 and ids[6, 511] == 1  # truncated, </s> kept
    assert mask[1].sum() == 1 and ids[1, 0] == 1  # empty: just </s>
    print("token ids identical to AutoTokenizer on", len(prompts), "prompts; lengths", mask.sum(1).tolist())


def test_clean_matches_wan():
    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    samples = [
        "  a  b\t\tc\n\nd  ", "it’s “quoted” ‘single’", "ﬁne ﬂour ﬀ", "ＬＯＵＤ　ＮＯＩＳＥＳ", "&amp;amp; &lt;tag&gt;",
        "e\u0301te\u0301", "bell\x07 and \x1b[31mred\x1b[0m", "\ufeffbom", "line\r\nbreak\u2028sep", "emoji 🎬 漢字",
        "\u00a0nbsp\u2003em\u3000ideographic",
    ]
    for s in samples:
        assert text.clean_prompt(s) == wan_clean(s), s


# --------------------------------------------------------------------------- the pipeline


def test_encode_prompts_matches_wan_pipeline(tiny, tmp_path):
    """Wan T5EncoderModel: tokenize (clean, pad/truncate 512), encode with the
    mask, keep u[:seq_len]; the DiT pads with zeros to 512."""
    model, dirs = tiny
    prompts = ["An empty street at dusk, wet asphalt.", "", " ".join(PROMPT_CORPUS) * 20]
    folder = dirs["wan"] / "tokenizer"
    ids, mask = wan_tokenize(folder, prompts)
    ref = hf_forward(model, ids.astype(np.int64), mask.astype(np.int64))
    lens = mask.sum(1)
    ref = np.stack([np.concatenate([r[:n], np.zeros_like(r[n:])]) for r, n in zip(ref, lens)])
    out = np.stack([np.array(o) for o in text.encode_prompts(dirs["wan"], prompts, tmp_path / "cache")])
    assert out.shape == (3, 512, TINY["d_model"])
    err = rel_err(out, ref)
    print(f"encode_prompts vs Wan pipeline: {err:.2e}")
    assert err <= TOL
    assert not out[0, lens[0]:].any()


# --------------------------------------------------------------------------- XXL width


@pytest.fixture(scope="module")
def xxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5xxl")
    model = hf_umt5(**XXL_WIDTH, seed=1)
    sources = write_sources(model, root)
    ids, mask = batch(XXL_WIDTH["vocab"], [300], 512, seed=2)
    ref = hf_forward(model, ids, mask)
    del model
    dirs = {fmt: convert(src, root / f"mlx_{fmt}", "--dtype", "float32") for fmt, src in sources.items()}
    return dirs, ids, mask, ref


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["hf", "wan"])
def test_t5_xxl_width_parity(xxl, fmt):
    dirs, ids, mask, ref = xxl
    mine = load_model(dirs[fmt], component="t5")
    t = time.perf_counter()
    out = mine(mx.array(ids), mx.array(mask))
    mx.eval(out)
    err = rel_err(np.array(out), ref)
    print(f"t5 XXL width, 2 layers, {fmt}: {err:.2e} ({time.perf_counter() - t:.1f} s for 512 tokens)")
    assert err <= TOL


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def quantized_dir(dirs, label: str, bits: int | None) -> Path:
    """The Hugging Face source converted to bfloat16 (`bits` None) or
    quantized, written once per session by whichever test needs it first."""
    from mlx_omnimatte.convert.core import convert as run_convert, detect
    from mlx_omnimatte.convert.readers import read_checkpoint
    from mlx_omnimatte.convert.writer import write_converted

    src = dirs["hf"].parent / "hf"  # the Hugging Face source folder
    out_dir = src.parent / f"q_{label}"
    if not out_dir.exists():
        ckpt = read_checkpoint(src)
        spec, fmt = detect(ckpt, "t5")
        write_converted(out_dir, run_convert(ckpt, spec, fmt, "bfloat16", quantize=bits), {"source": str(src)})
    return out_dir


def quantization_table(dirs) -> list[tuple]:
    """(label, bytes on disk, max-rel error, rms-rel error) of the bf16 / 8-bit /
    4-bit encoders against the float32 one. Few tokens: MLX's CPU kernels for
    bf16 and quantized matmuls are 10-100x slower than its BLAS float32 path."""
    ids, mask = batch(XXL_WIDTH["vocab"], [8], 8, seed=4)
    ids, mask = mx.array(ids), mx.array(mask)
    ref = np.array(load_model(dirs["hf"], component="t5")(ids, mask))
    rows = [("float32", _dir_bytes(dirs["hf"]), 0.0, 0.0)]
    for label, bits in [("bfloat16", None), ("8-bit", 8), ("4-bit", 4)]:
        out_dir = quantized_dir(dirs, label, bits)
        t = time.perf_counter()
        out = np.array(load_model(out_dir, component="t5")(ids, mask))
        diff = out - ref
        rows.append((label, _dir_bytes(out_dir), rel_err(out, ref),
                     float(np.sqrt((diff ** 2).mean() / (ref ** 2).mean())), time.perf_counter() - t))
    return rows


@pytest.mark.slow
def test_t5_quantized_error_and_size(xxl):
    dirs = xxl[0]
    rows = {r[0]: r for r in quantization_table(dirs)}
    for label, size, err, rms, *t in rows.values():
        print(f"{label:>9}: {size / 2**20:8.1f} MiB  max-rel {err:.2e}  rms-rel {rms:.2e}"
              + (f"  ({t[0]:.0f} s on CPU, 8 tokens)" if t else ""))
    assert rows["bfloat16"][2] < 2e-2
    assert rows["8-bit"][2] < 3e-2 and rows["8-bit"][1] < 0.6 * rows["bfloat16"][1]
    assert rows["4-bit"][2] < 0.3 and rows["4-bit"][1] < 0.35 * rows["bfloat16"][1]


@pytest.mark.slow
def test_t5_quantize_at_load_equals_at_convert(xxl):
    """Load-time quantization of the bf16 directory gives the very weights of a
    4-bit conversion (each written here unless another test already did)."""
    from mlx.utils import tree_flatten

    dirs = xxl[0]
    a = dict(tree_flatten(text.load_text_encoder(quantized_dir(dirs, "bfloat16", None), quantize=4).parameters()))
    b = dict(tree_flatten(load_model(quantized_dir(dirs, "4-bit", 4), component="t5").parameters()))
    assert a.keys() == b.keys()
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-s", "-q"]))
