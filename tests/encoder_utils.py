"""Text-encoder helpers shared by tests (no tests here): random UMT5 weights
in the Hugging Face layout and their Wan names, and a tiny umt5-like
tokenizer."""

from __future__ import annotations

import json

import numpy as np


CORPUS = ["A quiet street at dusk with parked cars and wet asphalt.", "Ein ruhiger Park im Herbst, Blätter fallen.",
          "海边的日落，波浪拍打沙滩。", "Une cuisine vide avec une table en bois.",
          "the empty room, sunlight through the window"]


def make_tokenizer(folder):
    """A tiny umt5-like tokenizer.json: Unigram, <pad>=0 </s>=1 <unk>=2,
    Metaspace pre-tokenizer, `$A </s>` post-processor."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(CORPUS * 20, trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
    return folder


def hf_weights(seed=0, vocab=300, d=64, inner=64, ff=96, heads=4, layers=2):
    rng = np.random.default_rng(seed)

    def r(*shape, scale=None):
        return (rng.standard_normal(shape) * (scale or shape[-1] ** -0.5)).astype(np.float32)

    w = {"shared.weight": r(vocab, d, scale=1.0), "encoder.final_layer_norm.weight": 1 + r(d, scale=0.1)}
    for i in range(layers):
        p = f"encoder.block.{i}.layer."
        for n in "qkv":
            w[f"{p}0.SelfAttention.{n}.weight"] = r(inner, d)
        w[f"{p}0.SelfAttention.o.weight"] = r(d, inner)
        w[f"{p}0.SelfAttention.relative_attention_bias.weight"] = r(32, heads, scale=1.0)
        w[f"{p}0.layer_norm.weight"] = 1 + r(d, scale=0.1)
        w[f"{p}1.DenseReluDense.wi_0.weight"] = r(ff, d)
        w[f"{p}1.DenseReluDense.wi_1.weight"] = r(ff, d)
        w[f"{p}1.DenseReluDense.wo.weight"] = r(d, ff)
        w[f"{p}1.layer_norm.weight"] = 1 + r(d, scale=0.1)
    return w


WAN_NAMES = {
    "0.SelfAttention.q": "attn.q", "0.SelfAttention.k": "attn.k", "0.SelfAttention.v": "attn.v",
    "0.SelfAttention.o": "attn.o", "0.SelfAttention.relative_attention_bias": "pos_embedding.embedding",
    "0.layer_norm": "norm1", "1.layer_norm": "norm2", "1.DenseReluDense.wi_0": "ffn.gate.0",
    "1.DenseReluDense.wi_1": "ffn.fc1", "1.DenseReluDense.wo": "ffn.fc2",
}


def to_wan(w):
    out = {"token_embedding.weight": w["shared.weight"], "norm.weight": w["encoder.final_layer_norm.weight"]}
    for k, v in w.items():
        if k.startswith("encoder.block."):
            parts = k.split(".")
            sub = ".".join(parts[4:-1])
            out[f"blocks.{parts[2]}.{WAN_NAMES[sub]}.weight"] = v
    return out
