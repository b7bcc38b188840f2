"""Torch-side helpers for the encoder parity tests: reference models with
random weights, their state dicts in every source layout, Wan's text
cleaning, a sentencepiece-built tokenizer like umt5-xxl's, and the CLIP
preprocessing of Wan's `CLIPModel.visual`.

The key renames here are written independently of convert/t5.py and
convert/clip.py (from the reference module definitions) so that the parity
tests check the converters rather than repeat them.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- UMT5


def hf_umt5(vocab=1000, d_model=64, d_kv=16, d_ff=160, heads=4, layers=3, seed=0):
    """transformers UMT5EncoderModel, fp32, random weights (norms randomized too)."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    cfg = UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_heads=heads,
                     num_layers=layers, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6)
    model = UMT5EncoderModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
    return model


def hf_to_wan_t5(sd: dict) -> dict:
    """HF UMT5 encoder names -> Wan's T5Encoder names (wan/modules/t5.py)."""
    out = {}
    for k, v in sd.items():
        if k == "encoder.embed_tokens.weight":
            continue
        parts = k.split(".")
        if k == "shared.weight":
            name = "token_embedding.weight"
        elif k == "encoder.final_layer_norm.weight":
            name = "norm.weight"
        else:
            i, sub = parts[2], ".".join(parts[4:])
            name = {
                "0.SelfAttention.q.weight": "attn.q.weight", "0.SelfAttention.k.weight": "attn.k.weight",
                "0.SelfAttention.v.weight": "attn.v.weight", "0.SelfAttention.o.weight": "attn.o.weight",
                "0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
                "0.layer_norm.weight": "norm1.weight", "1.layer_norm.weight": "norm2.weight",
                "1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight", "1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
                "1.DenseReluDense.wo.weight": "ffn.fc2.weight",
            }[sub]
            name = f"blocks.{i}.{name}"
        out[name] = v.detach().contiguous()
    return out


# --------------------------------------------------------------------------- text


def wan_clean(text: str) -> str:
    """Wan's HuggingfaceTokenizer(clean='whitespace'): basic_clean then whitespace_clean."""
    import ftfy
    import regex

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip()


PROMPT_CORPUS = [
    "A quiet street at dusk with parked cars and wet asphalt.",
    "Ein ruhiger Park im Herbst, die Blätter fallen langsam.",
    "海边的日落，波浪拍打着沙滩，天空是橙色的。",
    "Une cuisine vide avec une table en bois et des chaises.",
    "The empty room, sunlight through the window, dust in the air.",
    "Пустая улица ночью, фонари и снег.",
    "静かな森の中の小道、朝の霧。",
    "¡Una playa tranquila con palmeras! ¿Verdad?",
    "An old stone bridge over a river; mountains behind it.",
]


def _proto_fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message (enough for spm's ModelProto)."""
    pos = 0

    def varint():
        nonlocal pos
        shift = result = 0
        while True:
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result

    while pos < len(buf):
        tag = varint()
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            yield field, wire, varint()
        elif wire == 1:
            yield field, wire, buf[pos : pos + 8]
            pos += 8
        elif wire == 2:
            n = varint()
            yield field, wire, buf[pos : pos + n]
            pos += n
        elif wire == 5:
            yield field, wire, buf[pos : pos + 4]
            pos += 4
        else:
            raise ValueError(f"protobuf wire type {wire}")


def precompiled_charsmap(model_proto: bytes) -> bytes:
    for field, _, value in _proto_fields(model_proto):
        if field == 3:  # normalizer_spec
            for f2, _, v2 in _proto_fields(value):
                if f2 == 2:  # precompiled_charsmap
                    return bytes(v2)
    raise ValueError("no precompiled charsmap")


def build_spm_tokenizer(folder: Path, vocab_size: int = 400) -> Path:
    """A tiny umt5-like tokenizer folder: a sentencepiece Unigram model (nmt_nfkc
    normalization, <pad>=0 </s>=1 <unk>=2) and its tokenizer.json as the
    transformers T5 converter writes it (Precompiled normalizer, WhitespaceSplit
    + Metaspace, `$A </s>` post-processor), plus the config files."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(PROMPT_CORPUS * 40), model_writer=buf, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        normalization_rule_name="nmt_nfkc", hard_vocab_limit=False, minloglevel=2)
    proto = buf.getvalue()
    (folder / "spiece.model").write_bytes(proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Precompiled(precompiled_charsmap(proto)),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                       special_tokens=[("</s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "</s>", "<unk>")])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "extra_ids": 0, "additional_special_tokens": [], "model_max_length": 1000000000000000019884624838656}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}))
    return folder


def wan_tokenize(folder: Path, prompts: list[str], text_len: int = 512):
    """Wan's HuggingfaceTokenizer call with transformers' AutoTokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    out = tok([wan_clean(p) for p in prompts], padding="max_length", truncation=True, max_length=text_len,
              add_special_tokens=True, return_tensors="np")
    return out["input_ids"], out["attention_mask"]


# --------------------------------------------------------------------------- CLIP

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def hf_clip_vision(width=1280, heads=16, mlp=5120, layers=3, image_size=224, patch=14, seed=0):
    """transformers CLIPVisionModel (exact GELU, eps 1e-5), fp32, random weights
    with non-trivial norms."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=mlp, num_attention_heads=heads,
                           num_hidden_layers=layers, image_size=image_size, patch_size=patch,
                           hidden_act="gelu", layer_norm_eps=1e-5, attention_dropout=0.0)
    model = CLIPVisionModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn_like(p))
    return model


def hf_clip_penultimate(model, pixels_nchw: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixels_nchw, output_hidden_states=True).hidden_states[-2]


def hf_clip_to_open_clip(sd: dict, head_dim_out: int = 1024) -> dict:
    """HF CLIPVisionModel names -> open_clip `visual.*` names (q/k/v fused into
    in_proj; a random projection stands in for `visual.proj`)."""
    out = {}
    g = torch.Generator().manual_seed(1)
    sd = {k.removeprefix("vision_model."): v for k, v in sd.items()}  # v4 names had the prefix, v5 not
    p = ""
    out["visual.conv1.weight"] = sd[p + "embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = sd[p + "embeddings.class_embedding"]
    out["visual.positional_embedding"] = sd[p + "embeddings.position_embedding.weight"]
    for s in ("weight", "bias"):
        out[f"visual.ln_pre.{s}"] = sd[f"{p}pre_layrnorm.{s}"]
        out[f"visual.ln_post.{s}"] = sd[f"{p}post_layernorm.{s}"]
    width = out["visual.class_embedding"].shape[0]
    out["visual.proj"] = torch.randn(width, head_dim_out, generator=g)
    n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    for i in range(n):
        src, dst = f"{p}encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for s in ("weight", "bias"):
            out[dst + f"ln_1.{s}"] = sd[src + f"layer_norm1.{s}"]
            out[dst + f"ln_2.{s}"] = sd[src + f"layer_norm2.{s}"]
            out[dst + f"attn.in_proj_{s}"] = torch.cat([sd[src + f"self_attn.{x}_proj.{s}"] for x in "qkv"])
            out[dst + f"attn.out_proj.{s}"] = sd[src + f"self_attn.out_proj.{s}"]
            out[dst + f"mlp.c_fc.{s}"] = sd[src + f"mlp.fc1.{s}"]
            out[dst + f"mlp.c_proj.{s}"] = sd[src + f"mlp.fc2.{s}"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def open_clip_to_wan(sd: dict) -> dict:
    """open_clip `visual.*` names -> Wan's XLMRobertaCLIP names (wan/modules/clip.py),
    with a stand-in text tower key and logit scale as the real file has."""
    out = {}
    for k, v in sd.items():
        name = (k.replace("visual.conv1.", "visual.patch_embedding.")
                 .replace("visual.ln_pre.", "visual.pre_norm.").replace("visual.ln_post.", "visual.post_norm.")
                 .replace("visual.transformer.resblocks.", "visual.transformer.")
                 .replace(".ln_1.", ".norm1.").replace(".ln_2.", ".norm2.")
                 .replace(".attn.in_proj_weight", ".attn.to_qkv.weight")
                 .replace(".attn.in_proj_bias", ".attn.to_qkv.bias").replace(".attn.out_proj.", ".attn.proj.")
                 .replace(".mlp.c_fc.", ".mlp.0.").replace(".mlp.c_proj.", ".mlp.2."))
        if k == "visual.class_embedding":
            name, v = "visual.cls_embedding", v.reshape(1, 1, -1)
        elif k == "visual.positional_embedding":
            name, v = "visual.pos_embedding", v[None]
        elif k == "visual.proj":
            name = "visual.head"
        out[name] = v.contiguous()
    out["textual.token_embedding.weight"] = torch.randn(10, 8)
    out["log_scale"] = torch.tensor(4.6052)
    return out


def torch_clip_preprocess(frames_bhwc_minus1_1: np.ndarray, size: int = 224) -> torch.Tensor:
    """Wan CLIPModel.visual: bicubic resize of [-1, 1] frames, then mul(0.5).add(0.5), Normalize."""
    x = torch.from_numpy(frames_bhwc_minus1_1).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    x = x.mul(0.5).add(0.5)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std

