"""ROSE and MiniMax-Remover parity, float32, through the real converter.

* ROSE: diffusers' `WanTransformer3DModel` (Fun-InP layout) with random
  weights written as ROSE's checkpoint (the original key names), converted
  into a bundle with `--remover rose` over a Fun-InP folder; both forwards
  fed ROSE's inputs: the binary mask's channels (1 - mask), a condition
  latent, an empty prompt's context (one token, then zeros) and a zero CLIP
  context through the image embedder. The mask channels themselves against
  VideoX-Fun's recipe in torch (1 - mask, frame 0 four times, 4 sub-frames
  as channels, trilinear to the latent grid).
* MiniMax-Remover: a torch reference of its transformer written from its
  published formulas (`minimax_reference.py`), its `transformer/` folder
  converted by the CLI; and the conditioning tensors before the VAE (the
  grey-hole video and the mask video) against the published pipeline's for
  the same clip and mask.

Bound: max|mlx - ref| <= 1e-4 * max|ref|.

    pytest parity/test_remover_parity.py -m "not slow" -s
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        pytest parity/test_remover_parity.py -m slow -s      # 1.3B width, 2 layers
"""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mlx.core as mx  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from minimax_reference import MiniMaxTransformer, reference_condition, write_transformer_folder  # noqa: E402
from wan_reference import build_reference, make_inputs, randomize_, reference_forward, write_format  # noqa: E402

from helpers import rel_err  # noqa: E402
from mlx_omnimatte.cli.main import main  # noqa: E402
from mlx_omnimatte.models.wan.transformer import PRESETS, Config  # noqa: E402
from mlx_omnimatte.pipelines.conditioning import (CLIP_TOKENS, condition_channels, model_masks,  # noqa: E402
                                                  grey_hole_channels, model_video, removal_mask)
from mlx_omnimatte.removers import MINIMAX, ROSE  # noqa: E402
from mlx_omnimatte.weights import load_model  # noqa: E402
from tiny_models import write_fun_folder  # noqa: E402

pytestmark = pytest.mark.torch

BOUND = 1e-4
ROSE_TINY = Config(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=36, image_dim=1280)
ROSE_WIDE = replace(PRESETS["fun-inp-1.3b"], num_layers=2)
MINIMAX_TINY = dict(dim=256, heads=2, ffn=512, layers=2)
MINIMAX_WIDE = dict(dim=1536, heads=12, ffn=8960, layers=2)
WIDE_GRID = (4, 32, 40)  # 1280 tokens


def cli_ok(args):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    assert e.value.code == 0


def binary_masks(frames, h, w, seed=3):
    """Two objects' bool masks [T, H, W] at pixel size (8x the latent grid)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        m = np.zeros((frames, h, w), bool)
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        m[:, y:y + h // 3, x:x + w // 3] = True
        out.append(m)
    return out


def videox_mask_channels(mask: np.ndarray, latent_hw) -> np.ndarray:
    """VideoX-Fun's mask latent for its inpaint DiT, in torch: [1, T', h, w, 4]."""
    m = 1 - torch.from_numpy(mask.astype(np.float32))[None, None]  # b c t h w
    m = torch.cat([m[:, :, :1].repeat_interleave(4, dim=2), m[:, :, 1:]], dim=2)
    b, _, t4, h, w = m.shape
    m = m.view(b, t4 // 4, 4, h, w).transpose(1, 2)
    m = F.interpolate(m, size=(t4 // 4, *latent_hw), mode="trilinear", align_corners=False)
    return m.permute(0, 2, 3, 4, 1).numpy()


# --------------------------------------------------------------------------- ROSE


def rose_case(cfg: Config, grid, root, seed=1):
    """(diffusers reference, our model through `convert FOLDER --transformer
    rose.safetensors --remover rose`, ROSE's inputs)."""
    model = build_reference(cfg, seed=seed)
    src = write_format(model, root / "rose-src", "original", "safetensors")
    folder = write_fun_folder(root / "fun")
    base = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**base, "dim": cfg.dim, "ffn_dim": cfg.ffn_dim,
                                                    "num_heads": cfg.num_heads, "num_layers": cfg.num_layers}))
    out = root / "rose-bundle"
    cli_ok(["convert", folder, "--transformer", src, "--remover", "rose", "-o", out, "--dtype", "float32"])
    assert json.loads((out / "manifest.json").read_text())["remover"]["kind"] == "rose"
    f, h, w = grid
    masks = binary_masks(4 * (f - 1) + 1, 8 * h, 8 * w)
    inputs = make_inputs(cfg, f, h, w, text_tokens=1, seed=2)  # "" -> one token, then zeros
    cond = mx.array(np.random.default_rng(4).standard_normal((1, f, h, w, 16)).astype(np.float32))
    y = condition_channels(removal_mask(masks, None, ROSE), cond)
    inputs["x"] = np.concatenate([inputs["x"][..., :16], np.array(y)], axis=-1)
    inputs["clip_fea"] = np.zeros((1, CLIP_TOKENS, cfg.image_dim), np.float32)  # torch.zeros_like(clip_context)
    ref_y = np.concatenate([videox_mask_channels(removal_mask(masks, None, ROSE), (h, w)), np.array(cond)], -1)
    return model, load_model(out / "transformer"), inputs, rel_err(np.array(y), ref_y)


def rose_forward(dit, inputs):
    clip = mx.zeros((1, CLIP_TOKENS, dit.config.image_dim))  # as the run builds it
    v = dit(mx.array(inputs["x"]), mx.array(inputs["t"]), mx.array(inputs["context"]), clip)
    return np.array(v.astype(mx.float32))


def check_rose(cfg, grid, root, label):
    model, dit, inputs, cond_err = rose_case(cfg, grid, root)
    ref = reference_forward(model, inputs)
    assert 0.3 < np.abs(ref).max() < 30 and ref.std() > 0.1
    err = rel_err(rose_forward(dit, inputs), ref)
    print(f"\nROSE {label}: conditioning channels {cond_err:.2e}, forward max|mlx-ref|/max|ref| = {err:.2e}")
    assert cond_err <= 1e-6 and err <= BOUND


def test_rose_tiny(tmp_path):
    check_rose(ROSE_TINY, (3, 8, 12), tmp_path, "tiny")


@pytest.mark.slow
def test_rose_wide(tmp_path):
    check_rose(ROSE_WIDE, WIDE_GRID, tmp_path, "1.3B width, 2 layers, 1280 tokens")


# --------------------------------------------------------------------------- MiniMax-Remover


def check_minimax(cfg, grid, root, label):
    torch.manual_seed(0)
    model = MiniMaxTransformer(cfg["dim"], cfg["heads"], cfg["ffn"], cfg["layers"]).float().eval()
    randomize_(model, seed=5)
    src = write_transformer_folder(model, root / "minimax-remover" / "transformer", cfg)
    out = root / "mlx"
    cli_ok(["convert", src, "-o", out, "--dtype", "float32"])
    dit = load_model(out, component="transformer")
    assert not dit.config.cross_attn and dit.config.in_dim == 48
    f, h, w = grid
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, f, h, w, 48)).astype(np.float32)
    t = np.array([812.0], np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x).permute(0, 4, 1, 2, 3), torch.from_numpy(t)).permute(0, 2, 3, 4, 1).numpy()
    assert 0.3 < np.abs(ref).max() < 30 and ref.std() > 0.1
    got = np.array(dit(mx.array(x), mx.array(t)).astype(mx.float32))
    err = rel_err(got, ref)
    print(f"\nMiniMax-Remover {label}: forward max|mlx-ref|/max|ref| = {err:.2e}")
    assert err <= BOUND


def test_minimax_tiny(tmp_path):
    check_minimax(MINIMAX_TINY, (3, 8, 12), tmp_path, "tiny")


@pytest.mark.slow
def test_minimax_wide(tmp_path):
    check_minimax(MINIMAX_WIDE, WIDE_GRID, tmp_path, "1.3B width, 2 layers, 1280 tokens")


def test_minimax_conditioning_tensors():
    """The grey-hole video and the mask video before the VAE, ours against
    the published pipeline's, for a clip at the model size (9 frames, 64x48,
    a mask with soft edges: values around the > 20 threshold)."""
    rng = np.random.default_rng(7)
    t, h, w = 9, 48, 64
    frames = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    mask = np.zeros((t, h, w), np.uint8)
    for i in range(t):
        mask[i, 10 + i:30 + i, 20:40] = 255
        mask[i, 9 + i, 20:40] = 21  # just above the threshold: kept
        mask[i, 30 + i, 20:40] = 20  # just below: dropped
    ref_hole, ref_mask = reference_condition(frames, mask, iterations=6)
    clip, plan = SimpleNamespace(masks=[mask], frames=frames), SimpleNamespace(size=(w, h), frames=t)
    seen = {}

    def encode(x, what):  # the VAE's input, kept (the VAE itself has its own parity test)
        seen[what] = np.array(x)[0]
        return mx.zeros((1, 3, h // 8, w // 8, 16))

    grey_hole_channels(model_video(clip, plan), removal_mask(model_masks(clip, plan, MINIMAX), None, MINIMAX), encode)
    hole, mask_video = seen["video"], seen["mask"]
    print(f"\nMiniMax-Remover conditioning: masked video {np.abs(hole - ref_hole).max():.2e}, "
          f"mask video {np.abs(mask_video - ref_mask).max():.2e} (max abs)")
    np.testing.assert_allclose(hole, ref_hole, atol=1e-6)
    np.testing.assert_array_equal(mask_video, ref_mask)


def test_minimax_bundle_conditioning_and_step(tmp_path):
    """MiniMax-Remover's folder (its transformer from the reference above, a
    diffusers AutoencoderKLWan, its scheduler config) converted as a bundle;
    for one clip and mask, the two condition latents (normalised with the
    VAE's latents_mean/std) and the DiT's velocity on [noise, both latents],
    ours through the bundle against the published pipeline's formulas in torch."""
    import vae_reference as vref
    from tiny_removers import UNIPC_CONFIG

    cfg = MINIMAX_TINY
    torch.manual_seed(0)
    model = MiniMaxTransformer(cfg["dim"], cfg["heads"], cfg["ffn"], cfg["layers"]).float().eval()
    randomize_(model, seed=5)
    folder = tmp_path / "minimax-remover"
    write_transformer_folder(model, folder / "transformer", cfg)
    vae = vref.make_vae(0, base_dim=8)
    vref.save_diffusers(vae, folder / "vae")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(UNIPC_CONFIG))
    out = tmp_path / "bundle"
    cli_ok(["convert", folder, "-o", out, "--dtype", "float32"])
    assert json.loads((out / "manifest.json").read_text())["remover"]["kind"] == "minimax"

    rng = np.random.default_rng(8)
    t, h, w = 9, 48, 64
    frames = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    mask = np.zeros((t, h, w), np.uint8)
    for i in range(t):
        mask[i, 12:30, 16 + 2 * i:40 + 2 * i] = 255
    ref_hole, ref_mask = reference_condition(frames, mask)
    ref_y = np.concatenate([vref.encode(vae, ref_hole[None]), vref.encode(vae, ref_mask[None])], axis=-1)

    our_vae = load_model(out / "vae")
    clip, plan = SimpleNamespace(masks=[mask], frames=frames), SimpleNamespace(size=(w, h), frames=t)
    y = grey_hole_channels(model_video(clip, plan), removal_mask(model_masks(clip, plan, MINIMAX), None, MINIMAX),
                           lambda x, what: our_vae.encode(x))
    cond_err = rel_err(np.array(y), ref_y)

    noise = rng.standard_normal((1, *ref_y.shape[1:4], 16)).astype(np.float32)
    x = np.concatenate([noise, ref_y], axis=-1)
    tt = np.array([999.0], np.float32)
    with torch.no_grad():
        ref_v = model(torch.from_numpy(x).permute(0, 4, 1, 2, 3), torch.from_numpy(tt)).permute(0, 2, 3, 4, 1).numpy()
    dit = load_model(out / "transformer")
    v = np.array(dit(mx.concatenate([mx.array(noise), y], axis=-1), mx.array(tt)))
    step_err = rel_err(v, ref_v)
    print(f"\nMiniMax-Remover bundle: condition latents {cond_err:.2e}, velocity {step_err:.2e} (max|mlx-ref|/max|ref|)")
    assert cond_err <= BOUND and step_err <= BOUND
