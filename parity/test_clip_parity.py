"""Parity of the CLIP vision tower, its converter and the reference
preprocessing.

Reference model: transformers' CLIPVisionModel (pre-LN ViT, exact GELU) at
ViT-H/14 width (1280, 16 heads, MLP 5120) with 3 layers and random weights;
its hidden states after the penultimate block are what Wan's
`visual(..., use_31_block=True)` returns. The same weights are written in
Wan's .pth layout and open_clip's .pth layout (torch.save) and in the HF
safetensors layout, and converted with `mlx-omnimatte convert`. When
open_clip is installed its own VisionTransformer is checked too.
"""

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from helpers import rel_err  # noqa: E402
from encoder_reference import (  # noqa: E402
    hf_clip_penultimate, hf_clip_to_open_clip, hf_clip_vision, open_clip_to_wan, torch_clip_preprocess,
)
from mlx_omnimatte.encoders import image as text  # noqa: E402
from mlx_omnimatte.cli.main import cli  # noqa: E402
from mlx_omnimatte.weights import load_model  # noqa: E402

pytestmark = pytest.mark.torch

TOL = 1e-4


def convert(src: Path, out: Path, *args) -> Path:
    res = CliRunner().invoke(cli, ["convert", str(src), "-o", str(out), *args])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return out


def frames(shape, seed=0, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        return rng.integers(0, 256, shape).astype(np.uint8)
    return rng.uniform(-1, 1, shape).astype(np.float32)


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("hw", [(480, 832), (100, 150), (224, 224), (1080, 1920)])
def test_preprocess_matches_wan(hw):
    f = frames((2, *hw, 3), seed=hw[0])
    ref = torch_clip_preprocess(f.astype(np.float32) / 127.5 - 1.0).permute(0, 2, 3, 1).numpy()
    mine = np.array(text.clip_preprocess(f))
    assert mine.shape == (2, 224, 224, 3)
    err = np.abs(mine - ref).max()
    print(f"preprocess {hw}: max abs {err:.2e}")
    assert err < 1e-4
    # float input in [-1, 1] is the same path
    fl = frames((1, *hw, 3), seed=1, dtype=np.float32)
    ref = torch_clip_preprocess(fl).permute(0, 2, 3, 1).numpy()
    assert np.abs(np.array(text.clip_preprocess(fl[0])) - ref).max() < 1e-4


# --------------------------------------------------------------------------- ViT-H width


@pytest.fixture(scope="module")
def vit_h(tmp_path_factory):
    root = tmp_path_factory.mktemp("cliph")
    model = hf_clip_vision(layers=3)
    sd = model.state_dict()
    oc = hf_clip_to_open_clip(sd)
    torch.save(oc, root / "open_clip.pth")
    torch.save(open_clip_to_wan(oc), root / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    model.save_pretrained(root / "hf")
    dirs = {
        "open_clip": convert(root / "open_clip.pth", root / "mlx_open_clip", "--dtype", "float32"),
        "wan": convert(root / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", root / "mlx_wan",
                       "--dtype", "float32"),
        "hf": convert(root / "hf" / "model.safetensors", root / "mlx_hf", "--dtype", "float32"),
    }
    return model, dirs


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["wan", "open_clip", "hf"])
def test_clip_vit_h_parity(vit_h, fmt):
    model, dirs = vit_h
    mine = load_model(dirs[fmt], component="clip")
    assert mine.config.width == 1280 and mine.config.heads == 16 and mine.config.layers == 3
    f = frames((2, 240, 320, 3), seed=3)
    pixels = torch_clip_preprocess(f.astype(np.float32) / 127.5 - 1.0)
    ref = hf_clip_penultimate(model, pixels).numpy()
    out = np.array(mine(mx.array(pixels.permute(0, 2, 3, 1).numpy())))
    assert out.shape == ref.shape == (2, 257, 1280)
    err = rel_err(out, ref)
    print(f"clip ViT-H width, 3 layers, {fmt}: max|mlx-ref|/max|ref| = {err:.2e}")
    assert err <= TOL


@pytest.mark.slow
def test_clip_features_end_to_end(vit_h):
    """uint8 frame -> Wan's preprocessing + tower, against clip_features."""
    model, dirs = vit_h
    f = frames((360, 640, 3), seed=4)
    ref = hf_clip_penultimate(model, torch_clip_preprocess(f[None].astype(np.float32) / 127.5 - 1.0)).numpy()
    from mlx_omnimatte.progress import quiet

    report = quiet()
    out = text.clip_features(dirs["wan"], f, report=report)
    err = rel_err(np.array(out), ref)
    print(f"clip_features end to end: {err:.2e}; {report.lines()[-1]}")
    assert out.shape == (1, 257, 1280) and err <= TOL


@pytest.mark.slow
def test_open_clip_module(tmp_path):
    """open_clip's own VisionTransformer (the module Wan's checkpoint was trained as)."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=224, patch_size=14, width=1280, layers=3, heads=16, mlp_ratio=4.0,
                            output_dim=1024, act_layer=torch.nn.GELU).eval()
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if "ln_" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn_like(p))
    captured = {}
    vit.transformer.resblocks[-2].register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    f = frames((1, 300, 400, 3), seed=5)
    pixels = torch_clip_preprocess(f.astype(np.float32) / 127.5 - 1.0)
    with torch.no_grad():
        vit(pixels)
    ref = captured["x"]
    if not getattr(vit.transformer, "batch_first", True):
        ref = ref.permute(1, 0, 2)
    ref = ref.numpy()
    torch.save({f"visual.{k}": v for k, v in vit.state_dict().items()}, tmp_path / "oc.pth")
    out_dir = convert(tmp_path / "oc.pth", tmp_path / "mlx", "--dtype", "float32")
    mine = load_model(out_dir, component="clip")
    err = rel_err(np.array(mine(mx.array(pixels.permute(0, 2, 3, 1).numpy()))), ref)
    print(f"open_clip VisionTransformer module: {err:.2e} (open_clip {open_clip.__version__})")
    assert err <= TOL


@pytest.mark.slow
def test_clip_half_precision(tmp_path):
    """The bundle converts CLIP to float16: the error that costs, at ViT-H width, 2 layers."""
    model = hf_clip_vision(layers=2, seed=7)
    torch.save(open_clip_to_wan(hf_clip_to_open_clip(model.state_dict())), tmp_path / "w.pth")
    f = frames((1, 224, 224, 3), seed=6)
    pixels = torch_clip_preprocess(f.astype(np.float32) / 127.5 - 1.0)
    ref = hf_clip_penultimate(model, pixels).numpy()
    for dtype, tol in (("float16", 5e-3), ("bfloat16", 2e-2)):
        mine = load_model(convert(tmp_path / "w.pth", tmp_path / dtype, "--dtype", dtype), component="clip")
        err = rel_err(np.array(mine(mx.array(pixels.permute(0, 2, 3, 1).numpy()))), ref)
        print(f"clip {dtype} weights: {err:.2e}")
        assert err < tol


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-s", "-q"]))
