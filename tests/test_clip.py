"""CLIP vision tower, its converter (Wan / open_clip / HF layouts) and the
reference preprocessing, torch-free. Width 1280 (the converter accepts only
ViT-H width) with one block, a 28x28 image (2x2 patches) and a small MLP."""

import json

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file

from ckpt_utils import save_torch_zip
from mlx_omnimatte.encoders import image as image_encoder
from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.models import clip
from mlx_omnimatte.weights import load_model
from helpers import invoke, run_cli


def open_clip_weights(width=1280, layers=1, mlp=256, grid=2, patch=14, seed=0):
    rng = np.random.default_rng(seed)

    def r(*shape, scale=None):
        return (rng.standard_normal(shape) * (scale or shape[-1] ** -0.5)).astype(np.float32)

    w = {"visual.conv1.weight": r(width, 3, patch, patch, scale=0.05), "visual.class_embedding": r(width, scale=0.5),
         "visual.positional_embedding": r(grid * grid + 1, width, scale=0.5),
         "visual.ln_pre.weight": 1 + r(width, scale=0.1), "visual.ln_pre.bias": r(width, scale=0.1),
         "visual.ln_post.weight": 1 + r(width, scale=0.1), "visual.ln_post.bias": r(width, scale=0.1),
         "visual.proj": r(width, 64),
         # text tower keys of an open_clip file: not converted
         "token_embedding.weight": r(10, 8), "positional_embedding": r(4, 8), "logit_scale": r(1)}
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        w.update({p + "ln_1.weight": 1 + r(width, scale=0.1), p + "ln_1.bias": r(width, scale=0.1),
                  p + "attn.in_proj_weight": r(3 * width, width), p + "attn.in_proj_bias": r(3 * width, scale=0.1),
                  p + "attn.out_proj.weight": r(width, width), p + "attn.out_proj.bias": r(width, scale=0.1),
                  p + "ln_2.weight": 1 + r(width, scale=0.1), p + "ln_2.bias": r(width, scale=0.1),
                  p + "mlp.c_fc.weight": r(mlp, width), p + "mlp.c_fc.bias": r(mlp, scale=0.1),
                  p + "mlp.c_proj.weight": r(width, mlp), p + "mlp.c_proj.bias": r(width, scale=0.1)})
    return w


def to_wan(w):
    """open_clip names -> Wan's XLMRobertaCLIP names and shapes."""
    rules = [("visual.conv1.", "visual.patch_embedding."), ("visual.ln_pre.", "visual.pre_norm."),
             ("visual.ln_post.", "visual.post_norm."), ("transformer.resblocks.", "transformer."),
             (".ln_1.", ".norm1."), (".ln_2.", ".norm2."), (".attn.in_proj_", ".attn.to_qkv."),
             (".attn.out_proj.", ".attn.proj."), (".mlp.c_fc.", ".mlp.0."), (".mlp.c_proj.", ".mlp.2.")]
    out = {"textual.token_embedding.weight": w["token_embedding.weight"], "log_scale": w["logit_scale"]}
    for k, v in w.items():
        if not k.startswith("visual."):
            continue
        for a, b in rules:
            k = k.replace(a, b)
        if k == "visual.class_embedding":
            k, v = "visual.cls_embedding", v.reshape(1, 1, -1)
        elif k == "visual.positional_embedding":
            k, v = "visual.pos_embedding", v[None]
        elif k == "visual.proj":
            k = "visual.head"
        out[k] = v
    return out


def to_hf(w, layers=1):
    p = "vision_model."
    out = {p + "embeddings.patch_embedding.weight": w["visual.conv1.weight"],
           p + "embeddings.class_embedding": w["visual.class_embedding"],
           p + "embeddings.position_embedding.weight": w["visual.positional_embedding"],
           p + "embeddings.position_ids": np.arange(w["visual.positional_embedding"].shape[0])[None],
           p + "pre_layrnorm.weight": w["visual.ln_pre.weight"], p + "pre_layrnorm.bias": w["visual.ln_pre.bias"],
           p + "post_layernorm.weight": w["visual.ln_post.weight"], p + "post_layernorm.bias": w["visual.ln_post.bias"]}
    for i in range(layers):
        s, d = f"visual.transformer.resblocks.{i}.", f"{p}encoder.layers.{i}."
        for kind in ("weight", "bias"):
            for j, n in enumerate("qkv"):
                full = w[s + f"attn.in_proj_{kind}"]
                out[d + f"self_attn.{n}_proj.{kind}"] = np.ascontiguousarray(np.split(full, 3)[j])
            out[d + f"self_attn.out_proj.{kind}"] = w[s + f"attn.out_proj.{kind}"]
            out[d + f"layer_norm1.{kind}"] = w[s + f"ln_1.{kind}"]
            out[d + f"layer_norm2.{kind}"] = w[s + f"ln_2.{kind}"]
            out[d + f"mlp.fc1.{kind}"] = w[s + f"mlp.c_fc.{kind}"]
            out[d + f"mlp.fc2.{kind}"] = w[s + f"mlp.c_proj.{kind}"]
    return out


def convert(*args):
    return invoke(["convert", *args])


# --------------------------------------------------------------------------- model


def test_model_shape_and_penultimate():
    cfg = clip.Config(image_size=28, patch_size=14, width=64, layers=3, heads=4, mlp_dim=128)
    model = clip.Model(cfg)
    model.pos_embedding = mx.random.normal((5, 64), key=mx.random.key(0))
    x = mx.random.normal((2, 28, 28, 3), key=mx.random.key(1))
    out = model(x)
    assert out.shape == (2, 5, 64) and out.dtype == mx.float32
    # the last block is not run (penultimate features)...
    model.blocks[2].mlp.fc2.bias = mx.ones((64,)) * 100
    assert mx.array_equal(model(x), out)
    # ...the others are
    model.blocks[1].mlp.fc2.bias = mx.ones((64,))
    assert not mx.allclose(model(x), out).item()
    # and all of them with feature_layers = layers
    model.config.feature_layers = 3
    assert mx.abs(model(x) - out).max().item() > 50
    with pytest.raises(ValueError, match="expected pixels"):
        model(mx.zeros((1, 32, 32, 3)))


def _np_block_reference(model, x):
    """Pre-LN ViT in numpy: patches, class token, positions, LN, one block."""
    p = {k: np.array(v, np.float64) for k, v in __import__("mlx.utils").utils.tree_flatten(model.parameters())}
    c = model.config

    def ln(h, w, b):
        mu = h.mean(-1, keepdims=True)
        return (h - mu) / np.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * w + b

    B, g = x.shape[0], c.image_size // c.patch_size
    patches = x.reshape(B, g, c.patch_size, g, c.patch_size, 3).transpose(0, 1, 3, 2, 4, 5).reshape(B, g * g, -1)
    wconv = p["patch_embedding.weight"].reshape(c.width, -1)  # MLX layout (O, kh, kw, I)
    h = np.concatenate([np.broadcast_to(p["cls_embedding"], (B, 1, c.width)), patches @ wconv.T], 1)
    h = ln(h + p["pos_embedding"], p["pre_norm.weight"], p["pre_norm.bias"])
    a = ln(h, p["blocks.0.norm1.weight"], p["blocks.0.norm1.bias"]) @ p["blocks.0.attn.qkv.weight"].T
    a = a + p["blocks.0.attn.qkv.bias"]
    q, k, v = (t.reshape(B, -1, c.heads, c.width // c.heads).transpose(0, 2, 1, 3) for t in np.split(a, 3, -1))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(c.width // c.heads)
    s = np.exp(s - s.max(-1, keepdims=True))
    o = ((s / s.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(B, -1, c.width)
    h = h + o @ p["blocks.0.attn.proj.weight"].T + p["blocks.0.attn.proj.bias"]
    m = ln(h, p["blocks.0.norm2.weight"], p["blocks.0.norm2.bias"]) @ p["blocks.0.mlp.fc1.weight"].T
    m = m + p["blocks.0.mlp.fc1.bias"]
    from math import erf

    m = 0.5 * m * (1 + np.vectorize(erf)(m / np.sqrt(2)))  # exact GELU
    return h + m @ p["blocks.0.mlp.fc2.weight"].T + p["blocks.0.mlp.fc2.bias"]


# --------------------------------------------------------------------------- converter


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    w = open_clip_weights()
    save_file(w, str(root / "open_clip.safetensors"))
    save_torch_zip(root / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", to_wan(w))
    save_file(to_hf(w), str(root / "hf.safetensors"))
    return root


def test_convert_three_layouts_agree(sources, tmp_path):
    outs = {}
    for name in ("open_clip.safetensors", "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
                 "hf.safetensors"):
        res = convert(sources / name, "-o", tmp_path / name, "--dtype", "float32")
        assert res.exit_code == 0, res.output
        outs[name] = tmp_path / name
    cfg = json.loads((tmp_path / "hf.safetensors" / "config.json").read_text())
    assert {k: cfg[k] for k in ("image_size", "patch_size", "width", "layers", "heads", "mlp_dim")} == \
        {"image_size": 28, "patch_size": 14, "width": 1280, "layers": 1, "heads": 16, "mlp_dim": 256}
    fmts = [json.loads((d / "config.json").read_text())["source"]["source_format"] for d in outs.values()]
    assert fmts == ["open_clip", "wan", "hf"]
    x = mx.random.normal((2, 28, 28, 3), key=mx.random.key(2))
    models = [load_model(d, component="clip") for d in outs.values()]
    for m in models:
        m.config.feature_layers = 1  # one block only: run it
    ref = _np_block_reference(models[0], np.array(x, np.float64))
    outs_ = [np.array(m(x)) for m in models]
    assert np.abs(outs_[0] - ref).max() <= 1e-4 * np.abs(ref).max()
    assert all(np.array_equal(o, outs_[0]) for o in outs_[1:])


def test_other_width_is_rejected(tmp_path, capsys):
    save_file(open_clip_weights(width=1024, mlp=128), str(tmp_path / "vit_l.safetensors"))
    code = run_cli(["convert", str(tmp_path / "vit_l.safetensors"), "-o", str(tmp_path / "out")])[0]
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "width 1024" in err and "1280" in err
    assert not (tmp_path / "out").exists()


def test_ignored_keys_reported(sources, tmp_path):
    res = convert(sources / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", "-o", tmp_path / "o")
    assert res.exit_code == 0 and "ignored 5 keys" in res.output  # post_norm x2, head, textual, log_scale
    assert load_model(tmp_path / "o").blocks[0].attn.qkv.weight.dtype == mx.bfloat16
    assert load_model(tmp_path / "o").pos_embedding.dtype == mx.float32


# --------------------------------------------------------------------------- preprocessing


def test_bicubic_matrix():
    m = image_encoder.bicubic_matrix(832, 224)
    assert m.shape == (224, 832) and np.allclose(m.sum(1), 1, atol=1e-6)
    np.testing.assert_array_equal(image_encoder.bicubic_matrix(50, 50), np.eye(50, dtype=np.float32))
    # 4 -> 2: source x = 0.5, taps at -1 (clamped to 0), 0, 1, 2 with Keys' A = -0.75 weights
    np.testing.assert_allclose(image_encoder.bicubic_matrix(4, 2)[0], [-0.09375 + 0.59375, 0.59375, -0.09375, 0], atol=1e-7)


def test_preprocess_inputs():
    rng = np.random.default_rng(0)
    f = rng.integers(0, 256, (60, 90, 3)).astype(np.uint8)
    a = np.array(image_encoder.clip_preprocess(f))
    b = np.array(image_encoder.clip_preprocess(f.astype(np.float32) / 127.5 - 1))
    assert a.shape == (1, 224, 224, 3) and np.abs(a - b).max() < 1e-5
    # a flat grey frame maps to (0.5 - mean) / std everywhere
    grey = np.array(image_encoder.clip_preprocess(np.zeros((1, 30, 40, 3), np.float32)))
    assert np.allclose(grey, (0.5 - np.array(clip.MEAN)) / np.array(clip.STD), atol=1e-6)
    with pytest.raises(OmnimatteError, match="expected"):
        image_encoder.clip_preprocess(np.zeros((30, 40)))


def test_clip_features(sources, tmp_path):
    out_dir = tmp_path / "c"
    assert convert(sources / "open_clip.safetensors", "-o", out_dir, "--dtype", "float32").exit_code == 0
    frame = np.random.default_rng(1).integers(0, 256, (90, 160, 3)).astype(np.uint8)
    feats = image_encoder.clip_features(out_dir, frame)
    model = load_model(out_dir, component="clip")
    ref = model(image_encoder.clip_preprocess(frame, 28))
    assert feats.shape == (1, 5, 1280) and mx.array_equal(feats, ref)


def test_quick_gelu_config_is_honoured_or_refused(sources, tmp_path, capsys):
    import shutil

    from mlx_omnimatte.models.clip import quick_gelu

    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(sources / "hf.safetensors", folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"vision_config": {"hidden_act": "quick_gelu"}}))
    res = convert(folder / "model.safetensors", "-o", tmp_path / "q", "--dtype", "float32")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "q" / "config.json").read_text())["hidden_act"] == "quick_gelu"
    quick = load_model(tmp_path / "q")
    assert quick.blocks[0].mlp.act is quick_gelu
    plain = convert(sources / "hf.safetensors", "-o", tmp_path / "g", "--dtype", "float32")
    assert plain.exit_code == 0 and load_model(tmp_path / "g").blocks[0].mlp.act is not quick_gelu
    x = mx.random.normal((1, 28, 28, 3), key=mx.random.key(3))
    for m in (quick, load_model(tmp_path / "g")):
        m.config.feature_layers = 1
    assert float(mx.abs(quick(x) - load_model(tmp_path / "g")(x)).max()) > 1e-3  # the activation matters
    (folder / "config.json").write_text(json.dumps({"hidden_act": "gelu_new"}))
    code = run_cli(["convert", str(folder / "model.safetensors"), "-o", str(tmp_path / "bad")])[0]
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "hidden_act 'gelu_new' is not supported" in err
    assert not (tmp_path / "bad").exists()
