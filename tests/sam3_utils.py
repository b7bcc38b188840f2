"""A tiny random-weight SAM3 written as a model folder, built from mlx-vlm's
own config and model classes (real key names and layouts, tiny widths; the
input resolution and feature grids are the released model's, which mlx-vlm's
tracker assumes), with a tiny CLIP tokenizer beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

mlx_vlm = pytest.importorskip("mlx_vlm", reason="the masks extra (mlx-vlm) is not installed: "
                                                 'pip install -e ".[masks]"')

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_vlm.models.sam3 import Model, ModelConfig  # noqa: E402

from helpers import random_params  # noqa: E402

D = 32  # every width
_VIT = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * D,
            global_attn_indexes=[1])
_SMALL = dict(hidden_size=D, num_layers=1, num_attention_heads=2, intermediate_size=2 * D)
VOCAB = 512 + 2  # bytes and bytes ending a word, then start and end of text


def tiny_config() -> dict:
    vision = dict(fpn_hidden_size=D, backbone_config=_VIT)
    return dict(
        model_type="sam3_video",
        detector_config=dict(
            vision_config=vision,
            text_config=dict(hidden_size=D, num_hidden_layers=1, num_attention_heads=2, intermediate_size=2 * D,
                             vocab_size=VOCAB, projection_dim=D, bos_token_id=512, eos_token_id=513,
                             pad_token_id=513),
            detr_encoder_config=_SMALL, detr_decoder_config=dict(_SMALL, num_queries=8),
            geometry_encoder_config=_SMALL, mask_decoder_config=dict(hidden_size=D, num_attention_heads=2)),
        tracker_config=dict(
            vision_config=vision,
            mask_decoder_config=dict(hidden_size=D, num_attention_heads=2, mlp_dim=2 * D, iou_head_hidden_dim=D),
            prompt_encoder_config=dict(hidden_size=D),
            memory_attention_hidden_size=D, memory_attention_num_layers=1,
            memory_attention_feed_forward_hidden_size=2 * D, memory_encoder_hidden_size=D,
            memory_encoder_output_channels=16, mask_downsampler_embed_dim=D, memory_fuser_embed_dim=D,
            memory_fuser_intermediate_dim=2 * D, memory_fuser_num_layers=1))


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in for each byte (CLIP's vocabulary uses it)."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def write_tokenizer(folder: Path) -> None:
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def tiny_sam3(folder: Path, seed: int = 0) -> Path:
    """Write the tiny model folder; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config()
    model = Model(ModelConfig.from_dict(cfg))
    weights = {k: mx.array(v) for k, v in random_params(model, seed=seed).items()}
    assert set(weights) == {k for k, _ in tree_flatten(model.parameters())}
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tokenizer(folder)
    return folder
